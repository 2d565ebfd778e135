"""The offline demo: train a small task and serve it, with nothing downloaded.

    make demo [PORT=8000]    # or: python -m scripts.demo [--port 8000] [--dir .demo]

It draws a small dataset of noisy red, green and blue images, trains a Piggyback task on a resnet18
with seeded random weights (pretrained weights need a download; see docs/getting-started.md for real ones), puts
it into a store, writes a fresh management token to ``.demo/token``, and serves that store, printing
a curl line to try. A busy port is one line and a non-zero exit, before any training.
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
    parser.add_argument("--dir", default=".demo", help="where the dataset, store, token and sample image go")
    parser.add_argument("--port", type=int, default=8000, help="port to serve on (make demo PORT=8001)")
    parser.add_argument("--prepare-only", action="store_true", help="train and write the files, do not serve")
    args = parser.parse_args()
    root = Path(args.dir)
    store = root / "store"
    from piggyback_core import PiggybackError
    from server.cli import main as piggyback
    from server.serving import bind_socket

    if not args.prepare_only:
        try:  # fail in one line before a minute of training, not after it
            bind_socket("127.0.0.1", args.port).close()
        except PiggybackError as exc:
            sys.exit(f"demo: error: {exc}; choose another port: make demo PORT={args.port + 1}")
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
    # The management token of this demo, in a file that only its owner can read, so that the
    # README's examples (and you) can use it from another terminal: TOKEN=$(cat .demo/token).
    token = os.environ.get("PIGGYBACK_TOKEN") or secrets.token_hex(16)
    token_file = root / "token"
    with os.fdopen(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(token + "\n")
    if args.prepare_only:
        return
    url = f"http://localhost:{args.port}"
    print(
        f"\nServing task 'colours' at {url} (ready when the log says 'ready'). In another terminal:\n\n"
        f'  curl -s -H "Content-Type: image/png" --data-binary @{sample} "{url}/classify/colours?top_k=3"\n'
        f"  curl -s {url}/tasks\n\n"
        f"Or open {url}/ in a browser: the web console (drop {sample} on it).\n"
        f"Management token for PUT/DELETE /tasks: in {token_file}. Stop with Ctrl-C.\n",
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
