"""A small, offline version of Piggyback's Table 1, from real images shipped inside packages.

    pip install -e '.[bench]'          # scikit-learn, scikit-image, matplotlib
    python -m benchmarks.accuracy      # about 10-15 minutes on 2 CPU cores

1. **Source task** (stands in for ImageNet): which of 8 photos (scikit-image's astronaut, camera,
   retina, immunohistochemistry, clock, cell; scikit-learn's china and flower) a random patch
   comes from. resnet18 is trained on it from scratch at 32x32 (``piggyback train --method
   finetune`` from random weights), and saved as a local weights file, which every target task then
   loads through the ordinary ``--weights PATH`` path.
2. **Target tasks**, each learned four ways (classifier only, Piggyback binary, Piggyback ternary,
   full fine-tuning):

   * ``textures``: brick, grass, gravel, moon, coins, Hubble deep field (scikit-image): patches of
     other photos, a moderate domain shift;
   * ``digits``: scikit-learn's 1,797 handwritten digits (8x8, upscaled): a strong domain shift;
   * ``faces``: face / non-face from scikit-image's LFW subset (200 images, 25x25): a strong shift
     and a two-class label space;
   * ``photos``: which of 4 photos the source never saw (chelsea, coffee, rocket, page) a patch
     comes from: the source's own domain, new labels (the paper's Flowers, close to ImageNet).

Every run uses the trainer as shipped; the best epoch is chosen on ``val/`` and accuracy is reported
on a held-out ``test/`` split. Task-file methods are scored through the serving engine, from the
task file. The recipe is the paper's scaled to these small runs: the same optimisers and schedule
shape (Adam for scores and head; SGD with momentum 0.9 for the baselines; x0.1 decay half-way),
with 12 epochs instead of 30 and learning rates x10 because the runs take ~10x fewer steps.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from piggyback_core import Engine, TaskFile, evaluate, evaluate_task, load_backbone, parse_dtype, train
from piggyback_core.trainer import TrainConfig, TrainResult

SIZE = 36  # stored image size; training crops 32x32
SOURCE_PHOTOS = ["astronaut", "camera", "china", "flower", "retina", "immunohistochemistry", "clock", "cell"]
TEXTURES = ["brick", "grass", "gravel", "moon", "coins", "hubble_deep_field"]
NEW_PHOTOS = ["chelsea", "coffee", "rocket", "page"]
METHODS = [
    ("classifier", "binary"),
    ("piggyback", "binary"),
    ("piggyback", "ternary"),
    ("finetune", "binary"),
]


def _photo(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3].astype(np.uint8)


def _patches(img: np.ndarray, n: int, rng: np.random.Generator) -> list[Image.Image]:
    h, w = img.shape[:2]
    out = []
    for _ in range(n):
        side = int(rng.integers(max(24, min(h, w) // 10), min(h, w) // 3 + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(Image.fromarray(img[y : y + side, x : x + side]).resize((SIZE, SIZE), Image.BILINEAR))
    return out


def _write(root: Path, split: str, label: str, images: list[Image.Image]) -> None:
    folder = root / split / label
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(folder / f"{i:05d}.png")


def _split(items: list[Image.Image], train: int, val: int) -> dict[str, list[Image.Image]]:
    return {"train": items[:train], "val": items[train : train + val], "test": items[train + val :]}


def _photo_task(root: Path, photos: list[str], per_class: tuple[int, int, int], rng: np.random.Generator) -> None:
    for name in photos:
        for split, images in _split(_patches(_photo(name), sum(per_class), rng), *per_class[:2]).items():
            _write(root, split, name, images)


def _digits(root: Path, rng: np.random.Generator) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = rng.permutation(len(digits.target))
    for rank, i in enumerate(order):
        split = "train" if rank < 1000 else "val" if rank < 1300 else "test"
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        im = Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")
        _write_one(root / split / str(digits.target[i]), f"{i:05d}.png", im)


def _faces(root: Path, rng: np.random.Generator) -> None:
    import skimage.data

    faces = skimage.data.lfw_subset()  # 100 faces, then 100 non-faces
    for cls, block in (("face", faces[:100]), ("non-face", faces[100:])):
        order = rng.permutation(100)
        for rank, i in enumerate(order):
            split = "train" if rank < 50 else "val" if rank < 70 else "test"
            im = Image.fromarray((block[i] * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
            _write_one(root / split / cls, f"{i:03d}.png", im.convert("RGB"))


def _write_one(folder: Path, name: str, im: Image.Image) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    im.save(folder / name)


def build_datasets(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write every dataset once (ImageFolder layout with train/val/test); reuse it afterwards."""
    marker = root / f".complete-v2-{seed}"
    paths = {name: root / name for name in ("source", "textures", "digits", "faces", "photos")}
    if marker.exists():
        return paths
    rng = np.random.default_rng(seed)
    _photo_task(paths["source"], SOURCE_PHOTOS, (600, 100, 100), rng)
    _photo_task(paths["textures"], TEXTURES, (150, 50, 100), rng)
    _digits(paths["digits"], rng)
    _faces(paths["faces"], rng)
    _photo_task(paths["photos"], NEW_PHOTOS, (150, 50, 100), rng)
    marker.touch()
    return paths


