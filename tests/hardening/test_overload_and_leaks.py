"""Overload and leaks against a live server: far more concurrent clients than the queue holds for a
bounded time (only 200, 503 and 504; the queue never beyond its bound; full recovery after), and
RSS and open file descriptors stable over thousands of requests and hundreds of register/delete
cycles (the slopes are reported)."""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx

from piggyback_core import Backbone, FileSystemStore
from tests.live import HEADERS, IMAGE, live_server
from tests.server.conftest import AUTH, small_task


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def test_overload_answers_only_200_503_504_keeps_the_queue_bounded_and_recovers(
    tmp_path: Path, resnet18: Backbone, cases: Callable
) -> None:
    FileSystemStore(tmp_path).put("flowers", small_task(resnet18, "flowers").to_bytes())
    queue_size, clients, seconds = 8, 64, 6.0
    statuses: Counter[int] = Counter()
    depths: list[float] = []
    retry_after_missing = 0
    with live_server(
        tmp_path,
        queue_size=queue_size,
        max_images_per_request=queue_size,
        max_tasks_per_request=queue_size,
        max_batch_size=4,
        request_timeout_s=1.0,
    ) as server:
        stop = time.monotonic() + seconds
        lock = threading.Lock()

        def client() -> None:
            nonlocal retry_after_missing
            with httpx.Client(timeout=30) as http:
                while time.monotonic() < stop:
                    r = http.post(f"{server.url}/classify/flowers", content=IMAGE, headers=HEADERS)
                    with lock:
                        statuses[r.status_code] += 1
                        if r.status_code == 503 and "retry-after" not in r.headers:
                            retry_after_missing += 1

        def sample_depth() -> None:
            with httpx.Client(timeout=30) as http:
                while time.monotonic() < stop:
                    text = http.get(f"{server.url}/metrics").text
                    depths.append(float(re.search(r"^piggyback_queue_depth (\S+)$", text, re.M).group(1)))
                    time.sleep(0.02)

        threads = [threading.Thread(target=client) for _ in range(clients)] + [threading.Thread(target=sample_depth)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # recovery: sequential requests all succeed, promptly
        with httpx.Client(timeout=30) as http:
            started = time.monotonic()
            after = [http.post(f"{server.url}/classify/flowers", content=IMAGE, headers=HEADERS) for _ in range(20)]
            recovery_s = time.monotonic() - started
            assert http.get(f"{server.url}/readyz").status_code == 200
    total = sum(statuses.values())
    assert set(statuses) <= {200, 503, 504}, statuses
    assert statuses[503] > 0, f"the load never filled the queue: {statuses}"
    assert statuses[200] > 0 and retry_after_missing == 0
    assert depths and max(depths) <= queue_size, max(depths)
    assert all(r.status_code == 200 for r in after) and recovery_s < 10
    cases("overload", total, note=f"{clients} clients, queue {queue_size}: {dict(statuses)}, max depth "
          f"{max(depths):.0f} in {len(depths)} samples, 20 requests after in {recovery_s:.2f} s")  # fmt: skip


def test_rss_and_file_descriptors_stay_flat_over_requests_and_registration_cycles(
    tmp_path: Path, resnet18: Backbone, cases: Callable
) -> None:
    FileSystemStore(tmp_path).put("flowers", small_task(resnet18, "flowers").to_bytes())
    versions = [small_task(resnet18, "churn", seed=s).to_bytes() for s in range(3)]
    windows, per_window, cycles, per_sample = 8, 400, 240, 30
    with live_server(tmp_path) as server, httpx.Client(timeout=30) as http:
        url = server.url

        def burst(n: int) -> None:
            def worker(k: int) -> None:
                with httpx.Client(timeout=30) as h:
                    for _ in range(k):
                        assert h.post(f"{url}/classify/flowers", content=IMAGE, headers=HEADERS).status_code == 200

            threads = [threading.Thread(target=worker, args=(n // 4,)) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        burst(per_window)  # warm-up: allocator pools, caches, thread pools
        req_x, req_rss, req_fds = [], [], []
        for w in range(windows):
            burst(per_window)
            req_x.append((w + 1) * per_window)
            req_rss.append(server.rss_bytes())
            req_fds.append(server.open_fds())
        cyc_x, cyc_rss, cyc_fds = [], [], []
        warmup = 60  # the allocator's arenas settle over the first tens of cycles
        for c in range(-warmup, cycles):
            assert http.put(f"{url}/tasks/churn", content=versions[c % 3], headers=AUTH).status_code in (200, 201)
            assert http.post(f"{url}/classify/churn", content=IMAGE, headers=HEADERS).status_code == 200
            assert http.delete(f"{url}/tasks/churn", headers=AUTH).status_code == 204
            if c >= 0 and (c + 1) % per_sample == 0:
                cyc_x.append(c + 1)
                cyc_rss.append(server.rss_bytes())
                cyc_fds.append(server.open_fds())
    per_request = slope(req_x, req_rss)
    per_cycle = slope(cyc_x, cyc_rss)
    # A leak grows without end; the allocator's high-water steps (one larger batch) happen once.
    # So the test compares the last samples with the first ones after warm-up, not the slope.
    req_growth = statistics.median(req_rss[-3:]) - statistics.median(req_rss[:3])
    cyc_growth = statistics.median(cyc_rss[-3:]) - statistics.median(cyc_rss[:3])
    note = (
        f"{windows * per_window} requests: RSS slope {per_request:.0f} B/request "
        f"(+{req_growth / 2**20:.1f} MiB), {req_rss[-1] / 2**20:.0f} MiB at the end, "
        f"fds {min(req_fds)}..{max(req_fds)}; "
        f"{cycles} register/classify/delete cycles: RSS slope {per_cycle / 1024:.1f} KiB/cycle "
        f"(+{cyc_growth / 2**20:.1f} MiB), fds {min(cyc_fds)}..{max(cyc_fds)}"
    )
    cases("leaks", windows * per_window + cycles, note=note)
    assert max(req_fds) - min(req_fds) <= 6 and max(cyc_fds) - min(cyc_fds) <= 6, note  # <= client sockets
    assert req_growth < 24 * 2**20, note  # leaking 8 KiB per request would be 25 MiB
    assert cyc_growth < 32 * 2**20, note  # a leaked task (1.4 MB) per cycle would be 336 MB
