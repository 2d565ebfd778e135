"""Which dtype and memory layout each registered backbone should run in on this CPU.

    python -m benchmarks.layouts [--batch 8] [--repeats 5] [--arch resnet18 --arch resnet50 ...]

For every backbone: the plain torchvision forward (random weights, 224x224) in float32, and in
bfloat16 with the default (contiguous) and the channels_last layout, timed interleaved (medians).
Prints a table and writes benchmarks/results/layouts.{md,json}; the registry's
``channels_last`` choice per backbone (piggyback_core.backbones) comes from this table.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.serving import interleaved, machine, write_results
from piggyback_core import get_backbone_spec, list_backbones, native_bf16


def measure(arch: str, batch: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = get_backbone_spec(arch).build(weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)
    variants = {
        "float32": (model, x),
        "float32_cl": (
            _copy(model).to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        ),
        "bfloat16": (model_bf16 := _copy(model).to(torch.bfloat16), x.to(torch.bfloat16)),
        "bfloat16_cl": (
            _copy(model_bf16).to(memory_format=torch.channels_last),
            x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last),
        ),
    }

    def runner(m: torch.nn.Module, inp: torch.Tensor):  # noqa: ANN202
        def run() -> None:
            with torch.inference_mode():
                m(inp)

        return run

    return interleaved({k: runner(m, inp) for k, (m, inp) in variants.items()}, repeats)


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--arch", action="append", help="default: every registered backbone")
    args = parser.parse_args()
    rows = {}
    lines = [
        f"# dtype and layout per backbone: plain torchvision, batch {args.batch}, 224x224; {machine()}; "
        f"native bf16: {native_bf16()}",
        "",
        "| backbone | fp32 s/batch | fp32 channels_last | bf16 | bf16 channels_last | bf16 / fp32 speed | "
        "channels_last / contiguous speed, fp32 | the same, bf16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arch in args.arch or list_backbones():
        t = measure(arch, args.batch, args.repeats)
        rows[arch] = t
        lines.append(
            f"| {arch} | {t['float32']:.3f} | {t['float32_cl']:.3f} | {t['bfloat16']:.3f} | {t['bfloat16_cl']:.3f} | "
            f"{t['float32'] / t['bfloat16']:.2f} | {t['float32'] / t['float32_cl']:.2f} | "
            f"{t['bfloat16'] / t['bfloat16_cl']:.2f} |"
        )
        print(lines[-1], flush=True)
    write_results("layouts", lines, {"batch": args.batch, "seconds": rows})


if __name__ == "__main__":
    main()
