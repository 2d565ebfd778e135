"""The offline demo: train a small task and serve it, with nothing downloaded.

    make demo        # or: python -m scripts.demo [--port 8000]

It draws a small dataset of noisy red, green and blue images, trains a Piggyback task on a resnet18
with seeded random weights (pretrained weights need a download; see the README for real ones), puts
it into a store, and serves that store with a freshly generated management token, printing a curl
line to try.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"blue": (40, 40, 200), "green": (40, 200, 40), "red": (200, 40, 40)}


def make_colour_dataset(root: Path, *, n_train: int = 24, n_val: int = 12, size: int = 40, seed: int = 0) -> Path:
    """A small separable dataset in ImageFolder layout: noisy images of three colours."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=".demo", help="where the dataset, store and sample image go")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    root = Path(args.dir)
    store = root / "store"
    from server.cli import main as piggyback

    if not (store / "colours.safetensors").exists():
        data = make_colour_dataset(root / "data")
        common = ["--backbone", "resnet18", "--weights", "random", "--resize-size", "36", "--crop-size", "32"]
        code = piggyback(
            ["train", "--data", str(data), "--task", "colours", *common, "--epochs", "4", "--batch-size", "8",
             "--lr-mask", "1e-3", "--lr-head", "1e-2", "--workers", "0", "--quiet", "--workdir",
             str(root / "run"), "--store", str(store)]
        )  # fmt: skip
        if code:
            sys.exit(code)
    sample = root / "sample.png"
    Image.fromarray(np.full((64, 64, 3), COLOURS["red"], dtype=np.uint8)).save(sample)
    token = os.environ.get("PIGGYBACK_TOKEN") or secrets.token_hex(16)
    url = f"http://127.0.0.1:{args.port}"
    print(
        f"\nServing task 'colours' at {url} (ready in a few seconds). Try:\n\n"
        f'  curl -s -H "Content-Type: image/png" --data-binary @{sample} "{url}/classify/colours?top_k=3"\n'
        f"  curl -s {url}/tasks\n\n"
        f"Management token for PUT/DELETE /tasks (this run only): {token}\n",
        flush=True,
    )
    os.environ["PIGGYBACK_TOKEN"] = token
    sys.exit(
        piggyback(
            ["serve", "--backbone", "resnet18", "--weights", "random", "--store", str(store), "--port", str(args.port)]
        )
    )


if __name__ == "__main__":
    main()
