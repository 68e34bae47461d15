"""The peers users pick today, installed where they cannot disturb anything else: a venv of their own.

``<work>/peers-venv-<key>`` is created on first use with the interpreter the harness runs on, one per harness
environment (the key is a digest of its ``sys.prefix``: a floors venv and a newest one, run from one checkout,
even at once, never share a peers venv pointing at the other's packages); a ``.pth`` file adds the harness's
own site-packages behind it, so the peers run on the very same pytest, SQLAlchemy and psycopg
as pgshard does (a fair comparison) while their plugins load only in their own runs. Each peer is first
checked with ``pip download --no-deps`` (does it exist for this Python at all?), then installed; one that
cannot be installed is dropped with the reason, never silently.

py-pglite also needs node and npm (its server is PGlite under node): checked here, never installed here
(``apt-get install -y nodejs npm`` on Debian), and its two npm packages are installed once into
``<work>/pglite`` outside the timing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# distribution -> its pytest11 entry point name (each run blocks every peer plugin it does not use)
PLUGINS = {
    "pytest-postgresql": "pytest_postgresql",
    "pytest-sqla": "sqla",
    "pytest-sqlalchemy-alembic": "sqlalchemy-alembic",
    "py-pglite": "py_pglite",
}
# what py-pglite 0.5's own package.json asks for
PGLITE_NPM = {"@electric-sql/pglite": "^0.3.0", "@electric-sql/pglite-socket": "^0.0.8"}


@dataclass
class Peers:
    python: Path  # the peers venv's interpreter
    versions: dict[str, str] = field(default_factory=dict)  # installed distribution -> version
    dropped: dict[str, str] = field(default_factory=dict)  # distribution -> why it is not benchmarked
    pglite_dir: Path | None = None  # node_modules for py-pglite live here

    def has(self, distribution: str) -> bool:
        return distribution in self.versions

    def block_others(self, using: str | None) -> list[str]:
        """``-p no:<plugin>`` for every peer plugin this run does not use."""
        return [arg for dist, name in PLUGINS.items() if dist != using for arg in ("-p", f"no:{name}")]


def _venv(path: Path) -> Path:
    python = path / "bin" / "python"
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(path)], check=True, capture_output=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        ours = [p for p in site.getsitepackages() if Path(p).is_dir()]
        lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in ours)
        (Path(purelib) / "zz_harness_site.pth").write_text(lines)  # after the venv's own packages
    return python


def _installed(python: Path, distributions: list[str]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\nout = {}\nfor d in sys.argv[1:]:\n    try: out[d] = "
            "m.version(d)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    done = subprocess.run([str(python), "-c", code, *distributions], check=True, capture_output=True, text=True)
    found: dict[str, str] = json.loads(done.stdout)
    return found


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True, check=False, timeout=600)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def node_problem() -> str | None:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        return (f"{' and '.join(missing)} not found: py-pglite runs PGlite under node "
                "(Debian: apt-get install -y nodejs npm)")
    return None


def _npm_install(directory: Path) -> str | None:
    directory.mkdir(parents=True, exist_ok=True)
    if all((directory / "node_modules" / name).is_dir() for name in PGLITE_NPM):
        return None
    (directory / "package.json").write_text(json.dumps({"name": "bench-pglite", "private": True,
                                                        "dependencies": PGLITE_NPM}, indent=2))
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=directory, capture_output=True,
                          text=True, check=False, timeout=600)
    return None if done.returncode == 0 else f"npm install failed: {_last_line(done.stderr or done.stdout)}"


# what the peers must share with the harness (see above): a peer may not pull a release of its own over them
SHARED = ("pytest", "pytest-asyncio", "SQLAlchemy", "psycopg", "psycopg-binary", "pytest-xdist")


def _harness_pins(venv: Path) -> Path:
    """A constraints file pinning SHARED to the harness's own versions: on a pytest 7.4 floor a peer's newest
    release that needs pytest 9 would otherwise install pytest 9 into the peers venv, ahead of the harness's
    plugins, and every peer run would break; pip picks the peer's newest release that fits instead, or none."""
    from importlib import metadata

    pins = []
    for dist in SHARED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            pins.append(f"{dist}=={metadata.version(dist)}")
    path = venv / "peer-constraints.txt"  # in this harness's own peers venv
    path.write_text("\n".join(pins) + "\n")
    return path


def ensure(work_dir: Path, wanted: list[str]) -> Peers:
    """The peers venv with every wanted peer that installs here (newest releases); reasons for the rest."""
    key = hashlib.sha256(str(Path(sys.prefix).resolve()).encode()).hexdigest()[:8]
    venv = work_dir / f"peers-venv-{key}"
    python = _venv(venv)
    peers = Peers(python)
    have = _installed(python, wanted)
    with_deps = {"py-pglite": "py-pglite[sqlalchemy]"}  # psutil comes with it; greenlet is already ours
    for dist in wanted:
        if dist in have:
            continue
        probe = _pip(python, "download", "--no-deps", "--dest", str(work_dir / "peer-wheels"), dist)
        if probe.returncode != 0:
            peers.dropped[dist] = f"pip download --no-deps {dist} failed: {_last_line(probe.stderr)}"
            continue
        done = _pip(python, "install", "-c", str(_harness_pins(venv)), with_deps.get(dist, dist))
        if done.returncode != 0:
            peers.dropped[dist] = f"pip install {dist} failed: {_last_line(done.stderr)}"
    peers.versions = _installed(python, wanted)
    if "py-pglite" in peers.versions:
        problem = node_problem() or _npm_install(work_dir / "pglite")
        if problem:
            del peers.versions["py-pglite"]
            peers.dropped["py-pglite"] = problem
        else:
            peers.pglite_dir = work_dir / "pglite"
    return peers
