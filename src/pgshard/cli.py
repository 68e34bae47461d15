"""The ``pgshard`` command: what is on the server, clean up after crashed runs, keep a server warm.

``status`` and ``clean`` pick the server exactly as a test run would (``--pg-url`` / ``PGSHARD_URL``, else
the embedded server; the pytest ini of the current project is read too), so what they show is what the
next ``pytest`` sees. ``server start|stop|status`` manage the embedded server only.

Every error is one line on stderr, passwords masked, exit code 2: this runs in CI logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import psycopg

from pgshard import configfile
from pgshard.admin import Admin, NotOurs, intents_dir
from pgshard.host import default_cache_dir, host_identity
from pgshard.server import ServerLease, acquire
from pgshard.server.base import ServerError
from pgshard.server.embedded import EmbeddedServer
from pgshard.settings import OPTIONS, Settings, SettingsError, mask_url, resolve
from pgshard.survey import (
    Target,
    describe,
    lease_pids,
    marker_host,
    plan_all,
    status_lines,
    survey,
)
from pgshard.template import server_lock_key
from pgshard.version import __version__

EXIT_OK = 0
EXIT_PARTIAL = 1  # clean: some databases could not be dropped (each one is named)
EXIT_ERROR = 2  # bad usage or settings, server unreachable


class CliError(Exception):
    """A problem the user fixes; printed as one line."""


def load_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
                  cwd: Path | None = None) -> Settings:
    cwd = Path.cwd() if cwd is None else cwd
    env = dict(os.environ if environ is None else environ)
    # options that have no pytest flag get one here: applied as their env var, which the ini cannot override
    for attr, var in (("prefix", "PGSHARD_PREFIX"), ("cache_dir", "PGSHARD_CACHE_DIR")):
        value = getattr(args, attr, None)
        if value:
            env[var] = str(value)
    inidir, ini = configfile.find_ini(cwd)
    cli = {"url": getattr(args, "pg_url", None), "server": getattr(args, "pg_server", None)}
    return resolve(cli, env, ini.get, inidir or cwd)


# -- which server --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def server_for(settings: Settings) -> Iterator[Target]:
    """The server a run would use, held for the duration of the command."""
    if settings.server != "embedded":
        lease: ServerLease = acquire(settings)
        try:
            yield Target(lease.info, None, False)
        finally:
            lease.release()
        return
    embedded = EmbeddedServer.for_settings(settings)
    was_running = embedded.running_port() is not None
    info = embedded.acquire()
    for note in embedded.notes:  # a repaired cache, said once
        print(f"pgshard: {note}", file=sys.stderr)
    try:
        yield Target(info, embedded, not was_running)
    finally:
        embedded.release()


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    if settings.server == "embedded":
        embedded = EmbeddedServer.for_settings(settings)
        embedded.ensure_home()  # a cache dir that cannot be made is one line naming pgshard_cache_dir
        if embedded.running_port() is None:  # looked at, not started: its databases are read while it runs
            return _stopped_status(args, settings, embedded)
    with server_for(settings) as target, Admin(target.info.url, settings.prefix) as admin:
        entries = survey(admin, settings.stale_ttl_hours)
        if args.json:
            document: dict[str, Any] = {
                "server": {"source": target.info.source, "version": target.info.version,
                           "url": target.info.masked_url, "started_for_command": target.started_here},
                "prefix": settings.prefix,
                "databases": [e.as_json() for e in entries],
            }
            if target.embedded is not None:
                document["embedded"] = target.embedded.status()
            print(json.dumps(document, indent=2))
        else:
            print("\n".join(status_lines(target, settings, entries)))
    return EXIT_OK


def _stopped_status(args: argparse.Namespace, settings: Settings, embedded: EmbeddedServer) -> int:
    state = embedded.status()
    if args.json:
        print(json.dumps({"server": {"source": state["source"], "running": False}, "prefix": settings.prefix,
                          "databases": None, "embedded": state}, indent=2))
        return EXIT_OK
    print("\n".join([f"server:   {state['source']}", "running:  no (status starts nothing; a run starts it, "
                     "`pgshard server start` keeps it up, and its templates and clones are listed then)",
                     f"data:     {state['home']}", f"prefix:   {settings.prefix}"]))
    return EXIT_OK


# -- clean ---------------------------------------------------------------------------------------------------
def cmd_clean_server(args: argparse.Namespace, settings: Settings) -> int:
    """``clean --server``: the embedded server's whole cache (data directory, templates, passfile), for a
    damaged one; the next run re-creates it."""
    if settings.server != "embedded":
        raise CliError("clean --server removes the embedded server's cache; this environment selects another "
                       "server (--pg-url / PGSHARD_URL / --pg-server)")
    server = EmbeddedServer.for_settings(settings)
    if not server.home.exists():
        print(f"nothing to remove: {server.home} does not exist")
        return EXIT_OK
    if args.dry_run:
        print(f"would stop the embedded server and remove {server.home}; dry run, nothing was removed")
        return EXIT_OK
    url = server.expected_url()  # before its files go: names its notes of databases being created
    server.remove()
    _remove_server_notes(server, url)
    print(f"stopped the embedded server and removed {server.home}; the next run re-creates it")
    return EXIT_OK


def _remove_server_notes(server: EmbeddedServer, url: str) -> None:
    """What the cache holds for that server beside its home (its notes of databases being created, its clone
    times), then the cache's own directories once nothing is left in them: clean --server leaves nothing."""
    cache = server.home.parent
    intents = intents_dir(cache, url)
    for path in (intents, cache / "clone-times" / intents.name):
        shutil.rmtree(path, ignore_errors=True)
    for path in (cache / "locks").glob(f"{server_lock_key(url)}-*"):  # its template locks: nobody uses it now
        path.unlink(missing_ok=True)
    for path in (cache / "creating", cache / "clone-times", cache / "locks", cache):
        with contextlib.suppress(OSError):
            path.rmdir()  # only when empty: another server's or project's files stay


