"""The CPU at its limit: the packed engine against the reference engine, the frozen
``torch.compile`` forward and OpenVINO, on the same backbone and chip, in one run.

    python -m benchmarks.packed [--arch resnet50 --arch resnet18] [--batches 1,8] [--no-compile] [--no-openvino]

Forward only, one task, its weights built (cached), images already preprocessed, bf16 where the CPU
computes it natively (else float32), every core; img/s (median of 3 rounds). Rows:

* **reference**: the engine's reference CPU path (``cpu_path=reference``: eager bf16, channels_last);
* **packed**: the engine's packed CPU path (BatchNorm folded, fused post-ops, prepacked weights);
* **compile-frozen**: ``torch.compile`` with ``freezing`` of torchvision's model holding the task's
  weights (what a single fixed model can get from PyTorch; 10 s and a copy of the network per task);
* **openvino**: OpenVINO on the same model (``INFERENCE_PRECISION_HINT`` bf16, ``LATENCY`` hint);
* **mixed 8 / single**: the packed engine's fully mixed batch of 8 tasks against a single-task batch.

Ratios are against rows of the same run. Writes ``benchmarks/results/packed.{md,json}``. Needs the
``bench`` extra (OpenVINO); run it alone (it uses every core).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.serving import machine, make_task, plain_model, write_results
from piggyback_core import Engine, load_backbone, native_bf16


def _rate(fn: Callable[[], Any], batch: int, seconds: float = 3.0) -> float:
    """Images per second: the median of 3 rounds of about ``seconds`` / 3 each, after a warm-up."""
    for _ in range(2):
        fn()
    rounds = []
    for _ in range(3):
        n, started = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - started < seconds / 3:
            fn()
            n += 1
        rounds.append(n * batch / (time.perf_counter() - started))
    return sorted(rounds)[1]


def _openvino(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> Callable[[], Any] | str:
    try:
        import openvino as ov
    except ImportError:
        return "not installed (pip install -e '.[bench]')"
    core = ov.Core()
    converted = ov.convert_model(model.float().eval(), example_input=x.float())
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
    compiled = core.compile_model(converted, "CPU", config)
    request = compiled.create_infer_request()
    data = x.float().numpy()
    return lambda: request.infer({0: data})


def _compiled(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any] | str:
    try:
        import torch._inductor.config as inductor

        inductor.freezing = True
        compiled = torch.compile(model)
        with torch.inference_mode():
            compiled(x)
        return lambda: compiled(x)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def measure(arch: str, batches: list[int], *, compile_: bool, openvino: bool) -> list[dict[str, Any]]:
    dtype = torch.bfloat16 if native_bf16() else torch.float32
    engines = {}
    tasks = None
    for path in ("reference", "packed"):
        backbone = load_backbone(arch, weights="random", seed=0)
        tasks = tasks or [make_task(backbone, f"t{i}", seed=i) for i in range(8)]
        engine = Engine(backbone, dtype=dtype, channels_last=True, cpu_path=path, cache_bytes=1 << 36)
        for t in tasks:
            engine.add_task(t)
            engine.prefill(t.name)
        engines[path] = engine
    assert tasks is not None
    backbone = load_backbone(arch, weights="random", seed=0)
    size = backbone.preprocessing.crop_size
    rows: list[dict[str, Any]] = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        xl = x.to(dtype).contiguous(memory_format=torch.channels_last)
        row: dict[str, Any] = {"arch": arch, "batch": batch, "dtype": str(dtype).removeprefix("torch.")}
        with torch.inference_mode():
            for path, engine in engines.items():
                row[path] = _rate(lambda e=engine, x=x: e.run("t0", x), batch)
            if batch == 8:
                names = [f"t{i}" for i in range(8)]
                row["mixed8"] = _rate(lambda x=x, n=names: engines["packed"].run_mixed(x, n), batch)
            plain = plain_model(backbone, tasks[0], torch.device("cpu"), dtype).to(memory_format=torch.channels_last)
            frozen = _compiled(plain, xl) if compile_ else "skipped (--no-compile)"
            row["compile-frozen"] = _rate(frozen, batch) if callable(frozen) else frozen
        ov = _openvino(plain_model(backbone, tasks[0], torch.device("cpu"), torch.float32), x, dtype == torch.bfloat16)
        row["openvino"] = (_rate(ov, batch) if callable(ov) else ov) if openvino else "skipped (--no-openvino)"
        rows.append(row)
        print(row, flush=True)
    return rows


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) else "n/a"


def to_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["# The CPU at its limit: packed engine vs reference, frozen torch.compile and OpenVINO", "",
             f"Machine: {machine()}.", "",
             "Forward only, one task (weights built), img/s, median of 3 rounds; ratios within the same run.", "",
             "| arch | batch | dtype | reference | packed | compile-frozen | openvino | packed / reference | "
             "packed / compile | packed / openvino | mixed 8 / single 8 cost |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def cell(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    for r in rows:
        mixed = _ratio(r["packed"], r["mixed8"]) if "mixed8" in r else "-"
        lines.append(
            f"| {r['arch']} | {r['batch']} | {r['dtype']} | {cell(r['reference'])} | {cell(r['packed'])} | "
            f"{cell(r['compile-frozen'])} | {cell(r['openvino'])} | {_ratio(r['packed'], r['reference'])} | "
            f"{_ratio(r['packed'], r['compile-frozen'])} | {_ratio(r['packed'], r['openvino'])} | {mixed} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-openvino", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for arch in args.arch or ["resnet50", "resnet18"]:
        batches = [int(b) for b in args.batches.split(",")]
        rows += measure(arch, batches, compile_=not args.no_compile, openvino=not args.no_openvino)
    write_results("packed", to_markdown(rows), {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
