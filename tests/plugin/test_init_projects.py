"""Issue 16, must show: `pgshard init && pytest -n 2` on the project's own test projects, their conftests and code
untouched, passes as many tests as the suite's own serial run."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

PROJECTS = Path(__file__).parents[1] / "projects"
SUITES = {"shared_db": 34, "from_parts": 9}  # every test of each suite (shared_db: as many as its serial run)
CHECKS = {"shared_db": "heads", "from_parts": "heads, models"}  # from_parts' env.py names its metadata


def _digest(root: Path, skip: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != skip and "__pycache__" not in p.parts and ".pytest_cache" not in p.parts}


@pytest.mark.parametrize("name", list(SUITES))
def test_pgshard_init_then_pytest_n2_passes_the_whole_suite(pytester: pytest.Pytester, name: str) -> None:
    root = pytester.path
    shutil.copytree(PROJECTS / name, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    migration = next((root / "alembic" / "versions").glob("0001*.py"))
    with migration.open("a") as fh:
        fh.write(f"# token: {uuid.uuid4().hex}\n")  # a template of its own
    config = root / "pytest.ini"
    if not config.exists():  # from_parts ships without one: init makes it, with the pythonpath it needs by hand
        config.write_text("[pytest]\npythonpath = .\n")
    before = _digest(root, "pytest.ini")
    init = subprocess.run([sys.executable, "-m", "pgshard.cli", "init"], cwd=root, capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    assert "writing into pytest.ini [pytest]" in init.stdout and "# <- " in init.stdout
    assert _digest(root, "pytest.ini") == before  # no conftest, code or settings edited
    written = config.read_text()
    assert "pgshard_migrate" in written and "pgshard_env" in written, written
    again = subprocess.run([sys.executable, "-m", "pgshard.cli", "init"], cwd=root, capture_output=True, text=True)
    assert again.returncode == 2 and config.read_text() == written and len(again.stderr.splitlines()) == 1
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=SUITES[name])
    result.stdout.fnmatch_lines(["*clone per worker (*): gw0 *, gw1 *"])
    result.stdout.fnmatch_lines([f"*template * built in *, checks {CHECKS[name]} passed in * s*"])
