"""--pg-server docker: driving compose (no Docker needed), and the readiness wait against a real server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from pgshard.server import base
from pgshard.server import docker as docker_mod
from pgshard.server.base import ServerError, ServerInfo, mask_url, to_libpq, wait_until_ready
from pgshard.server.docker import DEFAULT_URL, DockerComposeServer, default_project_name
from pgshard.server.embedded import EmbeddedServer
from tests.conftest import remove_cache

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.test.yml"

# --- a real PostgreSQL: the project's own embedded server --------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def pg_url(pg_server: ServerInfo) -> str:
    """SQLAlchemy URL (with a password, scram auth) of the running embedded server."""
    return pg_server.url


# --- base: URL helpers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+psycopg://pgshard:pgshard@127.0.0.1:5433/postgres",
            "postgresql+psycopg://pgshard:***@127.0.0.1:5433/postgres",
        ),
        ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
        ("postgres://u:hunter2@h:5432/d", "postgres://u:***@h:5432/d"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql:///db?host=/run/pg&password=hunter2", "postgresql:///db?host=/run/pg&password=***"),
        ("host=h password=hunter2 dbname=d", "host=h password=*** dbname=d"),
    ],
)
def test_mask_url_hides_the_password(url: str, expected: str) -> None:
    assert mask_url(url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+psycopg://pgshard:pgshard@127.0.0.1:5433/postgres",
            "postgresql://pgshard:pgshard@127.0.0.1:5433/postgres",
        ),
        ("postgresql+asyncpg://u:p%40ss@h/db", "postgresql://u:p%40ss@h/db"),
        ("postgresql://u@h:1/d?sslmode=require", "postgresql://u@h:1/d?sslmode=require"),
        ("postgres://u:p@h/d", "postgresql://u:p@h/d"),
        ("postgresql+psycopg://u@/db?host=/tmp/pg%20sock", "postgresql://u@/db?host=/tmp/pg%20sock"),
        ("postgresql+psycopg://u@[::1]:5432/d", "postgresql://u@[::1]:5432/d"),
        ("postgresql+psycopg:///d?host=a&host=b", "postgresql:///d?host=a&host=b"),
    ],
)
def test_to_libpq_drops_the_driver_and_keeps_query_parameters(url: str, expected: str) -> None:
    assert to_libpq(url) == expected


def test_to_libpq_output_is_read_back_by_libpq_unchanged() -> None:
    url = "postgresql+psycopg://us%20er:p%20w%2Bx%40%3A%2F@/my%20db?host=/tmp/pg%20sock&application_name=a+b"
    params = psycopg.conninfo.conninfo_to_dict(to_libpq(url))
    # libpq must get the database SQLAlchemy's own engine would connect to: 2.1 decodes %20 in the
    # database name, 2.0 keeps it as written ('my%20db').
    assert params == {
        "user": "us er",
        "password": "p w+x@:/",
        "dbname": make_url(url).database,
        "host": "/tmp/pg sock",
        "application_name": "a b",
    }


@pytest.mark.parametrize("url", ["mysql://u:hunter2@h/db", "not a url", "postgresql://u:hunter2@h:port/db"])
def test_to_libpq_rejects_what_is_not_a_postgresql_url_naming_the_option(url: str) -> None:
    with pytest.raises(ServerError, match="--pg-url") as excinfo:
        to_libpq(url)
    assert "hunter2" not in str(excinfo.value)


def test_server_error_is_one_masked_line() -> None:
    error = ServerError("cannot reach postgresql://u:hunter2@h/db\nsecond line")
    assert str(error) == "cannot reach postgresql://u:***@h/db second line"
    assert isinstance(error, RuntimeError)


# --- base: readiness, against a real server ------------------------------------------------------------


def test_wait_until_ready_returns_once_the_server_answers(pg_url: str) -> None:
    started = time.monotonic()
    wait_until_ready(pg_url, timeout=10)
    assert time.monotonic() - started < 5


def test_wait_until_ready_waits_for_a_server_that_is_still_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[str] = []
    real_connect = psycopg.connect

    def spy(*args: Any, **kwargs: Any) -> psycopg.Connection[Any]:
        try:
            conn = real_connect(*args, **kwargs)
        except psycopg.OperationalError:
            attempts.append("refused")
            raise
        attempts.append("ok")
        return conn

    cache = Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()) / (
        f"pgshard-starting-{uuid.uuid4().hex[:8]}")  # pgshard creates it: a mkdtemp dir is 0700
    server = EmbeddedServer(cache_dir=cache)
    server.acquire()  # initdb once, learn the port, then stop it again
    server.release()
    url = server.url(int(str(server._secret()["port"])))
    failures: list[BaseException] = []

    def start() -> None:
        try:
            server.acquire()
        except BaseException as exc:
            failures.append(exc)

    starter = threading.Thread(target=start)
    try:
        monkeypatch.setattr(psycopg, "connect", spy)
        starter.start()
        try:
            wait_until_ready(url, timeout=30)  # while the server is still starting: must retry until it accepts
        except ServerError:
            starter.join()
            assert not failures, failures  # the starting side's own error explains a time-out best
            raise
        monkeypatch.undo()
        assert attempts[-1] == "ok"
        assert "refused" in attempts, "the first attempts hit a server that was not listening yet"
        with psycopg.connect(to_libpq(url)) as conn:
            assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    finally:
        starter.join()
        server.release()
        remove_cache(cache)


def test_wait_until_ready_on_a_closed_port_times_out_with_the_password_masked() -> None:
    url = f"postgresql+psycopg://pgshard:topsecret@127.0.0.1:{_free_port()}/postgres"
    started = time.monotonic()
    with pytest.raises(ServerError) as excinfo:
        wait_until_ready(url, timeout=0.5)
    elapsed = time.monotonic() - started
    message = str(excinfo.value)
    assert "topsecret" not in message
    assert "pgshard:***@127.0.0.1" in message
    assert "not ready after 0.5s" in message
    assert "\n" not in message
    assert 0.5 <= elapsed < 5


def test_wait_until_ready_fails_at_once_on_a_wrong_password(pg_url: str) -> None:
    wrong = make_url(pg_url).set(password="wrong-pw").render_as_string(hide_password=False)
    started = time.monotonic()
    with pytest.raises(ServerError, match="password authentication failed") as excinfo:
        wait_until_ready(wrong, timeout=20)
    assert time.monotonic() - started < 5, "waiting cannot fix a wrong password"
    assert "wrong-pw" not in str(excinfo.value)


def test_wait_until_ready_fails_at_once_on_a_missing_database(pg_url: str) -> None:
    missing = make_url(pg_url).set(database="no_such_db").render_as_string(hide_password=False)
    started = time.monotonic()
    with pytest.raises(ServerError, match="no_such_db"):
        wait_until_ready(missing, timeout=20)
    assert time.monotonic() - started < 5


# --- docker compose commands (no Docker needed) ---------------------------------------------------------


def done(
    cmd: Sequence[str], returncode: int = 0, stdout: str = "", stderr: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(list(cmd), returncode, stdout, stderr)


class FakeRunner:
    """Records commands; answers from ``results`` keyed by the compose subcommand (``up``, ``ps`` ...)."""

    def __init__(self, events: list[str] | None = None, **results: subprocess.CompletedProcess[str]) -> None:
        self.calls: list[list[str]] = []
        self.events = events if events is not None else []
        self.results = results

    def __call__(self, cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(cmd))
        sub = next((word for word in ("version", "up", "down", "ps") if word in cmd), "?")
        self.events.append(sub)
        return self.results.get(sub, done(cmd))


def fake_which(monkeypatch: pytest.MonkeyPatch, **binaries: str) -> None:
    table = {name.replace("_", "-"): path for name, path in binaries.items()}
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: table.get(name))


def make_server(run: FakeRunner, url: str = DEFAULT_URL) -> DockerComposeServer:
    return DockerComposeServer(COMPOSE_FILE, "myproj", url=url, run=run)


def test_compose_command_prefers_the_docker_compose_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_which(monkeypatch, docker="/usr/bin/docker", docker_compose="/usr/bin/docker-compose")
    run = FakeRunner()
    server = make_server(run)
    assert server.compose_command() == ["/usr/bin/docker", "compose"]
    assert run.calls == [["/usr/bin/docker", "compose", "version"]]
    server.compose_command()
    assert len(run.calls) == 1, "the probe runs once"


def test_compose_command_falls_back_to_the_docker_compose_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_which(monkeypatch, docker_compose="/usr/local/bin/docker-compose")
    run = FakeRunner()
    assert make_server(run).compose_command() == ["/usr/local/bin/docker-compose"]
    assert run.calls == []


def test_docker_without_the_compose_plugin_falls_back_to_docker_compose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_which(monkeypatch, docker="/usr/bin/docker", docker_compose="/usr/bin/docker-compose")
    run = FakeRunner(version=done([], 1, stderr="docker: unknown command: docker compose"))
    assert make_server(run).compose_command() == ["/usr/bin/docker-compose"]


def test_no_compose_at_all_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_which(monkeypatch, docker="/usr/bin/docker")
    run = FakeRunner(version=done([], 1, stderr="Usage: ...\ndocker: unknown command: docker compose\n"))
    with pytest.raises(ServerError) as excinfo:
        make_server(run).compose_command()
    message = str(excinfo.value)
    assert "--pg-server docker" in message
    assert "docker: unknown command: docker compose" in message
    assert "\n" not in message


def test_up_down_and_ps_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_which(monkeypatch, docker="/usr/bin/docker")
    server = make_server(FakeRunner())
    head = ["/usr/bin/docker", "compose", "-f", str(COMPOSE_FILE), "-p", "myproj"]
    assert server.up_command() == [*head, "up", "-d", "--wait"]
    assert server.down_command() == [*head, "down", "-v", "--remove-orphans"]
    assert server.ps_command() == [*head, "ps", "--status", "running", "-q"]


def test_legacy_binary_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_which(monkeypatch, docker_compose="/opt/docker-compose")
    server = make_server(FakeRunner())
    assert server.up_command() == [
        "/opt/docker-compose",
        "-f",
        str(COMPOSE_FILE),
        "-p",
        "myproj",
        "up",
        "-d",
        "--wait",
    ]


def test_project_name_must_be_one_compose_accepts() -> None:
    with pytest.raises(ValueError, match="project name"):
        DockerComposeServer(COMPOSE_FILE, "My Project", run=FakeRunner())


def test_default_project_name_is_the_one_compose_would_pick(tmp_path: Path) -> None:
    folder = tmp_path / "My.App_2"
    folder.mkdir()
    assert default_project_name(folder / "docker-compose.test.yml") == "myapp_2"


def test_start_runs_up_then_waits_for_readiness(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_which(monkeypatch, docker="/usr/bin/docker")
    events: list[str] = []
    monkeypatch.setattr(docker_mod, "wait_until_ready", lambda url, timeout: events.append(f"wait {url}"))
    run = FakeRunner(events)
    make_server(run).start(timeout=5)
    assert events == ["version", "ps", "up", f"wait {DEFAULT_URL}"]


def test_start_returns_once_the_real_server_answers(monkeypatch: pytest.MonkeyPatch, pg_url: str) -> None:
    fake_which(monkeypatch, docker="/usr/bin/docker")
    server = make_server(FakeRunner(), url=pg_url)
    server.start(timeout=10)
    assert not server.reused


def test_failing_up_is_one_server_error_line_naming_the_compose_file(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_which(monkeypatch, docker="/usr/bin/docker")
    stderr = (
        " Container myproj-postgres-1  Starting\n"
        "Error response from daemon: Bind for 127.0.0.1:5433 failed: port is already allocated\n\n"
    )
    events: list[str] = []
    monkeypatch.setattr(docker_mod, "wait_until_ready", lambda url, timeout: events.append("wait"))
    run = FakeRunner(events, up=done([], 1, stderr=stderr))
    with pytest.raises(ServerError) as excinfo:
        make_server(run).start()
    message = str(excinfo.value)
    assert "\n" not in message
    assert "up failed" in message
    assert str(COMPOSE_FILE) in message
    assert message.endswith("Bind for 127.0.0.1:5433 failed: port is already allocated")
    assert events == ["version", "ps", "up", "down"], "no wait; the half-started project is taken down"


def test_start_fails_clearly_when_the_server_never_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_which(monkeypatch, docker="/usr/bin/docker")
    run = FakeRunner()
    url = f"postgresql+psycopg://pgshard:topsecret@127.0.0.1:{_free_port()}/postgres"
    with pytest.raises(ServerError, match=r"not ready after") as excinfo:
        make_server(run, url=url).start(timeout=0.5)
    assert "topsecret" not in str(excinfo.value)
    assert run.calls[-1][-3:] == ["down", "-v", "--remove-orphans"]


def test_a_project_that_was_already_running_is_not_taken_down_on_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_which(monkeypatch, docker="/usr/bin/docker")
    events: list[str] = []
    monkeypatch.setattr(docker_mod, "wait_until_ready", lambda url, timeout: events.append("wait"))
    run = FakeRunner(events, ps=done([], 0, stdout="3f2a1b\n"), up=done([], 1, stderr="boom"))
    server = make_server(run)
    with pytest.raises(ServerError):
        server.start()
    assert server.reused
    assert "down" not in events


def test_missing_compose_file_names_the_option(tmp_path: Path) -> None:
    server = DockerComposeServer(tmp_path / "nope.yml", "myproj", run=FakeRunner())
    with pytest.raises(ServerError, match="pgshard_compose_file"):
        server.start()


def test_stop_runs_down_and_reports_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_which(monkeypatch, docker="/usr/bin/docker")
    run = FakeRunner()
    make_server(run).stop()
    assert run.calls[-1][-3:] == ["down", "-v", "--remove-orphans"]
    failing = FakeRunner(down=done([], 1, stderr="Cannot connect to the Docker daemon"))
    with pytest.raises(ServerError, match=r"down failed .*Cannot connect to the Docker daemon$"):
        make_server(failing).stop()


def test_runner_that_cannot_execute_becomes_a_server_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_which(monkeypatch, docker_compose="/gone/docker-compose")

    def run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    with pytest.raises(ServerError, match="could not run"):
        DockerComposeServer(COMPOSE_FILE, "myproj", run=run).stop()


def test_repr_masks_the_password() -> None:
    assert "pgshard:***@" in repr(DockerComposeServer(COMPOSE_FILE, "p", run=FakeRunner()))


def test_default_runner_captures_text_output() -> None:
    proc = docker_mod._run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")


def test_docker_server_lease_does_not_stop_a_project_it_reused(
    monkeypatch: pytest.MonkeyPatch, pg_url: str
) -> None:
    from pgshard.settings import Settings

    fake_which(monkeypatch, docker="/usr/bin/docker")
    run = FakeRunner(ps=done([], 0, stdout="abc\n"))
    lease = docker_mod.docker_server(
        Settings(server="docker", url=pg_url, compose_file=COMPOSE_FILE), run=run
    )
    assert lease.info.major >= 10
    assert "s3cr3t" not in lease.info.masked_url
    lease.release()
    assert not any("down" in call for call in run.calls)

    fresh = FakeRunner()
    docker_mod.docker_server(
        Settings(server="docker", url=pg_url, compose_file=COMPOSE_FILE), run=fresh
    ).release()
    assert fresh.calls[-1][-3:] == ["down", "-v", "--remove-orphans"]


# --- the compose file ----------------------------------------------------------------------------------


def test_compose_file_pins_a_tuned_throwaway_server() -> None:
    text = COMPOSE_FILE.read_text()
    for needle in (
        "image: postgres:16-alpine",
        "POSTGRES_USER: pgshard",
        "POSTGRES_PASSWORD: pgshard",
        "POSTGRES_DB: postgres",
        '"127.0.0.1:5433:5432"',
        "- /var/lib/postgresql/data",
        "fsync=off",
        "synchronous_commit=off",
        "full_page_writes=off",
        "max_connections=200",
        "pg_isready",
        "interval: 1s",
    ):
        assert needle in text, needle
    assert DEFAULT_URL == "postgresql+psycopg://pgshard:pgshard@127.0.0.1:5433/postgres"


def test_base_exports() -> None:
    assert set(base.__all__) >= {"ServerError", "mask_url", "to_libpq", "wait_until_ready"}
