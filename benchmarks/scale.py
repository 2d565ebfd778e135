"""Thousands of tasks on one server: throughput, latency, memory and start time against the number
of tasks, with the one-model-per-task baselines measured in the same run.

    python -m benchmarks.scale [--arch resnet18 --arch resnet50] [--tasks 1,8,64,512,1000]
                               [--clients 16,64] [--duration 10] [--memory-tasks resnet18:10000]

For each backbone and task count T: a store of T tasks (seeded random weights; masks of about 90%
density, 16 distinct mask sets, a distinct head per task), our server started on it (start time =
until /readyz is 200), then closed-loop HTTP load (benchmarks.loadgen, real JPEGs) with each
request to a task drawn uniformly or by Zipf (s = 1), for each client count: img/s, p50/p99,
RSS, and the weight cache's hit rate over the run (from /metrics).

Baselines, in the same run and on the same JPEGs:

* ``lru``: an in-process one-model-per-task server keeping an LRU of full models within the same
  byte budget as our weight cache, loading the others from disk (Triton's explicit model control,
  Ray Serve's multiplexing): benchmarks.model_per_task_server --models-dir. Its model files are
  hard links to 8 saved models (disk space), read through the page cache like any hot file;
* ``workers``: at T = 8, one single-threaded process per task (OMP_NUM_THREADS=1), each holding its
  full model: a well-configured TorchServe;
* ``plain``: the plain fp32 eager decode + transform + torchvision forward loop in batches of 8
  (the issue's floor for uniform traffic over 1,000 tasks).

``--memory-tasks ARCH:N`` also starts our server on N tasks (no load): start time and RSS only.
Writes benchmarks/results/scale.{md,json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import secrets
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
import torchvision

from benchmarks.serving import (
    ROOT,
    bench_offline_loops,
    load,
    machine,
    make_photos,
    make_task,
    start_server,
    stop_server,
    write_results,
)
from piggyback_core import FileSystemStore, TaskFile, load_backbone
from piggyback_core.store import SUFFIX

WORK = Path(os.environ.get("PIGGYBACK_BENCH_WORK", "/tmp/piggyback-scale"))


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_rss(pids: list[int]) -> int:
    return sum(rss(p) for p in pids)


def make_store(arch: str, count: int) -> Path:
    """``WORK/<arch>/all`` with ``count`` task files; built once, grown as needed."""
    root = WORK / arch / "all"
    have = len(list(root.glob(f"*{SUFFIX}"))) if root.exists() else 0
    if have >= count:
        return root
    backbone = load_backbone(arch, weights="random", seed=0)
    bases = [make_task(backbone, f"base{i}", seed=1000 + i, keep=0.9) for i in range(16)]
    store = FileSystemStore(root)
    t0 = time.perf_counter()
    for i in range(have, count):
        g = torch.Generator().manual_seed(i)
        base = bases[i % len(bases)]
        task = dataclasses.replace(
            base, name=task_name(i), head_weight=0.01 * torch.randn(base.head_weight.shape, generator=g)
        )
        store.put(task.name, TaskFile.from_bytes(task.to_bytes()).to_bytes())
    print(f"  store: {count - have} {arch} task files in {time.perf_counter() - t0:.0f} s", flush=True)
    return root


def task_name(i: int) -> str:
    return f"t{i:05d}"


def store_of(arch: str, count: int) -> Path:
    """A store holding the first ``count`` tasks (hard links into the full one)."""
    full = make_store(arch, count)
    path = WORK / arch / f"store-{count}"
    if not path.exists():
        path.mkdir(parents=True)
        for i in range(count):
            os.link(full / f"{task_name(i)}{SUFFIX}", path / f"{task_name(i)}{SUFFIX}")
    return path


def metrics_of(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for name in ("hits_total", "misses_total", "bytes"):
        m = re.search(rf"^piggyback_weight_cache_{name} (\S+)$", text, re.M)
        out[name.removesuffix("_total")] = float(m.group(1)) if m else 0.0
    return out


def wait_prefilled(url: str, limit_s: float = 120.0) -> float:
    """Seconds until the server's background cache prefill stops growing the cache."""
    t0 = time.perf_counter()
    last = -1.0
    while time.perf_counter() - t0 < limit_s:
        now = metrics_of(url)["bytes"]
        if now == last:
            break
        last = now
        time.sleep(1.0)
    return time.perf_counter() - t0


