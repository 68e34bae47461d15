"""What pgshard has on a server, for ``pgshard status`` and ``pgshard clean``: our databases with what can be
told of their owners, the status report's lines, and which of them ``clean --all`` may drop. No SQL of its
own (admin.py reads the server), no printing (cli.py prints)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pgshard.admin import Admin, DatabaseInfo
from pgshard.clones import stale_databases
from pgshard.host import host_identity, pid_alive
from pgshard.server.base import ServerInfo
from pgshard.settings import Settings

if TYPE_CHECKING:
    from pgshard.server.embedded import EmbeddedServer


@dataclass
class Target:
    info: ServerInfo
    embedded: EmbeddedServer | None  # when the server is the embedded one
    started_here: bool  # the embedded server was not running: started for this command, released after


# -- formatting ----------------------------------------------------------------------------------------------
def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]


# -- what is on the server -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One of our databases, with what we can tell about its owner."""

    db: DatabaseInfo
    alive: bool | None  # owner process alive (None: another host, cannot tell)
    age: float
    stale: bool

    @property
    def kind(self) -> str:
        return self.db.marker.kind if self.db.marker else "unmarked"

    def as_json(self) -> dict[str, Any]:
        marker = self.db.marker
        return {
            "name": self.db.name, "kind": self.kind, "run": marker.run if marker else None,
            "host": marker.host if marker else None, "pid": marker.pid if marker else None,
            "alive": self.alive, "started": marker.started if marker else None, "age_seconds": round(self.age, 1),
            "fingerprint": (marker.fingerprint or None) if marker else None, "size_bytes": self.db.size_bytes,
            "connections": self.db.connections, "stale": self.stale,
        }


def survey(admin: Admin, ttl_hours: float) -> list[Entry]:
    now = time.time()
    host = host_identity()
    stale = set(stale_databases(admin, ttl_hours, now))
    entries = []
    for db in admin.databases(sizes=True):
        marker = db.marker
        alive = None if marker is None or marker.host != host else pid_alive(marker.pid)
        age = now - marker.started if marker else 0.0
        entries.append(Entry(db, alive, age, db.name in stale))
    return entries


def _owner(entry: Entry) -> list[str]:
    marker = entry.db.marker
    assert marker is not None
    alive = {True: "alive", False: "dead", None: "?"}[entry.alive]
    return [marker.run or "-", marker.host, str(marker.pid), alive]


SECTIONS = (("template", "templates"), ("clone", "clones"), ("kept", "kept clones (--pg-keep)"),
            ("build", "template builds (in progress, or crashed half-way)"))


def status_lines(target: Target, settings: Settings, entries: Sequence[Entry]) -> list[str]:
    info = target.info
    lines = [f"server:   {info.source}", f"version:  PostgreSQL {info.version}", f"url:      {info.masked_url}"]
    if target.embedded is not None:
        state = target.embedded.status()
        others = [pid for pid in lease_pids(state) if pid != str(os.getpid())]
        if target.started_here and target.embedded.linger:
            running = f"no: started for this command; stops {target.embedded.linger} s after it (pgshard_linger)"
        elif target.started_here:
            running = "no: started for this command, stopped again after it"
        elif state["persistent"]:
            running = "yes, persistent (`pgshard server stop` to stop it)"
        elif target.embedded.linger:
            running = f"yes, started by a run; stops {target.embedded.linger} s after the last one ends"
        else:
            running = "yes, started by a run; stops when the last one ends"
        if others:
            running += f"; in use by {len(others)} process(es): pids {', '.join(sorted(others))}"
        lines += [f"running:  {running}", f"data:     {state['home']}"]
    lines.append(f"prefix:   {settings.prefix}")
    for kind, title in SECTIONS:
        found = [e for e in entries if e.kind == kind]
        if kind == "build" and not found:
            continue
        lines += ["", f"{title}: {len(found) or 'none'}"]
        if not found:
            continue
        if kind == "template":
            rows = [["NAME", "FINGERPRINT", "SIZE", "AGE", "BUILT BY RUN", "HOST", "PID", "OWNER"]]
            rows += [[e.db.name, e.db.marker.fingerprint if e.db.marker else "", human_size(e.db.size_bytes),
                      human_age(e.age), *_owner(e)] for e in found]
        else:
            rows = [["NAME", "RUN", "HOST", "PID", "OWNER", "AGE", "SIZE", "CONN", ""]]
            rows += [[e.db.name, *_owner(e), human_age(e.age), human_size(e.db.size_bytes), str(e.db.connections),
                      "stale" if e.stale else ""] for e in found]
        lines += table(rows)
    unmarked = [e for e in entries if e.db.marker is None]
    if unmarked:
        lines += ["", f"not pgshard's (our prefix but no ownership marker; never touched): {len(unmarked)}"]
        lines += [f"  {e.db.name}" for e in unmarked]
    stale = [e for e in entries if e.stale]
    if stale:
        lines += ["", f"{len(stale)} stale (dead runs on this host, other hosts' older than "
                      f"{settings.stale_ttl_hours} h): `pgshard clean` drops them"]
    return lines


# -- clean ---
def plan_all(entries: Sequence[Entry]) -> tuple[list[Entry], list[tuple[Entry, str]]]:
    """``clean --all``: every marked database, except what a live run on this host uses (its clones and
    builds, the templates those were cloned from) and anything with open connections (another host's run,
    or someone looking at a kept clone in psql). Returns (to drop, [(kept, why)])."""
    live = [e for e in entries if e.db.marker is not None and e.alive and e.kind != "template"]
    drop: list[Entry] = []
    skip: list[tuple[Entry, str]] = []
    for entry in entries:
        marker = entry.db.marker
        if marker is None:
            continue  # never ours to drop
        if entry.kind == "template":
            users = sorted({str(e.db.marker.pid) for e in live
                            if e.db.marker is not None and e.db.marker.fingerprint == marker.fingerprint})
            # a clone marked by an older pgshard does not name its template: it could be any of them
            unknown = any(e.db.marker is not None and not e.db.marker.fingerprint for e in live)
            if entry.alive:
                skip.append((entry, f"built by a live run on this host (pid {marker.pid})"))
            elif users:
                skip.append((entry, f"live runs on this host clone from it (pids {', '.join(users)})"))
            elif unknown:
                skip.append((entry, "a live run on this host uses a template it does not name"))
            else:
                drop.append(entry)
        elif entry.alive:
            skip.append((entry, f"in use by a live run on this host (pid {marker.pid})"))
        elif entry.db.connections:
            skip.append((entry, f"{entry.db.connections} open connection(s); close them and run again"))
        else:
            drop.append(entry)
    return drop, skip


def describe(entry: Entry) -> str:
    marker = entry.db.marker
    assert marker is not None
    alive = {True: "alive", False: "dead", None: "other host"}[entry.alive]
    return f"{entry.kind}, run {marker.run or '-'}, {marker.host} pid {marker.pid} {alive}, age {human_age(entry.age)}"


def marker_host(entry: Entry) -> str | None:
    return entry.db.marker.host if entry.db.marker is not None else None


def lease_pids(state: Mapping[str, object]) -> list[str]:
    return [str(pid) for pid in cast(list[object], state["leases"])]
