"""Auth: management without a token, with a wrong one, with one of the wrong length, with other
schemes; the comparison is constant-time over equal-length digests; no token ever shows up in
logs, error bodies or any other response."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from piggyback_core import Backbone, FileSystemStore
from tests.live import live_server
from tests.server.conftest import TOKEN, small_task

SUITE = "auth"
WRONG = [
    "", "x", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "x" * len(TOKEN), "x" * 4096, TOKEN[::-1], f" {TOKEN}",
    "wrong-token-marker-7f3a",
]  # fmt: skip


def headers_for(token: str | None, scheme: str = "Bearer") -> dict[str, str]:
    return {} if token is None else {"Authorization": f"{scheme} {token}".rstrip()}


def test_management_is_refused_without_the_exact_token(
    app_client,
    tmp_path: Path,
    resnet18: Backbone,
    cases: Callable,
) -> None:
    data = small_task(resnet18, "flowers").to_bytes()
    n = 0
    with app_client() as client:
        attempts = [
            headers_for(None),
            headers_for(TOKEN, "Basic"),
            headers_for(TOKEN, "Token"),
            {"Authorization": TOKEN},
        ]
        attempts += [headers_for(w) for w in WRONG]
        for h in attempts:
            for method in ("PUT", "DELETE"):
                r = client.request(method, "/tasks/flowers", content=data if method == "PUT" else None, headers=h)
                assert r.status_code == 401, (h, method, r.status_code)
                assert r.headers.get("www-authenticate", "").lower().startswith("bearer") or r.status_code == 401
                n += 1
        assert client.get("/tasks").json()["tasks"] == []
        assert client.put("/tasks/flowers", content=data, headers=headers_for(TOKEN)).status_code == 201
        assert (
            client.put("/tasks/flowers", content=data, headers={"authorization": f"bearer {TOKEN}"}).status_code == 200
        )
    with app_client(token=None, store=tmp_path / "closed") as client:  # secure by default
        for h in (headers_for(None), headers_for(TOKEN)):
            assert client.put("/tasks/flowers", content=data, headers=h).status_code == 403
            n += 1
    cases(SUITE, n)


def test_tokens_are_compared_in_constant_time_over_equal_length_digests(
    app_client,
    monkeypatch: pytest.MonkeyPatch,
    cases: Callable,
) -> None:
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with app_client() as client:
        for token in [t for t in WRONG if t and t == t.strip()] + [TOKEN]:
            client.delete("/tasks/nothing", headers=headers_for(token))
    assert len(calls) == len([t for t in WRONG if t and t == t.strip()]) + 1
    assert all(a == b == 32 for a, b in calls), calls  # sha256 digests: the length never depends on the input
    cases(SUITE, len(calls))


def test_no_token_appears_in_logs_error_bodies_or_any_response(
    tmp_path: Path, resnet18: Backbone, cases: Callable
) -> None:
    FileSystemStore(tmp_path).put("flowers", small_task(resnet18, "flowers").to_bytes())
    data = small_task(resnet18, "birds").to_bytes()
    bodies: list[str] = []
    with (
        live_server(tmp_path, log_level="debug", classify_token="classify-secret-91b2") as server,
        httpx.Client(timeout=30) as http,
    ):
        url = server.url
        for token in WRONG + [TOKEN]:
            for method, path, body in (("PUT", "/tasks/birds", data), ("DELETE", "/tasks/zzz", None),
                                       ("POST", "/classify/flowers", b"not an image")):  # fmt: skip
                r = http.request(method, f"{url}{path}", content=body, headers=headers_for(token))
                bodies.append(r.text)
        for path in ("/tasks", "/tasks/flowers", "/metrics", "/readyz", "/healthz", "/openapi.json"):
            bodies.append(http.get(f"{url}{path}").text)
        log = server.log()
    secrets = [TOKEN, "classify-secret-91b2", "wrong-token-marker-7f3a", TOKEN[::-1]]
    for secret in secrets:
        assert secret not in log, f"a token is in the server log: {secret!r}"
        for body in bodies:
            assert secret not in body, f"a token is in a response: {secret!r}"
    assert "DEBUG" in log or "debug" in log.lower()  # the log was verbose, so the check means something
    cases(SUITE, len(bodies), note=f"{len(bodies)} responses and {len(log.splitlines())} log lines scanned")


def test_with_a_classify_token_every_read_of_task_data_needs_a_token_and_ops_stay_open(
    app_client, resnet18: Backbone, cases: Callable
) -> None:
    classify = "classify-token-0123456789"
    with app_client(classify_token=classify) as client:
        assert client.put("/tasks/flowers", content=small_task(resnet18, "flowers").to_bytes(),
                          headers=headers_for(TOKEN)).status_code == 201  # fmt: skip
        reads = ["/tasks", "/tasks/flowers", "/v2/models/flowers", "/v2/models/flowers/ready"]
        for path in reads:
            for h in [headers_for(None), *(headers_for(w) for w in WRONG[1:4])]:
                assert client.get(path, headers=h).status_code == 401, (path, h)
            assert client.get(path, headers=headers_for(classify)).status_code == 200, path
        # the operator's management token reads the task list too
        for path in ("/tasks", "/tasks/flowers"):
            assert client.get(path, headers=headers_for(TOKEN)).status_code == 200
        for path in ("/metrics", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2"):
            assert client.get(path).status_code == 200, path
    cases(SUITE, len(reads) * 5 + 8)


def test_a_setting_closes_metrics_and_health_behind_the_classify_token(
    app_client, tmp_path: Path, cases: Callable
) -> None:
    classify = "classify-token-0123456789"
    with pytest.raises(ValueError, match="ops_need_token needs a classify token"):
        from server.settings import Settings

        Settings(ops_need_token=True)
    with app_client(classify_token=classify, ops_need_token=True, store=tmp_path / "ops") as client:
        for path in ("/metrics", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers=headers_for(classify)).status_code == 200, path
    cases(SUITE, 12)
