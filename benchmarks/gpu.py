"""The GPU figures: plain torchvision vs one masked task vs mixed batches, per batch size and dtype,
with and without CUDA graphs.

    python -m benchmarks.gpu [--arch resnet50] [--batches 1,8,32,64] [--iters 50]
    python -m benchmarks.gpu --device cpu --arch resnet18 --batches 1 --iters 2 --out /tmp/x  # smoke run

Per (dtype, batch), forward only, images already on the device, ms per batch (CUDA events) and
images/s:

* **plain**: torchvision's model with one task's weights (backbone x mask) and head, eager;
* **masked, cached**: the engine, one task, its built weights in the cache (what a hot task costs);
* **masked, built**: the engine, one task, weights built every batch (cache 0: a cold task);
* **mixed segments / stacked**: a batch of 8 tasks (uneven: batch / 8 rows each, at least one),
  weights cached, on each mixed path: the figure that decides ``mixed_path=auto`` on CUDA;
* each with a CUDA graph of the same call captured once and replayed (``graph``), where capture
  works; "n/a" with the reason where it does not.

The ratios against plain are in the same run. Writes ``benchmarks/results/gpu.{md,json}``
(``--out`` elsewhere). ``make gpu-check`` runs it after ``tests/cuda``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.serving import machine, make_task, plain_model
from piggyback_core import Engine, load_backbone

ROOT = Path(__file__).resolve().parent.parent


def _time(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 5) -> float:
    """Milliseconds per call (median of 3 rounds of ``iters``)."""
    for _ in range(warmup):
        fn()
    rounds = []
    for _ in range(3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            rounds.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            rounds.append((time.perf_counter() - t0) * 1000 / iters)
    return sorted(rounds)[1]


def _graphed(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any] | str:
    """``fn`` captured in a CUDA graph (replayed per call), or why it cannot be."""
    if device.type != "cuda":
        return "no CUDA"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as exc:  # noqa: BLE001 - reported in the table
        torch.cuda.synchronize()
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def measure(
    arch: str, device: torch.device, dtype: torch.dtype, batches: list[int], iters: int
) -> list[dict[str, Any]]:
    backbone = load_backbone(arch, weights="random", seed=0)
    tasks = [make_task(backbone, f"t{i}", seed=i) for i in range(8)]
    plain = plain_model(backbone, tasks[0], device, dtype)
    engines = {
        "cached": Engine(backbone, device=device, dtype=dtype, channels_last=True, cache_bytes=1 << 40),
        "built": Engine(backbone, device=device, dtype=dtype, channels_last=True, cache_bytes=0),
    }
    stacked = Engine(backbone, device=device, dtype=dtype, channels_last=True, cache_bytes=1 << 40,
                     mixed_path="stacked")  # fmt: skip
    for engine in (*engines.values(), stacked):
        for t in tasks:
            engine.add_task(t)
            if engine.cache.max_bytes:
                engine.prefill(t.name)
    size = backbone.preprocessing.crop_size
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        mixed = [f"t{min(i * 8 // batch, 7)}" for i in range(batch)] if batch >= 2 else ["t0"]
        calls: dict[str, Callable[[], Any]] = {
            "plain": lambda x=x: plain(x),
            "masked, cached": lambda x=x: engines["cached"].run("t0", x),
            "masked, built": lambda x=x: engines["built"].run("t0", x),
            "mixed segments": lambda x=x, m=mixed: engines["cached"].run_mixed(x, m),
            "mixed stacked": lambda x=x, m=mixed: stacked.run_mixed(x, m),
        }
        with torch.inference_mode():
            for name, fn in calls.items():
                ms = _time(fn, device, iters)
                graphed = _graphed(fn, device)
                graph_ms = _time(graphed, device, iters) if callable(graphed) else None
                rows.append({"dtype": str(dtype).removeprefix("torch."), "batch": batch, "path": name, "ms": ms,
                             "img_s": batch * 1000 / ms, "graph_ms": graph_ms,
                             "graph": None if callable(graphed) else graphed})  # fmt: skip
    for row in rows:  # ratios against plain eager, same dtype and batch, same run
        base = next(
            r for r in rows if r["dtype"] == row["dtype"] and r["batch"] == row["batch"] and r["path"] == "plain"
        )
        row["vs_plain"] = base["ms"] / row["ms"]
    return rows


def to_markdown(arch: str, device: torch.device, rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"# GPU figures ({arch}, {device})", "", f"Machine: {machine()}.", "",
             "Forward only, images on the device; ms per batch (median of 3 rounds); `vs plain` = plain ms / "
             "this ms (1.0: as fast as torchvision with the task's weights).", "",
             "| dtype | batch | path | ms | img/s | vs plain | CUDA graph ms |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        graph = f"{r['graph_ms']:.2f}" if r["graph_ms"] is not None else f"n/a ({r['graph']})"
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['path']} | {r['ms']:.2f} | {r['img_s']:.0f} | "
                     f"{r['vs_plain']:.2f} | {graph} |")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA GPU here; the GPU figures stay unmeasured (run `make gpu-check` on one)")
        return 2
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        if device.type == "cpu" and dtype == torch.float16:
            continue  # no fast float16 kernels on a CPU
        if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
            continue
        rows += measure(args.arch, device, dtype, batches, args.iters)
    lines = to_markdown(args.arch, device, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.md").write_text("\n".join(lines) + "\n")
    (args.out / "gpu.json").write_text(json.dumps({"machine": machine(), "arch": args.arch, "rows": rows}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