def cmd_clean(args: argparse.Namespace, settings: Settings) -> int:
    if args.server:
        return cmd_clean_server(args, settings)
    with server_for(settings) as target, Admin(target.info.url, settings.prefix,
                                               intents_dir(settings.cache_dir or default_cache_dir(),
                                                           target.info.url)) as admin:
        entries = survey(admin, settings.stale_ttl_hours)
        if args.all:
            drop, skip = plan_all(entries)
            what = "pgshard database(s)"
        elif args.kept:  # what --pg-keep left, nothing else; one that someone still looks at stays
            kept = [e for e in entries if e.kind == "kept"]
            drop = [e for e in kept if not e.db.connections]
            skip = [(e, f"{e.db.connections} open connection(s); close them and run again")
                    for e in kept if e.db.connections]
            what = "kept clone(s) (--pg-keep)"
        else:  # exactly what a run drops at its start: another host's, past the TTL, only without sessions
            host = host_identity()
            drop = [e for e in entries if e.stale and (not e.db.connections or marker_host(e) == host)]
            skip = [(e, f"another host's, past the TTL, but {e.db.connections} open connection(s): a live run")
                    for e in entries if e.stale and e not in drop]
            what = (f"stale database(s) (dead runs on this host, other hosts' older than "
                    f"{settings.stale_ttl_hours} h)")
        verb = "would drop" if args.dry_run else "dropped"
        failed = 0
        dropped: list[str] = []
        for entry in drop:
            if not args.dry_run:
                try:
                    if not admin.drop(entry.db.name, force=True):
                        continue  # gone meanwhile (its run ended, or another clean)
                except (NotOurs, psycopg.Error) as exc:
                    failed += 1
                    print(f"  could not drop {entry.db.name}: {mask_url(' '.join(str(exc).split()))}")
                    continue
            dropped.append(entry.db.name)
            print(f"  {verb} {entry.db.name} ({describe(entry)})")
        if not args.dry_run:
            for name in admin.abandoned():
                dropped.append(name)
                print(f"  {verb} {name} (unmarked: its creator on this host was killed before marking it)")
        for entry, why in skip:
            print(f"  kept {entry.db.name}: {why}")
        summary = f"{verb} {len(dropped)} {what} on {target.info.masked_url}"
        if args.dry_run:
            summary += "; dry run, nothing was dropped"
        print(summary)
    return EXIT_PARTIAL if failed else EXIT_OK


