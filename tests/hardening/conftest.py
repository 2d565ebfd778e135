"""The hardening suites: hostile input, API fuzzing, overload, crash safety, leaks, auth. Each
records how many cases it tried; the counts are printed at the end of the run."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import pytest

from tests.server.conftest import app_client  # noqa: F401 - the server tests' fixture, shared

_CASES: dict[str, int] = defaultdict(int)
_NOTES: dict[str, list[str]] = defaultdict(list)


@pytest.fixture
def cases() -> Callable[..., None]:
    """``cases(suite, n, note=None)``: count ``n`` cases tried for ``suite`` (and an optional figure)."""

    def count(suite: str, n: int = 1, note: str | None = None) -> None:
        _CASES[suite] += n
        if note:
            _NOTES[suite].append(note)

    return count


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _CASES:
        return
    terminalreporter.section("hardening: cases tried per suite")
    for suite in sorted(_CASES):
        terminalreporter.write_line(f"{suite:<24} {_CASES[suite]:>6} cases")
        for note in _NOTES[suite]:
            terminalreporter.write_line(f"{'':<24} {note}")
