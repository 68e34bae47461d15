"""The ``command:`` step, the ``pgshard_migrate`` lines parsed into steps, and what a step's child process
gets from pytest's interpreter (its PATH and the project's import roots); the step kinds themselves and their
fingerprints are in migrate.py.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pgshard.migrate import (
    KINDS,
    AlembicMigrator,
    MetadataMigrator,
    MigrationError,
    Migrator,
    PythonMigrator,
    SqlMigrator,
    hash_tree,
    meaningful_tail,
    run_watched,
    sha,
)
from pgshard.settings import SettingsError, mask_url


def project_path() -> list[str]:
    """The project's own import roots in this interpreter's sys.path (the rootdir, ``pythonpath`` entries,
    conftest directories): what a child process needs on PYTHONPATH to import the app as pytest does. The
    interpreter's own stdlib and site-packages are left out: another interpreter must not get them."""
    import site
    import sysconfig

    site_dirs: list[str] = getattr(site, "getsitepackages", list)()  # missing in some old virtualenvs
    own = {Path(p).resolve() for p in (*sysconfig.get_paths().values(), *site_dirs,
                                       site.getusersitepackages(), sys.prefix, sys.base_prefix) if p}
    roots: list[str] = []
    for entry in sys.path:
        path = Path(entry or ".").resolve()
        if path.is_dir() and not any(path == o or o in path.parents for o in own) and str(path) not in roots:
            roots.append(str(path))
    return roots


def interpreter_env(base: Mapping[str, str]) -> dict[str, str]:
    """The environment of the interpreter running pytest, for a child: its bin directory first on PATH
    (``.venv/bin/python -m pytest`` without an activated venv still finds ``alembic``) and the project's
    import roots first on PYTHONPATH."""
    env = dict(base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir)])
    roots = [*project_path(), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    if roots:
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots))
    return env


def hash_globs(patterns: Sequence[str], rootdir: Path) -> tuple[str, list[str]]:
    """``pgshard_fingerprint``: the names and contents of the files the globs match, and the patterns
    that matched nothing (a typo there would silently blind the cache)."""
    parts: list[bytes | str] = []
    empty: list[str] = []
    for pattern in patterns:
        try:
            files = sorted(p for p in rootdir.glob(pattern) if p.is_file() and "__pycache__" not in p.parts)
        except (ValueError, NotImplementedError):  # absolute or otherwise unusable pattern
            raise SettingsError(f"pgshard_fingerprint line {pattern!r} must be a glob relative to the rootdir "
                                f"({rootdir})") from None
        if not files:
            empty.append(pattern)
        for path in files:
            parts += [str(path.relative_to(rootdir)), path.read_bytes()]
    return sha(*parts), empty


def _module_file(name: str, roots: Sequence[Path]) -> Path | None:
    """Where ``python -m name`` finds the module among the project's roots (a file or a package
    directory), without importing it: an import would run the app's code in this process."""
    relative = Path(*name.split("."))
    for root in roots:
        for candidate in (root / relative.with_suffix(".py"), root / relative):
            if candidate.is_file() or (candidate.is_dir() and (candidate / "__init__.py").is_file()):
                return candidate
    return None


def alembic_ini(args: Sequence[str], cwd: Path) -> Path | None:
    """The ini an ``alembic ...`` / ``python -m alembic ...`` command reads (``-c``/``--config``), if any."""
    names = [Path(arg).name for arg in args]
    if "alembic" in names[:1]:
        rest = list(args[1:])
    elif len(args) > 2 and names[0].startswith("python") and args[1] == "-m" and args[2] == "alembic":
        rest = list(args[3:])
    else:
        return None
    ini = "alembic.ini"
    for i, arg in enumerate(rest):
        if arg in ("-c", "--config") and i + 1 < len(rest):
            ini = rest[i + 1]
        elif arg.startswith("--config="):
            ini = arg.split("=", 1)[1]
    path = (cwd / ini).resolve()
    return path if path.is_file() else None


