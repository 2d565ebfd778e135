"""Ray Serve end to end (server.ray_serve) on a local Ray: two CPU task replicas over one store,
resnet18 with random weights. A task's requests land on one replica, tritonclient works through the
ingress, and a killed replica is replaced while requests keep succeeding.

In the default run: about a minute on 2 cores, Ray's start and stop included. Skipped where
ray[serve] is not installed (it is in the dev extra)."""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from piggyback_core import FileSystemStore
from server.replica import REPLICA_HEADER
from tests.conftest import encode
from tests.server.conftest import TOKEN, small_task

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

JPEG = encode("JPEG")
IMAGE = {"Content-Type": "image/jpeg"}
TASKS = ("flowers", "birds", "cars")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = check()
        except Exception:  # noqa: BLE001 - not up yet
            result = None
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, resnet18) -> Iterator[str]:  # noqa: ANN001
    from server.ray_serve import PiggybackIngress, TaskReplica

    store = tmp_path_factory.mktemp("ray-store")
    fs = FileSystemStore(store)
    for seed, name in enumerate(TASKS):
        fs.put(name, small_task(resnet18, name, seed=seed).to_bytes())
    settings = {"backbone": "resnet18", "weights": "random", "store": str(store), "token": TOKEN,
                "max_wait_ms": 2.0, "store_poll_s": 0.5, "workers": 1, "worker_threads": 1}  # fmt: skip
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        replicas = TaskReplica.options(num_replicas=2, ray_actor_options={"num_cpus": 0.5}).bind(settings, 2)
        app = PiggybackIngress.options(ray_actor_options={"num_cpus": 0.25}).bind(replicas, settings)
        serve.run(app, name="piggyback", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: httpx.get(f"{base}/readyz", timeout=5).status_code == 200, 180, "the replicas to be ready")
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()


def _classify(url: str, task: str) -> httpx.Response:
    r = httpx.post(f"{url}/classify/{task}", content=JPEG, headers=IMAGE, timeout=60)
    assert r.status_code == 200, r.text
    return r


def test_the_same_task_lands_on_the_same_replica(url: str) -> None:
    first = {task: _classify(url, task).headers[REPLICA_HEADER] for task in TASKS}
    time.sleep(1.0)  # the replicas report their tasks to Ray Serve's routers (every 0.1 s)
    seen = collections.defaultdict(set)
    for _ in range(5):
        for task in TASKS:
            seen[task].add(_classify(url, task).headers[REPLICA_HEADER])
    print("placement:", {t: sorted(r) for t, r in seen.items()})
    assert all(seen[t] == {first[t]} for t in TASKS), (first, seen)
    assert len(set(first.values())) == 2  # three tasks, two replicas: both serve


def test_the_api_auth_and_errors_are_the_apps_through_the_ingress(url: str, resnet18) -> None:  # noqa: ANN001
    assert httpx.post(f"{url}/classify/nope", content=JPEG, headers=IMAGE, timeout=30).status_code == 404
    bad = httpx.post(f"{url}/v2/models/nope/infer", json={"inputs": []}, timeout=30)
    assert bad.status_code == 404 and "error" in bad.json()
    text = httpx.post(f"{url}/classify/flowers", content=b"x", headers={"Content-Type": "text/plain"}, timeout=30)
    assert text.status_code == 415 and "detail" in text.json()
    assert httpx.delete(f"{url}/tasks/cars", timeout=30).status_code == 401
    listing = httpx.get(f"{url}/tasks", timeout=30).json()
    assert sorted(t["task"] for t in listing["tasks"]) == sorted(TASKS)
    # registered through the ingress: served at once, by the replica that registered it
    data = small_task(resnet18, "planes", seed=7).to_bytes()
    put = httpx.put(f"{url}/tasks/planes", content=data, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert put.status_code == 201, put.text
    assert _classify(url, "planes").headers[REPLICA_HEADER] == put.headers[REPLICA_HEADER]


def test_tritonclient_works_through_the_ingress(url: str) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("birds")
        tensor = triton.InferInput("image", [2], "BYTES")
        tensor.set_data_from_numpy(np.array([JPEG, JPEG], dtype=np.object_))
        result = client.infer("birds", [tensor], outputs=[triton.InferRequestedOutput("logits")])
        logits = result.as_numpy("logits")
        assert logits.shape == (2, 5) and np.allclose(logits[0], logits[1], atol=1e-4)
        scores = httpx.post(f"{url}/classify/birds?top_k=1", content=JPEG, headers=IMAGE, timeout=30).json()
        assert scores["predictions"][0]["index"] == int(np.argmax(logits[0]))
    finally:
        client.close()


def test_a_killed_replica_is_replaced_and_requests_keep_succeeding(url: str) -> None:
    actors = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#TaskReplica#" in a["name"]}
    assert len(actors) == 2
    holder = _classify(url, "flowers").headers[REPLICA_HEADER]
    victim = next(name for name in actors if name.endswith(holder))
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    statuses, answered_by = collections.Counter(), collections.Counter()
    deadline = time.monotonic() + 120
    replaced: set[str] = set()
    while time.monotonic() < deadline:
        for task in TASKS:
            r = httpx.post(f"{url}/classify/{task}", content=JPEG, headers=IMAGE, timeout=60)
            statuses[r.status_code] += 1
            answered_by[r.headers.get(REPLICA_HEADER)] += 1
        now = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#TaskReplica#" in a["name"]}
        replaced = now - actors
        if replaced and serve.status().applications["piggyback"].status == "RUNNING":
            break
    print("after_kill:", dict(statuses), "answered by:", dict(answered_by), "new replica:", sorted(replaced))
    assert replaced, "the killed replica was not replaced"
    assert statuses == {200: sum(statuses.values())}
    assert holder not in answered_by
    for task in TASKS:  # and the fleet of two serves every task afterwards
        _classify(url, task)
