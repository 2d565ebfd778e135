"""Seconds per training epoch in float32 against bfloat16 autocast (+ channels_last).

    python -m benchmarks.train_speed [--images 64] [--size 224]

A Piggyback run of resnet18 (random weights) on a generated ImageFolder dataset of photo-like
JPEGs, at the given crop size (224: the paper's; 32: the offline accuracy benchmark's). Each dtype
runs 2 epochs; the second epoch's time is reported (the first warms the kernels). Writes
benchmarks/results/train_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.decode import photo_like
from benchmarks.serving import machine, write_results
from piggyback_core import train
from piggyback_core.trainer import TrainConfig

VARIANTS = {"float32 NCHW": ("float32", "contiguous"), "bfloat16 channels_last": ("bfloat16", "channels_last")}


def make_dataset(root: Path, images: int, size: int) -> Path:
    for split, n in (("train", images), ("val", max(8, images // 4))):
        for c in range(4):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n // 4):
                (folder / f"{i}.jpg").write_bytes(photo_like(size, size, seed=c * 10_000 + i))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, action="append", help="crop sizes (default: 224 and 32)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for size in args.size or [224, 32]:
            data = make_dataset(Path(work) / f"data{size}", args.images, max(size * 8 // 7, size + 4))
            seconds = {}
            for label, (dtype, layout) in VARIANTS.items():
                config = TrainConfig(
                    data=data, task="speed", backbone="resnet18", weights="random", epochs=2, batch_size=16,
                    crop_size=size, resize_size=max(size * 8 // 7, size + 4), workers=0, progress=False,
                    dtype=dtype, layout=layout, lr_mask=1e-3,
                )  # fmt: skip
                result = train(config, log=lambda _: None)
                seconds[label] = result.history[1].seconds
                print(f"crop {size}: {label}: {seconds[label]:.2f} s/epoch", flush=True)
            rows.append({"crop": size, "images": args.images, "seconds_per_epoch": seconds})
    lines = [
        f"# Training epoch time, resnet18 Piggyback, {args.images} train images, batch 16; {machine()}",
        "",
        "| crop | " + " | ".join(f"{k} s/epoch" for k in VARIANTS) + " | speed-up |",
        "| --- | " + " | ".join("---" for _ in VARIANTS) + " | --- |",
    ]
    for r in rows:
        s = r["seconds_per_epoch"]
        a, b = (s[k] for k in VARIANTS)
        lines.append(f"| {r['crop']} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
    write_results("train_speed", lines, {"rows": rows})


if __name__ == "__main__":
    main()
