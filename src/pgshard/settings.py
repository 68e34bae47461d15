"""Every pgshard option in one frozen dataclass, resolved CLI > environment > ini > default.

One table (`OPTIONS`) drives both the pytest option registration and the resolution, so an option's
three spellings can never drift apart.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ServerKind = Literal["embedded", "url", "docker"]
SERVER_KINDS: tuple[ServerKind, ...] = ("embedded", "url", "docker")

# From the scheme to the *last* @ of the authority: an unencoded password may hold @, :, / or % itself
# (``p@ss:w/rd%40x``), and masking up to its first @ would print the rest. The host after that @ holds no @ or /.
_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>\S*?)(?P<tail>@)"
                              r"(?=[^@\s/?#]*(?:[/?#\s'\"),;]|$)(?![^\s]*@[^@\s/?#]*(?:[/?#\s'\"),;]|$)))", re.I)
_PASSWORD_IN_DSN = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'[^']*'|\S+)", re.I)


def mask_url(text: str) -> str:
    """Replace every password in URLs (and ``password=`` key/values) inside ``text`` with ``***``."""
    text = _PASSWORD_IN_URL.sub(lambda m: f"{m['head']}***{m['tail']}", text)
    return _PASSWORD_IN_DSN.sub(lambda m: f"{m['head']}***", text)


def database_url(server_url: str, name: str) -> str:
    """``server_url`` naming the database ``name`` (its password kept: to connect with, never to show)."""
    from sqlalchemy.engine import make_url

    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


class SettingsError(ValueError):
    """Bad option value; the message names the option to fix."""


@dataclass(frozen=True)
class Option:
    name: str  # attribute of Settings
    cli: str | None  # --flag
    env: str | None  # environment variable
    ini: str | None  # ini key
    kind: Literal["str", "bool", "lines", "int"]
    default: Any
    help: str


LINGER_LOCAL = 120  # a local edit-run loop finds the server warm; a CI job (CI set) leaves nothing behind

OPTIONS: tuple[Option, ...] = (
    Option("url", "--pg-url", "PGSHARD_URL", "pgshard_url", "str", None,
           "Use the PostgreSQL server at this URL (admin work goes through its 'postgres' database)."),
    Option("server", "--pg-server", "PGSHARD_SERVER", "pgshard_server", "str", None,
           "Where PostgreSQL comes from: embedded (default without a URL), url, docker."),
    Option("migrate", None, "PGSHARD_MIGRATE", "pgshard_migrate", "lines", (),
           "Template build steps, one per line: alembic:alembic.ini, metadata:pkg.models:Base, "
           "sql:migrations/, python:pkg.seed:main, command:python seed.py"),
    Option("fingerprint", None, "PGSHARD_FINGERPRINT", "pgshard_fingerprint", "lines", (),
           "Globs (relative to the rootdir) of files the template steps read: their names and contents "
           "are hashed into the template's fingerprint."),
    Option("env", None, "PGSHARD_ENV", "pgshard_env", "lines", (),
           "Env vars pointed at the current database, e.g. DATABASE_URL={url}, POSTGRES_DB={dbname}."),
    Option("app", None, "PGSHARD_APP", "pgshard_app", "str", None, "FastAPI app, module:attribute."),
    Option("get_db", None, "PGSHARD_GET_DB", "pgshard_get_db", "str", None,
           "The app's session dependency, module:attribute."),
    Option("sessionmaker", None, "PGSHARD_SESSIONMAKER", "pgshard_sessionmaker", "str", None,
           "The app's sessionmaker, module:attribute; rebound to the test's connection."),
    Option("engine", None, "PGSHARD_ENGINE", "pgshard_engine", "str", None,
           "The app's engine (sync or async), module:attribute: tests connect through it."),
    Option("redirect", None, "PGSHARD_REDIRECT", "pgshard_redirect", "lines", (),
           "Database names or shell-style globs (test_db_*), one per line: SQLAlchemy engines connecting to one "
           "land on this worker's database."),
    Option("base_url", None, "PGSHARD_BASE_URL", "pgshard_base_url", "str", "http://test",
           "Base URL of the client fixtures' requests, e.g. http://test/api for an app mounted under /api."),
    Option("lifespan", None, "PGSHARD_LIFESPAN", "pgshard_lifespan", "bool", True,
           "Run the app's lifespan (startup, shutdown) around each test's client, as `with TestClient(app)` does; "
           "false for an app whose startup reaches outside."),
    Option("async_driver", None, "PGSHARD_ASYNC_DRIVER", "pgshard_async_driver", "str", "psycopg",
           "Driver for async_db_session when the app has no async engine (set: overrides the app's): "
           "psycopg or asyncpg."),
    Option("rebuild", "--pg-rebuild", "PGSHARD_REBUILD", "pgshard_rebuild", "bool", False,
           "Rebuild the template even when one with the same fingerprint exists."),
    Option("keep", "--pg-keep", "PGSHARD_KEEP", "pgshard_keep", "bool", False,
           "Keep this run's databases after the run and print their URLs."),
    Option("shard", "--shard", "PGSHARD_SHARD", "pgshard_shard", "str", None,
           "Run only shard K of N (K/N) of the collected tests."),
    Option("store_durations", "--pg-store-durations", "PGSHARD_STORE_DURATIONS", None, "bool", False,
           "Record test durations for --shard balancing."),
    Option("durations_file", None, "PGSHARD_DURATIONS_FILE", "pgshard_durations_file", "str",
           ".test_durations", "Durations file used by --shard and --pg-store-durations (pytest-split's file and "
           "format: one file for both)."),
    Option("pg_bin", None, "PGSHARD_PG_BIN", "pgshard_pg_bin", "str", None,
           "Directory with initdb/pg_ctl/postgres for the embedded server."),
    Option("cache_dir", None, "PGSHARD_CACHE_DIR", "pgshard_cache_dir", "str", None,
           "Where the embedded server's data directory and locks live."),
    Option("compose_file", None, "PGSHARD_COMPOSE_FILE", "pgshard_compose_file", "str",
           "docker-compose.test.yml", "Compose file for --pg-server docker."),
    Option("prefix", None, "PGSHARD_PREFIX", "pgshard_prefix", "str", "pgshard",
           "Name prefix of every database pgshard creates."),
    Option("keep_templates", None, "PGSHARD_KEEP_TEMPLATES", "pgshard_keep_templates", "int", 3,
           "How many templates of older fingerprints to keep on the server."),
    Option("stale_ttl_hours", None, "PGSHARD_STALE_TTL_HOURS", "pgshard_stale_ttl_hours", "int", 24,
           "Age after which databases left by runs of other hosts are dropped."),
    Option("commit_pool", None, "PGSHARD_COMMIT_POOL", "pgshard_commit_pool", "int", 2,
           "How many fresh clones to keep ready for db_commit tests."),
    Option("build_timeout", None, "PGSHARD_BUILD_TIMEOUT", "pgshard_build_timeout", "int", 1800,
           "Seconds a template build may take before it is stopped (0: no limit); a line every 30 s while it runs."),
    Option("check", None, "PGSHARD_CHECK", "pgshard_check", "lines", (),
           "Checks of the migrations, run once per template build, one per line: heads (one Alembic head per "
           "branch), models:pkg.models:Base (the models match the migrated schema), downgrade (each revision's "
           "downgrade and upgrade leave its schema as it was)."),
    Option("check_mode", None, "PGSHARD_CHECK_MODE", "pgshard_check_mode", "str", "fail",
           "What a failed pgshard_check does: fail (one message, the run stops) or warn (the tests run)."),
    Option("linger", None, "PGSHARD_LINGER", "pgshard_linger", "int", None,
           f"Seconds the embedded server stays up after the last run (default {LINGER_LOCAL}, 0 when CI is set)."),
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_PREFIX = re.compile(r"^[a-z][a-z0-9_]{0,19}$")


@dataclass(frozen=True)
class Settings:
    url: str | None = field(default=None, repr=False)  # may hold a password: never in a repr
    server: ServerKind = "embedded"
    migrate: tuple[str, ...] = ()
    fingerprint: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    app: str | None = None
    get_db: str | None = None
    sessionmaker: str | None = None
    engine: str | None = None
    redirect: tuple[str, ...] = ()
    base_url: str = "http://test"
    lifespan: bool = True
    async_driver: str = "psycopg"
    rebuild: bool = False
    keep: bool = False
    shard: str | None = None
    store_durations: bool = False
    durations_file: Path = Path(".test_durations")
    pg_bin: str | None = None
    cache_dir: Path | None = None
    compose_file: Path = Path("docker-compose.test.yml")
    prefix: str = "pgshard"
    keep_templates: int = 3
    stale_ttl_hours: int = 24
    commit_pool: int = 2
    build_timeout: int = 1800
    check: tuple[str, ...] = ()
    check_mode: str = "fail"
    linger: int = 0
    rootdir: Path = field(default_factory=Path.cwd)
    explicit: frozenset[str] = frozenset()  # options the user set somewhere (not defaults)

    @property
    def configured(self) -> bool:
        """True when the project asked for pgshard (any option set), so the server starts eagerly."""
        return bool(self.explicit - {"store_durations", "shard"})

    @property
    def eager(self) -> bool:
        """True when the project's own code will use the database pgshard makes (its env, its migrations,
        its redirected engines): then a worker's database must exist before the project's first fixture,
        which may be a session-scoped autouse one that knows nothing of pgshard."""
        return bool(self.explicit & {"migrate", "env", "redirect"})


def _convert(opt: Option, raw: Any, source: str) -> Any:
    where = {"cli": opt.cli, "env": opt.env, "ini": opt.ini}[source] or opt.name
    if opt.kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise SettingsError(f"{where} must be true or false, got {raw!r}")
    if opt.kind == "int":
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise SettingsError(f"{where} must be a whole number, got {raw!r}") from None
        if value < 0:
            raise SettingsError(f"{where} must not be negative, got {raw!r}")
        return value
    if opt.kind == "lines":
        items = raw.splitlines() if isinstance(raw, str) else list(raw)
        return tuple(s.strip() for s in items if s.strip() and not s.strip().startswith("#"))
    text = str(raw).strip()
    return text or None


def resolve(
    cli: Mapping[str, Any],
    env: Mapping[str, str],
    ini: Callable[[str], Any],
    rootdir: Path,
) -> Settings:
    """Build Settings: a CLI value (not None) wins over the env var, which wins over the ini key."""
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    for opt in OPTIONS:
        raw: Any = None
        source = ""
        if opt.cli and cli.get(opt.name) not in (None, False):
            raw, source = cli[opt.name], "cli"
        elif opt.env and env.get(opt.env, "").strip():
            raw, source = env[opt.env], "env"
        elif opt.ini:
            ini_value = ini(opt.ini)
            if ini_value not in (None, "", [], ()):
                raw, source = ini_value, "ini"
        if source:
            values[opt.name] = _convert(opt, raw, source)
            explicit.add(opt.name)
        elif opt.default is not None:
            values[opt.name] = opt.default
    server = values.get("server")
    if server is None:
        server = "url" if values.get("url") else "embedded"
    if server not in SERVER_KINDS:
        raise SettingsError(f"--pg-server (PGSHARD_SERVER) must be one of {', '.join(SERVER_KINDS)}, got {server!r}")
    if server == "url" and not values.get("url"):
        raise SettingsError("--pg-server url needs --pg-url (or PGSHARD_URL / ini pgshard_url)")
    values["server"] = server
    if values.get("linger") is None:
        values["linger"] = 0 if env.get("CI", "").strip().lower() not in _FALSE else LINGER_LOCAL
    if not _PREFIX.match(values["prefix"]):
        raise SettingsError(
            f"pgshard_prefix must be lowercase letters, digits and _ (at most 20), got {values['prefix']!r}"
        )
    if values.get("async_driver") not in ("psycopg", "asyncpg"):
        raise SettingsError(f"pgshard_async_driver must be psycopg or asyncpg, got {values.get('async_driver')!r}")
    for key in ("durations_file", "compose_file", "cache_dir"):
        if values.get(key) is not None:
            path = Path(values[key]).expanduser()
            values[key] = path if path.is_absolute() else rootdir / path
    ours = ("postgres", "template0", "template1", f"{values['prefix']}_tpl_0", f"{values['prefix']}_0000_gw0")
    for name in values.get("redirect", ()):
        if any(fnmatch.fnmatchcase(db, name) for db in ours) or name.startswith(values["prefix"] + "_"):
            raise SettingsError(f"pgshard_redirect names the app's own databases (a name or a glob such as "
                                f"test_db_*), not {name!r}: it matches a maintenance database or one of pgshard's "
                                f"own ({values['prefix']}_...)")
    for line in values.get("check", ()):
        kind, _, target = line.partition(":")
        if line not in ("heads", "downgrade") and not (kind == "models" and ":" in target.strip()):
            raise SettingsError(f"pgshard_check line {line!r} must be one of: heads, models:pkg.models:Base, "
                                "downgrade")
    if values.get("check_mode") not in ("fail", "warn"):
        raise SettingsError(f"pgshard_check_mode must be fail or warn, got {values.get('check_mode')!r}")
    for line in values.get("env", ()):
        if "=" not in line or not line.split("=", 1)[0].strip():
            raise SettingsError(f"pgshard_env lines look like NAME=template, got {line!r}")
    return Settings(rootdir=rootdir, explicit=frozenset(explicit), **values)


def env_assignments(lines: Sequence[str], placeholders: Mapping[str, str]) -> dict[str, str]:
    """Expand ``NAME={url}`` lines of ``pgshard_env`` with the current database's placeholders."""
    out: dict[str, str] = {}
    for line in lines:
        name, template = line.split("=", 1)
        try:
            out[name.strip()] = template.strip().format_map(placeholders)
        except (KeyError, ValueError) as exc:
            known = ", ".join("{" + k + "}" for k in sorted(placeholders))
            raise SettingsError(
                f"pgshard_env line {line!r} uses an unknown placeholder {exc}; known: {known}") from None
    return out


