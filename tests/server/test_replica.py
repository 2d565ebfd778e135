"""The task replica of the Ray Serve deployment without Ray (server.replica): our whole app behind
forwarded requests, the task leases that Ray's multiplexing holds and evicts, and what the
ingress does (the routing key, the body bound, the error bodies)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from starlette.requests import Request

from piggyback_core import FileSystemStore, TaskNotFoundError
from server.app import create_app
from server.errors import NotReadyError
from server.replica import (
    REPLICA_HEADER,
    ForwardedRequest,
    ReplicaApp,
    body_limit,
    error_reply,
    forwarded,
    route_key,
)
from tests.conftest import encode
from tests.server.conftest import settings_for, small_task, wait_ready

JPEG = encode("JPEG")
IMAGE = [(b"content-type", b"image/jpeg")]


@pytest.fixture
def store(tmp_path: Path, resnet18) -> Path:  # noqa: ANN001
    fs = FileSystemStore(tmp_path / "store")
    fs.put("flowers", small_task(resnet18, "flowers", seed=1).to_bytes())
    fs.put("birds", small_task(resnet18, "birds", num_labels=3, seed=2).to_bytes())
    return tmp_path / "store"


def run_replica(store: Path, scenario: Callable[[ReplicaApp], Awaitable[Any]], **overrides: Any) -> Any:
    async def main() -> Any:
        replica = ReplicaApp(settings_for(store, **overrides), name="replica-a")
        await replica.start()
        try:
            return await scenario(replica)
        finally:
            await replica.stop()

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("method", "path", "query", "task"),
    [
        ("POST", "/classify/flowers", b"top_k=2", "flowers"),
        ("POST", "/classify", b"tasks=birds,flowers", "birds"),
        ("POST", "/classify", b"tasks=%20,flowers", "flowers"),
        ("POST", "/v2/models/birds/infer", b"", "birds"),
        ("POST", "/v2/models/birds/versions/abc/infer", b"", "birds"),
        ("GET", "/v2/models/birds", b"", "birds"),
        ("PUT", "/tasks/new-task", b"", "new-task"),
        ("DELETE", "/tasks/birds", b"", "birds"),
        ("GET", "/tasks", b"", None),
        ("GET", "/healthz", b"", None),
        ("GET", "/v2/health/ready", b"", None),
        ("POST", "/classify/Bad..Name", b"", None),  # any replica: the app refuses the name itself
        ("POST", "/classify", b"", None),
    ],
)
def test_the_routing_key_is_the_task_a_request_is_for(method: str, path: str, query: bytes, task: str | None) -> None:
    assert route_key(method, path, query) == task


def test_a_forwarded_request_gets_the_same_answer_as_the_app_over_http_and_names_the_replica(store: Path) -> None:
    with TestClient(create_app(settings_for(store)), raise_server_exceptions=False) as client:
        wait_ready(client)
        expected = client.post("/classify/flowers?top_k=3", content=JPEG, headers={"Content-Type": "image/jpeg"})
    assert expected.status_code == 200

    async def scenario(replica: ReplicaApp) -> list[Any]:
        return [
            await replica.handle(ForwardedRequest("POST", "/classify/flowers", b"top_k=3", IMAGE, JPEG)),
            await replica.handle(ForwardedRequest("POST", "/classify/nope", b"", IMAGE, JPEG)),
            await replica.handle(ForwardedRequest("POST", "/v2/models/nope/infer", b"", [], b"{}")),
            await replica.handle(ForwardedRequest("DELETE", "/tasks/flowers")),
            await replica.handle(ForwardedRequest("GET", "/tasks")),
        ]

    ok, unknown, unknown_v2, unauthorised, listing = run_replica(store, scenario)
    assert ok.status == 200 and ok.header(REPLICA_HEADER) == "replica-a"
    got, want = json.loads(ok.body), expected.json()
    assert [p["index"] for p in got["predictions"]] == [p["index"] for p in want["predictions"]]
    assert [p["score"] for p in got["predictions"]] == pytest.approx([p["score"] for p in want["predictions"]])
    assert unknown.status == 404 and "detail" in json.loads(unknown.body)
    assert unknown_v2.status == 404 and "error" in json.loads(unknown_v2.body)
    assert unauthorised.status == 401  # the same auth: no token, no deletion
    assert sorted(t["task"] for t in json.loads(listing.body)["tasks"]) == ["birds", "flowers"]
    assert all(r.header(REPLICA_HEADER) == "replica-a" for r in (unknown, unknown_v2, unauthorised, listing))


def test_a_lease_builds_and_keeps_a_tasks_weights_and_its_release_drops_them(store: Path) -> None:
    async def scenario(replica: ReplicaApp) -> None:
        engine = replica.services.engine  # type: ignore[union-attr]
        assert "flowers" not in engine.tasks  # a stored task is read at its first use
        lease = await replica.lease("flowers")
        assert lease.pinned and engine.residency("flowers").pinned
        assert engine.residency("flowers").built_bytes == engine.weights_nbytes
        lease.release()
        assert not engine.residency("flowers").pinned and engine.residency("flowers").built_bytes == 0
        assert replica.serves("flowers") and not replica.serves("nope")
        with pytest.raises(TaskNotFoundError):
            await replica.lease("nope")

    run_replica(store, scenario, prefill=False)


def test_an_eviction_leaves_the_weights_a_batch_in_flight_holds_intact(store: Path) -> None:
    async def scenario(replica: ReplicaApp) -> None:
        engine = replica.services.engine  # type: ignore[union-attr]
        before = await replica.handle(ForwardedRequest("POST", "/classify/flowers", b"", IMAGE, JPEG))
        lease = await replica.lease("flowers")
        task = engine.get_task("flowers")
        in_flight = engine.cache.get((task.name, task.version))  # what a batch running now holds
        assert in_flight is not None
        copies = {k: v.clone() for k, v in in_flight.items()}
        lease.release()  # Ray Serve evicts the task meanwhile
        assert engine.residency("flowers").built_bytes == 0
        assert all(torch.equal(in_flight[k], copies[k]) for k in copies)  # nothing freed under the batch
        after = await replica.handle(ForwardedRequest("POST", "/classify/flowers", b"", IMAGE, JPEG))
        assert after.status == 200
        assert json.loads(after.body)["predictions"] == json.loads(before.body)["predictions"]

    run_replica(store, scenario, prefill=False, cpu_path="reference")  # plain tensors to compare


def test_a_superseded_lease_releases_nothing_and_a_lease_is_released_once(store: Path) -> None:
    async def scenario(replica: ReplicaApp) -> None:
        engine = replica.services.engine  # type: ignore[union-attr]
        old = await replica.lease("birds")
        old.release()
        new = await replica.lease("birds")  # evicted, then loaded again
        old.release()  # the garbage collector calling the old lease's __del__ late
        assert engine.residency("birds").pinned and engine.residency("birds").built_bytes > 0
        new.release()
        new.release()
        assert not engine.residency("birds").pinned

    run_replica(store, scenario, prefill=False)


def test_releasing_a_lease_leaves_a_task_pinned_by_pin_tasks_or_the_repository_api_pinned(store: Path) -> None:
    async def scenario(replica: ReplicaApp) -> None:
        services = replica.services
        assert services is not None
        engine = services.engine
        lease = await replica.lease("birds")  # pinned at start by pin_tasks
        lease.release()
        assert engine.residency("birds").pinned and engine.residency("birds").built_bytes > 0
        lease = await replica.lease("flowers")
        services.repository.load("flowers")  # loaded through /v2/repository while leased
        lease.release()
        assert engine.residency("flowers").pinned and engine.residency("flowers").built_bytes > 0

    run_replica(store, scenario, prefill=False, pin_tasks="birds")


def test_a_task_that_does_not_fit_is_leased_unpinned_and_still_served(store: Path) -> None:
    async def scenario(replica: ReplicaApp) -> tuple[bool, int]:
        lease = await replica.lease("flowers")
        reply = await replica.handle(ForwardedRequest("POST", "/classify/flowers", b"", IMAGE, JPEG))
        return lease.pinned, reply.status

    assert run_replica(store, scenario, cache_bytes=0, prefill=False) == (False, 200)


def test_a_replica_that_cannot_start_raises_its_reason_and_reports_unhealthy(tmp_path: Path) -> None:
    async def main() -> None:
        replica = ReplicaApp(settings_for(tmp_path / "store", weights=str(tmp_path / "missing.pth")), name="r")
        with pytest.raises(Exception, match="missing.pth"):
            await replica.start()
        with pytest.raises(NotReadyError, match="start-up failed"):
            replica.check_health()
        await replica.stop()

    asyncio.run(main())


def _request(method: str, path: str, body: bytes, query: bytes = b"") -> Request:
    chunks = [body]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop() if chunks else b"", "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "query_string": query, "headers": [],
             "client": ("10.0.0.1", 5000), "server": ("ingress", 8000), "scheme": "http", "root_path": ""}  # fmt: skip
    return Request(scope, receive)


def test_the_ingress_reads_a_body_within_the_apps_bound_and_refuses_more(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, max_image_bytes=1000, max_task_bytes=5000)
    assert body_limit("POST", "/classify/a", settings) == 1000 + 64 * 1024
    assert body_limit("PUT", "/tasks/a", settings) == 5000
    ok = asyncio.run(forwarded(_request("PUT", "/tasks/a", b"x" * 5000, b"q=1"), settings))
    assert (ok.method, ok.path, ok.query_string, len(ok.body), ok.client) == ("PUT", "/tasks/a", b"q=1", 5000,
                                                                              ("10.0.0.1", 5000))  # fmt: skip
    with pytest.raises(Exception, match="5,000 bytes") as refused:
        asyncio.run(forwarded(_request("PUT", "/tasks/a", b"x" * 5001), settings))
    assert error_reply("/tasks/a", refused.value).status_code == 413


def test_the_ingress_answers_errors_as_the_app_does() -> None:
    v2 = error_reply("/v2/models/a/infer", NotReadyError("busy"))
    plain = error_reply("/classify/a", NotReadyError("busy"))
    assert (v2.status_code, json.loads(v2.body)) == (503, {"error": "busy"})
    assert (plain.status_code, json.loads(plain.body)) == (503, {"detail": "busy"})
    assert plain.headers["retry-after"] == "5"
    from piggyback_core import PiggybackError

    hidden = error_reply("/classify/a", PiggybackError("secret internals"))
    assert (hidden.status_code, json.loads(hidden.body)) == (500, {"detail": "internal error"})
