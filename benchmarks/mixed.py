"""The mixed path per layer: S tasks with one image each, through every masked conv of a backbone.

    python -m benchmarks.mixed [--arch resnet18] [--segments 8] [--threads 1 --threads 2]

For each distinct conv shape of the backbone (its input at 224x224, batch 1 per task), in float32
and bfloat16, channels_last, it times (interleaved, medians):

* ``loop``: the engine's per-segment loop, S convolutions of one image with that task's weight;
* ``grouped``: one grouped convolution over the S images stacked along channels, with the S
  weights stacked (``groups = S``; the activations are permuted in and out);
* ``bmm``: unfold + one batched matmul ``[S, Cout, Cin*k*k] @ [S, Cin*k*k, L]`` (1x1 convs need
  no unfold);
* ``mm``: unfold once, then one matmul per task (no stacked weights needed);
* ``batch``: one convolution of the S images with one weight: the single-task batch the mixed
  path is measured against;

the weight build of the whole backbone (``weight * unpack(mask)`` for every masked layer), to
compare with a batch-1 forward; and the whole network through the engine (weights cached): a batch
of S tasks x 1 image on the ``segments`` and ``stacked`` mixed paths against a single-task batch of
S, on ``--device`` (``cuda`` measures the GPU path). Writes
``benchmarks/results/mixed-<arch>.{md,json}``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.serving import interleaved, machine, make_task, write_results
from piggyback_core import Engine, channel_separable, load_backbone, native_bf16, pack_mask, packed_supported
from piggyback_core.engine import apply_packed_mask


def conv_shapes(arch: str) -> list[tuple[nn.Conv2d, tuple[int, ...], int]]:
    """(conv, input shape at batch 1, how many convs of the backbone share that shape)."""
    model = load_backbone(arch, weights="random", seed=0).model.eval()
    seen: dict[tuple[Any, ...], list[Any]] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        assert isinstance(module, nn.Conv2d)
        shape = tuple(inputs[0].shape)
        key = (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.groups, shape)
        seen.setdefault(key, [module, shape, 0])[2] += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.inference_mode():
        model(torch.zeros(1, 3, 224, 224))
    for h in handles:
        h.remove()
    return [(m, s, n) for m, s, n in seen.values()]


def layer_variants(conv: nn.Conv2d, shape: tuple[int, ...], segments: int, dtype: torch.dtype) -> dict[str, Any]:
    cl = torch.channels_last
    x = torch.randn(segments, *shape[1:]).to(dtype).contiguous(memory_format=cl)
    weights = torch.randn(segments, *conv.weight.shape).to(dtype)
    stride, padding, dilation, groups = conv.stride, conv.padding, conv.dilation, conv.groups
    k = conv.kernel_size

    def loop() -> None:
        torch.cat([F.conv2d(x[i : i + 1], w, None, stride, padding, dilation, groups) for i, w in enumerate(weights)])

    stacked = weights.reshape(segments * conv.out_channels, *conv.weight.shape[1:])

    def grouped() -> None:
        xs = x.reshape(1, segments * shape[1], *shape[2:]).contiguous(memory_format=cl)
        y = F.conv2d(xs, stacked, None, stride, padding, dilation, groups * segments)
        y.reshape(segments, conv.out_channels, *y.shape[2:]).contiguous(memory_format=cl)

    flat = weights.reshape(segments, conv.out_channels, -1)

    def bmm() -> None:
        if k == (1, 1) and stride == (1, 1) and groups == 1:
            cols = x.flatten(2)  # [S, Cin, L]
        else:
            cols = F.unfold(x, k, dilation, padding, stride)  # [S, Cin*k*k, L]
        torch.bmm(flat, cols)

    def mm() -> None:
        if k == (1, 1) and stride == (1, 1) and groups == 1:
            cols = x.flatten(2)
        else:
            cols = F.unfold(x, k, dilation, padding, stride)
        for i in range(segments):
            torch.mm(flat[i], cols[i])

    def batch() -> None:
        F.conv2d(x, weights[0], None, stride, padding, dilation, groups)

    variants = {"loop": loop, "batch": batch, "grouped": grouped}
    if groups == 1:
        variants["bmm"] = bmm
        variants["mm"] = mm
    if packed_supported():
        variants.update(_packed_variants(conv, x, weights, segments))
    return variants


def _packed_variants(conv: nn.Conv2d, x: torch.Tensor, weights: torch.Tensor, segments: int) -> dict[str, Any]:
    """The packed CPU path's forms (piggyback_core.packed): each task's weight prepacked for oneDNN
    and run on its one image (``packed_loop``: the engine's segments); the S weights stacked and
    prepacked as one grouped convolution (``packed_grouped``); one weight over the S images
    (``packed_batch``: a single-task batch)."""
    conv_op, reorder = torch.ops.mkldnn._convolution_pointwise, torch.ops.mkldnn._reorder_convolution_weight
    cl = torch.channels_last
    pad, stride, dil, groups = list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups
    shape = list(x.shape)

    def pack(w: torch.Tensor, g: int, input_size: list[int]) -> torch.Tensor:
        return reorder(w.contiguous(memory_format=cl), pad, stride, dil, g, input_size)

    one = [pack(w, groups, [1, *shape[1:]]) for w in weights]
    batch_w = pack(weights[0], groups, shape)
    stacked = weights.reshape(segments * conv.out_channels, *weights.shape[2:])
    grouped_w = pack(stacked, groups * segments, [1, segments * shape[1], *shape[2:]])

    def packed_loop() -> None:
        for i, w in enumerate(one):
            conv_op(x[i : i + 1], w, None, pad, stride, dil, groups, "none", [], "")

    def packed_grouped() -> None:
        xs = x.reshape(1, segments * shape[1], *shape[2:]).contiguous(memory_format=cl)
        y = conv_op(xs, grouped_w, None, pad, stride, dil, groups * segments, "none", [], "")
        y.reshape(segments, conv.out_channels, *y.shape[2:]).contiguous(memory_format=cl)

    def packed_batch() -> None:
        conv_op(x, batch_w, None, pad, stride, dil, groups, "none", [], "")

    return {"packed_loop": packed_loop, "packed_grouped": packed_grouped, "packed_batch": packed_batch}


def _packed_cells(t: dict[str, float]) -> str:
    """The packed columns: the loop's time, grouped / loop, loop / batch ("-" where not run)."""
    if "packed_loop" not in t or t["packed_loop"] != t["packed_loop"]:
        return "- | - | -"
    loop = t["packed_loop"]
    return f"{loop * 1e3:.3f} | {t['packed_grouped'] / loop:.2f} | {loop / t['packed_batch']:.2f}"


def build_time(arch: str, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    backbone = load_backbone(arch, weights="random", seed=0)
    model = backbone.model.to(dtype).eval()
    gen = torch.Generator().manual_seed(0)
    packed = [pack_mask(torch.rand(mp.weight.shape, generator=gen) < 0.9, "binary") for mp in backbone.masked]
    outs = [torch.empty(p.numel() * 8, dtype=dtype) for p in packed]
    x1 = torch.randn(1, 3, 224, 224).to(dtype).contiguous(memory_format=torch.channels_last)

    def build() -> None:
        for mp, p, o in zip(backbone.masked, packed, outs, strict=True):
            apply_packed_mask(mp.weight, p, "binary", out=o)

    def forward1() -> None:
        with torch.inference_mode():
            model(x1)

    return interleaved({"build": build, "forward_b1": forward1}, repeats)


def network_time(arch: str, dtype: torch.dtype, segments: int, device: str, repeats: int) -> dict[str, float]:
    """Seconds per batch through the engine, weights cached: ``S`` tasks x 1 image on each mixed
    path, and one task x ``S`` images."""
    backbone = load_backbone(arch, weights="random", seed=0)
    paths = ["segments"] + (["stacked"] if channel_separable(backbone.model) else [])
    x = torch.randn(segments, 3, 224, 224)
    names = [f"t{i}" for i in range(segments)]
    engines = {}
    for path in paths:
        engine = Engine(backbone, device=device, dtype=dtype, channels_last=True, cache_bytes=1 << 40, mixed_path=path)
        for i, name in enumerate(names):
            engine.add_task(make_task(backbone, name, seed=i))
            engine.prefill(name)
        engines[path] = engine

    def timed(fn: Any) -> Any:
        def call() -> None:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()

        return call

    fns = {path: timed(lambda e=e: e.run_mixed(x, names)) for path, e in engines.items()}
    fns["batch"] = timed(lambda: engines["segments"].run("t0", x))
    return interleaved(fns, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--threads", type=int, action="append", help="intra-op threads (default: 1 and 2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the whole-network section runs")
    parser.add_argument("--network-only", action="store_true", help="only the whole-network section")
    args = parser.parse_args()
    dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16() else [])
    shapes = conv_shapes(args.arch)
    lines = [
        f"# The mixed path per layer: {args.arch}, {args.segments} tasks x 1 image, channels_last; {machine()}",
        "",
        "Seconds per call (median); `x` columns are the time relative to `loop`; `loop/batch` is what a "
        "fully mixed batch costs against a single-task batch of the same size.",
        "",
        "| threads | dtype | conv (cin, cout, k, stride) | input | count | loop ms | batch ms | grouped x | bmm x "
        "| mm x | loop/batch | packed loop ms | packed grouped x | packed loop/batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    record: dict[str, Any] = {"arch": args.arch, "segments": args.segments, "layers": [], "build": []}
    record["network"] = []
    for threads in args.threads or [1, 2]:
        torch.set_num_threads(threads)
        for dtype in dtypes if args.device == "cpu" else cuda_dtypes():
            n = network_time(args.arch, dtype, args.segments, args.device, args.repeats)
            record["network"].append({"threads": threads, "dtype": str(dtype).removeprefix("torch."), **n})
            print(record["network"][-1], flush=True)
        for dtype in [] if args.network_only else dtypes:
            totals = {"loop": 0.0, "batch": 0.0, "best": 0.0}
            for conv, shape, count in shapes:
                t = interleaved(layer_variants(conv, shape, args.segments, dtype), args.repeats)
                best = min(v for name, v in t.items() if name in ("loop", "grouped", "bmm", "mm"))
                totals["loop"] += t["loop"] * count
                totals["batch"] += t["batch"] * count
                totals["best"] += min(best, t["loop"]) * count
                name = str(dtype).removeprefix("torch.")
                geometry = f"{conv.in_channels}, {conv.out_channels}, {conv.kernel_size[0]}, {conv.stride[0]}"
                bmm = f"{t['bmm'] / t['loop']:.2f}" if "bmm" in t else "-"
                mm = f"{t['mm'] / t['loop']:.2f}" if "mm" in t else "-"
                lines.append(
                    f"| {threads} | {name} | {geometry} | {shape[2]}x{shape[3]} | {count} | {t['loop'] * 1e3:.3f} "
                    f"| {t['batch'] * 1e3:.3f} | {t['grouped'] / t['loop']:.2f} | {bmm} | {mm} "
                    f"| {t['loop'] / t['batch']:.2f} | {_packed_cells(t)} |"
                )
                for key in ("packed_loop", "packed_batch", "packed_grouped"):
                    totals[key] = totals.get(key, 0.0) + t.get(key, float("nan")) * count
                print(lines[-1], flush=True)
                record["layers"].append({"threads": threads, "dtype": name, "geometry": geometry, "shape": shape,
                                         "count": count, "seconds": t})  # fmt: skip
            lines.append(
                f"| {threads} | {name} | **all convs** | | | {totals['loop'] * 1e3:.2f} | {totals['batch'] * 1e3:.2f} "
                f"| best per layer: {totals['best'] / totals['loop']:.2f} | | "
                f"| {totals['loop'] / totals['batch']:.2f} | {_packed_cells(totals)} |"
            )
            print(lines[-1], flush=True)
            b = build_time(args.arch, dtype, args.repeats)
            record["build"].append({"threads": threads, "dtype": name, **b})
    lines += ["", "## The weight build of one task against a batch-1 forward", ""]
    lines += ["| threads | dtype | build ms | forward b1 ms | build / forward |", "| --- | --- | --- | --- | --- |"]
    for b in record["build"]:
        lines.append(
            f"| {b['threads']} | {b['dtype']} | {b['build'] * 1e3:.2f} | {b['forward_b1'] * 1e3:.2f} "
            f"| {b['build'] / b['forward_b1']:.2f} |"
        )
    if args.network_only:
        lines = [f"# The mixed path, whole network: {args.arch}, channels_last; {machine()}"]
    lines += ["", f"## The whole network: {args.segments} tasks x 1 image against one task x {args.segments}", ""]
    lines += [
        "Weights cached (built once); milliseconds per batch (median) and the ratio to the single-task batch.",
        "",
        "| device | threads | dtype | batch ms | segments ms | segments / batch | stacked ms | stacked / batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in record["network"]:
        stacked = f"{n['stacked'] * 1e3:.2f} | {n['stacked'] / n['batch']:.2f}" if "stacked" in n else "- | -"
        lines.append(
            f"| {args.device} | {n['threads']} | {n['dtype']} | {n['batch'] * 1e3:.2f} | {n['segments'] * 1e3:.2f} "
            f"| {n['segments'] / n['batch']:.2f} | {stacked} |"
        )
    suffix = ("" if args.device == "cpu" else f"-{args.device}") + ("-network" if args.network_only else "")
    write_results(f"mixed-{args.arch}{suffix}", lines, record)


def cuda_dtypes() -> list[torch.dtype]:
    return [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])


if __name__ == "__main__":
    main()
