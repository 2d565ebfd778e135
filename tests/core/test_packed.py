"""The packed CPU path (piggyback_core.packed) against the reference path (``weight * mask`` in the
torchvision modules): every backbone, binary, ternary and per-task BatchNorm tasks, batch 1 and 8,
mixed batches; the oneDNN operators' schemas pinned; a backbone the pass cannot read falls back."""

from __future__ import annotations

import pytest
import torch

from piggyback_core import PACKED_OPS, Backbone, Engine, list_backbones, load_backbone
from piggyback_core import packed as packed_module
from tests.conftest import make_task

# bf16 against bf16 reference: logits within 5% of the largest logit (the bf16 bound of docs/operations/compute.md);
# float32 folds BatchNorm in another order of operations: 1e-4 of the largest logit.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.05}


def _engines(arch: str, dtype: torch.dtype) -> tuple[Engine, Engine]:
    tasks = None
    out = []
    for path in ("packed", "reference"):
        backbone = load_backbone(arch, weights="random", seed=0)  # each engine converts its own
        if tasks is None:
            tasks = [
                make_task(backbone, "binary", num_labels=5, seed=0),
                make_task(backbone, "ternary", num_labels=4, kind="ternary", seed=1),
                make_task(backbone, "own-bn", num_labels=3, norms=True, seed=2),
            ]
        engine = Engine(backbone, dtype=dtype, channels_last=True, cpu_path=path, cache_bytes=1 << 34)
        for t in tasks:
            engine.add_task(t)
        out.append(engine)
    return out[0], out[1]


def _close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    error = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()
    assert error <= TOLERANCE[dtype], f"{what}: off by {error:.2%} of the largest logit"


@pytest.mark.parametrize("arch", list_backbones())
def test_the_packed_path_gives_the_reference_logits_for_every_backbone(arch: str) -> None:
    dtype = torch.float32
    packed, reference = _engines(arch, dtype)
    assert packed.cpu_path == "packed" and reference.cpu_path == "reference"
    size = 224 if arch.startswith("vit") else 64
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    for name in ("binary", "ternary", "own-bn"):
        for batch in (1, 8):
            _close(packed.run(name, x[:batch]), reference.run(name, x[:batch]), dtype, f"{arch} {name} b{batch}")
    names = ["binary", "ternary", "own-bn", "binary", "own-bn", "ternary", "binary", "binary"]
    for got, expected in zip(packed.run_mixed(x, names), reference.run_mixed(x, names), strict=True):
        _close(got, expected, dtype, f"{arch} mixed")


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_large", "vgg16_bn"])
def test_the_packed_path_in_bfloat16_stays_within_the_bfloat16_bound(arch: str) -> None:
    dtype = torch.bfloat16
    packed, reference = _engines(arch, dtype)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    names = ["binary", "ternary", "own-bn", "own-bn", "binary", "ternary", "binary", "ternary"]
    for got, expected in zip(packed.run_mixed(x, names), reference.run_mixed(x, names), strict=True):
        _close(got, expected, dtype, f"{arch} bf16 mixed")


def test_resnets_are_fused_whole_and_the_cache_holds_packed_weights() -> None:
    backbone = load_backbone("resnet18", weights="random", seed=0)
    engine = Engine(backbone, dtype=torch.bfloat16, channels_last=True, cpu_path="packed", cache_bytes=1 << 32)
    assert engine._packed is not None and engine._packed.fused == 20 and engine._packed.left == 0
    engine.add_task(make_task(backbone, "a"))
    engine.run("a", torch.zeros(2, 3, 64, 64))
    engine.run("a", torch.zeros(1, 3, 64, 64))
    assert engine.cache.misses == 1 and engine.cache.hits == 1  # one pack serves every batch size
    built = engine.build_weights("a")
    assert {k for k in built if k.endswith(packed_module.BIAS)} == {
        k + packed_module.BIAS for k in engine._packed.layers
    }


def test_the_onednn_operators_keep_the_schemas_the_packed_path_was_tested_with() -> None:
    for name, schema in PACKED_OPS.items():
        op, overload = name.split(".")
        found = str(getattr(getattr(torch.ops.mkldnn, op), overload)._schema)
        assert found == schema, f"mkldnn.{name} changed: {found}"


def test_auto_takes_the_packed_path_only_where_the_cpu_has_it(
    resnet18: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    import piggyback_core.engine as engine_module

    monkeypatch.setattr(engine_module, "packed_supported", lambda: False)
    assert Engine(load_backbone("resnet18", weights="random"), cpu_path="auto").cpu_path == "reference"
    monkeypatch.setattr(engine_module, "packed_supported", lambda: True)
    assert Engine(load_backbone("resnet18", weights="random"), cpu_path="auto").cpu_path == "packed"
    assert Engine(load_backbone("resnet18", weights="random"), mixed_path="stacked").cpu_path == "reference"


def test_a_network_the_pass_cannot_trace_is_served_by_the_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import piggyback_core.engine as engine_module

    def untraceable(*args: object, **kwargs: object) -> None:
        raise torch.fx.proxy.TraceError("symbolically traced variables cannot be used as inputs to control flow")

    monkeypatch.setattr(engine_module, "PackedNetwork", untraceable)
    backbone = load_backbone("resnet18", weights="random", seed=0)
    engine = Engine(backbone, cpu_path="auto")
    assert engine.cpu_path == "reference"
    engine.add_task(make_task(backbone, "a"))
    assert engine.run("a", torch.zeros(1, 3, 64, 64)).shape == (1, 5)
