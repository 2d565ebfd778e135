"""Core figures for one backbone, measured in one run: task-file size, fingerprint time, and the
engine's masked batch against the plain torchvision model on the same batch.

    python -m benchmarks.core [--arch resnet50] [--batch 8] [--repeats 7]

Timings alternate engine and plain runs and report medians, so drift on a noisy machine hits
both sides alike. Weights are random (same architecture and FLOPs as the pretrained ones).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from piggyback_core import Engine, TaskFile, fingerprint_state_dict, get_backbone_spec, load_backbone


def _median_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    backbone = load_backbone(args.arch, weights="random", seed=0)
    g = torch.Generator().manual_seed(0)
    masks = {k: torch.rand(s, generator=g) < 0.6 for k, s in backbone.mask_shapes.items()}
    task = TaskFile.create(
        name="bench",
        labels=[f"c{i}" for i in range(100)],
        backbone=backbone,
        masks=masks,
        head_weight=0.01 * torch.randn(100, backbone.feature_dim, generator=g),
        head_bias=torch.zeros(100),
    )
    data = task.to_bytes()
    state = backbone.model.state_dict()
    fp_s = _median_time(lambda: fingerprint_state_dict(state), 5)

    # The plain model: torchvision's own, weights multiplied by the mask once, same head.
    spec = get_backbone_spec(args.arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        plain = torchvision.models.get_model(args.arch, weights=None).eval()
    sd = plain.state_dict()
    for k, m in masks.items():
        sd[k] = sd[k] * m
    head = torch.nn.Linear(backbone.feature_dim, 100)
    parent, _, attr = spec.head.rpartition(".")
    setattr(plain.get_submodule(parent) if parent else plain, attr, head)
    sd[f"{spec.head}.weight"], sd[f"{spec.head}.bias"] = task.head_weight, task.head_bias
    plain.load_state_dict(sd)

    engine = Engine(backbone)
    engine.add_task(task)
    cached = Engine(backbone, cache_bytes=2 * sum(m.weight.nbytes for m in backbone.masked))
    cached.add_task(task)
    x = torch.randn(args.batch, 3, 224, 224, generator=g)

    def run_plain() -> None:
        with torch.inference_mode():
            plain(x)

    for fn in (run_plain, lambda: engine.run("bench", x), lambda: cached.run("bench", x)):
        fn()  # warm-up
    plain_t, engine_t, cached_t = [], [], []
    for _ in range(args.repeats):
        plain_t.append(_median_time(run_plain, 1))
        engine_t.append(_median_time(lambda: engine.run("bench", x), 1))
        cached_t.append(_median_time(lambda: cached.run("bench", x), 1))
    p, e, c = (statistics.median(t) for t in (plain_t, engine_t, cached_t))

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