@dataclass
class CommandMigrator:
    """``command:python scripts/seed.py``: run with pgshard_env pointing at the template."""

    spec: str
    command: str
    cwd: Path
    env: Mapping[str, str] | None = None

    def inputs(self) -> list[bytes | str]:
        """What the command reads, as far as its text tells: an Alembic config with its script_location
        tree (env.py included), files named in it, and ``-m`` modules of the project."""
        args = shlex.split(self.command)
        parts: list[bytes | str] = []
        ini = alembic_ini(args, self.cwd)
        if ini is not None:
            parts.append(AlembicMigrator(self.spec, ini).fingerprint())
        roots = [self.cwd, *(Path(p) for p in project_path())]
        root = self.cwd.resolve()
        for i, arg in enumerate(args):
            candidate = (self.cwd / arg).resolve()
            if candidate.is_file() and root in candidate.parents:  # the project's files, not /bin/sh
                parts += [arg, candidate.read_bytes()]
            elif i > 0 and args[i - 1] == "-m" and arg != "alembic":
                module = _module_file(arg, roots)
                if module is not None:
                    parts += [arg, module.read_bytes() if module.is_file() else hash_tree(module, (".py",))]
        return parts

    def fingerprint(self) -> str:
        return sha(self.command, *self.inputs())

    def apply(self, url: str) -> None:
        env = {**interpreter_env(os.environ), **(self.env or {}), "PGSHARD_TEMPLATE_URL": url}
        args = shlex.split(self.command)
        if args and args[0] == "python":
            args[0] = sys.executable
        try:
            returncode, out, err = run_watched(args, lambda: self.spec, cwd=self.cwd, env=env)
        except OSError as exc:  # not found / not executable: say which, with the PATH it searched
            raise MigrationError(self.spec, f"{exc.strerror}: {args[0]!r} (PATH starts with {env['PATH'][:200]})") \
                from None
        if returncode != 0:
            output = "\n".join(part.decode(errors="replace") for part in (out, err) if part)
            raise MigrationError(self.spec, f"exit {returncode}",
                                 output=[*("  " + line for line in meaningful_tail(output) or ["(no output)"]),
                                         f"  whole output: {_keep_output(self.command, output)}"])


def _keep_output(command: str, output: str) -> str:
    """Write a failed command's whole output (passwords in URLs masked) to a private file; its path."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix="pgshard-step-", suffix=".log")  # 0600
    with os.fdopen(fd, "w") as handle:
        handle.write(f"$ {command}\n{mask_url(output)}")
    return path


def blind_commands(migrators: Sequence[Migrator]) -> list[str]:
    """``command:`` steps with no input pgshard can see: their template is reused until their text changes."""
    return [m.spec for m in migrators if isinstance(m, CommandMigrator) and not m.inputs()]


def parse_migrators(lines: Sequence[str], rootdir: Path) -> list[Migrator]:
    """Turn ``pgshard_migrate`` lines into migrators; a bad line is one error naming it. Imports nothing
    of the project's (that waits until the build), so it can check the lines when the run starts."""
    migrators: list[Migrator] = []
    for line in lines:
        kind, sep, arg = line.partition(":")
        kind, arg = kind.strip(), arg.strip()
        if not sep or kind not in KINDS or not arg:
            raise SettingsError(f"pgshard_migrate line {line!r} must be one of: alembic:alembic.ini, "
                                "metadata:pkg.models:Base, sql:dir/, python:pkg.mod:func, command:...")
        if kind == "alembic":
            path, _, revision = arg.partition("@")
            ini = (rootdir / path).resolve()
            if not ini.is_file():
                raise SettingsError(f"pgshard_migrate line {line!r}: {ini} does not exist")
            migrators.append(AlembicMigrator(line, ini, revision or "head"))
        elif kind == "metadata":
            migrators.append(MetadataMigrator(line, arg))
        elif kind == "sql":
            where = (rootdir / arg).resolve()
            if not where.exists():
                raise SettingsError(f"pgshard_migrate line {line!r}: {where} does not exist")
            migrators.append(SqlMigrator(line, where))
        elif kind == "python":
            migrators.append(PythonMigrator(line, arg))
        else:
            migrators.append(CommandMigrator(line, arg, rootdir))
    return migrators
