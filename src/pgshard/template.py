"""The coordinator: exactly one process builds the template database; everyone else waits and reuses it.

Two locks: a lock file serialises the processes of this machine (xdist workers, concurrent runs) without
a connection each, and a PostgreSQL advisory lock serialises machines sharing one server (CI shards).
The template's name is its fingerprint, and a template is built under a temporary name and renamed
only when complete, then sealed: a half-built template can never be cloned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from sqlalchemy.engine import make_url

from pgshard import redirect
from pgshard.admin import Admin, Marker
from pgshard.alembic_project import alembic_targets
from pgshard.build import apply_steps, build_name
from pgshard.lockfile import CoordinatorLock, LockError
from pgshard.migrate import MigrationError, Migrator, Watch, sha, watching
from pgshard.server.base import ServerError, ServerInfo
from pgshard.settings import SettingsError, database_url, env_assignments, placeholders
from pgshard.verify import LABEL as CHECK_LABEL
from pgshard.verify import CheckRun, cached_error, findings_of, post_build, read_report
from pgshard.version import __version__


@dataclass(frozen=True)
class TemplateResult:
    name: str
    fingerprint: str
    built: bool  # False: cache hit
    build_seconds: float
    wait_seconds: float
    checks: tuple[str, ...] = ()  # the pgshard_check lines its build ran (verify.py), when, how long
    checked_at: float = 0.0
    check_seconds: float = 0.0
    findings: tuple[str, ...] = ()  # what they found, when pgshard_check_mode = warn sealed it anyway


def server_lock_key(url: str) -> str:
    """What the names of a server's files in the cache's ``locks/`` begin with (its lock and failure files)."""
    parsed = make_url(url)
    return hashlib.sha256(f"{parsed.host}:{parsed.port}:{parsed.query}".encode()).hexdigest()[:8]


def swap_lock(template: str) -> str:
    """The advisory-lock key guarding a template's name: every clone holds it shared while it copies,
    a rebuild holds it exclusively for the moment it drops the old template and renames the new one, so
    a live run never finds the name missing (and never copies a template being dropped)."""
    return f"swap:{template}"


def project_key(rootdir: Path) -> str:
    """Which project built a template (its rootdir, hashed): pgshard_keep_templates counts per project,
    so two projects sharing one server do not evict each other's templates."""
    return sha(str(rootdir.resolve()))[:12]


