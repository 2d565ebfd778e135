"""The GPU path: runs where CUDA is present, skipped with the reason elsewhere (CI has no GPU).

The engine in float16 and bfloat16 on CUDA against the float32 CPU reference, for every backbone;
mixed-task batches on CUDA against task-by-task; and the server on CUDA end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from piggyback_core import Engine, FileSystemStore, list_backbones, load_backbone
from tests.conftest import encode, make_task
from tests.core.test_engine import _input, reference_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")

# Half precision against the fp32 reference: logits within 5% of the largest logit (the bound the
# CPU bf16 tests state; fp16 keeps 3 more mantissa bits than bf16 and is tighter in practice).
TOLERANCE = 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", list_backbones())
def test_cuda_engine_in_half_precision_matches_the_cpu_fp32_reference(arch: str, dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    backbone = load_backbone(arch, weights="random", seed=0)
    task = make_task(backbone, "t", num_labels=7, keep=0.9)
    x = _input(arch)
    with torch.inference_mode():
        expected = reference_model(arch, 0, task)(x)
    engine = Engine(backbone, device="cuda", dtype=dtype, channels_last=True)
    engine.add_task(task)
    got = engine.run("t", x).cpu()
    assert got.dtype == torch.float32
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error < TOLERANCE, f"{arch} {dtype}: logits off by {error:.3%} of the largest logit"


def test_cuda_mixed_batches_equal_task_by_task() -> None:
    backbone = load_backbone("resnet18", weights="random", seed=0)
    engine = Engine(backbone, device="cuda", dtype=torch.float16, channels_last=True, cache_bytes=1 << 30)
    for i in range(3):
        engine.add_task(make_task(backbone, f"t{i}", num_labels=5, seed=i))
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    names = ["t0", "t1", "t2", "t1", "t0", "t2"]
    mixed = engine.run_mixed(x, names)
    for row, name in enumerate(names):
        alone = engine.run(name, x[row : row + 1])[0]
        torch.testing.assert_close(mixed[row].cpu(), alone.cpu(), rtol=0, atol=2e-2)


def test_the_server_serves_on_cuda_end_to_end(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.server.conftest import AUTH, settings_for, small_task, wait_ready

    backbone = load_backbone("resnet18", weights="random")
    FileSystemStore(tmp_path / "store").put("a", small_task(backbone, "a").to_bytes())
    with TestClient(
        create_app(settings_for(tmp_path / "store", device="cuda")), raise_server_exceptions=False
    ) as client:
        wait_ready(client)
        ready = client.get("/readyz").json()
        assert ready["device"].startswith("cuda") and ready["dtype"] in ("bfloat16", "float16")
        r = client.post("/classify/a", content=encode("PNG"), headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 5
        put = client.put("/tasks/b", content=small_task(backbone, "b", seed=2).to_bytes(), headers=AUTH)
        assert put.status_code == 201


def test_cuda_mixed_batches_run_stacked_and_equal_task_by_task_in_a_fixed_number_of_operations() -> None:
    from tests.core.test_engine import _count_ops

    backbone = load_backbone("resnet50", weights="random", seed=0)
    engine = Engine(
        backbone, device="cuda", dtype=torch.float16, channels_last=True, cache_bytes=1 << 32, mixed_path="stacked"
    )
    names = [f"t{i}" for i in range(8)]
    for i, name in enumerate(names):
        engine.add_task(make_task(backbone, name, num_labels=3 + i, norms=i % 2 == 1, seed=i))
        engine.prefill(name)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mixed = engine.run_mixed(x, names)
    for row, name in enumerate(names):
        alone = engine.run(name, x[row : row + 1])[0]
        torch.testing.assert_close(mixed[row].cpu(), alone.cpu(), rtol=0, atol=2e-2)
    assert _count_ops(engine, x[:2], names[:2]) == _count_ops(engine, x, names)
