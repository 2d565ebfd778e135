"""A closed-loop HTTP load generator, run as its own process so that it does not share the server's
interpreter: ``concurrency`` clients, each with a keep-alive connection, send the next request as
soon as the last one is answered.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --images DIR --tasks a,b,c \
        --concurrency 16 --duration 15 [--warmup 3]

Prints one JSON object: requests answered in the measured window (whenever they were sent),
throughput, latency percentiles (ms) of those answers and the count of each HTTP status. Request
``i`` of a client goes to ``tasks[i % len(tasks)]`` with image ``i % len(images)``, clients
staggered so that every batch mixes tasks.
"""

from __future__ import annotations

import argparse
import http.client
import json
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


def run(url: str, images: list[bytes], tasks: list[str], concurrency: int, duration: float, warmup: float) -> dict:
    parsed = urlparse(url)
    start = time.monotonic()
    measure_from, stop_at = start + warmup, start + warmup + duration
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
        i = k
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            body = images[i % len(images)]
            path = f"/classify/{tasks[i % len(tasks)]}?top_k=1"
            t0 = time.monotonic()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "image/jpeg"})
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
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
    args = parser.parse_args()
    images = [p.read_bytes() for p in sorted(Path(args.images).glob("*.jpg"))]
    print(json.dumps(run(args.url, images, args.tasks.split(","), args.concurrency, args.duration, args.warmup)))


if __name__ == "__main__":
    main()
