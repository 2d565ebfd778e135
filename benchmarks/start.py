"""Start time and memory with a large store: does a replica cost nothing per stored task until it is used?

    python -m benchmarks.start [--backbone resnet50] [--tasks 10000] [--keep] [--cache-bytes 1073741824]

Generates N task files for the backbone (random weights, seed 0) in a fresh store: one task is built
and serialised, and each file is that task with its name (fixed width, so the header keeps its
length) written in; the files are then flushed and dropped from the page cache (``posix_fadvise``
on our files only), so the server reads them cold. Then, in turn, it starts ``piggyback serve``
(``ready_after=tasks``, the same flags) on an empty store (the base) and on the full one, and
measures: seconds from the process start to ``/readyz`` 200; the RSS (``/proc/PID/status``) at
ready; the first request to a few random stored tasks right after ready (each must answer 200:
``ready_after=tasks`` means a ready replica never 404s a stored task); the RSS after them; and the
RSS once the background prefill of the weight cache has settled. Prints the figures against the
targets (ready in 10 s or less; RSS at most base + caches + 64 MiB) and writes
``benchmarks/results/start.{md,json}``. The store is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.scale import rss
from benchmarks.serving import machine, make_photos, make_task, start_server, stop_server, write_results
from piggyback_core import load_backbone
from piggyback_core.store import SUFFIX

WORK = Path(os.environ.get("PIGGYBACK_BENCH_WORK", "/tmp/piggyback-start"))
MIB = 2**20


def task_name(i: int) -> str:
    return f"t{i:05d}"


def make_store(root: Path, arch: str, count: int) -> float:
    """``count`` task files in ``root``, cold on disk; returns the seconds it took."""
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    template = make_task(load_backbone(arch, weights="random", seed=0), task_name(0), seed=1, labels=10).to_bytes()
    header_end = 8 + int.from_bytes(template[:8], "little")
    marker = f'"task":"{task_name(0)}"'.encode()
    if template[:header_end].count(marker) != 1:
        raise RuntimeError("the task name is not where it was expected in the header")
    at = template.index(marker) + len(b'"task":"')
    for i in range(count):
        data = bytearray(template)
        data[at : at + 6] = task_name(i).encode()
        fd = os.open(root / f"{task_name(i)}{SUFFIX}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        if i % 1000 == 999:
            print(f"  {i + 1} files, {time.perf_counter() - t0:.0f} s", flush=True)
    os.sync()
    for path in root.iterdir():  # our files out of the page cache: the server reads them cold
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def _classify(url: str, task: str, jpeg: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    request = urllib.request.Request(f"{url}/classify/{task}", data=jpeg, headers={"Content-Type": "image/jpeg"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, time.perf_counter() - t0


def _cache_bytes(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("piggyback_weight_cache_bytes "):
                return float(line.split()[-1])
    return 0.0


def one_server(
    arch: str, store: Path, count: int, args: argparse.Namespace, jpeg: bytes, label: str, extra: list[str]
) -> dict[str, Any]:
    url = "http://127.0.0.1:8741"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--backbone", arch, "--weights", "random",
           "--store", str(store), "--port", "8741", "--log-level", "info", "--ready-after", "tasks",
           "--cache-bytes", str(args.cache_bytes), *args.server_arg, *extra]  # fmt: skip
    env = {**os.environ, "PIGGYBACK_TOKEN": secrets.token_hex(16)}
    proc, handle, ready_s = start_server(cmd, url, env, WORK / f"{label}.log")
    try:
        out: dict[str, Any] = {"label": label, "tasks": count, "ready_s": ready_s, "rss_ready": rss(proc.pid)}
        out["weight_cache_bytes_ready"] = _cache_bytes(url)
        info = _get(f"{url}/readyz")
        out |= {"tasks_listed": info["tasks"], "tasks_loaded_at_ready": info.get("tasks_loaded"),
                "dtype": info["dtype"], "cache_budget_bytes": info["cache_budget_bytes"]}  # fmt: skip
        if count:
            picks = random.Random(0).sample(range(count), min(args.checks, count))
            firsts = [_classify(url, task_name(i), jpeg) for i in picks]
            out["first_requests"] = [
                {"task": task_name(i), "status": s, "ms": t * 1e3} for i, (s, t) in zip(picks, firsts, strict=True)
            ]
            out["rss_after_requests"] = rss(proc.pid)
        # the background prefill of the weight cache: settled once its bytes stop growing
        last, still = -1.0, 0
        deadline = time.monotonic() + args.settle_s
        while time.monotonic() < deadline and still < 3:
            now = _cache_bytes(url)
            still = still + 1 if now == last else 0
            last = now
            time.sleep(1.0)
        out["rss_settled"] = rss(proc.pid)
        out["weight_cache_bytes_settled"] = last
        out["task_cache_bytes"] = args.task_cache_bytes
    finally:
        stop_server(proc, handle)
    print(out, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--checks", type=int, default=5, help="random stored tasks classified right after ready")
    parser.add_argument("--cache-bytes", type=int, default=1 << 30, help="the weight cache budget of both servers")
    parser.add_argument("--task-cache-bytes", type=int, default=512 * MIB, help="loaded tasks' budget of both")
    parser.add_argument("--settle-s", type=float, default=120.0, help="wait this long at most for the prefill")
    parser.add_argument("--server-arg", action="append", default=[], help="one more flag for both servers")
    parser.add_argument("--keep", action="store_true", help="keep the generated store")
    args = parser.parse_args()
    args.server_arg += ["--task-cache-bytes", str(args.task_cache_bytes)]
    WORK.mkdir(parents=True, exist_ok=True)
    jpeg = sorted(make_photos(WORK / "photos"))[0].read_bytes()
    store, empty = WORK / f"store-{args.backbone}-{args.tasks}", WORK / "empty"
    shutil.rmtree(empty, ignore_errors=True)
    empty.mkdir()
    try:
        have = len(list(store.glob(f"*{SUFFIX}"))) if store.exists() else 0
        made_s = make_store(store, args.backbone, args.tasks) if have != args.tasks else 0.0
        disk = sum(p.stat().st_size for p in store.iterdir())
        print(f"store: {args.tasks} {args.backbone} tasks, {disk / 2**30:.1f} GiB, made in {made_s:.0f} s", flush=True)
        base = one_server(args.backbone, empty, 0, args, jpeg, "base", ["--no-prefill"])
        idle = one_server(args.backbone, store, args.tasks, args, jpeg, "full-no-prefill", ["--no-prefill"])
        full = one_server(args.backbone, store, args.tasks, args, jpeg, "full", [])
    finally:
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
    caches = args.cache_bytes + args.task_cache_bytes
    firsts = [*idle.get("first_requests", []), *full.get("first_requests", [])]
    ok_requests = all(r["status"] == 200 for r in firsts)
    first_ms = [r["ms"] for r in idle.get("first_requests", [])]
    # what grows with the store: RSS at ready (no prefill) past the base and the warm-up task's built weights
    grown = idle["rss_ready"] - base["rss_ready"] - idle["weight_cache_bytes_ready"]
    rows = [
        ("ready s", f"{base['ready_s']:.1f}", f"{idle['ready_s']:.1f}, {full['ready_s']:.1f}", "≤ 10",
         f"{max(idle['ready_s'], full['ready_s']) / 10:.2f}"),
        ("RSS at ready, no prefill MiB", f"{base['rss_ready'] / MIB:.0f}", f"{idle['rss_ready'] / MIB:.0f}", "", ""),
        ("... less base and built weights MiB", "", f"{grown / MIB:.0f}", "≤ 64", f"{grown / MIB / 64:.2f}"),
        ("RSS after the first requests MiB", "", f"{idle['rss_after_requests'] / MIB:.0f}",
         f"≤ base + caches + 64 = {(base['rss_ready'] + caches) / MIB + 64:.0f}",
         f"{(idle['rss_after_requests'] - base['rss_ready']) / (caches + 64 * MIB):.2f}"),
        ("RSS, prefill settled MiB", f"{base['rss_settled'] / MIB:.0f}", f"{full['rss_settled'] / MIB:.0f}",
         f"≤ base + caches + 64 = {(base['rss_ready'] + caches) / MIB + 64:.0f}",
         f"{(full['rss_settled'] - base['rss_ready']) / (caches + 64 * MIB):.2f}"),
    ]  # fmt: skip
    lines = [
        f"# Start with {args.tasks} {args.backbone} tasks in the store: {machine()}",
        "",
        f"Store: {disk / 2**30:.1f} GiB on local disk, read cold. Both servers: `ready_after=tasks`, weight cache "
        f"{args.cache_bytes / MIB:.0f} MiB, loaded tasks {args.task_cache_bytes / MIB:.0f} MiB (*caches*: both), "
        f"compute dtype {full['dtype']}. Base: the same server on an empty store. *full store*: without the "
        "background prefill of the weight cache, then with it (the default).",
        "",
        "| | base | full store | target | ratio to target |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {' | '.join(r)} |" for r in rows),
        "",
        f"First request to {len(first_ms)} random stored tasks right after ready (both full runs): all 200: "
        f"{ok_requests}; without prefill "
        f"{min(first_ms, default=0):.0f}-{max(first_ms, default=0):.0f} ms each (its file read and checked in full, "
        f"its weights built). Tasks listed at ready: {full['tasks_listed']}; loaded at ready: "
        f"{full['tasks_loaded_at_ready']}; the prefill settled at {full['weight_cache_bytes_settled'] / MIB:.0f} MiB "
        "of built weights.",
    ]
    record = {"args": vars(args), "disk_bytes": disk, "made_s": made_s, "base": base, "idle": idle, "full": full}
    write_results("start", lines, record)


if __name__ == "__main__":
    main()
