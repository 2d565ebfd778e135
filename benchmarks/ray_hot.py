"""One hot task on a Ray Serve fleet (server.ray_serve): does Ray Serve's multiplexed routing pin it
to the replica that holds it while that replica is saturated (Ray issues #48741, #65691)?

Starts a local Ray (``--cpus``), ``--replicas`` CPU task replicas of resnet18 (random weights, one
single-threaded worker each), then sends ``--seconds`` of traffic for one task from ``--clients``
concurrent clients, and prints the requests each replica answered, the rate and the latency
percentiles, as one JSON object.

    python -m benchmarks.ray_hot --clients 16 --max-ongoing 64
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from piggyback_core import FileSystemStore, load_backbone
from tests.conftest import encode, make_task


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _load(url: str, task: str, clients: int, seconds: float) -> tuple[collections.Counter[str], list[float]]:
    image = encode("JPEG", size=(224, 224))
    per_replica: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            started = time.perf_counter()
            r = await http.post(f"{url}/classify/{task}", content=image, headers={"Content-Type": "image/jpeg"})
            latencies.append(time.perf_counter() - started)
            per_replica[r.headers.get("x-piggyback-replica", f"status {r.status_code}")] += 1

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return per_replica, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-ongoing", type=int, default=64, help="max_ongoing_requests of a task replica")
    args = parser.parse_args()

    import ray
    from ray import serve

    from server.ray_serve import PiggybackIngress, TaskReplica

    store = Path(tempfile.mkdtemp(prefix="ray-hot-"))
    backbone = load_backbone("resnet18", weights="random", seed=0)
    FileSystemStore(store).put("hot", make_task(backbone, "hot").to_bytes())
    settings = {"backbone": "resnet18", "weights": "random", "store": str(store), "allow_unauthenticated": True,
                "workers": 1, "worker_threads": 1, "max_wait_ms": 2.0}  # fmt: skip
    options: dict[str, Any] = {"num_replicas": args.replicas, "max_ongoing_requests": args.max_ongoing,
                               "ray_actor_options": {"num_cpus": args.cpus / (args.replicas + 1)}}  # fmt: skip
    port = _port()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        share = {"num_cpus": args.cpus / (args.replicas + 1)}  # the ingress's share too: all must fit
        app = PiggybackIngress.options(ray_actor_options=share).bind(TaskReplica.options(**options).bind(settings, 4),
                                                                      settings)  # fmt: skip
        serve.run(app, name="piggyback", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_load(url, "hot", 2, 3))  # warm-up: the task loaded and reported
        per_replica, latencies = asyncio.run(_load(url, "hot", args.clients, args.seconds))
    finally:
        serve.shutdown()
        ray.shutdown()
    ms = np.array(latencies) * 1000
    print(json.dumps({
        "replicas": args.replicas, "clients": args.clients, "max_ongoing": args.max_ongoing,
        "requests_per_replica": dict(per_replica), "rate_per_s": round(len(latencies) / args.seconds, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
