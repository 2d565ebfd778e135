"""A shared store is shared by every replica: one hostile file, one failing poll or one empty
listing must cost that file or that poll, never a replica or the tasks it serves."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from piggyback_core import Backbone, FileSystemStore
from server.registry import SyncReport, TaskRegistry
from tests.live import LiveServer
from tests.server.conftest import AppFactory, small_task


def _deep_header(depth: int) -> bytes:
    header = b'{"__metadata__":{"format":"piggyback"},"x":' + b"[" * depth + b"]" * depth + b"}"
    return len(header).to_bytes(8, "little") + header


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_a_header_nested_100000_deep_in_the_store_costs_that_file_not_the_replica(
    tmp_path: Path, resnet18: Backbone, cases: Callable[..., None]
) -> None:
    store = FileSystemStore(tmp_path / "store")
    store.put("good", small_task(resnet18, "good").to_bytes())
    store.put("poison", _deep_header(100_000))
    server = LiveServer(tmp_path / "store", store_poll_s=0.2)
    try:
        server.wait_ready()
        store.put("poison2", _deep_header(100_000))  # and one more, picked up by the poller
        deadline = time.monotonic() + 10
        while (
            time.monotonic() < deadline
            and _metric(httpx.get(f"{server.url}/metrics").text, "piggyback_store_tasks_failed") < 2
        ):
            time.sleep(0.1)
        listing = httpx.get(f"{server.url}/tasks").json()
        assert [t["task"] for t in listing["tasks"]] == ["good"]
        assert sorted(listing["failed"]) == ["poison", "poison2"]
        assert _metric(httpx.get(f"{server.url}/metrics").text, "piggyback_store_tasks_failed") == 2
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["tasks_failed"] == 2 and ready["store"]["last_error"] is None
        assert "poison" in server.log()
    finally:
        server.stop()
    cases("poisoned store", 2)


def test_the_store_poller_survives_any_exception_and_shows_the_last_error(
    app_client: AppFactory, resnet18: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = TaskRegistry.sync
    failures = {"left": 3}

    def sync_with_a_bug(self: TaskRegistry, pool: object = None) -> SyncReport:
        if failures["left"] and pool is None:  # polls only; the start-up load goes through
            failures["left"] -= 1
            raise RuntimeError("a bug in a store driver")
        return real(self, pool)  # type: ignore[arg-type]

    monkeypatch.setattr(TaskRegistry, "sync", sync_with_a_bug)
    with app_client(store_poll_s=0.05) as client:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and client.get("/readyz").json()["store"]["last_error"] is None:
            time.sleep(0.02)
        store = client.get("/readyz").json()["store"]
        assert store["last_error"] == "RuntimeError: a bug in a store driver"
        assert client.get("/readyz").status_code == 200
        # the poller goes on: a task another replica stored is picked up
        FileSystemStore(tmp_path / "store").put("later", small_task(resnet18, "later").to_bytes())
        while time.monotonic() < deadline and client.get("/tasks/later").status_code != 200:
            time.sleep(0.02)
        assert client.get("/tasks/later").status_code == 200
        store = client.get("/readyz").json()["store"]
        assert store["last_error"] is None and store["last_success_unix_s"] > time.time() - 10
        metrics = client.get("/metrics").text
        assert _metric(metrics, "piggyback_store_sync_errors_total") == 3
        assert _metric(metrics, "piggyback_store_sync_last_success_timestamp_seconds") > 0
