"""Many tasks on one server: the cache budget and pinning, per-task residency, pagination, bounded
metrics, workers."""

import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from piggyback_core import Backbone, Engine, FileSystemStore
from tests.conftest import encode
from tests.server.conftest import AppFactory, small_task


@pytest.fixture
def store_of_five(tmp_path: Path, resnet18: Backbone) -> Path:
    store = FileSystemStore(tmp_path / "store")
    for i in range(5):
        store.put(f"t{i}", small_task(resnet18, f"t{i}", num_labels=3, seed=i).to_bytes())
    return tmp_path / "store"


def _classify(client, task: str) -> None:  # noqa: ANN001
    r = client.post(f"/classify/{task}", content=encode("JPEG"), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text


def test_tasks_are_listed_a_page_at_a_time(app_client: AppFactory, store_of_five: Path) -> None:
    with app_client(store=store_of_five) as client:
        seen, after, pages = [], None, 0
        while True:
            params = {"limit": 2} | ({"after": after} if after else {})
            body = client.get("/tasks", params=params).json()
            assert body["total"] == 5 and len(body["tasks"]) <= 2
            seen += [t["task"] for t in body["tasks"]]
            pages += 1
            after = body["next"]
            if after is None:
                break
        assert seen == [f"t{i}" for i in range(5)] and pages == 3
        assert len(client.get("/tasks").json()["tasks"]) == 5  # default page: 100
        for _ in range(200):  # the cache is prefilled in the background after ready
            if all(client.get(f"/tasks/t{i}").json()["residency"]["built_bytes"] for i in range(5)):
                break
            time.sleep(0.05)
        assert all(client.get(f"/tasks/t{i}").json()["residency"]["built_bytes"] for i in range(5))
        assert client.get("/tasks", params={"limit": 0}).status_code == 422


def test_a_pinned_task_is_built_at_start_and_never_evicted_and_residency_is_reported(
    app_client: AppFactory, store_of_five: Path, resnet18: Backbone
) -> None:
    one_task = Engine(resnet18).weights_nbytes  # float32 (forced below); packed or not, as the server's
    # room for two tasks' built weights: t0 pinned, the other four take turns in the one slot left
    with app_client(
        store=store_of_five, pin_tasks="t0", cache_bytes=2 * one_task + 1, dtype="float32", workers=1
    ) as client:
        t0 = client.get("/tasks/t0").json()["residency"]
        assert t0["pinned"] and t0["built_bytes"] == one_task and t0["packed_bytes"] > 0
        ready = client.get("/readyz").json()
        assert ready["cache_budget_bytes"] == 2 * one_task + 1 and ready["workers"] == 1
        assert ready["mixed_path"] == "segments"  # auto on a CPU
        for _ in range(2):
            for i in range(1, 5):
                _classify(client, f"t{i}")
        _classify(client, "t0")
        t0 = client.get("/tasks/t0").json()["residency"]
        assert t0["built_bytes"] == one_task and t0["cache_hits"] >= 1 and t0["cache_misses"] == 0
        others = [client.get(f"/tasks/t{i}").json()["residency"] for i in range(1, 5)]
        assert sum(r["built_bytes"] for r in others) <= one_task  # the budget holds
        assert all(r["cache_hits"] + r["cache_misses"] == 2 for r in others)
        samples = {
            s.name: s.value
            for family in text_string_to_metric_families(client.get("/metrics").text)
            for s in family.samples
        }
        assert samples["piggyback_weight_cache_pinned_bytes"] == one_task
        assert samples["piggyback_weight_cache_budget_bytes"] == 2 * one_task + 1
        assert samples["piggyback_weight_cache_hits_total"] >= 1
        assert samples["piggyback_weight_cache_misses_total"] >= 4
        assert "piggyback_weight_cache_evictions_total" in samples


def test_a_pinned_task_that_cannot_fit_the_budget_fails_the_start_with_the_reason(store_of_five: Path) -> None:
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.server.conftest import settings_for

    app = create_app(settings_for(store_of_five, pin_tasks="t1", cache_bytes=1000))
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(400):
            detail = client.get("/readyz").json()["detail"]
            if "start-up failed" in detail:
                break
            time.sleep(0.05)
        assert "task 't1' cannot be pinned" in detail and "(1000 bytes)" in detail


def test_per_task_metric_series_are_bounded_and_the_rest_counted_as_other(
    app_client: AppFactory, store_of_five: Path
) -> None:
    with app_client(store=store_of_five, metrics_top_tasks=2, metrics_tasks="t4") as client:
        for i in range(5):
            _classify(client, f"t{i}")
        metrics = client.get("/metrics").text
        labelled = {f"t{i}" for i in range(5) if f'piggyback_requests_total{{status="200",task="t{i}"}}' in metrics}
        assert labelled == {"t0", "t1", "t4"}  # the first two to get traffic, and the allow-list
        assert 'piggyback_requests_total{status="200",task="_other"} 2.0' in metrics


@pytest.mark.parametrize("workers", [1, 2])
def test_several_workers_answer_a_burst_of_mixed_tasks_correctly(
    app_client: AppFactory, store_of_five: Path, workers: int
) -> None:
    import concurrent.futures

    with app_client(store=store_of_five, workers=workers, worker_threads=1, dtype="float32") as client:
        assert client.get("/readyz").json()["workers"] == workers
        # on a CPU, the work in sight is spread over the idle workers (server/batcher.py)
        assert client.app.state.services.batcher.policy.spread == (workers > 1)  # type: ignore[attr-defined]
        expected = {f"t{i}": client.post(f"/classify/t{i}", content=encode("JPEG"),
                                         headers={"Content-Type": "image/jpeg"}).json()["predictions"]
                    for i in range(5)}  # fmt: skip

        def one(i: int) -> bool:
            task = f"t{i % 5}"
            r = client.post(f"/classify/{task}", content=encode("JPEG"), headers={"Content-Type": "image/jpeg"})
            got = r.json()["predictions"]
            return [p["label"] for p in got] == [p["label"] for p in expected[task]] and all(
                abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(got, expected[task], strict=True)
            )

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert all(pool.map(one, range(40)))


def test_spreading_batches_is_a_setting(app_client: AppFactory, store_of_five: Path) -> None:
    with app_client(store=store_of_five, workers=2, spread_batches=False) as client:
        assert client.app.state.services.batcher.policy.spread is False  # type: ignore[attr-defined]


def test_ready_after_backbone_serves_at_once_and_loads_a_pending_task_on_its_first_request(
    app_client: AppFactory, store_of_five: Path, resnet18: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.server.conftest import AUTH

    FileSystemStore(store_of_five).put("t5", b"not a task file")
    slow_head = FileSystemStore.head

    def head(self, name, version=None):  # noqa: ANN001, ANN202 - a slow store: 0.5 s a header
        time.sleep(0.5)
        return slow_head(self, name, version)

    monkeypatch.setattr(FileSystemStore, "head", head)
    with app_client(store=store_of_five, ready_after="backbone", load_threads=1, prefill=False) as client:
        ready = client.get("/readyz").json()
        assert ready["tasks_loading"] >= 3 and ready["tasks"] <= 2  # ready before the store was read through
        # the last task in line answers now: it is loaded for its request, ahead of the others
        _classify(client, "t4")
        assert client.get("/readyz").json()["tasks_loading"] >= 2
        # a registration of a pending task wins over its background load, and so does a deletion
        new_t3 = small_task(resnet18, "t3", num_labels=6, seed=30)
        assert client.put("/tasks/t3", content=new_t3.to_bytes(), headers=AUTH).status_code == 200
        assert client.delete("/tasks/t2", headers=AUTH).status_code == 204
        for _ in range(100):
            if client.get("/readyz").json()["tasks_loading"] == 0:
                break
            time.sleep(0.1)
        body = client.get("/tasks").json()
        assert [t["task"] for t in body["tasks"]] == ["t0", "t1", "t3", "t4"]
        assert "t5" in body["failed"]
        assert len(client.get("/tasks/t3").json()["labels"]) == 6
        assert client.get("/tasks/t2").status_code == 404
        time.sleep(0.5)  # a store poll later, it all still holds
        assert len(client.get("/tasks/t3").json()["labels"]) == 6 and client.get("/tasks/t2").status_code == 404