def ready_info(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/readyz", timeout=10) as r:
        return json.loads(r.read())


def start_ours(arch: str, count: int, port: int, server_args: list[str], label: str) -> tuple[str, tuple]:
    """Our server on the store of ``count`` tasks: its URL and start_server's (proc, log, ready_s)."""
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--backbone", arch, "--weights", "random",
           "--store", str(store_of(arch, count)), "--port", str(port), "--log-level", "warning",
           *server_args]  # fmt: skip
    env = {**os.environ, "PIGGYBACK_TOKEN": secrets.token_hex(16)}
    return url, start_server(cmd, url, env, WORK / f"{label}-{arch}-{count}.log")


def run_ours(arch: str, count: int, photos: Path, clients: list[int], traffics: list[str], duration: float,
             server_args: list[str]) -> dict[str, Any]:  # fmt: skip
    url, (proc, handle, ready_s) = start_ours(arch, count, 8731, server_args, "ours")
    result: dict[str, Any] = {"tasks": count, "ready_s": ready_s, "rss_ready": rss(proc.pid), "runs": []}
    try:
        info = ready_info(url)
        result["cache_budget_bytes"] = info["cache_budget_bytes"]
        result["workers"] = f"{info['workers']}x{info['worker_threads']}"
        result["dtype"] = info["dtype"]
        result["prefill_s"] = wait_prefilled(url)
        names = [task_name(i) for i in range(count)]
        for traffic in traffics if count > 1 else traffics[:1]:
            for c in clients:
                before = metrics_of(url)
                row = load(url, photos, names, c, duration, 3.0, traffic)
                after = metrics_of(url)
                hits = after["hits"] - before["hits"]
                lookups = hits + after["misses"] - before["misses"]
                hit_rate = hits / lookups if lookups else float("nan")
                row |= {"traffic": traffic, "rss": rss(proc.pid), "hit_rate": hit_rate}
                result["runs"].append(row)
                print(f"  ours {arch} T={count} {traffic} c={c}: {row['throughput']:.1f} img/s, p50 "
                      f"{row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, hit {row['hit_rate']:.2f}, "
                      f"RSS {row['rss'] / 2**30:.2f} GiB, {row['statuses']}", flush=True)  # fmt: skip
    finally:
        stop_server(proc, handle)
    return result


def saved_models(arch: str) -> Path:
    """8 full models saved as state dicts, and hard links ``t<i>.pt`` to them for every task."""
    path = WORK / arch / "models"
    path.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        f = path / f"base{i}.pt"
        if not f.exists():
            torch.manual_seed(i)
            torch.save(torchvision.models.get_model(arch, weights=None, num_classes=100).state_dict(), f)
    return path


def run_lru(arch: str, count: int, photos: Path, clients: list[int], traffics: list[str], duration: float,
            budget: int, dtype: str) -> dict[str, Any]:  # fmt: skip
    base = saved_models(arch)
    models = WORK / arch / f"models-{count}"
    if not models.exists():
        models.mkdir()
        for i in range(count):
            os.link(base / f"base{i % 8}.pt", models / f"{task_name(i)}.pt")
    url = "http://127.0.0.1:8732"
    cmd = [sys.executable, "-m", "benchmarks.model_per_task_server", "--arch", arch, "--port", "8732",
           "--models-dir", str(models), "--lru-bytes", str(budget), "--dtype", dtype]  # fmt: skip
    proc, handle, ready_s = start_server(cmd, url, dict(os.environ), WORK / f"lru-{arch}-{count}.log")
    result: dict[str, Any] = {"tasks": count, "ready_s": ready_s, "runs": []}
    try:
        names = [task_name(i) for i in range(count)]
        for traffic in traffics if count > 1 else traffics[:1]:
            for c in clients:
                row = load(url, photos, names, c, duration, 3.0, traffic) | {"traffic": traffic, "rss": rss(proc.pid)}
                result["runs"].append(row)
                print(f"  lru {arch} T={count} {traffic} c={c}: {row['throughput']:.1f} img/s, "
                      f"RSS {row['rss'] / 2**30:.2f} GiB, {row['statuses']}", flush=True)  # fmt: skip
    finally:
        stop_server(proc, handle)
    return result


