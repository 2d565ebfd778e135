"""API fuzzing with schemathesis against the server's own OpenAPI schema: every operation, a
bounded number of generated cases (``PIGGYBACK_FUZZ_EXAMPLES``, default 25 per operation; the
opt-in ``make test-fuzz`` runs 500). No 5xx, and every response must match the schema."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from piggyback_core import FileSystemStore, load_backbone
from tests.live import live_server
from tests.server.conftest import AUTH, small_task

EXAMPLES = int(os.environ.get("PIGGYBACK_FUZZ_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("fuzz-store")
    backbone = load_backbone("resnet18", weights="random")
    for name in ("flowers", "birds"):
        FileSystemStore(store).put(name, small_task(backbone, name).to_bytes())
    with live_server(store, max_image_bytes=1_000_000, max_task_bytes=5_000_000) as server:
        yield server.url


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_operation_answers_5xx_or_breaks_its_schema(fuzz_target: str, mode: str, cases: Callable) -> None:
    """Schemathesis' Python API driven by Hypothesis directly (its pytest plugin does not run under
    pytest 9): valid inputs (positive) and inputs that break the schema on purpose (negative)."""
    schema = schemathesis.openapi.from_url(f"{fuzz_target}/openapi.json")
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8  # classify, tasks (list, get, put, delete), healthz, readyz, metrics
    tried = 0
    skipped: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=generation))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def run(case: schemathesis.Case) -> None:
            nonlocal tried
            tried += 1
            # Authenticated, so that PUT/DELETE reach their validation instead of stopping at 401.
            case.call_and_validate(headers=AUTH if case.method in ("PUT", "DELETE") else None, checks=CHECKS)

        try:
            run()
        except Unsatisfiable:
            assert mode == "negative"  # no parameter or body to break (e.g. GET /healthz)
            skipped.append(f"{operation.method.upper()} {operation.path}")
    cases("api fuzzing", tried, note=f"{mode}: {tried} cases over {len(operations) - len(skipped)} operations"
          + (f" (nothing to break in {', '.join(skipped)})" if skipped else ""))  # fmt: skip
