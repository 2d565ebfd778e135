"""The CUDA path, checked on every CPU run: fake CUDA tensors (FakeTensorMode) raise on any device
or dtype mismatch, and a dispatch mode counts the transfers and host syncs a batch makes.

No GPU is needed; what these cannot check (kernels' numerics and speed) ``tests/test_cuda.py`` and
``make gpu-check`` do where a GPU is.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
import torch.nn.functional as F

from piggyback_core import Engine, HostLogits, auto_dtype, channel_separable, list_backbones, load_backbone
from server.batcher import Batcher, BatchPolicy, _Request
from tests.conftest import make_task
from tests.cuda.fake import GIB, FakeGPU, count_kernels, count_transfers, fake_cuda

pytestmark = pytest.mark.fakecuda


def _size(arch: str) -> int:
    return 224 if arch.startswith("vit") else 64


# The backbones whose mixed batches may run stacked (backbones.channel_separable); the test checks
# this list against the engine, so it cannot go stale.
STACKABLE = {"efficientnet_b0", "mobilenet_v3_large", "resnet101", "resnet18", "resnet34", "resnet50", "vgg16",
             "vgg16_bn"}  # fmt: skip
CASES = [(arch, path) for arch in list_backbones() for path in ("segments", "stacked") if path == "segments" or
         arch in STACKABLE]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("arch", "path"), CASES)
def test_every_backbone_runs_mixed_batches_on_fake_cuda_with_weights_cached_and_not(
    arch: str, path: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = load_backbone(arch, weights="random", seed=0)  # its own: the engine moves it to the device
    tasks = [
        make_task(backbone, "binary", num_labels=3, seed=0),
        make_task(backbone, "ternary", num_labels=5, kind="ternary", seed=1),
        make_task(backbone, "own-bn", num_labels=4, norms=True, seed=2),
    ]
    size = _size(arch)
    with fake_cuda(monkeypatch) as gpu:
        engine = Engine(backbone, device="cuda", dtype=dtype, channels_last=True, cache_bytes=1 << 40,
                        mixed_path=path)  # fmt: skip
        assert channel_separable(engine.model) == (arch in STACKABLE)
        for t in tasks:
            engine.add_task(t)
        names = ["binary", "ternary", "own-bn", "ternary", "binary", "own-bn"]
        images = torch.zeros(len(names), 3, size, size, dtype=torch.uint8)
        for round_ in ("miss", "hit"):
            with count_transfers() as seen:
                host = engine.run_mixed_host(engine.stage(list(images)), names)
            assert isinstance(host, HostLogits) and host.flat.device.type == "cpu", round_
            assert host.flat.dtype == torch.float32 and len(host) == len(names)
            assert [host.row(i).shape[0] for i in range(len(names))] == [3, 5, 4, 5, 3, 4]
            assert seen.count("d2h") == 1 and seen.count("sync") == 0, (round_, seen.events)
            assert seen.count("h2d-blocking") == 0, (round_, seen.events)
        assert engine.cache.hits >= 3 and engine.cache.misses == 3
        assert gpu.syncs == ["cuda:0", "cuda:0"]  # one wait per batch, after its copy


def test_a_batch_makes_one_device_to_host_copy_and_no_sync_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = load_backbone("resnet18", weights="random", seed=0)
    tasks = [make_task(backbone, f"t{i}", num_labels=4, seed=i) for i in range(3)]  # real files, made first
    with fake_cuda(monkeypatch) as gpu:
        engine = Engine(backbone, device="cuda", dtype=torch.float16, channels_last=True, cache_bytes=0)
        for task in tasks:
            engine.add_task(task)
        batcher = Batcher(engine, BatchPolicy())
        loop = asyncio.new_event_loop()
        try:
            reqs = [
                _Request(
                    engine.get_task(f"t{i % 3}"),
                    torch.zeros(3, 64, 64, dtype=torch.uint8),
                    5,
                    0.0,
                    time.monotonic() + 10,
                    loop.create_future(),
                )  # fmt: skip
                for i in range(8)
            ]
            with count_transfers() as seen:
                host = batcher.device_part(reqs)  # what a worker does for a batch, up to the host copy
        finally:
            loop.close()
    assert host.flat.device.type == "cpu"
    assert seen.count("d2h") == 1 and "sync" not in seen.events
    assert seen.events.index("d2h") == len(seen.events) - 1  # the copy is the batch's last transfer
    assert seen.count("h2d-blocking") == 0 and seen.count("h2d") >= 1
    assert gpu.syncs == ["cuda:0"] and gpu.pinned >= 2  # images staged in pinned memory, logits pinned


def test_the_harness_catches_what_the_first_gpu_request_would_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The v2 route used to call ``.numpy()`` on the stacked logits of ``run_mixed`` (device
    tensors); on fake CUDA that raises as it would on a GPU. A CPU tensor meeting a CUDA weight
    raises too. What the batch hands back now is on the host."""
    backbone = load_backbone("resnet18", weights="random", seed=0)
    task = make_task(backbone, "a", num_labels=4)
    with fake_cuda(monkeypatch):
        engine = Engine(backbone, device="cuda", dtype=torch.float16)
        engine.add_task(task)
        x = torch.zeros(2, 3, 64, 64)
        device_rows = engine.run_mixed(x, ["a", "a"])
        with pytest.raises((TypeError, RuntimeError)):
            torch.stack(device_rows).float().numpy()  # the old v2 path: a 500 on the first GPU request
        with pytest.raises(RuntimeError, match="same device|device"):
            F.linear(torch.zeros(1, 512), engine.get_task("a").head_weight)
        assert engine.run_mixed_host(x, ["a", "a"]).flat.device.type == "cpu"


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_dtype_on_cuda_is_bfloat16_only_where_the_gpu_computes_it(
    capability: tuple[int, int], expected: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # it counts emulation
    with fake_cuda(monkeypatch, FakeGPU(capability=capability)):
        assert auto_dtype("cuda") is expected


def test_on_cuda_the_task_files_host_bytes_are_let_go_once_the_masks_are_on_the_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backbone = load_backbone("resnet18", weights="random", seed=0)
    task = make_task(backbone, "a", num_labels=4, norms=True)
    with fake_cuda(monkeypatch):
        engine = Engine(backbone, device="cuda", dtype=torch.float16)
        loaded = engine.add_task(task)
    file = loaded.file
    assert all(m.device.type == "cuda" for m in file.masks.values())
    assert file.head_weight.device.type == "meta" and file.head_bias.device.type == "meta"
    assert all(t.device.type == "meta" for p in file.norms.values() for t in vars(p).values())
    assert file.summary() == task.summary()  # what GET /tasks shows is unchanged


def test_a_cache_miss_for_s_stacked_tasks_runs_as_many_operations_as_for_two(monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = load_backbone("resnet18", weights="random", seed=0)
    tasks = [make_task(backbone, f"t{i}", num_labels=4, seed=i) for i in range(8)]
    with fake_cuda(monkeypatch):
        engine = Engine(backbone, device="cuda", dtype=torch.float16, mixed_path="stacked", cache_bytes=0)
        for task in tasks:
            engine.add_task(task)
        warm = [f"t{i}" for i in range(8)]  # the pinned buffers at their largest
        engine.run_mixed_host(torch.zeros(8, 3, 64, 64, dtype=torch.uint8), warm)
        counts = {}
        for s in (2, 8):
            names = [f"t{i}" for i in range(s)]
            x = torch.zeros(s, 3, 64, 64, dtype=torch.uint8)
            counts[s] = count_kernels(lambda x=x, names=names: engine.run_mixed_host(x, names))
    assert counts[8] == counts[2], counts


def test_the_gpu_cache_budget_is_sized_after_the_largest_batch_and_shrinks_as_tasks_arrive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server.services import gpu_headroom, keep_gpu_reserve

    backbone = load_backbone("resnet18", weights="random", seed=0)
    tasks = [make_task(backbone, f"t{i}", num_labels=4, seed=i) for i in range(2)]
    gpu = FakeGPU(free_bytes=10 * GIB, total_bytes=16 * GIB)
    with fake_cuda(monkeypatch, gpu):
        engine = Engine(backbone, device="cuda", dtype=torch.float16, mixed_path="stacked")
        for task in tasks:
            engine.add_task(task)
        with count_transfers() as seen:
            free = gpu_headroom(engine, 32)  # the warm-up: a mixed batch of 32 images
        assert free == 10 * GIB and seen.count("d2h") == 1
        engine.cache.resize(8 * GIB)  # 80% of it; 2 GiB left as the reserve
        assert keep_gpu_reserve(engine, 2 * GIB) == 8 * GIB  # nothing added yet
        gpu.free_bytes = 9 * GIB  # tasks registered since took 1 GiB
        assert keep_gpu_reserve(engine, 2 * GIB) == 7 * GIB
        assert keep_gpu_reserve(engine, 2 * GIB) == 7 * GIB  # stable once the reserve is kept
        gpu.free_bytes, gpu.cached_unused = 8 * GIB, 1 * GIB  # weights evicted: the allocator keeps the block
        assert keep_gpu_reserve(engine, 2 * GIB) == 7 * GIB  # still free for us: no shrink