@dataclass
class Row:
    target: str
    method: str
    top1: float
    masked_out: float
    task_bytes: int
    seconds: float
    top1_bf16: float | None = None  # the same task file served by a bfloat16 engine
    agreement: float | None = None  # share of test images whose top-1 label the two engines agree on


TRAIN_DTYPE = "auto"  # set by --train-dtype


def _config(data: Path, task: str, weights: str, **kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "backbone": "resnet18", "weights": weights, "resize_size": SIZE, "crop_size": 32,
        "crop_scale_min": 0.5, "workers": 1, "progress": False, "dtype": TRAIN_DTYPE,
    }  # fmt: skip
    return TrainConfig(data=data, task=task, **{**base, **kw})  # type: ignore[arg-type]


def pretrain(data: Path, out: Path, epochs: int, log: Callable[[str], None]) -> Path:
    if out.exists():
        log(f"reusing the pretrained source backbone {out}")
        return out
    result = train(
        _config(
            data,
            "source",
            "random",
            method="finetune",
            epochs=epochs,
            batch_size=64,
            lr=0.05,
            weight_decay=5e-4,
            lr_decay_every=max(1, epochs * 2 // 3),
        ),  # fmt: skip
        log=log,
    )
    assert result.model_state is not None
    state = {k.removeprefix("backbone."): v for k, v in result.model_state.items() if k.startswith("backbone.")}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    log(f"source task: val top-1 {result.best_val_top1:.2%}; backbone saved to {out}")
    return out


def _test_top1(result: TrainResult, weights: str, data: Path) -> tuple[float, float | None, float | None]:
    """Test top-1 in float32; for a task file also in bfloat16 and the two engines' agreement."""
    if result.task is not None:  # served from the task file, as the server would
        reports = []
        for dtype in (torch.float32, torch.bfloat16):
            engine = Engine(load_backbone("resnet18", weights=weights), dtype=dtype, channels_last=True)
            engine.add_task(TaskFile.from_bytes(result.task.to_bytes()))
            reports.append(evaluate_task(engine, result.task.name, data / "test"))
        fp32, bf16 = reports
        same = [
            a["top"][0]["label"] == b["top"][0]["label"]
            for a, b in zip(fp32.predictions, bf16.predictions, strict=True)
        ]
        return fp32.top1, bf16.top1, sum(same) / len(same)
    net, pre = result.net, result.preprocessing
    assert net is not None and pre is not None

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(x)

    return evaluate(predict, data / "test", labels=result.labels, preprocessing=pre).top1, None, None


def run_target(name: str, data: Path, weights: str, epochs: int, log: Callable[[str], None]) -> list[Row]:
    rows = []
    for method, kind in METHODS:
        start = time.perf_counter()
        kw: dict[str, object] = {"method": method, "mask_kind": kind, "epochs": epochs}
        kw["lr_decay_every"] = max(1, epochs * 2 // 3)
        if method == "piggyback":
            kw |= {"lr_mask": 1e-3, "lr_head": 1e-3}
        else:
            kw |= {"lr": 1e-2}
        result = train(_config(data, name, weights, **kw), log=lambda _: None)
        top1, top1_bf16, agreement = _test_top1(result, weights, data)
        if result.task is not None:
            size, masked_out = len(result.task.to_bytes()), 1 - result.task.density
        else:
            assert result.model_state is not None
            size, masked_out = sum(t.nbytes for t in result.model_state.values()), 0.0
        label = "piggyback " + kind if method == "piggyback" else method
        rows.append(Row(name, label, top1, masked_out, size, time.perf_counter() - start, top1_bf16, agreement))
        log(f"  {name:<9} {label:<18} test top-1 {top1:6.2%}  masked out {masked_out:6.2%}  {size:>10,} B  "
            f"({rows[-1].seconds:.0f}s, best val epoch {result.best_epoch})")  # fmt: skip
    return rows


def render(rows: list[Row], source_note: str) -> str:
    targets = list(dict.fromkeys(r.target for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    by = {(r.target, r.method): r for r in rows}
    lines = [
        "| method | " + " | ".join(targets) + " | mean | % masked out (mean) | bytes per task |",
        "| --- | " + " | ".join("---" for _ in targets) + " | --- | --- | --- |",
    ]
    for m in methods:
        accs = [by[(t, m)].top1 for t in targets]
        masked = np.mean([by[(t, m)].masked_out for t in targets])
        size = int(np.mean([by[(t, m)].task_bytes for t in targets]))
        lines.append(
            f"| {m} | " + " | ".join(f"{a:.1%}" for a in accs) + f" | {np.mean(accs):.1%} | {masked:.1%} | {size:,} |"
        )
    lines += [
        "",
        "Task files served by a float32 and a bfloat16 engine (channels_last), test sets: top-1 agreement "
        "(goal >= 99.5%) and accuracy difference bf16 - fp32 (goal within 0.3 points).",
        "",
        "| method | " + " | ".join(targets) + " |",
        "| --- | " + " | ".join("---" for _ in targets) + " |",
    ]
    for m in methods:
        cells = [by[(t, m)] for t in targets]
        if any(c.agreement is None for c in cells):
            continue
        lines.append(
            f"| {m} | "
            + " | ".join(f"{c.agreement:.1%} agree, {100 * ((c.top1_bf16 or 0) - c.top1):+.1f} pt" for c in cells)
            + " |"
        )
    return "\n".join([source_note, "", *lines])


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r.target for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    by = {(r.target, r.method): r.top1 for r in rows}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + i * width for j in range(len(targets))]
        ax.bar(xs, [100 * by[(t, m)] for t in targets], width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(targets))], targets)
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Offline Table 1: resnet18 pretrained on photo patches, 4 target tasks")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=".bench/accuracy", help="datasets and the pretrained backbone")
    parser.add_argument("--out", default="benchmarks/results", help="where accuracy.md/.json/.png go")
    parser.add_argument("--source-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--targets", default="textures,digits,faces,photos")
    parser.add_argument("--train-dtype", default="auto", help="compute dtype of training (piggyback train --dtype)")
    args = parser.parse_args()
    global TRAIN_DTYPE
    TRAIN_DTYPE = args.train_dtype
    torch.manual_seed(0)
    start = time.perf_counter()
    work, out = Path(args.work), Path(args.out)
    paths = build_datasets(work / "data")
    log = print
    log(f"datasets ready under {work / 'data'} ({time.perf_counter() - start:.0f}s)")
    weights = str(pretrain(paths["source"], work / "source-resnet18.safetensors", args.source_epochs, log))
    rows: list[Row] = []
    for name in args.targets.split(","):
        rows += run_target(name, paths[name], weights, args.epochs, log)
    elapsed = time.perf_counter() - start
    note = (
        f"resnet18 pretrained on 8-way photo-patch classification; {args.epochs} epochs per target; "
        f"test top-1 (best epoch chosen on val/); {torch.get_num_threads()} CPU threads; "
        f"training dtype {args.train_dtype} ({parse_dtype(args.train_dtype, 'cpu')}); "
        f"total {elapsed / 60:.1f} min."
    )
    table = render(rows, note)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.md").write_text(table + "\n")
    (out / "accuracy.json").write_text(json.dumps([vars(r) for r in rows], indent=2))
    plot(rows, out / "accuracy.png")
    print(f"\nwrote {out / 'accuracy.md'}, {out / 'accuracy.json'} and {out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
