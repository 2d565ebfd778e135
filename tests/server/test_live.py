"""Real `piggyback serve` processes on loopback, real HTTP, bounded loops that stop by themselves."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from piggyback_core import Backbone, FileSystemStore, load_backbone
from tests.live import HEADERS, IMAGE, serve
from tests.server.conftest import AUTH, small_task


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone("resnet18", weights="random")


Answer = tuple[str, int, str | None, float]


def hammer(url: str, tasks: list[str], seconds: float, threads: int) -> list[Answer]:
    """Closed-loop clients for a bounded time: (task, status, version, time sent) of every answer."""
    results: list[Answer] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        with httpx.Client(timeout=30) as http:
            n = 0
            while time.monotonic() < stop and n < 2000:
                task = tasks[(i + n) % len(tasks)]
                sent = time.monotonic()
                r = http.post(f"{url}/classify/{task}", content=IMAGE, headers=HEADERS)
                version = r.json().get("version") if r.status_code == 200 else None
                with lock:
                    results.append((task, r.status_code, version, sent))
                n += 1

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return results


def test_hot_replacement_and_deletion_under_concurrent_load_fail_no_request(tmp_path: Path, backbone: Backbone) -> None:
    store = FileSystemStore(tmp_path)
    versions: dict[str, set[str]] = {"a": set(), "b": set(), "c": set()}
    for name in versions:
        task = small_task(backbone, name, seed=1)
        store.put(name, task.to_bytes())
        versions[name].add(task.version)
    with serve(tmp_path, max_wait_ms=5) as url:
        results: list[Answer] = []
        loader = threading.Thread(target=lambda: results.extend(hammer(url, ["a", "b", "c"], 6.0, 6)))
        loader.start()
        time.sleep(1.0)
        for seed in (2, 3, 4):  # replace "a" three times while it is being classified
            task = small_task(backbone, "a", seed=seed)
            versions["a"].add(task.version)
            assert httpx.put(f"{url}/tasks/a", content=task.to_bytes(), headers=AUTH, timeout=60).status_code == 200
            time.sleep(0.5)
        delete_sent = time.monotonic()
        assert httpx.delete(f"{url}/tasks/c", headers=AUTH, timeout=60).status_code == 204
        loader.join()
    statuses = Counter(status for _, status, _, _ in results)
    assert sum(statuses.values()) > 50
    assert set(statuses) <= {200, 404}, statuses
    # 404 only for the deleted task, and only for requests sent after its deletion was asked for
    assert {(t, sent >= delete_sent) for t, status, _, sent in results if status == 404} <= {("c", True)}
    for task, status, version, _ in results:
        if status == 200:
            assert version in versions[task], (task, version)
    assert len({v for t, s, v, _ in results if t == "a" and s == 200}) >= 2  # old and new versions both answered


def test_two_replicas_sharing_a_store_converge_within_the_poll_interval(tmp_path: Path, backbone: Backbone) -> None:
    poll = 0.5
    with serve(tmp_path, store_poll_s=poll) as first, serve(tmp_path, store_poll_s=poll) as second:
        assert httpx.post(f"{second}/classify/shared", content=IMAGE, headers=HEADERS).status_code == 404
        data = small_task(backbone, "shared").to_bytes()
        put_at = time.monotonic()
        assert httpx.put(f"{first}/tasks/shared", content=data, headers=AUTH, timeout=60).status_code == 201
        while httpx.post(f"{second}/classify/shared", content=IMAGE, headers=HEADERS).status_code != 200:
            assert time.monotonic() - put_at < 2 * poll + 2, "the second replica did not pick up the task"
            time.sleep(0.05)
        assert httpx.delete(f"{first}/tasks/shared", headers=AUTH).status_code == 204
        deleted_at = time.monotonic()
        while httpx.post(f"{second}/classify/shared", content=IMAGE, headers=HEADERS).status_code != 404:
            assert time.monotonic() - deleted_at < 2 * poll + 2, "the second replica still serves a deleted task"
            time.sleep(0.05)


def test_overload_gets_503_with_retry_after_never_500_and_the_server_recovers(
    tmp_path: Path, backbone: Backbone
) -> None:
    FileSystemStore(tmp_path).put("a", small_task(backbone, "a").to_bytes())
    with serve(
        tmp_path, queue_size=4, max_images_per_request=4, max_tasks_per_request=4, max_batch_size=2, max_wait_ms=20
    ) as url:
        retry_after: list[str | None] = []

        def burst(_: int) -> int:
            r = httpx.post(f"{url}/classify/a", content=IMAGE, headers=HEADERS, timeout=60)
            if r.status_code == 503:
                retry_after.append(r.headers.get("retry-after"))
            return r.status_code

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=48) as pool:
            statuses = Counter(pool.map(burst, range(240)))
        assert set(statuses) <= {200, 503, 504}, statuses
        assert statuses[503] > 0 and statuses[200] > 0
        assert retry_after and all(v is not None and v.isdigit() for v in retry_after)
        assert httpx.post(f"{url}/classify/a", content=IMAGE, headers=HEADERS).status_code == 200
        depth = re.search(r"^piggyback_queue_depth (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
        assert depth is not None and float(depth.group(1)) == 0.0


def test_mixed_task_load_produces_batches_holding_several_tasks(tmp_path: Path, backbone: Backbone) -> None:
    store = FileSystemStore(tmp_path)
    names = ["t0", "t1", "t2", "t3"]
    for i, name in enumerate(names):
        store.put(name, small_task(backbone, name, seed=i).to_bytes())
    with serve(tmp_path, max_wait_ms=30, max_batch_size=16) as url:
        results = hammer(url, names, 3.0, 8)
        metrics = httpx.get(f"{url}/metrics").text
    assert {status for _, status, _, _ in results} == {200}
    single = float(re.search(r'^piggyback_batch_tasks_bucket\{le="1.0"\} (\S+)$', metrics, re.M).group(1))  # type: ignore[union-attr]
    total = float(re.search(r"^piggyback_batch_tasks_count (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    assert total > single, "no batch held more than one task"
