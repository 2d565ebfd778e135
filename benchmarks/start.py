"""Start time with many tasks in the store: eager (``ready_after=tasks``) against background loading
(``ready_after=backbone``).

    python -m benchmarks.start [--case resnet50:1000 --case resnet18:10000] [--repeats 2]

For each case and mode, in turn, it starts our server (``python -m server.cli serve``, defaults,
seeded random weights) on a store of N tasks (the stores of ``benchmarks.scale``, built once) and
measures: seconds from the process start to ``/readyz`` 200; seconds until every task is loaded
(``tasks_loading`` 0 and ``tasks`` N); the latency of a first request to the task last in the
loading order, sent at once after ready (in the background mode it is loaded for that request);
and the RSS once everything is loaded. Writes ``benchmarks/results/start.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from typing import Any

from benchmarks.scale import WORK, make_photos, rss, start_ours, task_name
from benchmarks.serving import machine, stop_server, write_results


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _classify(url: str, task: str, jpeg: bytes) -> float:
    t0 = time.perf_counter()
    request = urllib.request.Request(f"{url}/classify/{task}", data=jpeg, headers={"Content-Type": "image/jpeg"})
    with urllib.request.urlopen(request, timeout=60) as r:
        r.read()
    return time.perf_counter() - t0


def one_start(arch: str, count: int, mode: str, jpeg: bytes) -> dict[str, Any]:
    url, (proc, handle, ready_s) = start_ours(arch, count, 8735, ["--ready-after", mode], f"start-{mode}")
    t_ready = time.perf_counter()
    try:
        first_ms = _classify(url, task_name(count - 1), jpeg) * 1e3
        while (r := _get(f"{url}/readyz"))["tasks_loading"] or r["tasks"] < count:
            time.sleep(0.05)
        loaded_s = ready_s + time.perf_counter() - t_ready
        out = {"arch": arch, "tasks": count, "mode": mode, "ready_s": ready_s, "loaded_s": loaded_s,
               "first_request_ms": first_ms, "rss": rss(proc.pid)}  # fmt: skip
    finally:
        stop_server(proc, handle)
    print(out, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="ARCH:TASKS (default resnet50:1000, resnet18:10000)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.case or ["resnet50:1000", "resnet18:10000"]]
    jpeg = sorted(make_photos(WORK / "photos"))[0].read_bytes()
    modes = ("tasks", "backbone")
    runs = [one_start(a, n, mode, jpeg) for a, n in cases for _ in range(args.repeats) for mode in modes]
    lines = [
        f"# Start time with many tasks: {machine()}",
        "",
        "`ready_after=tasks` (the default): ready once every task is loaded and validated. "
        "`ready_after=backbone`: ready once the backbone is loaded and warmed up; the tasks load in the "
        "background and a request for one still loading loads it at once. *first request*: the task last in "
        "the loading order, asked for right after ready. Each start in its own process, one after the other.",
        "",
        "| backbone | tasks | ready_after | ready s | all loaded s | first request ms | RSS GiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        lines.append(
            f"| {r['arch']} | {r['tasks']} | {r['mode']} | {r['ready_s']:.1f} | {r['loaded_s']:.1f} "
            f"| {r['first_request_ms']:.0f} | {r['rss'] / 2**30:.2f} |"
        )
    write_results("start", lines, {"machine": machine(), "runs": runs})


if __name__ == "__main__":
    main()