def raised_at(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of the project's own code in ``exc``'s traceback (a migration,
    a seed script, a model), relative to the working directory (the rootdir); a SyntaxError's own spot."""
    import traceback as tb

    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{_relative(exc.filename)}:{exc.lineno}"
    outside = tuple(str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, str(Path(__file__).parent)})
    frames = [f for f in tb.extract_tb(exc.__traceback__)
              if not str(Path(f.filename).resolve()).startswith(outside) and not f.filename.startswith("<")]
    return f"{_relative(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""


def _relative(filename: str) -> str:
    path = Path(filename).resolve()
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd().resolve()))
    return str(path)


def import_object(target: str, option: str) -> Any:
    """Resolve ``module:attribute`` (dotted attribute allowed); errors name the option to fix."""
    import importlib

    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise SettingsError(f"{option} must look like module:attribute, got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # the module itself may raise anything at import
        where = raised_at(exc)
        at = f" at {where}" if where else ""
        raise SettingsError(f"{option}: cannot import {target} ({type(exc).__name__}: {exc}{at})") from None
    return obj


def passfile_passwords(passfile: str) -> list[str]:
    """The passwords in a libpq passfile (``host:port:db:user:password`` lines, ``\\:`` escaped); none
    when it cannot be read."""
    try:
        lines = Path(passfile).read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = re.split(r"(?<!\\):", line, maxsplit=4)
        if len(fields) == 5:
            found.append(fields[4].replace("\\:", ":").replace("\\\\", "\\"))
    return found


def url_endpoint(url: Any) -> tuple[str, int | None]:
    """Where a SQLAlchemy URL leads: host and port from its authority, else from its query as libpq reads
    them (``postgresql://u@/db?host=/run/pg&port=5433``: a socket directory; the first of a host list);
    ("", None) for what only a service file or libpq's defaults know."""
    def first(key: str) -> str:
        value = url.query.get(key, "")
        value = value[0] if isinstance(value, tuple) and value else value
        return str(value or "").split(",")[0]

    host = url.host or first("host")
    port = url.port if url.port is not None else first("port")
    try:
        return host, int(port) if port else None
    except ValueError:
        return host, None


def placeholders(url: str, password: str | None = None, scheme: str | None = None) -> dict[str, str]:
    """What a ``pgshard_env`` line may use, for the database at ``url`` (a SQLAlchemy URL). pgshard's URLs
    name a passfile instead of carrying a password; ``{password}`` is the real one all the same (``password``,
    else the passfile's), since an app that builds its URL from parts has no other way to log in. It never
    reaches output: every report is scrubbed of it (docs/reliability.md, "Secrets")."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    passfile = parsed.query.get("passfile", "")
    if password is None and isinstance(passfile, str) and passfile:
        password = next(iter(passfile_passwords(passfile)), None)
    return {  # {url}: the app's own driver (``scheme``, discover.url_driver), else psycopg 3
        "url": (parsed.set(drivername=scheme) if scheme else parsed).render_as_string(hide_password=False),
        "psycopg_url": parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False),
        "libpq_url": parsed.set(drivername="postgresql").render_as_string(hide_password=False),
        "psycopg2_url": parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False),
        "async_url": parsed.set(drivername="postgresql+psycopg_async").render_as_string(hide_password=False),
        "asyncpg_url": parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False),
        "dbname": parsed.database or "",
        "host": url_endpoint(parsed)[0],
        "port": str(url_endpoint(parsed)[1] or 5432),
        "user": parsed.username or "",
        "password": password if password is not None else str(parsed.password or ""),
        "passfile": passfile if isinstance(passfile, str) else passfile[0],
    }


@contextlib.contextmanager
def temporary_env(values: Mapping[str, str]) -> Iterator[None]:
    """Set env vars for the duration of a block, restoring (or removing) them after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
