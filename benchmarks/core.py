"""Core figures for one backbone, measured in one run: task-file size, fingerprint time, and the
engine's masked batch against the plain torchvision model on the same batch.

    python -m benchmarks.core [--arch resnet50] [--batch 8] [--repeats 7]

Timings alternate engine and plain runs and report medians, so drift on a noisy machine hits
both sides alike. Weights are random (same architecture and FLOPs as the pretrained ones).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.serving import interleaved, make_task, plain_model
from piggyback_core import Engine, fingerprint_state_dict, load_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    backbone = load_backbone(args.arch, weights="random", seed=0)
    task = make_task(backbone, "bench", seed=0)
    data = task.to_bytes()
    state = backbone.model.state_dict()
    fp_s = interleaved({"fp": lambda: fingerprint_state_dict(state)}, 5)["fp"]

    plain = plain_model(backbone, task, torch.device("cpu"), torch.float32)
    engine = Engine(backbone)
    engine.add_task(task)
    cached = Engine(backbone, cache_bytes=2 * sum(m.weight.nbytes for m in backbone.masked))
    cached.add_task(task)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def run_plain() -> None:
        with torch.inference_mode():
            plain(x)

    t = interleaved(
        {"plain": run_plain, "engine": lambda: engine.run("bench", x), "cached": lambda: cached.run("bench", x)},
        args.repeats,
    )
    p, e, c = t["plain"], t["engine"], t["cached"]

    print(f"# {args.arch}, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"masked weights            {backbone.num_masked_weights:,} in {len(backbone.masked)} layers")
    sizes = f"mask {task.mask_nbytes:,}, head {task.head_nbytes:,}"
    print(f"task file                 {len(data):,} bytes ({sizes})")
    print(f"bits per masked weight    {task.bits_per_parameter:.4f}")
    print(f"fingerprint               {fp_s * 1000:.0f} ms")
    print()
    print("| path | median s/batch | throughput ratio vs plain |")
    print("| --- | --- | --- |")
    print(f"| plain torchvision | {p:.3f} | 1.000 |")
    print(f"| engine, weights built per batch | {e:.3f} | {p / e:.3f} |")
    print(f"| engine, materialised-weight cache hit | {c:.3f} | {p / c:.3f} |")


if __name__ == "__main__":
    main()
