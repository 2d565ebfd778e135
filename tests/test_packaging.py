"""The web stack's version ranges: bounded above and below, and the installed releases inside them
(the drain overrides uvicorn's internals; multipart relies on Starlette's part and spool limits)."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


@pytest.mark.parametrize("name", ["fastapi", "starlette", "uvicorn"])
def test_the_web_stack_is_bounded_to_the_releases_the_suite_runs_on(name: str) -> None:
    requirement = _dependencies()[name]
    operators = {spec.operator for spec in requirement.specifier}
    assert {">=", "<"} <= operators or "==" in operators, requirement
    assert requirement.specifier.contains(version(name)), (requirement, version(name))


def test_the_web_consoles_files_are_package_data_so_a_wheel_ships_them() -> None:
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["server"]
    files = sorted((ROOT / "server" / "console").iterdir())
    assert {f.name for f in files} >= {"index.html", "app.js", "metrics.js", "style.css"}
    for file in files:
        assert any(file.relative_to(ROOT / "server").match(g) for g in globs), f"{file.name} is not package data"