# -- the embedded server -------------------------------------------------------------------------------------
def _note_other_server(settings: Settings) -> None:
    if settings.server != "embedded":
        via = "--pg-url / PGSHARD_URL" if settings.server == "url" else "--pg-server / PGSHARD_SERVER"
        print(f"pgshard: note: {via} selects another server here, so runs in this environment will not use "
              "the embedded one", file=sys.stderr)


def cmd_server_start(args: argparse.Namespace, settings: Settings) -> int:
    _note_other_server(settings)
    server = EmbeddedServer.for_settings(settings)
    was_running = server.running_port() is not None
    info = server.acquire()
    try:
        server.set_persistent(True)  # before our lease goes: nobody may stop it in between
    finally:
        server.release()
    how = "was already running; now persistent" if was_running else "started, persistent"
    print(f"{info.source}: {how}")
    print(f"url:  {info.masked_url}")
    print(f"data: {server.home}")
    print("test runs on this machine use it and leave it running; `pgshard server stop` stops it")
    return EXIT_OK


def cmd_server_stop(args: argparse.Namespace, settings: Settings) -> int:
    server = EmbeddedServer.for_settings(settings)
    server.set_persistent(False)
    if server.running_port() is None:
        print(f"{server.source}: not running")
        return EXIT_OK
    users = server.stop_unless_used()  # now, whatever the linger: the user asked for it
    if not users:
        print(f"{server.source}: stopped")
        return EXIT_OK
    pids = ", ".join(users)
    print(f"{server.source}: no longer persistent; still used by pids {pids}, it stops when the last one ends")
    return EXIT_OK


def cmd_server_status(args: argparse.Namespace, settings: Settings) -> int:
    _note_other_server(settings)
    server = EmbeddedServer.for_settings(settings)
    state = server.status()
    port = cast("int | None", state["port"])
    url = server.url(port) if port is not None else None
    if args.json:
        print(json.dumps({**state, "url": mask_url(url) if url else None}, indent=2))
        return EXIT_OK
    print(f"server:     {state['source']}")
    print(f"running:    {f'yes, port {port}' if port is not None else 'no'}")
    if url:
        print(f"url:        {mask_url(url)}")
    print(f"persistent: {'yes' if state['persistent'] else 'no'}")
    print(f"leases:     {', '.join(lease_pids(state)) or 'none'}")
    print(f"data:       {state['home']}")
    return EXIT_OK


