"""The HTTP rates with a load generator that does not eat the cores: ``wrk`` (C, Debian's package)
against a real ``piggyback serve``, next to the plain fp32 eager decode+forward loop in one run.

    python -m benchmarks.http [--arch resnet18] [--duration 15] [--tasks 1,512] [--clients 8,16]
                              [--server-args="--workers 1" --server-args=--no-spread-batches ...]
                              [--name http-workers]

For each task count and traffic (1 task; 512 tasks drawn uniformly or by Zipf, s = 1.0, from a
fixed sequence), ``wrk`` keeps ``clients`` connections busy POSTing 500x375 JPEGs to
``/classify/{task}`` for ``duration`` seconds after a warm-up of the same length (the weight cache
and the batcher settled). The plain loop is the baseline the targets use: decode + preprocess +
torchvision forward in fp32 NCHW, batches of 8, one Python thread, every core. wrk's own CPU time is
reported, so that the figure is known to be the server's. Each ``--server-args`` (repeatable; ""
is the defaults) starts its own server over the same store, and the table has a row per server for
each cell. Needs ``wrk`` on the PATH (``apt-get install wrk``) and the ``bench`` extra (the
photos). Writes ``benchmarks/results/{name}.{md,json}`` (``http``, ``http-cache`` with
``--cache-bytes``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import random
import re
import resource
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import torch

from benchmarks.compute import plain_loop
from benchmarks.serving import machine, make_photos, make_task, plain_model, start_server, stop_server, write_results
from piggyback_core import FileSystemStore, load_backbone

PORT = 8713
_LUA = """
local bodies = {{}}
for _, path in ipairs({{{photos}}}) do
  local f = assert(io.open(path, "rb")); bodies[#bodies + 1] = f:read("*all"); f:close()
end
local paths = {{{paths}}}
local i = 0
request = function()
  i = i + 1
  local headers = {{["Content-Type"] = "image/jpeg"}}
  return wrk.format("POST", paths[(i % #paths) + 1], headers, bodies[(i % #bodies) + 1])
end
"""


def _paths(tasks: list[str], traffic: str, n: int = 20_000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    if traffic == "zipf":
        ranks = list(range(len(tasks)))
        rng.shuffle(ranks)  # popularity does not follow the names' order
        weights = [1.0 / (r + 1) for r in ranks]
        picks = rng.choices(range(len(tasks)), weights=weights, k=n)
    elif traffic == "uniform":
        picks = [rng.randrange(len(tasks)) for _ in range(n)]
    else:
        picks = [0] * n
    return [f"/classify/{tasks[p]}?top_k=1" for p in picks]


def _wrk(script: Path, clients: int, seconds: float) -> tuple[float, float]:
    """(requests per second, wrk's CPU seconds per wall second)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--timeout", "30s", "-s", str(script),
         f"http://127.0.0.1:{PORT}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out.stdout:
        raise RuntimeError(f"wrk saw errors:\n{out.stdout}")
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / seconds
    return rate, cpu


def _cache_counters() -> dict[str, float]:
    """The weight cache's hit and miss counts and its budget, from the server's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=10).read().decode()
    out = {}
    for name in ("hits", "misses", "budget_bytes", "bytes"):
        m = re.search(rf"^piggyback_weight_cache_{name}(?:_total)? ([\d.e+]+)$", text, re.M)
        out[name] = float(m.group(1)) if m else float("nan")
    return out


def bench(
    arch: str,
    task_counts: list[int],
    clients: list[int],
    duration: float,
    cache_bytes: str | None = None,
    server_args: list[str] | None = None,
) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("benchmarks.http: wrk not found (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="piggyback-http-"))
    photos = make_photos(work / "photos")
    backbone = load_backbone(arch, weights="random")
    tasks = [make_task(backbone, f"t{i:04d}", seed=i) for i in range(max(task_counts))]
    blobs = [p.read_bytes() for p in photos]
    fp32 = plain_model(backbone, tasks[0], torch.device("cpu"), torch.float32)
    plain = plain_loop(fp32, blobs, backbone.preprocessing, torch.float32, False, max(10.0, duration))
    print(f"{arch}: plain fp32 loop {plain:.1f} img/s", flush=True)
    del fp32
    store = FileSystemStore(work / "store")
    for t in tasks:
        store.put(t.name, t.to_bytes())
    all_names = [t.name for t in tasks]
    # the tasks in this process take gigabytes: freed before the server measures its available memory
    del tasks, backbone
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)  # and handed back to the system (glibc)
    env = {**os.environ, "PIGGYBACK_TOKEN": secrets.token_hex(16)}
    rows = []
    try:
        for extra in server_args or [""]:
            cmd = [sys.executable, "-m", "server.cli", "serve", "--backbone", arch, "--weights", "random",
                   "--store", str(work / "store"), "--port", str(PORT), "--log-level", "warning"]  # fmt: skip
            if cache_bytes is not None:
                cmd += ["--cache-bytes", cache_bytes]
            cmd += shlex.split(extra)
            proc, handle, _ = start_server(cmd, f"http://127.0.0.1:{PORT}", env, work / "server.log")
            try:
                rows += _cells(work, photos, all_names, task_counts, clients, duration, extra or "defaults")
            finally:
                stop_server(proc, handle)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"arch": arch, "plain_fp32": plain, "rows": rows}


def _cells(
    work: Path, photos: list[Path], names: list[str], task_counts: list[int], clients: list[int], duration: float,
    server: str,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every (tasks, traffic, clients) cell against the running server."""
    rows = []
    for count in task_counts:
        for traffic in ["one"] if count == 1 else ["zipf", "uniform"]:
            script = work / f"{count}-{traffic}.lua"
            photo_list = ", ".join(f'"{p}"' for p in photos)
            path_list = ", ".join(f'"{p}"' for p in _paths(names[:count], traffic))
            script.write_text(_LUA.format(photos=photo_list, paths=path_list))
            for c in clients:
                _wrk(script, c, duration)  # warm-up: caches, batcher
                before = _cache_counters()
                rate, wrk_cpu = _wrk(script, c, duration)
                after = _cache_counters()
                lookups = after["hits"] + after["misses"] - before["hits"] - before["misses"]
                row = {"server": server, "tasks": count, "traffic": traffic, "clients": c, "img_s": rate,
                       "wrk_cpu": wrk_cpu,
                       "hit_rate": (after["hits"] - before["hits"]) / lookups if lookups else float("nan"),
                       "cache_budget_gib": after["budget_bytes"] / 2**30,
                       "cache_held_gib": after["bytes"] / 2**30}  # fmt: skip
                rows.append(row)
                print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--tasks", default="1,512")
    parser.add_argument("--clients", default="8,16")
    parser.add_argument("--cache-bytes", default=None, help="the server's weight cache budget (default: its auto)")
    parser.add_argument(
        "--server-args",
        action="append",
        default=None,
        help='extra `piggyback serve` arguments, one server each (repeatable; "" for the defaults)',
    )
    parser.add_argument("--name", default=None, help="the results' file name (default: http, or http-cache)")
    args = parser.parse_args(argv)  # fmt: skip
    r = bench(args.arch, [int(t) for t in args.tasks.split(",")], [int(c) for c in args.clients.split(",")],
              args.duration, args.cache_bytes, args.server_args)  # fmt: skip
    one = {(row["server"], row["clients"]): row["img_s"] for row in r["rows"] if row["tasks"] == 1}
    budget = "server defaults" if args.cache_bytes is None else f"--cache-bytes {args.cache_bytes}"
    lines = [f"# HTTP with wrk ({r['arch']}, {budget}; {machine()})", "",
             f"Plain fp32 eager decode+forward loop (batches of 8): {r['plain_fp32']:.1f} img/s.", "",
             "| server | tasks | traffic | clients | img/s | / plain fp32 loop | / one task, same clients "
             "| weight cache hit rate | cache budget (GiB) | wrk CPU (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in r["rows"]:
        base = one.get((row["server"], row["clients"]))
        vs_one = row["img_s"] / base if base else float("nan")
        lines.append(f"| {row['server']} | {row['tasks']} | {row['traffic']} | {row['clients']} | "
                     f"{row['img_s']:.1f} | {row['img_s'] / r['plain_fp32']:.2f} | {vs_one:.2f} | "
                     f"{row['hit_rate']:.2f} | {row['cache_budget_gib']:.1f} | {row['wrk_cpu']:.2f} |")  # fmt: skip
    write_results(args.name or ("http" if args.cache_bytes is None else "http-cache"), lines, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