def run_workers(arch: str, count: int, photos: Path, clients: list[int], traffics: list[str], duration: float,
                dtype: str) -> dict[str, Any]:  # fmt: skip
    """One single-threaded process per task, each with its own full model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = []
    urls = [f"http://127.0.0.1:{8800 + i}" for i in range(count)]
    try:
        for i, url in enumerate(urls):
            cmd = [sys.executable, "-m", "benchmarks.model_per_task_server", "--arch", arch, "--tasks", "1",
                   "--offset", str(i), "--port", str(8800 + i), "--dtype", dtype]  # fmt: skip
            procs.append(start_server(cmd, url, env, WORK / f"workers-{arch}-{i}.log"))
        result: dict[str, Any] = {"tasks": count, "runs": []}
        names = [f"task{i}" for i in range(count)]
        for traffic in traffics:
            for c in clients:
                row = load(urls[0], photos, names, c, duration, 3.0, traffic, urls)
                row |= {"traffic": traffic, "rss": tree_rss([p.pid for p, _, _ in procs])}
                result["runs"].append(row)
                print(f"  workers {arch} T={count} {traffic} c={c}: {row['throughput']:.1f} img/s, "
                      f"RSS {row['rss'] / 2**30:.2f} GiB", flush=True)  # fmt: skip
    finally:
        for proc, handle, _ in procs:
            stop_server(proc, handle)
    return result


def memory_only(arch: str, count: int, server_args: list[str]) -> dict[str, Any]:
    _, (proc, handle, ready_s) = start_ours(arch, count, 8733, server_args, "memory")
    try:
        out = {"tasks": count, "ready_s": ready_s, "rss_ready": rss(proc.pid)}
    finally:
        stop_server(proc, handle)
    print(f"  memory {arch} T={count}: ready in {ready_s:.1f} s, RSS {out['rss_ready'] / 2**30:.2f} GiB", flush=True)
    return out


def to_markdown(r: dict[str, Any]) -> list[str]:
    gib = 2**30
    lines = [f"# Many tasks on one server ({r['machine']})", "", f"Command: `{r['command']}`", ""]
    for arch, a in r["archs"].items():
        one = {(x["traffic"], x["concurrency"]): x["throughput"] for x in a["ours"][0]["runs"]}
        one_c = {c: v for (_, c), v in one.items()}
        lines += [f"## {arch} ({a['ours'][0].get('workers', '?')} workers x threads, "
                  f"{r['dtype']}, plain fp32 decode+forward loop: {a['plain_fp32']:.1f} img/s)", ""]  # fmt: skip
        lines += ["| T | traffic | clients | img/s | of T=1 | of plain fp32 | p50 ms | p99 ms | hit rate | RSS GiB "
                  "| ready s | LRU baseline img/s | ours / LRU | LRU RSS GiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        lru = {(b["tasks"], x["traffic"], x["concurrency"]): x for b in a["lru"] for x in b["runs"]}
        for o in a["ours"]:
            for x in o["runs"]:
                base = lru.get((o["tasks"], x["traffic"], x["concurrency"]))
                lru_cells = (f"{base['throughput']:.1f} | {x['throughput'] / base['throughput']:.2f} | "
                             f"{base['rss'] / gib:.2f}") if base else "- | - | -"  # fmt: skip
                lines.append(
                    f"| {o['tasks']} | {x['traffic']} | {x['concurrency']} | {x['throughput']:.1f} | "
                    f"{x['throughput'] / one_c[x['concurrency']]:.2f} | {x['throughput'] / a['plain_fp32']:.2f} | "
                    f"{x['p50_ms']:.0f} | {x['p99_ms']:.0f} | {x['hit_rate']:.2f} | {x['rss'] / gib:.2f} | "
                    f"{o['ready_s']:.1f} | {lru_cells} |"
                )
        for w in a.get("workers", []):
            ours = {
                (x["traffic"], x["concurrency"]): x for o in a["ours"] if o["tasks"] == w["tasks"] for x in o["runs"]
            }
            lines += ["", f"Against {w['tasks']} independent single-threaded workers (one full model each):", "",
                      "| traffic | clients | workers img/s | workers RSS GiB | ours img/s | ours / workers "
                      "| ours RSS / workers RSS |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
            for x in w["runs"]:
                o = ours.get((x["traffic"], x["concurrency"]))
                if o:
                    lines.append(f"| {x['traffic']} | {x['concurrency']} | {x['throughput']:.1f} | "
                                 f"{x['rss'] / gib:.2f} | {o['throughput']:.1f} | "
                                 f"{o['throughput'] / x['throughput']:.2f} | {o['rss'] / x['rss']:.2f} |")  # fmt: skip
        if a.get("memory"):
            lines += ["", "Start time and memory without load:", "", "| T | ready s | RSS GiB | MiB per task |",
                      "| --- | --- | --- | --- |"]  # fmt: skip
            first = a["ours"][0]
            for m in [*a["ours"], *a["memory"]]:
                per = (m["rss_ready"] - first["rss_ready"]) / max(1, m["tasks"] - first["tasks"]) / 2**20
                lines.append(f"| {m['tasks']} | {m['ready_s']:.1f} | {m['rss_ready'] / gib:.2f} | "
                             f"{per:.2f} |" if m["tasks"] > first["tasks"] else
                             f"| {m['tasks']} | {m['ready_s']:.1f} | {m['rss_ready'] / gib:.2f} | - |")  # fmt: skip
        lines.append("")
    return lines


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(r["archs"]), figsize=(6 * len(r["archs"]), 4), squeeze=False)
    for ax, (arch, a) in zip(axes[0], r["archs"].items(), strict=True):
        series: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for o in a["ours"]:
            for x in o["runs"]:
                for traffic in [x["traffic"]] if o["tasks"] > 1 else ["uniform", "zipf"]:
                    series.setdefault((traffic, x["concurrency"]), []).append((o["tasks"], x["throughput"]))
        for (traffic, c), pts in sorted(series.items()):
            ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=f"ours, {traffic}, {c} clients")
        lru: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for b in a["lru"]:
            for x in b["runs"]:
                lru.setdefault((x["traffic"], x["concurrency"]), []).append((b["tasks"], x["throughput"]))
        for (traffic, c), pts in sorted(lru.items()):
            ax.plot(*zip(*sorted(pts), strict=True), marker="x", linestyle="--", label=f"LRU models, {traffic}, {c}")
        ax.axhline(a["plain_fp32"], color="grey", linestyle=":", label="plain fp32 loop")
        ax.set_xscale("log")
        ax.set_xlabel("tasks T")
        ax.set_ylabel("img/s")
        ax.set_title(arch)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help="default: resnet18 and resnet50")
    parser.add_argument("--tasks", default="1,8,64,512,1000")
    parser.add_argument("--clients", default="16,64")
    parser.add_argument("--traffic", default="uniform,zipf")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--baseline-clients", default="16", help="client counts of the LRU baseline")
    parser.add_argument(
        "--memory-tasks", action="append", default=[], help="ARCH:COUNT, start time and RSS only (no load)"
    )
    parser.add_argument("--dtype", default="auto", help="our server's --dtype (the baselines run in the same)")
    args, server_args = parser.parse_known_args()
    counts = [int(x) for x in args.tasks.split(",")]
    clients = [int(x) for x in args.clients.split(",")]
    traffics = args.traffic.split(",")
    WORK.mkdir(parents=True, exist_ok=True)
    photos = WORK / "photos"
    photo_paths = make_photos(photos)
    record: dict[str, Any] = {"machine": machine(), "command": " ".join(["python -m benchmarks.scale", *sys.argv[1:]]),
                              "archs": {}}  # fmt: skip
    for arch in args.arch or ["resnet18", "resnet50"]:
        backbone = load_backbone(arch, weights="random", seed=0)
        plain = bench_offline_loops(backbone, [make_task(backbone, "p", seed=1)], photo_paths, seconds=args.duration)
        a: dict[str, Any] = {"plain_fp32": plain["plain_decode_forward_b8"], "ours": [], "lru": [], "workers": []}
        record["archs"][arch] = a
        for count in counts:
            a["ours"].append(run_ours(arch, count, photos, clients, traffics, args.duration,
                                      ["--dtype", args.dtype, *server_args]))  # fmt: skip
            dtype = a["ours"][-1]["dtype"]
            record["dtype"] = dtype
            budget = a["ours"][-1]["cache_budget_bytes"]
            baseline_clients = [int(x) for x in args.baseline_clients.split(",")]
            a["lru"].append(run_lru(arch, count, photos, baseline_clients, traffics, args.duration, budget, dtype))
            if count == 8:
                a["workers"].append(run_workers(arch, 8, photos, baseline_clients, ["uniform"], args.duration, dtype))
        memory_counts = [int(m.split(":")[1]) for m in args.memory_tasks if m.split(":")[0] == arch]
        a["memory"] = [memory_only(arch, n, ["--dtype", args.dtype, *server_args]) for n in memory_counts]
        write_results("scale", to_markdown(record), record)
    plot(record, ROOT / "benchmarks" / "results" / "scale.png")
    shutil.rmtree(WORK / "photos", ignore_errors=True)


if __name__ == "__main__":
    main()
