"""A closed-loop HTTP load generator, run as its own process so that it does not share the server's
interpreter: ``concurrency`` clients, each with a keep-alive connection, send the next request as
soon as the last one is answered.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --images DIR --tasks a,b,c \
        --concurrency 16 --duration 15 [--warmup 3]

Prints one JSON object: requests answered in the measured window (whenever they were sent),
throughput, latency percentiles (ms) of those answers and the count of each HTTP status.

``--traffic cycle`` (default): request ``i`` of a client goes to ``tasks[i % len(tasks)]`` with
image ``i % len(images)``, clients staggered so that every batch mixes tasks. ``uniform``: each
request to a task drawn uniformly at random; ``zipf``: drawn with probability proportional to
``1 / rank`` (Zipf, s = 1; ranks given to the tasks by a seeded shuffle). Seeded per client.
``--urls`` (one per task, in the order of ``--tasks``) sends each task to its own server.
``--protocol``: ``classify`` (``POST /classify/{task}``, the image as the body), ``v2`` (``POST
/v2/models/{task}/infer`` with binary tensor data in and out, as tritonclient sends it) or
``v2-json`` (the image base64 in JSON, the logits as JSON).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import itertools
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def request_for(protocol: str, task: str, image: bytes) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of one request for ``image`` to ``task``."""
    if protocol == "classify":
        return f"/classify/{task}?top_k=1", image, {"Content-Type": "image/jpeg"}
    path = f"/v2/models/{task}/infer"
    if protocol == "v2-json":
        data = [base64.b64encode(image).decode()]
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": data}]}
        return path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    element = len(image).to_bytes(4, "little") + image
    header = json.dumps({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(element)}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    return path, header + element, {"Inference-Header-Content-Length": str(len(header))}


def run(
    url: str,
    images: list[bytes],
    tasks: list[str],
    concurrency: int,
    duration: float,
    warmup: float,
    traffic: str = "cycle",
    urls: list[str] | None = None,
    seed: int = 0,
    protocol: str = "classify",
) -> dict:
    targets = [urlparse(u) for u in urls] if urls else [urlparse(url)] * len(tasks)
    weights = list(itertools.accumulate(1.0 / (r + 1) for r in range(len(tasks))))
    popularity = list(range(len(tasks)))  # Zipf rank -> task: a seeded shuffle, unrelated to names
    random.Random(seed).shuffle(popularity)
    start = time.monotonic()
    measure_from, stop_at = start + warmup, start + warmup + duration
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def client(k: int) -> None:
        rng = random.Random(seed * 1_000_003 + k)
        conns: dict[int, http.client.HTTPConnection] = {}
        i = k
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            body = images[i % len(images)]
            if traffic == "uniform":
                t = rng.randrange(len(tasks))
            elif traffic == "zipf":
                t = popularity[rng.choices(range(len(tasks)), cum_weights=weights)[0]]
            else:
                t = i % len(tasks)
            target = targets[t]
            conn = conns.get(target.port or 80)
            if conn is None:
                conn = conns[target.port or 80] = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
            path, payload, headers = request_for(protocol, tasks[t], body)
            t0 = time.monotonic()
            try:
                conn.request("POST", path, body=payload, headers=headers)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                del conns[target.port or 80]
                status = 0
            t1 = time.monotonic()
            # Every answer that arrives inside the window counts, whenever it was sent: a closed
            # loop with multi-second latencies would otherwise undercount its own throughput.
            if measure_from <= t1 <= stop_at:
                with lock:
                    statuses[status] += 1
                    if status == 200:
                        latencies.append(t1 - t0)
            i += concurrency
        for conn in conns.values():
            conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return {
        "concurrency": concurrency,
        "duration_s": duration,
        "ok": len(latencies),
        "throughput": len(latencies) / duration,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p95_ms": percentile(latencies, 95) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--images", required=True, help="a directory of .jpg files")
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--traffic", choices=["cycle", "uniform", "zipf"], default="cycle")
    parser.add_argument("--urls", help="comma-separated, one server per task (default: --url for all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--protocol", choices=["classify", "v2", "v2-json"], default="classify")
    args = parser.parse_args()
    images = [p.read_bytes() for p in sorted(Path(args.images).glob("*.jpg"))]
    tasks = args.tasks.split(",")
    urls = args.urls.split(",") if args.urls else None
    if urls is not None and len(urls) != len(tasks):
        parser.error("--urls needs one URL per task")
    result = run(
        args.url, images, tasks, args.concurrency, args.duration, args.warmup, args.traffic, urls, args.seed,
        args.protocol,
    )  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
