"""Triton's model-repository extension (``/v2/repository``): tritonclient's ``load_model``,
``unload_model``, ``get_model_repository_index`` and ``is_model_ready`` against real ``piggyback
serve`` processes in both ``model_control`` modes, the raw requests KServe's agent sends, and
pinning under cache pressure in an app in this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from piggyback_core import Backbone, Engine, FileSystemStore, TaskFile
from server.settings import Settings
from tests.conftest import encode
from tests.live import LiveServer, live_server
from tests.server.conftest import AUTH, AppFactory, small_task

JPEG = encode("JPEG")
TASKS = ("birds", "cars", "flowers")


def _store(root: Path, resnet18: Backbone) -> Path:
    store = FileSystemStore(root)
    for i, name in enumerate(TASKS):
        store.put(name, small_task(resnet18, name, num_labels=3 + i, seed=i).to_bytes())
    return root


@pytest.fixture(scope="module")
def lazy(tmp_path_factory: pytest.TempPathFactory, resnet18: Backbone) -> Iterator[LiveServer]:
    with live_server(_store(tmp_path_factory.mktemp("lazy"), resnet18), dtype="float32") as server:
        yield server


@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory, resnet18: Backbone) -> Iterator[LiveServer]:
    store = _store(tmp_path_factory.mktemp("explicit"), resnet18)
    with live_server(store, dtype="float32", model_control="explicit", pin_tasks="birds") as server:
        yield server


def _client(server: LiveServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=server.url.removeprefix("http://"))


def _classify(url: str, task: str) -> httpx.Response:
    return httpx.post(f"{url}/classify/{task}", content=JPEG, headers={"Content-Type": "image/jpeg"}, timeout=30)


def _residency(url: str, task: str) -> dict:
    r = httpx.get(f"{url}/tasks/{task}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["residency"]


def _index(client: triton.InferenceServerClient) -> dict[str, dict]:
    return {entry["name"]: entry for entry in client.get_model_repository_index()}


def test_the_server_metadata_lists_the_model_repository_extension(lazy: LiveServer) -> None:
    assert "model_repository" in _client(lazy).get_server_metadata()["extensions"]


def test_lazy_every_stored_task_is_ready_and_load_pins_and_unload_unpins(lazy: LiveServer) -> None:
    client = _client(lazy)
    index = _index(client)
    assert sorted(index) == sorted(TASKS)
    for name in TASKS:
        version = client.get_model_metadata(name)["versions"][0]
        assert index[name] == {"name": name, "version": version, "state": "READY", "reason": ""}
        assert client.is_model_ready(name)
    client.load_model("cars", headers=AUTH)
    cars = _residency(lazy.url, "cars")
    assert cars["pinned"] and cars["built_bytes"] > 0
    client.unload_model("cars", headers=AUTH)
    cars = _residency(lazy.url, "cars")
    assert not cars["pinned"] and cars["built_bytes"] == 0
    # lazy: an unloaded task still answers; its weights are built again on demand
    assert client.is_model_ready("cars") and _index(client)["cars"]["state"] == "READY"
    misses = cars["cache_misses"]
    assert _classify(lazy.url, "cars").status_code == 200
    assert _residency(lazy.url, "cars")["cache_misses"] == misses + 1


def test_explicit_only_loaded_tasks_answer_until_unloaded(explicit: LiveServer) -> None:
    client = _client(explicit)
    index = _index(client)
    assert sorted(index) == sorted(TASKS)
    assert index["birds"]["state"] == "READY"  # pin_tasks are loaded at start
    assert client.is_model_ready("birds") and _classify(explicit.url, "birds").status_code == 200
    flowers = index["flowers"]
    assert flowers["state"] == "UNAVAILABLE" and "/v2/repository/models/flowers/load" in flowers["reason"]
    assert [e["name"] for e in client.get_model_repository_index() if e["state"] == "READY"] == ["birds"]
    assert not client.is_model_ready("flowers")
    r = _classify(explicit.url, "flowers")
    assert r.status_code == 404 and "load it with POST /v2/repository/models/flowers/load" in r.json()["detail"]
    r = httpx.get(f"{explicit.url}/v2/models/flowers", timeout=10)
    assert r.status_code == 404 and "not loaded" in r.json()["error"]
    assert httpx.get(f"{explicit.url}/tasks/flowers", timeout=10).status_code == 200  # management still sees it

    client.load_model("flowers", headers=AUTH)
    assert client.is_model_ready("flowers") and _index(client)["flowers"]["state"] == "READY"
    assert _classify(explicit.url, "flowers").status_code == 200
    assert _residency(explicit.url, "flowers")["pinned"]

    client.unload_model("flowers", headers=AUTH)
    assert not client.is_model_ready("flowers") and _index(client)["flowers"]["state"] == "UNAVAILABLE"
    assert _classify(explicit.url, "flowers").status_code == 404
    with pytest.raises(InferenceServerException, match="not loaded"):
        client.get_model_metadata("flowers")


def test_raw_requests_as_kserves_agent_sends_them(explicit: LiveServer) -> None:
    url = f"{explicit.url}/v2/repository"
    json = {"Content-Type": "application/json"}
    for body in (b"{}", b""):  # tritonclient sends nothing, KServe's agent "{}"
        r = httpx.post(f"{url}/index", content=body, headers=json, timeout=10)
        assert r.status_code == 200 and sorted(e["name"] for e in r.json()) == sorted(TASKS)
    r = httpx.post(f"{url}/index", json={"ready": True}, timeout=10)
    assert all(e["state"] == "READY" for e in r.json()) and "birds" in [e["name"] for e in r.json()]
    r = httpx.post(f"{url}/models/cars/load", content=b"{}", headers=json | AUTH, timeout=30)
    assert (r.status_code, r.content) == (200, b"")
    assert _classify(explicit.url, "cars").status_code == 200
    r = httpx.post(f"{url}/models/cars/unload", content=b"{}", headers=json | AUTH, timeout=30)
    assert (r.status_code, r.content) == (200, b"")
    assert _classify(explicit.url, "cars").status_code == 404
    r = httpx.post(f"{url}/index", content=b'{"ready": "yes"}', timeout=10)
    assert r.status_code == 422 and "ready" in r.json()["error"]
    r = httpx.post(f"{url}/index", content=b"[1, 2", timeout=10)
    assert r.status_code == 422 and "error" in r.json()


def test_load_refuses_unknown_tasks_missing_tokens_versions_and_configs(lazy: LiveServer) -> None:
    client = _client(lazy)
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("nope", headers=AUTH)
    assert caught.value.status() == "404" and "no task named 'nope'" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.unload_model("nope", headers=AUTH)
    assert caught.value.status() == "404"
    for headers in (None, {"Authorization": "Bearer wrong"}):
        with pytest.raises(InferenceServerException) as caught:
            client.load_model("flowers", headers=headers)
        assert caught.value.status() == "401" and "bearer token" in caught.value.message()
        with pytest.raises(InferenceServerException):
            client.unload_model("flowers", headers=headers)
    assert not _residency(lazy.url, "flowers")["pinned"]
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("flowers", headers=AUTH, config='{"max_batch_size": 8}')
    assert caught.value.status() == "422" and "not supported" in caught.value.message()
    for versioned in ("flowers/3", "flowers:3", "flowers/versions/3"):
        r = httpx.post(f"{lazy.url}/v2/repository/models/{versioned}/load", headers=AUTH, timeout=10)
        assert r.status_code == 422 and "load 'flowers'" in r.json()["error"], r.text
    r = httpx.post(f"{lazy.url}/v2/repository/models/Bad%20Name/load", headers=AUTH, timeout=10)
    assert r.status_code == 422 and "invalid task name" in r.json()["error"]


# --- in this process: the cache, the store and the metrics ----------------------------------------


def _samples(client: TestClient) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for s in family.samples
    }


def _in_process_classify(client: TestClient, task: str) -> int:
    return client.post(f"/classify/{task}", content=JPEG, headers={"Content-Type": "image/jpeg"}).status_code


@pytest.fixture
def one_task(resnet18: Backbone) -> int:
    return Engine(resnet18).weights_nbytes  # float32 (forced below): a task's built weights


def test_a_loaded_task_survives_other_tasks_evicting_each_other(
    app_client: AppFactory, tmp_path: Path, resnet18: Backbone, one_task: int
) -> None:
    store = _store(tmp_path / "store", resnet18)
    # room for two tasks' built weights: flowers pinned, birds and cars take turns in the other slot
    with app_client(store=store, cache_bytes=2 * one_task + 1, dtype="float32", workers=1, prefill=False) as client:
        assert client.post("/v2/repository/models/flowers/load", headers=AUTH).status_code == 200
        assert _in_process_classify(client, "birds") == 200  # cached in the free slot
        for _ in range(70):  # birds goes stale (unused for more than 64 lookups)...
            assert _in_process_classify(client, "flowers") == 200
        assert _in_process_classify(client, "cars") == 200  # ... and cars evicts it
        evictions = _samples(client)[("piggyback_weight_cache_evictions_total", ())]
        assert evictions >= 1 and client.get("/tasks/birds").json()["residency"]["built_bytes"] == 0
        flowers = client.get("/tasks/flowers").json()["residency"]
        assert flowers["pinned"] and flowers["built_bytes"] == one_task and flowers["cache_misses"] == 0
        # a second pinned task fits beside the first (evicting what is not pinned); a third does not:
        # refused with the reason, nothing pinned
        assert client.post("/v2/repository/models/cars/load", headers=AUTH).status_code == 200
        r = client.post("/v2/repository/models/birds/load", headers=AUTH)
        assert r.status_code == 507 and "'birds' cannot be pinned" in r.json()["error"], r.text
        assert "2 pinned task(s)" in r.json()["error"] and not client.get("/tasks/birds").json()["residency"]["pinned"]
        assert client.post("/v2/repository/models/flowers/unload", headers=AUTH).status_code == 200
        assert client.post("/v2/repository/models/birds/load", headers=AUTH).status_code == 200
        samples = _samples(client)
        assert samples[("piggyback_weight_cache_pinned_tasks", ())] == 2
        assert samples[("piggyback_weight_cache_pinned_bytes", ())] == 2 * one_task
        actions = {labels: v for (name, labels), v in samples.items() if name == "piggyback_repository_actions_total"}
        assert actions[(("action", "load"), ("status", "200"))] == 3
        assert actions[(("action", "load"), ("status", "507"))] == 1
        assert actions[(("action", "unload"), ("status", "200"))] == 1


def test_load_fetches_a_task_from_the_store_before_any_poll_and_refuses_a_broken_one(
    app_client: AppFactory, tmp_path: Path, resnet18: Backbone
) -> None:
    store = FileSystemStore(tmp_path / "store")
    store.put("birds", small_task(resnet18, "birds", seed=1).to_bytes())
    with app_client(store=tmp_path / "store", store_poll_s=3600, model_control="explicit") as client:
        store.put("owls", small_task(resnet18, "owls", seed=2).to_bytes())  # not seen by any poll yet
        assert _in_process_classify(client, "owls") == 404
        assert client.post("/v2/repository/models/owls/load", headers=AUTH).status_code == 200
        assert _in_process_classify(client, "owls") == 200
        first = client.get("/v2/models/owls").json()["versions"]
        store.put("owls", small_task(resnet18, "owls", seed=3).to_bytes())  # a new version: load reloads
        assert client.post("/v2/repository/models/owls/load", headers=AUTH).status_code == 200
        assert client.get("/v2/models/owls").json()["versions"] != first
        assert client.get("/tasks/owls").json()["residency"]["pinned"]
        (tmp_path / "store" / "broken.safetensors").write_bytes(b"not a task file")
        r = client.post("/v2/repository/models/broken/load", headers=AUTH)
        assert r.status_code == 422 and "error" in r.json()
        assert _in_process_classify(client, "broken") == 404


def test_a_deleted_task_registered_again_must_be_loaded_again(app_client: AppFactory, resnet18: Backbone) -> None:
    with app_client(model_control="explicit") as client:
        data = small_task(resnet18, "owls", seed=2).to_bytes()
        assert client.put("/tasks/owls", content=data, headers=AUTH).status_code == 201
        assert client.post("/v2/repository/models/owls/load", headers=AUTH).status_code == 200
        assert _in_process_classify(client, "owls") == 200
        assert client.put("/tasks/owls", content=data, headers=AUTH).status_code == 200  # replaced: stays loaded
        assert _in_process_classify(client, "owls") == 200
        assert client.delete("/tasks/owls", headers=AUTH).status_code == 204
        assert client.put("/tasks/owls", content=data, headers=AUTH).status_code == 201
        assert _in_process_classify(client, "owls") == 404
        index = client.post("/v2/repository/index").json()
        assert [(e["name"], e["state"]) for e in index] == [("owls", "UNAVAILABLE")]


def test_the_index_gives_unloaded_tasks_their_file_versions_without_reading_the_store(
    app_client: AppFactory, resnet18: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileSystemStore(tmp_path / "versions")
    versions = {}
    for i, name in enumerate(TASKS):
        data = small_task(resnet18, name, seed=i).to_bytes()
        store.put(name, data)
        versions[name] = TaskFile.from_bytes(data).version  # a hash of the metadata, set on read
    with app_client(store=tmp_path / "versions", prefill=False) as client:  # the prefill would read files
        reads: list[str] = []
        head, get = FileSystemStore.head, FileSystemStore.map
        monkeypatch.setattr(FileSystemStore, "head", lambda self, n, v=None: reads.append(n) or head(self, n, v))
        monkeypatch.setattr(FileSystemStore, "map", lambda self, n, v=None: reads.append(n) or get(self, n, v))
        index = client.post("/v2/repository/index").json()
        assert len(set(versions.values())) == 3
        assert {e["name"]: (e["version"], e["state"]) for e in index} == {n: (v, "READY") for n, v in versions.items()}
        assert reads == []  # from what the start-up check kept, not 3 headers read again
        assert _in_process_classify(client, "cars") == 200  # loaded: the same version from the engine
        index = client.post("/v2/repository/index").json()
        assert {e["name"]: e["version"] for e in index} == versions


def test_a_file_stored_under_another_name_has_no_version_in_the_index_until_it_is_read(
    app_client: AppFactory, resnet18: Backbone, tmp_path: Path
) -> None:
    data = small_task(resnet18, "birds", seed=4).to_bytes()  # trained as birds, stored as owls
    store = FileSystemStore(tmp_path / "renamed")
    store.put("owls", data)
    store.put("aaa", small_task(resnet18, "aaa", seed=5).to_bytes())  # the first name: loaded for the warm-up
    with app_client(store=tmp_path / "renamed", prefill=False) as client:
        entry = client.post("/v2/repository/index").json()[1]
        assert entry["name"] == "owls" and entry["state"] == "READY" and "version" not in entry
        assert _in_process_classify(client, "owls") == 200
        entry = client.post("/v2/repository/index").json()[1]
        served = TaskFile.from_bytes(data).renamed("owls").version  # the version changes with the name
        assert entry["version"] == served == client.get("/v2/models/owls").json()["versions"][0]


def test_the_index_needs_the_classify_token_where_task_reads_do(app_client: AppFactory) -> None:
    with app_client(classify_token="reader-token") as client:
        assert client.post("/v2/repository/index").status_code == 401
        assert client.post("/v2/repository/index", headers={"Authorization": "Bearer reader-token"}).json() == []
        # the classify token does not manage
        r = client.post("/v2/repository/models/x/load", headers={"Authorization": "Bearer reader-token"})
        assert r.status_code == 401


def test_model_control_is_a_setting_with_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIGGYBACK_MODEL_CONTROL", "explicit")
    assert Settings().model_control == "explicit"
    monkeypatch.setenv("PIGGYBACK_MODEL_CONTROL", "poll")
    with pytest.raises(ValueError, match="lazy"):
        Settings()


def test_a_task_still_loading_in_the_background_is_loaded_by_load(
    app_client: AppFactory, tmp_path: Path, resnet18: Backbone
) -> None:
    store = _store(tmp_path / "store", resnet18)
    with app_client(store=store, ready_after="backbone", model_control="explicit") as client:
        assert client.post("/v2/repository/models/flowers/load", headers=AUTH).status_code == 200
        assert _in_process_classify(client, "flowers") == 200
        states = {e["name"]: e["state"] for e in client.post("/v2/repository/index").json()}
        assert states == {"birds": "UNAVAILABLE", "cars": "UNAVAILABLE", "flowers": "READY"}