class Template:
    def __init__(
        self,
        admin: Admin,
        server: ServerInfo,
        migrators: Sequence[Migrator],
        *,
        lock_dir: Path,
        run_id: str,
        rebuild: bool = False,
        keep: int = 3,
        env_lines: Sequence[str] = (),
        url_scheme: str | None = None,
        inputs: Sequence[str] = (),
        project: str = "",
        watch: Watch | None = None,
        checks: Sequence[str] = (),
        check_mode: str = "fail",
    ) -> None:
        self.admin = admin
        self.server = server
        self.migrators = list(migrators)
        self.lock_dir = lock_dir
        self.run_id = run_id
        self.rebuild = rebuild
        self.keep = keep
        self.env_lines = tuple(env_lines)
        self.url_scheme = url_scheme  # what {url} carries in pgshard_env: the app's driver (discover.url_driver)
        self.inputs = tuple(inputs)  # more fingerprint parts: hashes of files the steps read (pgshard_fingerprint)
        self.project = project
        self.watch = watch or Watch()
        self.checks = tuple(checks)  # pgshard_check: run by the build, their verdict kept in the marker
        self.check_mode = check_mode
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            parts = [f"pgshard {__version__}", f"postgres {self.server.major}", *self.inputs]
            for migrator in self.migrators:
                try:
                    parts.append(f"{migrator.spec}={migrator.fingerprint()}")
                except MigrationError:
                    raise
                except SettingsError as exc:  # the line's target cannot be imported: its own words say why
                    raise MigrationError(migrator.spec, f"cannot fingerprint: {exc}") from exc
                except Exception as exc:
                    raise MigrationError(migrator.spec, f"cannot fingerprint: {type(exc).__name__}: {exc}") from exc
            self._fingerprint = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
        return self._fingerprint

    @property
    def name(self) -> str:
        return f"{self.admin.prefix}_tpl_{self.fingerprint()}"

    def _lock_path(self) -> Path:
        """One lock per server and project, whatever the fingerprint: it stays in place, nothing piles up."""
        try:
            self.lock_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServerError(f"cannot take the template lock: cannot create {self.lock_dir}: {exc.strerror or exc}; "
                              "set pgshard_cache_dir (PGSHARD_CACHE_DIR) to a writable directory of your own") from None
        return self.lock_dir / f"{server_lock_key(self.server.url)}-{self.admin.prefix}-{self.project or 'any'}.lock"

    def _usable(self) -> Marker | None:
        """The marker of the sealed template of this fingerprint, when there is one to clone."""
        found = self.admin.info(self.name)
        if found is None or found.marker is None or found.marker.kind != "template":
            return None
        if found.allow_connections or not found.is_template:
            return None
        # --pg-rebuild: rebuilt once per run, then reused by this run's other workers
        if self.rebuild and found.marker.run != self.run_id:
            return None
        if self.admin.files_missing(self.name):
            raise ServerError(f"template {self.name} is damaged (its files are gone from the data directory): "
                              "rebuild it with --pg-rebuild, or on the embedded server remove its whole cache "
                              "with `pgshard clean --server`")
        return found.marker

    def _result(self, marker: Marker | None, built: float | None, waited: float) -> TemplateResult:
        """What ensure() returns for the sealed template with this ``marker``; its checks' findings stop the
        run here when pgshard_check_mode is fail (a template sealed under warn, then the mode changed)."""
        marker = marker or self._usable()
        assert marker is not None
        if marker.findings and self.check_mode == "fail":
            raise cached_error(marker.findings)
        return TemplateResult(self.name, self.fingerprint(), built is not None, built or 0.0, waited,
                              marker.checks, marker.checked_at, marker.check_seconds, marker.findings)

    @overload
    def ensure(self) -> TemplateResult: ...
    @overload
    def ensure(self, build: bool) -> TemplateResult | None: ...

    def ensure(self, build: bool = True) -> TemplateResult | None:
        """The sealed template of this fingerprint, built (under both locks) when missing; ``build=False``:
        None instead."""
        name = self.name
        started = time.perf_counter()
        marker = self._usable()
        if marker is not None:  # the warm path: a sealed template needs neither lock (a build re-checks under both)
            return self._result(marker, None, time.perf_counter() - started)
        if not build:
            return None
        # a waiter past a few seconds says who builds
        lock = CoordinatorLock(self._lock_path(), f"checking or building template {name}", timeout=1800)
        try:
            lock.acquire()
        except LockError as exc:
            raise ServerError(f"cannot take the template lock: {exc}") from None
        except OSError as exc:  # the lock path is a directory, its parent a file, a read-only filesystem
            raise ServerError(f"cannot take the template lock {exc.filename or self.lock_dir}: "
                              f"{exc.strerror or exc}; remove it or set pgshard_cache_dir (PGSHARD_CACHE_DIR)"
                              ) from None
        try:
            with self.admin.advisory_lock(name):
                waited = time.perf_counter() - started
                marker = self._usable()
                if marker is not None:
                    return self._result(marker, None, waited)
                earlier = self._earlier_failure()
                if earlier is not None:
                    raise earlier
                build_started = time.perf_counter()
                try:
                    self._build(name)
                except MigrationError as exc:
                    self._failure_file().write_text(json.dumps({"run": self.run_id, "template": name,
                                                                "spec": exc.spec, "reason": exc.reason,
                                                                "label": exc.label, "output": exc.output}))
                    raise
                self._failure_file().unlink(missing_ok=True)
                built = time.perf_counter() - build_started
        finally:
            lock.release()
        self.collect_garbage()
        return self._result(None, built, waited)

    def _failure_file(self) -> Path:
        """One per project and server, not per fingerprint: the build that succeeds after a fix (a new
        fingerprint) removes the failure it fixed."""
        return self._lock_path().with_suffix(".failed")

    def _earlier_failure(self) -> MigrationError | None:
        """A process of this same run failed to build this template: its error, without running the
        failing steps again in every xdist worker (a later run tries afresh)."""
        try:
            data = json.loads(self._failure_file().read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("run") != self.run_id or data.get("template") != self.name:
            return None
        error = MigrationError(str(data.get("spec")), str(data.get("reason")), output=list(data.get("output") or []),
                               label=str(data.get("label") or "pgshard_migrate step"))
        error.elsewhere = True
        return error

    def _build(self, name: str) -> None:
        build = build_name(name)
        if self.admin.exists(build):  # a build that crashed half-way: ours, never used, start over
            self.admin.drop(build, force=True)
        self.admin.create(build, Marker("build", self.run_id, fingerprint=self.fingerprint()), template="template0")
        url = database_url(self.server.url, build)
        started = time.monotonic()
        checks = _Checks(self, build)
        try:
            # in-process steps that use the app's own (redirected or followed) engines build the template too
            # the build child redirects pgshard_redirect's names to the build database too (redirect.CHILD_NAMES)
            with redirect.retarget(url), watching(self.watch):
                apply_steps([*checks.before_steps(), *self.migrators], url, self.step_env(url))
            took = time.monotonic() - started
            if self.watch.progress is not None and took >= self.watch.first:  # it said it was running: now it ended
                self.watch.progress(f"pgshard: template {name} built in {took:.1f} s")
            checks.after_steps()
        except BaseException:
            checks.discard()
            self.admin.drop(build, force=True)
            raise
        self.admin.terminate(build)  # engines the migrations left open would block every clone
        with self.admin.advisory_lock(swap_lock(name)):  # --pg-rebuild: live runs wait a moment, never fail
            if self.admin.exists(name):
                self.admin.drop(name, force=True)
            self.admin.rename(build, name)
            self.admin.mark(name, Marker("template", self.run_id, fingerprint=self.fingerprint(),
                                         project=self.project, **checks.verdict()))
            self.admin.seal(name)

    def step_env(self, url: str) -> dict[str, str]:
        """What a build step's process gets, pointed at the database at ``url`` (pgshard_env, the names to
        redirect)."""
        return {**env_assignments(self.env_lines, placeholders(url, scheme=self.url_scheme)),
                **redirect.child_environment()}

    def collect_garbage(self) -> list[str]:
        """Drop this project's templates of older fingerprints beyond the newest ``keep`` (other projects'
        templates are theirs to count; unattributed ones, from an older pgshard, count for everyone);
        returns what was dropped."""
        everything = self.admin.databases()
        in_use = {d.marker.fingerprint for d in everything  # live runs still clone from these
                  if d.marker is not None and d.marker.kind in ("clone", "build") and d.marker.fingerprint}
        others = [d for d in everything if d.name.startswith(f"{self.admin.prefix}_tpl_") and d.name != self.name
                  and d.marker is not None and d.marker.kind == "template" and d.marker.fingerprint not in in_use
                  and d.marker.project in (self.project, "")]
        others.sort(key=lambda d: d.marker.started if d.marker else 0.0, reverse=True)
        dropped = []
        for old in others[self.keep:]:
            try:
                if self.admin.drop(old.name):
                    dropped.append(old.name)
            except Exception:  # another run may be cloning it right now: keep it sealed, retry next run
                with contextlib.suppress(Exception):
                    self.admin.seal(old.name)
        return dropped


class _Checks:
    """One build's pgshard_check (verify.py): ``heads`` before the steps (two heads fail the build itself),
    the others after them, on a scratch clone of the build when ``downgrade`` is among them. Their verdict
    goes into the template's marker, so a warm run shows it and pays nothing."""

    def __init__(self, template: Template, build: str) -> None:
        self.template = template
        self.build = build
        self.targets = alembic_targets(template.migrators) if template.checks else []
        self.checks = template.checks if self.targets else ()  # (what cannot apply is the run's note)
        self.report: Path | None = None
        self.seconds = 0.0
        if self.checks:
            import tempfile

            fd, name = tempfile.mkstemp(prefix="pgshard-check-", suffix=".jsonl")
            os.close(fd)
            self.report = Path(name)

    def _run(self, checks: Sequence[str], scratch: bool = False) -> CheckRun:
        assert self.report is not None
        return CheckRun(CHECK_LABEL, tuple(checks), self.targets, str(self.report),
                               fail=self.template.check_mode == "fail", scratch=scratch)

    def before_steps(self) -> list[Migrator]:
        return [self._run(["heads"])] if "heads" in self.checks else []

    def after_steps(self) -> None:
        after = post_build(self.checks)
        if not after:
            return
        admin = self.template.admin
        started = time.perf_counter()
        scratch = f"{self.build}_check" if "downgrade" in after else None
        if scratch is not None:  # a clone to downgrade: the build itself is never migrated down
            admin.terminate(self.build)
            if admin.exists(scratch):
                admin.drop(scratch, force=True)
            admin.create(scratch, Marker("build", self.template.run_id, fingerprint=self.template.fingerprint()),
                         template=self.build)
        url = database_url(self.template.server.url, scratch or self.build)
        try:
            with watching(self.template.watch):
                apply_steps([self._run(after, scratch=scratch is not None)], url, self.template.step_env(url))
        finally:
            if scratch is not None:
                admin.drop(scratch, force=True)
            self.seconds = time.perf_counter() - started

    def verdict(self) -> dict[str, Any]:
        """The marker's fields: which checks ran, when, how long, and what failed ones found."""
        if self.report is None:
            return {}
        entries = read_report(self.report)
        self.discard()
        seconds = self.seconds + sum(float(e.get("seconds", 0)) for e in entries if e.get("check") == "heads")
        return {"checks": tuple(str(e["check"]) for e in entries), "checked_at": time.time(),
                "check_seconds": round(seconds, 3),
                "findings": findings_of(entries)}

    def discard(self) -> None:
        if self.report is not None:
            self.report.unlink(missing_ok=True)
