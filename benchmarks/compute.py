"""Compute at the hardware's limit: the server against plain loops, per dtype and layout.

    python -m benchmarks.compute [--arch resnet18 --arch resnet50] [--duration 15]

For each backbone, one task, 8 closed-loop clients over HTTP (``benchmarks.loadgen`` in its own
process) sending the same 500x375 JPEG photos to a real ``piggyback serve`` on loopback, against
in-process plain loops on the same JPEGs (decode + preprocess + torchvision forward, batches of 8):

* server (``--dtype auto --layout auto``) / plain fp32 eager loop (NCHW): what the defaults gain;
* server / the plain loop in the server's own dtype and layout: what serving costs;
* server ``--dtype float32`` (auto layout) and ``--decode-threads 2`` against today's fp32 NCHW
  server: nothing may be slower, and whether decoding threads pay.

Writes benchmarks/results/compute.{md,json}. Needs the ``bench`` extra (the photos).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.serving import (
    load,
    machine,
    make_photos,
    make_task,
    plain_model,
    start_server,
    stop_server,
    write_results,
)
from piggyback_core import (
    FileSystemStore,
    Preprocessing,
    decode_image,
    dtype_name,
    get_backbone_spec,
    load_backbone,
    parse_dtype,
)

SERVERS = {  # label: extra `piggyback serve` flags
    "auto": [],
    "auto_reference_cpu_path": ["--cpu-path", "reference"],  # the engine before the packed CPU path
    "auto_decode_threads_2": ["--decode-threads", "2"],
    "fp32_nchw": ["--dtype", "float32", "--layout", "contiguous"],  # the engine before this issue
    "fp32_auto_layout": ["--dtype", "float32"],
}


def plain_loop(model: torch.nn.Module, blobs: list[bytes], pre: Preprocessing, dtype: torch.dtype,
               channels_last: bool, seconds: float) -> float:  # fmt: skip
    """Images per second of decode + preprocess + forward in batches of 8, one thread of Python."""

    def batch(i: int) -> None:
        x = torch.stack([pre(decode_image(blobs[(i + j) % len(blobs)], draft_min_side=pre.resize_size))
                         for j in range(8)])  # fmt: skip
        x = x.to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            model(x)

    batch(0)
    n, i, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch(i)
        n += 8
        i += 8
    return n / (time.perf_counter() - started)


def bench_arch(arch: str, work: Path, photos: Path, duration: float, warmup: float) -> dict[str, Any]:
    backbone = load_backbone(arch, weights="random")
    task = make_task(backbone, "photos", seed=0)
    blobs = [p.read_bytes() for p in sorted(photos.glob("*.jpg"))]
    pre = backbone.preprocessing
    dtype, channels_last = parse_dtype("auto", "cpu"), get_backbone_spec(arch).channels_last
    fp32 = plain_model(backbone, task, torch.device("cpu"), torch.float32)
    best = plain_model(backbone, task, torch.device("cpu"), dtype)
    if channels_last:
        best = best.to(memory_format=torch.channels_last)
    seconds = max(10.0, duration)
    plain = {
        "plain_fp32_nchw": plain_loop(fp32, blobs, pre, torch.float32, False, seconds),
        "plain_best": plain_loop(best, blobs, pre, dtype, channels_last, seconds),
    }
    print(f"{arch}: {plain}", flush=True)
    del fp32, best

    store = work / f"store-{arch}"
    shutil.rmtree(store, ignore_errors=True)
    FileSystemStore(store).put(task.name, task.to_bytes())
    env = {**os.environ, "PIGGYBACK_TOKEN": secrets.token_hex(16)}
    served: dict[str, Any] = {}
    for label, flags in SERVERS.items():
        cmd = [sys.executable, "-m", "server.cli", "serve", "--backbone", arch, "--weights", "random",
               "--store", str(store), "--port", "8711", "--log-level", "warning", *flags]  # fmt: skip
        proc, handle, _ = start_server(cmd, "http://127.0.0.1:8711", env, work / f"{arch}-{label}.log")
        try:
            served[label] = load("http://127.0.0.1:8711", photos, [task.name], 8, duration, warmup)
        finally:
            stop_server(proc, handle)
        print(f"{arch} server {label}: {served[label]['throughput']:.1f} img/s", flush=True)
    rate = {k: v["throughput"] for k, v in served.items()}
    return {
        "dtype": dtype_name(dtype),
        "layout": "channels_last" if channels_last else "contiguous",
        "plain": plain,
        "servers": served,
        "ratios": {
            "server_vs_plain_fp32": rate["auto"] / plain["plain_fp32_nchw"],
            "server_vs_plain_best": rate["auto"] / plain["plain_best"],
            "fp32_auto_layout_vs_fp32_nchw_server": rate["fp32_auto_layout"] / rate["fp32_nchw"],
            "decode_threads_2_vs_0": rate["auto_decode_threads_2"] / rate["auto"],
            "packed_vs_reference_cpu_path": rate["auto"] / rate["auto_reference_cpu_path"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help="default: resnet18 and resnet50")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="piggyback-compute-"))
    photos = work / "photos"
    make_photos(photos)
    results = {
        a: bench_arch(a, work, photos, args.duration, args.warmup) for a in args.arch or ["resnet18", "resnet50"]
    }
    lines = [
        f"# Compute: one task, 8 clients over HTTP, 500x375 JPEGs; {machine()}",
        "",
        "| backbone | server dtype, layout | plain fp32 NCHW loop img/s | plain loop, server's dtype and layout | "
        "server img/s | server / plain fp32 (goal >= 3) | server / plain same dtype (goal >= 0.9) | "
        "fp32 server, auto layout / NCHW (>= 1) | decode threads 2 / 0 | packed / reference CPU path |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arch, r in results.items():
        q = r["ratios"]
        lines.append(
            f"| {arch} | {r['dtype']}, {r['layout']} | {r['plain']['plain_fp32_nchw']:.1f} | "
            f"{r['plain']['plain_best']:.1f} | {r['servers']['auto']['throughput']:.1f} | "
            f"{q['server_vs_plain_fp32']:.2f} | {q['server_vs_plain_best']:.2f} | "
            f"{q['fp32_auto_layout_vs_fp32_nchw_server']:.2f} | {q['decode_threads_2_vs_0']:.2f} | "
            f"{q['packed_vs_reference_cpu_path']:.2f} |"
        )
    write_results("compute", lines, {"results": results})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
