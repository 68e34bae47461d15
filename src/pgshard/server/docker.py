"""``--pg-server docker``: PostgreSQL from ``docker compose`` and the project's docker-compose.test.yml.

For teams that already pin their server in a compose file. The command runner is injectable, so how
commands are built and how failures read is tested without Docker; readiness is checked over a real
connection (``wait_until_ready``) because a healthy container is not yet a reachable port.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pgshard.server.base import ServerError, ServerLease, mask_url, wait_until_ready

if TYPE_CHECKING:
    from pgshard.settings import Settings

__all__ = ["DEFAULT_URL", "DockerComposeServer", "Runner", "default_project_name", "docker_server"]

DEFAULT_URL = "postgresql+psycopg://pgshard:pgshard@127.0.0.1:5433/postgres"

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]

_PROJECT_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    for stream in (proc.stderr, proc.stdout):
        lines = [line.strip() for line in (stream or "").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return "(no output)"


def default_project_name(compose_file: Path) -> str:
    """The name ``docker compose`` itself would pick (the file's directory, normalised).

    Using the same name means a server the user already brought up by hand is found and reused
    rather than clashing with ours over the same port.
    """
    name = re.sub(r"[^a-z0-9_-]", "", compose_file.resolve().parent.name.lower()).lstrip("_-")
    return name or "pgshard"


class DockerComposeServer:
    """One compose project: ``up -d --wait``, a real readiness check, ``down -v`` (data is on tmpfs)."""

    def __init__(
        self,
        compose_file: Path,
        project_name: str,
        url: str = DEFAULT_URL,
        run: Runner = _run,
    ) -> None:
        if not _PROJECT_RE.fullmatch(project_name):
            raise ValueError(
                "docker compose project name must be lowercase letters, digits, '-' and '_', "
                f"got {project_name!r}"
            )
        self.compose_file = Path(compose_file)
        self.project_name = project_name
        self.url = url
        self._run = run
        self._compose: list[str] | None = None
        self.reused = False  # the project was already running before start(): not ours to take down

    def compose_command(self) -> list[str]:
        """``docker compose`` (the v2 plugin) when it works, else a ``docker-compose`` binary.

        ``docker`` on PATH does not prove the plugin is installed, so ``docker compose version`` is asked.
        """
        if self._compose is not None:
            return list(self._compose)
        docker = shutil.which("docker")
        plugin_problem = "docker is not on PATH"
        if docker is not None:
            try:
                probe = self._run([docker, "compose", "version"])
            except OSError as exc:
                plugin_problem = f"`docker compose version` could not run: {exc}"
            else:
                if probe.returncode == 0:
                    self._compose = [docker, "compose"]
                    return list(self._compose)
                plugin_problem = f"`docker compose version` failed: {_last_line(probe)}"
        legacy = shutil.which("docker-compose")
        if legacy is not None:
            self._compose = [legacy]
            return list(self._compose)
        raise ServerError(
            f"--pg-server docker needs Docker Compose (`docker compose` or `docker-compose`) on PATH; "
            f"{plugin_problem} and there is no docker-compose binary. "
            "Install Compose, or use --pg-server embedded"
        )

    def _project_args(self) -> list[str]:
        return [*self.compose_command(), "-f", str(self.compose_file), "-p", self.project_name]

    def up_command(self) -> list[str]:
        return [*self._project_args(), "up", "-d", "--wait"]

    def down_command(self) -> list[str]:
        return [*self._project_args(), "down", "-v", "--remove-orphans"]

    def ps_command(self) -> list[str]:
        return [*self._project_args(), "ps", "--status", "running", "-q"]

    def _call(self, what: str, cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        try:
            proc = self._run(cmd)
        except OSError as exc:
            raise ServerError(f"docker compose {what} could not run for {self.compose_file}: {exc}") from exc
        if proc.returncode != 0:
            raise ServerError(
                f"docker compose {what} failed for {self.compose_file} "
                f"(exit {proc.returncode}): {_last_line(proc)}"
            )
        return proc

    def _running(self) -> bool:
        try:
            proc = self._run(self.ps_command())
        except OSError:
            return False
        return proc.returncode == 0 and bool(proc.stdout.strip())

    def start(self, timeout: float = 60) -> None:
        """Bring the project up and return once PostgreSQL answers at ``url``.

        ``timeout`` bounds the whole start; the readiness wait gets what ``up`` left (at least a second).
        If a project we started fails, it is taken down again so no half-started container lingers.
        """
        if not self.compose_file.is_file():
            raise ServerError(
                f"compose file {self.compose_file} not found; "
                "set pgshard_compose_file (or PGSHARD_COMPOSE_FILE)"
            )
        deadline = time.monotonic() + timeout
        self.reused = self._running()
        try:
            self._call("up", self.up_command())
            wait_until_ready(self.url, max(deadline - time.monotonic(), 1.0))
        except ServerError:
            if not self.reused:
                with contextlib.suppress(OSError):
                    self._run(self.down_command())
            raise

    def stop(self) -> None:
        """Take the project down, volumes included."""
        self._call("down", self.down_command())

    def __repr__(self) -> str:
        return (
            f"DockerComposeServer(compose_file={str(self.compose_file)!r}, "
            f"project_name={self.project_name!r}, url={mask_url(self.url)!r})"
        )


def docker_server(settings: Settings, *, run: Runner = _run) -> ServerLease:
    """Start (or reuse) the compose project for a run; releasing the lease stops only what we started."""
    from pgshard.server.base import describe, sqlalchemy_url

    server = DockerComposeServer(
        settings.compose_file,
        default_project_name(settings.compose_file),
        url=sqlalchemy_url(settings.url or DEFAULT_URL, database="postgres"),
        run=run,
    )
    server.start()
    info = describe(server.url, f"docker compose ({settings.compose_file})")

    def release() -> None:
        if not server.reused:
            server.stop()

    return ServerLease(info, release)