# -- arguments -----------------------------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: accepted before or after the subcommand, and a later position does not reset an earlier one
    group = parser.add_argument_group("server selection (as for pytest; CLI > env > pytest ini)")
    group.add_argument("--pg-url", default=argparse.SUPPRESS, metavar="URL",
                       help="use the server at this URL (PGSHARD_URL); default: the embedded server")
    group.add_argument("--pg-server", default=argparse.SUPPRESS, choices=["embedded", "url", "docker"],
                       help="where PostgreSQL comes from (PGSHARD_SERVER)")
    group.add_argument("--prefix", default=argparse.SUPPRESS, help="database name prefix (PGSHARD_PREFIX)")
    group.add_argument("--cache-dir", default=argparse.SUPPRESS, metavar="DIR",
                       help="the embedded server's home (PGSHARD_CACHE_DIR)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not the whole usage block
        raise CliError(f"{message} (see `{self.prog} --help`)")


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    """Read the project (init_plan.plan), print each line with its evidence, write them into the config
    file pytest reads. Nothing else is edited: no conftest, no code, no settings."""
    from pgshard.init_plan import plan

    root = Path(args.root).resolve()
    if not root.is_dir():
        raise CliError(f"{root} is not a directory: run `pgshard init` in the project's root or pass it")
    found = plan(root)
    where = f"{found.config.relative_to(root)} [{found.section}]"
    toml = found.config.suffix == ".toml"
    line_lists = {option.ini for option in OPTIONS if option.kind == "lines" and option.ini}
    rendered = configfile.render(toml, [(line.key, line.values) for line in found.lines], line_lists)
    text = found.config.read_text() if found.config.is_file() else ""
    if not found.lines:
        for need in found.needs:
            print(f"pgshard init: {need}", file=sys.stderr)
        raise CliError(f"nothing to write into {where}: say what the suite needs (above) by hand")
    try:
        new = configfile.place(text, toml, found.section, rendered, replace=args.replace)
    except configfile.ConfigFileError as exc:  # pgshard lines already there: one line, nothing written
        raise CliError(f"{found.config.name} {exc}") from None
    print(f"# pgshard init: {'would write' if args.dry_run else 'writing'} into {where}"
          f"{'' if found.exists else ' (a new section)'}")
    shown = iter(rendered)
    for line in found.lines:
        for _ in range(1 + (len(line.values) if not toml and len(line.values) > 1 else 0)):
            print(next(shown))
        for evidence in line.evidence:
            print(f"    # <- {mask_url(evidence)}")
    for need in found.needs:
        print(f"# needs: {need}")
    if args.dry_run:
        print("# (--dry-run: nothing written)")
        return EXIT_OK
    if new != text:
        found.config.write_text(new)
    print(f"# then: pytest -n auto   (correct a guess in {found.config.name}: docs/init.md)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pgshard", description="pgshard: inspect and clean the PostgreSQL server your tests use.")
    parser.add_argument("--version", action="version", version=f"pgshard {__version__}")
    _common(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    init = commands.add_parser("init", help="write pgshard's lines for this project into its pytest config",
                               description="Reads the project (settings, .env, alembic.ini, prestart scripts, "
                               "Makefile, CI workflows, compose files, conftests) and writes the pgshard lines it "
                               "needs into the config file pytest reads, each printed with its evidence. Edits no "
                               "code, conftest or settings.")
    init.add_argument("root", nargs="?", default=".", help="the project's root (default: here)")
    init.add_argument("--dry-run", action="store_true", help="print the lines, write nothing")
    init.add_argument("--replace", action="store_true", help="replace pgshard lines the file already has")
    init.set_defaults(func=cmd_init)

    status = commands.add_parser("status", help="the server, templates (fingerprint, size, age), clones and owners")
    _common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    clean = commands.add_parser("clean", help="drop databases of dead runs (--all: every pgshard database)",
                                description="Default: the databases a run would drop at its start (clones and "
                                "half-built templates of dead runs on this host, of other hosts after the TTL). "
                                "--kept: the clones --pg-keep kept. --all: every database with pgshard's marker, "
                                "templates and kept clones too, "
                                "except what a live run on this host uses or what has open connections. "
                                "A database without pgshard's ownership marker is never dropped.")
    _common(clean)
    clean.add_argument("--all", action="store_true", help="templates and kept clones too")
    clean.add_argument("--kept", action="store_true", help="only the clones --pg-keep kept")
    clean.add_argument("--server", action="store_true",
                       help="stop the embedded server and remove its whole cache (a damaged one is re-created)")
    clean.add_argument("--dry-run", action="store_true", help="list what would be dropped, drop nothing")
    clean.set_defaults(func=cmd_clean)

    server = commands.add_parser("server", help="a long-running embedded server for a fast local loop")
    _common(server)
    actions = server.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    for name, func, text in (("start", cmd_server_start, "start it and keep it running; runs use it"),
                             ("stop", cmd_server_stop, "stop it (once no run uses it)"),
                             ("status", cmd_server_status, "is it running, on which port, who uses it")):
        action = actions.add_parser(name, help=text, description=text)
        _common(action)
        if name == "status":
            action.add_argument("--json", action="store_true", help="machine-readable output")
        action.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        settings = load_settings(args)
        func: Callable[[argparse.Namespace, Settings], int] = args.func
        return func(args, settings)
    except (CliError, configfile.ConfigFileError, SettingsError, ServerError, NotOurs, psycopg.Error, OSError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"pgshard: {mask_url(text)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
