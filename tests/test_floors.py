"""Issue 8 item 5: the version floors real projects pin stay installable.

.ci/run installs pgshard beside a project pinned to the floors (`.ci/constraints-floors.txt`) and runs
our suites there; these tests keep pyproject.toml from drifting away from what CI proves: a requirement
raised past a floor (as `pytest>=8` once was) fails here first, with the requirement named.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli below 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
EXTRAS = ("", "dev", "embedded", "fastapi", "async")  # what the README and .ci/run install


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)


def _pins(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            pins[requirement.name.lower()] = Version(spec.version)
    return pins


def _requirements(python: str) -> list[Requirement]:
    """pgshard's own requirements, with every extra we document, that apply on this Python."""
    project = _pyproject()["project"]
    lines = list(project["dependencies"])
    for extra in EXTRAS[1:]:
        lines += project["optional-dependencies"][extra]
    found = []
    for line in lines:
        requirement = Requirement(line)
        if requirement.name == project["name"]:
            continue  # dev pulls in our other extras, listed above
        if requirement.marker is None or any(
                requirement.marker.evaluate({"python_version": python, "extra": extra}) for extra in EXTRAS):
            found.append(requirement)
    return found


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("constraints", ["constraints-floors.txt", "constraints-oldest.txt"])
def test_every_requirement_admits_the_pinned_floors(constraints: str, python: str) -> None:
    pins = _pins(constraints)
    if python == "3.13" and constraints == "constraints-oldest.txt":
        pins.pop("sqlalchemy")  # SQLAlchemy < 2.0.31 cannot be imported on 3.13: pyproject says so
    for requirement in _requirements(python):
        pinned = pins.get(requirement.name.lower())
        assert pinned is None or requirement.specifier.contains(pinned, prereleases=True), (
            f"pyproject.toml requires {requirement} on Python {python}, which excludes the pin "
            f"{requirement.name}=={pinned} of .ci/{constraints}")


def test_the_oldest_sqlalchemy_declared_is_the_one_ci_runs() -> None:
    """The floor pyproject.toml claims below Python 3.13 is exactly the version .ci/run tests."""
    floors = {str(spec.version) for requirement in _requirements("3.11") if requirement.name == "SQLAlchemy"
              for spec in requirement.specifier if spec.operator == ">="}
    assert floors == {str(_pins("constraints-oldest.txt")["sqlalchemy"])}


def test_python_3_10_to_3_13_are_declared() -> None:
    project = _pyproject()["project"]
    assert project["requires-python"] == ">=3.10"
    declared = {c.rsplit(" :: ", 1)[-1] for c in project["classifiers"] if c.startswith("Programming Language")}
    assert set(PYTHONS) <= declared
