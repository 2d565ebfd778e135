"""Per-request costs of one replica, measured through the engine: what benchmarks.fleet simulates.

    python -m benchmarks.fleet --measure      # writes benchmarks/results/fleet-costs.json

For each backbone (random weights, the server's defaults on this machine: dtype ``auto``, layout
``auto``, the packed CPU path where supported, torch's default threads):

* ``batch_s[b]``: seconds to run one task's batch of ``b`` images (b = 1..8) with its weights
  resident in the cache (a hit), median of interleaved repeats;
* ``build_s``: seconds to build one task's weights from its packed masks (a miss pays it before
  its segment runs), median;
* ``weights_nbytes``: bytes one task's built weights take in the cache (``Engine.weights_nbytes``),
  what sizes a replica's cache.

A mixed batch runs one segment per task (the packed path's loop), so the simulation prices a batch
as the sum of its segments' ``batch_s`` plus ``build_s`` for each segment that missed.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.serving import interleaved, machine, make_task
from piggyback_core import Engine, load_backbone
from piggyback_core.hardware import dtype_name, parse_dtype, parse_layout

MAX_BATCH = 8


def measure_arch(arch: str, repeats: int) -> dict[str, Any]:
    backbone = load_backbone(arch, weights="random", seed=0)
    dtype = parse_dtype("auto", "cpu")
    engine = Engine(backbone, dtype=dtype, channels_last=parse_layout("auto", arch), cache_bytes=1 << 40)
    task = engine.add_task(make_task(backbone, "t0", seed=0, keep=0.9))
    engine.prefill("t0")
    images = torch.randn(MAX_BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    fns: dict[str, Any] = {f"b{b}": (lambda b=b: engine.run("t0", images[:b])) for b in range(1, MAX_BATCH + 1)}
    fns["build"] = lambda: engine.build_weights(task)
    t0 = time.perf_counter()
    t = interleaved(fns, repeats)
    return {
        "arch": arch,
        "dtype": dtype_name(dtype),
        "cpu_path": engine.cpu_path,
        "threads": torch.get_num_threads(),
        "weights_nbytes": engine.weights_nbytes,
        "build_s": t["build"],
        "batch_s": [t[f"b{b}"] for b in range(1, MAX_BATCH + 1)],
        "measured_s": time.perf_counter() - t0,
    }


def measure(archs: list[str], repeats: int = 3) -> dict[str, Any]:
    costs = {"machine": machine(), "archs": {}}
    for arch in archs:
        c = measure_arch(arch, repeats)
        costs["archs"][arch] = c
        per_image = ", ".join(f"b{b} {s / b * 1e3:.0f}" for b, s in enumerate(c["batch_s"], 1))
        print(
            f"  {arch}: build {c['build_s'] * 1e3:.0f} ms, ms per image: {per_image}; "
            f"{c['weights_nbytes'] / 2**20:.0f} MiB per task ({c['dtype']}, {c['cpu_path']})",
            flush=True,
        )
    return costs


def fake_costs(weights_nbytes: int = 100 << 20) -> dict[str, Any]:
    """Round numbers for tests, near resnet50's on 2 cores: a batch of b costs 4 + 10 b ms, a build 15 ms."""
    arch = {
        "arch": "fake",
        "dtype": "float32",
        "cpu_path": "fake",
        "threads": 1,
        "weights_nbytes": weights_nbytes,
        "build_s": 0.015,
        "batch_s": [0.004 + 0.010 * b for b in range(1, MAX_BATCH + 1)],
    }
    return {"machine": "fake costs", "archs": {"fake": arch}}
