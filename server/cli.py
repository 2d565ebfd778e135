"""The ``piggyback`` command line.

Every command has ``--help``. A command that fails exits non-zero with a one-line reason on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from piggyback_core import (
    DatasetError,
    Engine,
    PiggybackError,
    TaskFile,
    dtype_name,
    list_backbones,
    load_backbone,
    open_store,
    parse_dtype,
    parse_layout,
    validate_task_name,
    weights_from_description,
)

__all__ = ["build_parser", "main"]


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.task_file)
    task = TaskFile.load(path)
    info = task.summary()
    info["file_bytes"] = path.stat().st_size
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    labels = ", ".join(task.labels[:8]) + (", ..." if len(task.labels) > 8 else "")
    prov = ", ".join(f"{k}={v}" for k, v in task.provenance.items()) or "-"
    lines = [
        f"task:          {task.name}  (version {task.version})",
        f"backbone:      {task.backbone}",
        f"fingerprint:   {task.fingerprint}",
        f"labels:        {len(task.labels)}  ({labels})",
        f"mask:          {task.mask_kind}, threshold {task.threshold:g}",
        f"masked:        {_fmt_int(task.num_masked_weights)} weights in {len(task.layers)} layers",
        f"bits/param:    {task.bits_per_parameter:.4f} (mask bits per masked backbone weight)",
        f"density:       {task.density:.2%} kept, {1 - task.density:.2%} masked out",
        f"file:          {_fmt_int(info['file_bytes'])} bytes "
        f"(mask {_fmt_int(task.mask_nbytes)}, head {_fmt_int(task.head_nbytes)})",
        f"batchnorm:     {len(task.norms)} per-task layers" if task.norms else "batchnorm:     backbone's (frozen)",
        f"provenance:    {prov}",
        "",
        f"{'layer':<56} {'weights':>12} {'kept':>8}",
    ]
    for key, layer in task.layers.items():
        lines.append(f"{key:<56} {_fmt_int(layer.numel):>12} {layer.density:>8.2%}")
    print("\n".join(lines))
    return 0


def _upload(url: str, token: str | None, task: TaskFile) -> str:
    """PUT the task to a running server; returns the server's one-line answer."""
    request = urllib.request.Request(
        f"{url.rstrip('/')}/tasks/{task.name}",
        data=task.to_bytes(),
        method="PUT",
        headers={
            "Content-Type": "application/octet-stream",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", "")
        except (ValueError, AttributeError):
            detail = ""
        raise PiggybackError(f"server refused the task: HTTP {exc.code} {detail}".rstrip()) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise PiggybackError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from exc


def cmd_train(args: argparse.Namespace) -> int:
    from piggyback_core.trainer import TrainConfig, train

    # Every check that needs nothing loaded comes first: a bad flag fails at once and creates nothing.
    validate_task_name(args.task)
    if args.method == "finetune" and not args.out:
        raise PiggybackError("--method finetune writes a full-model checkpoint: give --out FILE")
    for split in ("train", "val"):
        if not (Path(args.data) / split).is_dir():
            raise DatasetError(f"{args.data!r} has no {split}/ folder (expected {split}/CLASS/IMAGE files)")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise PiggybackError(f"cannot write {args.out!r}: its folder does not exist")
    config = TrainConfig(
        data=Path(args.data),
        task=args.task,
        backbone=args.backbone,
        weights=args.weights,
        method=args.method,
        mask_kind=args.mask_kind,
        train_bn=args.train_bn,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr_mask=args.lr_mask,
        lr_head=args.lr_head,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        lr_decay_every=args.lr_decay_every,
        lr_decay_factor=args.lr_decay_factor,
        score_init=args.score_init,
        score_scale=args.score_scale,
        threshold=args.threshold,
        resize_size=args.resize_size,
        crop_size=args.crop_size,
        crop_scale_min=args.crop_scale_min,
        resize_mode=args.resize_mode,
        seed=args.seed,
        workers=args.workers,
        device=args.device,
        dtype=args.dtype,
        layout=args.layout,
        amp=args.amp,
        workdir=Path(args.workdir) if args.workdir else Path("runs") / args.task,
        resume=args.resume,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    result = train(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 writes the result
    if result.model_state is not None:
        from safetensors.torch import save_file

        meta = {"labels": json.dumps(result.labels), "backbone": args.backbone, "method": "finetune"}
        save_file(result.model_state, args.out, metadata=meta)
        print(f"wrote full-model checkpoint {args.out} (val top-1 {result.best_val_top1:.2%})")
        return 0
    task = result.task
    assert task is not None
    if args.out:
        task.save(args.out)
        where = args.out
    elif args.store:
        open_store(args.store).put(task.name, task.to_bytes())
        where = f"store {args.store}"
    else:
        where = f"{args.server} ({_upload(args.server, args.token or os.environ.get('PIGGYBACK_TOKEN'), task)})"
    print(
        f"wrote task {task.name!r} version {task.version} to {where}: val top-1 {result.best_val_top1:.2%} "
        f"(epoch {result.best_epoch}), {1 - task.density:.2%} of weights masked out"
    )
    return 0


def _eval_root(data_dir: Path) -> Path:
    """DATA_DIR itself (class folders), or its val/ when it is a train/val dataset root."""
    return data_dir / "val" if (data_dir / "val").is_dir() and not (data_dir / "val").is_symlink() else data_dir


def cmd_eval(args: argparse.Namespace) -> int:
    from piggyback_core.evaluate import evaluate_task

    task = TaskFile.load(args.task_file)
    if args.weights is not None:
        weights, seed, source = args.weights, args.seed or 0, "from --weights"
    else:
        recorded = task.provenance.get("weights")
        if not isinstance(recorded, str):
            raise PiggybackError(
                f"{args.task_file} does not record its backbone weights: pass --weights NAME|PATH|random"
            )
        weights, seed = weights_from_description(recorded)
        seed = args.seed if args.seed is not None else seed
        source = "as recorded in the task file; --weights overrides"
    backbone = load_backbone(task.backbone, weights=weights, seed=seed)
    engine = Engine(
        backbone, dtype=parse_dtype(args.dtype, "cpu"), channels_last=parse_layout(args.layout, task.backbone)
    )
    print(
        f"eval: backbone {task.backbone}, weights {backbone.weights} ({source}); "
        f"{dtype_name(engine.dtype)}, {engine.layout}",
        file=sys.stderr,
    )
    engine.add_task(task)
    report = evaluate_task(engine, task.name, _eval_root(Path(args.data_dir)), batch_size=args.batch_size)
    if args.json:
        out = report.to_dict()
        if not args.predictions:
            out.pop("predictions")
        print(json.dumps(out, indent=2))
        return 0
    print(f"task {task.name!r} on {_eval_root(Path(args.data_dir))}: {report.n} images")
    print(f"top-1 {report.top1:.2%}   top-5 {report.top5:.2%}")
    print(f"\n{'class':<32} {'images':>7} {'top-1':>8}")
    for label, c in report.per_class.items():
        if c.n:
            print(f"{label:<32} {c.n:>7} {c.top1:>8.2%}")
    if args.predictions:
        for p in report.predictions:
            print(json.dumps(p))
    return 0


def cmd_fingerprint(args: argparse.Namespace) -> int:
    """Load a backbone (downloading torchvision weights into $TORCH_HOME if they are not there yet)
    and print its fingerprint: the Docker build uses it to bake the weights into the image, and
    operators to check which task files a server will accept."""
    backbone = load_backbone(args.backbone, weights=args.weights, seed=args.seed)
    if args.json:
        print(json.dumps({"backbone": backbone.arch, "weights": backbone.weights, "fingerprint": backbone.fingerprint}))
    else:
        print(backbone.fingerprint)
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    """Send images to a running server and print each one's top labels and scores."""
    from .client import classify

    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    for task in tasks:
        validate_task_name(task)
    token = args.token or os.environ.get("PIGGYBACK_CLASSIFY_TOKEN")
    answers = classify(
        args.server, tasks, [Path(p) for p in args.images], token=token, top_k=args.top_k, timeout_s=args.timeout
    )
    if args.json:
        print(json.dumps(answers, indent=2))
        return 0
    for a in answers:
        scores = "  ".join(f"{p['label']} {p['score']:.3f}" for p in a["predictions"])
        print(f"{a['image']}\t{a['task']}\t{scores}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .serving import run_server
    from .settings import Settings

    overrides = {f: getattr(args, f) for f in Settings.model_fields if getattr(args, f, None) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PiggybackError(f"invalid setting: {problems}") from None
    return run_server(settings)


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field (``--max-batch-size`` for ``max_batch_size``); unset flags fall
    back to the PIGGYBACK_* environment, then to the defaults."""
    from .settings import Settings

    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = info.default
        help_text = (info.description or name.replace("_", " ")) + f" (env PIGGYBACK_{name.upper()}"
        help_text += ")" if default is None or name == "token" else f", default {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if info.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, default=None, help=help_text)


def _add_compute_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype; auto: bfloat16 on a CPU that has it natively, else float32 (as `serve`)",
    )
    p.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "channels_last", "contiguous"],
        help="activation layout; auto: the backbone's faster one (as `serve`)",
    )


def _add_backbone_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="IMAGENET1K_V1", help="torchvision weights name, a local file, or 'random'")
    p.add_argument("--seed", type=int, default=0, help="seed of the run (and of --weights random)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if present")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piggyback", description="Serve many image classifiers from one backbone.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "serve",
        help="run the HTTP server",
        description="Serve every task in the store from one resident backbone. Every flag has a "
        "PIGGYBACK_* environment variable; flags win.",
    )
    _add_settings_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("inspect", help="print a task file's metadata", description="Print a task file's metadata.")
    p.add_argument("task_file", metavar="TASK_FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "train",
        help="learn a task (Piggyback or a baseline) from an ImageFolder dataset",
        description="Learn a task from DATA/train and DATA/val (one sub-folder per class). "
        "Defaults are the paper's recipe; the best epoch is chosen on val/. Runs under torchrun too.",
    )
    p.add_argument("--data", required=True, help="dataset root holding train/ and val/")
    p.add_argument("--task", required=True, help="task name")
    p.add_argument("--backbone", default="resnet50", choices=list_backbones(), help="backbone architecture")
    _add_backbone_flags(p)
    p.add_argument(
        "--method",
        default="piggyback",
        choices=["piggyback", "classifier", "finetune"],
        help="piggyback: learn a mask and a head; classifier: the head only; finetune: every weight",
    )
    p.add_argument("--mask-kind", default="binary", choices=["binary", "ternary"], help="{0,1} or {-1,0,1} masks")
    p.add_argument("--train-bn", action="store_true", help="learn per-task BatchNorm (stored in the task file)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (the best one on val/ is kept)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (split across torchrun processes)")
    p.add_argument("--lr-mask", type=float, default=1e-4, help="Adam learning rate of the mask scores")
    p.add_argument("--lr-head", type=float, default=1e-4, help="Adam learning rate of the head (and BN)")
    p.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate of the baselines")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum of the baselines")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay of every optimiser")
    p.add_argument("--lr-decay-every", type=int, default=15, help="epochs between learning-rate decays")
    p.add_argument("--lr-decay-factor", type=float, default=0.1, help="learning rates are multiplied by this")
    p.add_argument(
        "--score-init", default="1s", choices=["1s", "uniform"], help="1s: every score starts at --score-scale"
    )
    p.add_argument("--score-scale", type=float, default=1e-2, help="initial score (1s) or its range (uniform)")
    p.add_argument("--threshold", type=float, default=5e-3, help="a weight is kept where its score exceeds this")
    p.add_argument("--resize-size", type=int, default=None, help="default: the weights' own (256)")
    p.add_argument("--crop-size", type=int, default=None, help="default: the weights' own (224)")
    p.add_argument("--crop-scale-min", type=float, default=0.08, help="smallest area of the random crop")
    p.add_argument(
        "--resize-mode",
        default="shorter",
        choices=["shorter", "squash"],
        help="shorter: resize the shorter side, random crop (train) or center crop (test); squash: resize to "
        "crop x crop ignoring the aspect ratio, flip only (the authors' CUBS/Cars loaders)",
    )
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    _add_compute_flags(p)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="--no-amp: --dtype float32")
    p.add_argument("--workdir", default=None, help="checkpoints and log.json (default runs/TASK)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --workdir")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", help="write the task file (finetune: the full-model checkpoint) here")
    dest.add_argument("--store", help="put the task into this store (a directory or s3://bucket[/prefix])")
    dest.add_argument("--server", help="upload the task to this server (PUT /tasks/NAME)")
    p.add_argument("--token", default=None, help="bearer token for --server (default $PIGGYBACK_TOKEN)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="top-1/top-5 accuracy of a task file on a folder of class sub-folders",
        description="Evaluate TASK_FILE on DATA_DIR (class sub-folders, or a dataset root with val/).",
    )
    p.add_argument("task_file", metavar="TASK_FILE")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument(
        "--weights",
        default=None,
        help="torchvision weights name, a local file, or 'random'; default: the weights the task file records",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for --weights random (default: the recorded one)")
    _add_compute_flags(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object (top1, top5, n, per_class)")
    p.add_argument("--predictions", action="store_true", help="also print every file's top-5 predictions")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "fingerprint",
        help="load a backbone (fetching its weights once) and print its fingerprint",
        description="Load a backbone, downloading torchvision weights into $TORCH_HOME if needed, and print the "
        "fingerprint that task files must carry to be served by it.",
    )
    p.add_argument("--backbone", default="resnet50", choices=list_backbones())
    p.add_argument("--weights", default="IMAGENET1K_V1", help="torchvision weights name, a local file, or 'random'")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_fingerprint)

    p = sub.add_parser(
        "classify",
        help="classify images with a running server's task(s)",
        description="Send images to a running server and print each one's top labels and scores (several images "
        "go in one request; several tasks classify each image in one mixed batch).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, ...)")
    p.add_argument("--server", default="http://localhost:8000", help="the server's URL (default %(default)s)")
    p.add_argument("--task", required=True, help="a task name, or several separated by commas")
    p.add_argument("--top-k", type=int, default=5, help="predictions per image and task (default %(default)s)")
    p.add_argument("--token", help="classify token, if the server needs one (default: $PIGGYBACK_CLASSIFY_TOKEN)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the answers as JSON")
    p.set_defaults(func=cmd_classify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (`piggyback inspect --json f | head`): not an error of ours. Point
        # stdout at /dev/null so that the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (PiggybackError, OSError, ValueError) as exc:
        print(f"piggyback {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
