"""The only place that issues CREATE / DROP / ALTER DATABASE.

Every database pgshard creates carries an ownership marker (a COMMENT starting with ``pgshard:``, holding
the host, pid, start time and run id of its creator). Nothing without that marker and our name prefix is
ever dropped or altered: that is the guarantee that pgshard cannot lose a user's data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgshard.host import host_identity, identity_alive, process_identity
from pgshard.server.base import ServerError, connect

if TYPE_CHECKING:  # psycopg is imported where a connection is made: an xdist controller needs none
    import psycopg
    from psycopg import sql


@dataclass(frozen=True)
class CloneMethod:
    """How CREATE DATABASE ... TEMPLATE copies: its STRATEGY, and (PostgreSQL 18) file_copy_method."""

    strategy: str | None  # None: the server has no STRATEGY option (PostgreSQL < 15)
    file_copy: str | None = None  # "clone": FILE_COPY by reflink, a cost that does not grow with the template

    @property
    def label(self) -> str:
        if self.file_copy == "clone":
            return "reflink"
        return self.strategy or "file copy"


MARKER_PREFIX = "pgshard:"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class NotOurs(RuntimeError):
    """Refused to touch a database pgshard did not create."""


@dataclass(frozen=True)
class Marker:
    kind: str  # "template", "build", "clone"
    run: str = ""
    host: str = field(default_factory=host_identity)
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    fingerprint: str = ""
    project: str = ""  # templates: whose pgshard_keep_templates counts them ("": built by an older pgshard)
    checks: tuple[str, ...] = ()  # templates: the pgshard_check lines run on it (verify.py) ...
    checked_at: float = 0.0  # ... when, and how long they took
    check_seconds: float = 0.0
    findings: tuple[str, ...] = ()  # what failed checks found (pgshard_check_mode = warn sealed it anyway)

    def render(self) -> str:
        return MARKER_PREFIX + json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def parse(cls, comment: str | None) -> Marker | None:
        if not comment or not comment.startswith(MARKER_PREFIX):
            return None
        try:
            data = json.loads(comment[len(MARKER_PREFIX):])
            fields = ("kind", "run", "host", "pid", "started", "fingerprint", "project", "checks", "checked_at",
                      "check_seconds", "findings")
            found: dict[str, Any] = {k: tuple(data[k]) if isinstance(data[k], list) else data[k]
                                     for k in fields if k in data}
            return cls(**found)
        except (ValueError, TypeError):
            return None


@dataclass(frozen=True)
class DatabaseInfo:
    name: str
    marker: Marker | None
    is_template: bool
    allow_connections: bool
    size_bytes: int
    connections: int


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"invalid database name {name!r}: lowercase letters, digits and _, at most 63")
    return name


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")


def lock_key(text: str) -> int:
    """A stable signed 64-bit advisory-lock key for a string."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


def intents_dir(cache_dir: Path, url: str) -> Path:
    """Where this machine notes, per server, the databases it is creating: CREATE DATABASE and the COMMENT
    that marks it ours are two statements, and a kill between them leaves a database no marker claims."""
    from sqlalchemy.engine import make_url

    from pgshard.settings import url_endpoint

    parsed = make_url(url)
    host, port = url_endpoint(parsed)
    key = hashlib.sha256(f"{host}:{port}:{parsed.query.get('service', '')}".encode()).hexdigest()[:12]
    return cache_dir / "creating" / key


