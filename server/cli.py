"""The ``piggyback`` command line.

Every command has ``--help``. A command that fails exits non-zero with a one-line reason on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from piggyback_core import PiggybackError, TaskFile

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
        f"batchnorm:     {len(task.norms)} per-task layers"
        if task.norms
        else "batchnorm:     backbone's (frozen)",
        f"provenance:    {prov}",
        "",
        f"{'layer':<56} {'weights':>12} {'kept':>8}",
    ]
    for key, layer in task.layers.items():
        lines.append(f"{key:<56} {_fmt_int(layer.numel):>12} {layer.density:>8.2%}")
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="piggyback", description="Serve many image classifiers from one backbone."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "inspect", help="print a task file's metadata", description="Print a task file's metadata."
    )
    p.add_argument("task_file", metavar="TASK_FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (PiggybackError, OSError) as exc:
        print(f"piggyback {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