class Admin:
    """Admin work over one autocommit connection to the maintenance database. ``intents``: the directory
    (intents_dir) where each CREATE is noted until its marker is written; None notes nothing."""

    def __init__(self, url: str, prefix: str, intents: Path | None = None) -> None:
        self.url = url
        self.prefix = prefix
        self.intents = intents
        self._conn: psycopg.Connection | None = None

    def sibling(self) -> Admin:
        """Another connection to the same server, noting its creations in the same place."""
        return Admin(self.url, self.prefix, self.intents)

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url)
        return self._conn

    def lost(self) -> bool:
        """The server ended this connection (a backend terminated, a restart): a new one may do the work."""
        return self._conn is not None and self._conn.closed

    def discard(self, name: str) -> None:
        """Drop what a lost attempt to create ``name`` (one of the caller's own names) may have left, marked
        or not (it was noted before its CREATE, so it is claimed on that proof)."""
        found = self.info(name)
        if found is None:
            return
        if found.marker is None:
            if self.intents is None or not (self.intents / name).exists():
                raise NotOurs(f"database {name} was not created by pgshard (no ownership marker); left untouched")
            self.mark(name, Marker("clone", "lost"))
        self.drop(name, force=True)
        if self.intents is not None:
            (self.intents / name).unlink(missing_ok=True)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def cancel(self) -> None:
        """Cancel the statement this connection runs (safe from another thread); nothing when none."""
        if self._conn is not None and not self._conn.closed:
            with contextlib.suppress(Exception):
                self._conn.cancel()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------
    def in_namespace(self, name: str) -> bool:
        """``prefix_...`` exactly: prefix ``pgshard`` must not claim ``pgshardx_tpl_1`` or ``pgsharded_prod``."""
        return name.startswith(self.prefix + "_")

    def databases(self, name: str | None = None, *, sizes: bool = False) -> list[DatabaseInfo]:
        """pgshard's databases on this server (``prefix_`` names), with their markers, or the one
        ``name``. Sizes only on request: each one walks the database's directory, which every run
        start would pay for."""
        size = "coalesce(pg_database_size(d.oid), 0)" if sizes else "0"  # NULL while a concurrent DROP runs
        if name is None:  # LIKE with _ and % escaped: the prefix's own characters match only themselves
            where, arg = "d.datname LIKE %s", _like_escape(self.prefix + "_") + "%"
        else:
            where, arg = "d.datname = %s", name
        rows = self._read(
            f"""SELECT d.datname, shobj_description(d.oid, 'pg_database'), d.datistemplate, d.datallowconn,
                      {size}, (SELECT count(*) FROM pg_stat_activity a WHERE a.datid = d.oid)
               FROM pg_database d WHERE {where} ORDER BY d.datname""",
            (arg,),
        )
        return [DatabaseInfo(r[0], Marker.parse(r[1]), r[2], r[3], int(r[4]), int(r[5])) for r in rows]

    def others(self) -> set[str]:
        """The names of the databases on this server outside pgshard's namespace and the maintenance ones that
        no pgshard made: another prefix's runs (another project sharing the server) mark theirs, or noted them
        in the same cache dir while their marker is not written yet."""
        rows = self._read(
            "SELECT datname FROM pg_database WHERE datname NOT LIKE %s "
            "AND datname NOT IN ('postgres', 'template0', 'template1') "
            "AND coalesce(shobj_description(oid, 'pg_database'), '') NOT LIKE %s",
            (_like_escape(self.prefix + "_") + "%", _like_escape(MARKER_PREFIX) + "%"),
        )
        names = {str(r[0]) for r in rows}
        if self.intents is not None and names:
            with contextlib.suppress(OSError):
                names -= {path.name for path in self.intents.iterdir()}
        return names

    def info(self, name: str) -> DatabaseInfo | None:
        found = self.databases(name)
        return found[0] if found else None

    def exists(self, name: str) -> bool:
        return bool(self._read("SELECT 1 FROM pg_database WHERE datname = %s", (name,)))

    def setting(self, name: str) -> str:
        return str(self._read("SELECT current_setting(%s)", (name,))[0][0])

    def read(self, query: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        """A catalog read of the caller's (no write), made like Admin's own."""
        return self._read(query, params)

    def _read(self, query: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        """A read (nothing it does can be half done): once more on a new connection when the server ended this
        one meanwhile (a test that terminated every other backend, while this process had nothing to do)."""
        from psycopg import OperationalError

        try:
            return self.conn.execute(query, params).fetchall()
        except OperationalError:
            if not self.lost():
                raise
        return self.conn.execute(query, params).fetchall()

    # -- writing (our databases only) ----------------------------------------------------------
    def _ours(self, name: str) -> DatabaseInfo:
        check_name(name)
        found = self.info(name)
        if found is None:
            raise NotOurs(f"database {name} does not exist")
        if not self.in_namespace(name) or found.marker is None:
            raise NotOurs(f"database {name} was not created by pgshard (no ownership marker); left untouched")
        return found

    def create(self, name: str, marker: Marker, *, template: str | None = None, method: CloneMethod | None = None
               ) -> float:
        """CREATE DATABASE (from ``template`` when given) and mark it ours. Returns seconds taken."""
        check_name(name)
        if not self.in_namespace(name):
            raise ValueError(f"database name {name} must start with the prefix {self.prefix}_")
        from psycopg import sql

        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
            if method is not None and method.strategy:
                query += sql.SQL(" STRATEGY {}").format(sql.SQL(method.strategy))
        started = time.perf_counter()
        intent = self._intend(name)
        try:
            if method is not None and method.file_copy:  # this session only (PostgreSQL 18: a user setting)
                self.conn.execute(sql.SQL("SET file_copy_method = {}").format(sql.Literal(method.file_copy)))
            self._create(query, template)
        except BaseException:
            if intent is not None:
                intent.unlink(missing_ok=True)
            raise
        try:
            self.mark(name, marker)
        except BaseException:  # the database exists unmarked: the note stays for abandoned() to find
            intent = None
            raise
        finally:
            if intent is not None:
                intent.unlink(missing_ok=True)
        return time.perf_counter() - started

    def _intend(self, name: str) -> Path | None:
        if self.intents is None:
            return None
        try:
            self.intents.mkdir(parents=True, exist_ok=True)
            path = self.intents / name
            path.write_text(f"{host_identity()} {process_identity()}\n")
        except OSError:  # a cache dir that cannot be written: the marker still comes a moment later
            return None
        return path

    def abandoned(self) -> list[str]:
        """Drop the databases that a process of this machine created and was killed before it could mark
        (its note names it and the process is gone), after marking them: a database is claimed only on
        that proof, never because its name looks like ours. Returns their names."""
        if self.intents is None or not self.intents.is_dir():
            return []
        dropped = []
        for path in sorted(self.intents.iterdir()):
            try:
                host, identity = path.read_text().split()
            except (OSError, ValueError):
                continue
            if host != host_identity() or identity_alive(identity):
                continue
            name = path.name
            with contextlib.suppress(Exception):
                found = self.info(name) if _NAME.match(name) and self.in_namespace(name) else None
                if found is not None and found.marker is None:
                    self.discard(name)  # claimed on the note's proof, then dropped like any of ours
                    dropped.append(name)
                path.unlink(missing_ok=True)
        return dropped

    def _create(self, query: sql.Composed, template: str | None) -> None:
        from psycopg import errors

        try:
            self.conn.execute(query)
        except errors.ObjectInUse as exc:
            raise ServerError(f"cannot clone {template}: someone is connected to it ({exc.diag.message_detail or exc})"
                              ) from None
        except errors.InvalidCatalogName:
            if not template:
                raise
            raise ServerError(f"cannot clone {template}: it no longer exists (dropped by `pgshard clean --all` or "
                              "another project's template collection while this run started); run again") from None
        except (errors.UndefinedFile, errors.DataCorrupted, errors.IoError) as exc:
            if not template:
                raise
            raise ServerError(f"template {template} is damaged ({exc.diag.message_primary or exc}): rebuild it with "
                              "--pg-rebuild, or on the embedded server remove its whole cache with "
                              "`pgshard clean --server`") from None

    def files_missing(self, name: str) -> bool:
        """Whether the database's directory is gone from the data directory (a damaged cache: cloning it
        "succeeds" and every connection then fails). Needs pg_stat_file, which a plain role may not call:
        then we cannot tell, and say no."""
        from psycopg import errors

        try:
            rows = self._read("SELECT (pg_stat_file('base/' || oid, true)).isdir FROM pg_database "
                              "WHERE datname = %s", (name,))
        except errors.InsufficientPrivilege:
            return False
        return bool(rows) and rows[0][0] is None

    def mark(self, name: str, marker: Marker) -> None:
        from psycopg import sql

        self.conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name),
                                                                         sql.Literal(marker.render())))

    def drop(self, name: str, *, force: bool = False) -> bool:
        """Drop one of our databases; False when it is already gone."""
        try:
            found = self._ours(name)
        except NotOurs:
            if not self.exists(name):
                return False
            raise
        from psycopg import errors, sql

        if found.is_template:
            self.conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(sql.Identifier(name)))
        query = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
        if force:
            with contextlib.suppress(errors.InsufficientPrivilege):  # then DROP says so itself
                self._end_sessions(name)
            query += sql.SQL(" WITH (FORCE)")
        self.conn.execute(query)
        return True

    def rename(self, old: str, new: str) -> None:
        self._ours(old)
        check_name(new)
        from psycopg import sql

        self.conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))

    def seal(self, name: str) -> None:
        """Make it a template nobody can connect to (a connection would block every clone)."""
        self._ours(name)
        from psycopg import sql

        self.conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false")
                          .format(sql.Identifier(name)))

    def terminate(self, name: str) -> None:
        """End the sessions left on one of our databases (e.g. by a migration's own engine)."""
        self._ours(name)
        self._end_sessions(name)

    def _end_sessions(self, name: str, wait: float = 5.0) -> None:
        """Terminate every other session on ``name`` and wait until they are gone. The server's own wait
        (DROP ... WITH (FORCE), CREATE DATABASE ... TEMPLATE) sleeps 100 ms at a time while one of them is
        still exiting, and one always is right after its client left: an app engine's pooled connection
        at the end of every run. Polling here costs a millisecond or two instead."""
        others = "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
        self.conn.execute(f"SELECT pg_terminate_backend(pid) {others}", (name,))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            row = self.conn.execute(f"SELECT count(*) {others}", (name,)).fetchone()
            if row is None or row[0] == 0:
                return
            time.sleep(0.001)

    @contextlib.contextmanager
    def advisory_lock(self, key: str, *, shared: bool = False) -> Iterator[None]:
        """A server-wide lock (session level): serialises runs on different machines sharing a server.
        ``shared``: many holders at once, excluded only by an exclusive holder (clones vs. a rebuild)."""
        number = lock_key(key)
        suffix = "_shared" if shared else ""
        self.conn.execute(f"SELECT pg_advisory_lock{suffix}(%s)", (number,))
        try:
            yield
        finally:
            if self._conn is not None and not self._conn.closed:  # a lost connection took its locks with it
                self._conn.execute(f"SELECT pg_advisory_unlock{suffix}(%s)", (number,))
