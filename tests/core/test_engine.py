import threading
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from piggyback_core import (
    Backbone,
    Engine,
    EngineError,
    TaskFile,
    TaskNotFoundError,
    get_backbone_spec,
    list_backbones,
    load_backbone,
)
from tests.conftest import make_task


def _unpack_reference(task: TaskFile, key: str) -> torch.Tensor:
    """The slow, obviously-correct mask: numpy's own unpacking, independent of bitpack.py."""
    info = task.layers[key]
    raw = task.masks[key].numpy()
    if task.mask_kind == "binary":
        bits = np.unpackbits(raw, bitorder="little")[: info.numel].astype(np.float32)
    else:
        pairs = np.unpackbits(raw, bitorder="little").reshape(-1, 2)[: info.numel]
        bits = pairs[:, 0].astype(np.float32) - pairs[:, 1].astype(np.float32)
    return torch.from_numpy(bits.reshape(info.shape))


def reference_model(arch: str, seed: int, task: TaskFile) -> nn.Module:
    """Plain torchvision ``arch`` with its weights multiplied by the task's mask in plain PyTorch."""
    spec = get_backbone_spec(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(arch, weights=None)
    state = model.state_dict()
    for key in task.layers:
        state[key] = state[key] * _unpack_reference(task, key)
    for module, p in task.norms.items():
        for field in ("weight", "bias", "running_mean", "running_var"):
            state[f"{module}.{field}"] = getattr(p, field)
    head = nn.Linear(task.head_weight.shape[1], task.head_weight.shape[0])
    parent, _, attr = spec.head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, head)
    state[f"{spec.head}.weight"], state[f"{spec.head}.bias"] = task.head_weight, task.head_bias
    model.load_state_dict(state)
    return model.eval()


def _input(arch: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = 224 if arch.startswith("vit") else 64
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item() + 1e-6
    torch.testing.assert_close(got / scale, expected / scale, rtol=0, atol=2e-5)


def engine_against_reference(arch: str, **engine_options: Any) -> tuple[torch.Tensor, torch.Tensor, Backbone]:
    """(engine logits, fp32 reference logits, backbone) for one masked task of ``arch``."""
    backbone = load_backbone(arch, weights="random", seed=0)
    task = make_task(backbone, "t", num_labels=7, keep=0.9)
    expected_model = reference_model(arch, 0, task)
    engine = Engine(backbone, **engine_options)
    engine.add_task(task)
    x = _input(arch)
    with torch.inference_mode():
        expected = expected_model(x)
    got = engine.run("t", x)
    assert got.shape == (2, 7) and got.dtype == torch.float32
    return got, expected, backbone


@pytest.mark.parametrize("arch", list_backbones())
def test_engine_equals_torchvision_with_weights_multiplied_by_the_mask(arch: str) -> None:
    got, expected, _ = engine_against_reference(arch)
    _assert_logits_close(got, expected)


@pytest.mark.parametrize("kind,norms", [("ternary", False), ("binary", True), ("ternary", True)])
def test_engine_equals_reference_for_ternary_masks_and_per_task_batchnorm(resnet18, kind: str, norms: bool) -> None:
    task = make_task(resnet18, "t", kind=kind, norms=norms, seed=5)
    engine = Engine(resnet18)
    engine.add_task(task)
    x = _input("resnet18", batch=3)
    with torch.inference_mode():
        expected = reference_model("resnet18", 0, task)(x)
    _assert_logits_close(engine.run("t", x), expected)


def _assert_mixed_equals_task_by_task(engine: Engine, order: list[str]) -> None:
    """Tasks a (binary), b (ternary) and c (own BatchNorm) in one batch in ``order``, against each
    task's rows run alone."""
    backbone = engine.backbone
    tasks = [
        make_task(backbone, "a", num_labels=3, seed=1),
        make_task(backbone, "b", num_labels=4, kind="ternary", seed=2),
        make_task(backbone, "c", num_labels=5, norms=True, seed=3),
    ]
    for t in tasks:
        engine.add_task(t)
    x = _input(backbone.arch, batch=len(order), seed=9)
    mixed = engine.run_mixed(x, order)
    assert [row.shape[0] for row in mixed] == [{"a": 3, "b": 4, "c": 5}[n] for n in order]
    for name in "abc":
        rows = [i for i, n in enumerate(order) if n == name]
        alone = engine.run(name, x[rows])
        for j, i in enumerate(rows):
            _assert_logits_close(mixed[i], alone[j])


@pytest.mark.parametrize("channels_last", [False, True])
def test_mixed_task_batch_equals_the_same_requests_run_task_by_task(resnet18: Backbone, channels_last: bool) -> None:
    # 64x64 inputs: the last stage's outputs are 2x2, so its convs take the unfold + matmul path
    _assert_mixed_equals_task_by_task(
        Engine(resnet18, channels_last=channels_last), ["b", "a", "c", "a", "b", "c", "c", "a"]
    )


def test_weight_cache_gives_identical_results_and_stays_within_its_byte_bound(resnet18: Backbone) -> None:
    plain = Engine(resnet18)
    one_task_bytes = plain.weights_nbytes  # on the packed path: packed weights and folded biases
    cached = Engine(resnet18, cache_bytes=int(one_task_bytes * 1.5))
    for seed, name in enumerate("ab"):
        cached.add_task(make_task(resnet18, name, seed=seed))
        plain.add_task(make_task(resnet18, name, seed=seed))
    x = _input("resnet18", batch=2)
    for name in ["a", "a", "b", "a", "b"]:
        assert torch.equal(cached.run(name, x), plain.run(name, x))
        assert cached.cache.bytes <= cached.cache.max_bytes
    assert cached.cache.hits >= 1 and cached.cache.bytes == one_task_bytes  # room for one task only
    cached.remove_task("b")
    cached.remove_task("a")
    assert cached.cache.bytes == 0


def test_packed_masks_stay_resident_not_float_copies(resnet18: Backbone) -> None:
    engine = Engine(resnet18)
    loaded = engine.add_task(make_task(resnet18, "a", num_labels=10))
    mask_bytes = sum(t.nbytes for t in loaded.masks.values())
    assert mask_bytes == sum((n + 7) // 8 for n in (m.weight.numel() for m in resnet18.masked))
    assert engine.resident_mask_bytes == mask_bytes + (10 * 512 + 10) * 4


def test_a_batch_holding_the_old_version_finishes_with_it_after_replacement(resnet18: Backbone) -> None:
    engine = Engine(resnet18)
    old = engine.add_task(make_task(resnet18, "a", seed=1))
    x = _input("resnet18", batch=2)
    before = engine.run("a", x)
    new = engine.add_task(make_task(resnet18, "a", seed=2))
    assert new.version != old.version and engine.get_task("a") is new
    assert torch.equal(engine.run(old, x), before)
    assert not torch.equal(engine.run("a", x), before)
    engine.remove_task("a")
    assert torch.equal(engine.run_mixed(x, [old, old])[1], before[1])
    with pytest.raises(TaskNotFoundError, match="no task named 'a'"):
        engine.run("a", x)


def test_concurrent_batches_from_many_threads_match_sequential_results(resnet18: Backbone) -> None:
    engine = Engine(resnet18)
    for seed, name in enumerate("abc"):
        engine.add_task(make_task(resnet18, name, seed=seed))
    inputs = {name: _input("resnet18", batch=2, seed=i) for i, name in enumerate("abc")}
    expected = {name: engine.run(name, inputs[name]) for name in "abc"}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            for _ in range(3):
                assert torch.equal(engine.run(name, inputs[name]), expected[name])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in "abcabc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_shared_backbone_weights_are_never_written_by_serving(resnet18: Backbone) -> None:
    before = {k: v.clone() for k, v in resnet18.model.state_dict().items()}
    engine = Engine(resnet18, cache_bytes=10**9)
    engine.add_task(make_task(resnet18, "a", norms=True, kind="ternary"))
    engine.run_mixed(_input("resnet18", batch=2), ["a", "a"])
    for k, v in resnet18.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_batches_are_refused_with_engine_errors(resnet18: Backbone) -> None:
    engine = Engine(resnet18)
    engine.add_task(make_task(resnet18, "a"))
    with pytest.raises(EngineError, match=r"\[B, 3, H, W\]"):
        engine.run("a", torch.zeros(3, 32, 32))
    with pytest.raises(EngineError, match="empty batch"):
        engine.run("a", torch.zeros(0, 3, 32, 32))
    with pytest.raises(EngineError, match="3 images for 2 task names"):
        engine.run_mixed(torch.zeros(3, 3, 32, 32), ["a", "a"])
    with pytest.raises(EngineError, match="floating point"):
        engine.run("a", torch.zeros(1, 3, 32, 32, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uint8_images_normalised_by_the_engine_give_the_logits_of_host_preprocessing(
    resnet18: Backbone, dtype: torch.dtype
) -> None:
    from piggyback_core import Preprocessing

    engine = Engine(resnet18, dtype=dtype)
    other = Preprocessing(resize_size=36, crop_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    engine.add_task(make_task(resnet18, "a"))
    engine.add_task(make_task(resnet18, "b", seed=1, preprocessing=other))
    pixels = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    names = ["a", "b", "b", "a"]
    preprocessings = [other if n == "b" else resnet18.preprocessing for n in names]
    # what Preprocessing.__call__ computes on the host, in numpy float32
    by_host = torch.stack(
        [
            torch.from_numpy(
                ((pixels[i].permute(1, 2, 0).numpy().astype("float32") / 255.0 - _f32(p.mean)) / _f32(p.std))
                .transpose(2, 0, 1)
                .copy()
            )
            for i, p in enumerate(preprocessings)
        ]
    )
    expected = engine.run_mixed(by_host, names)
    got = engine.run_mixed_host(pixels, names)
    assert len(got) == 4
    for i in range(4):
        assert torch.equal(got.row(i), expected[i]), i


def _f32(values: tuple[float, ...]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


@pytest.mark.parametrize("kind", ["binary", "ternary"])
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 4099])
def test_fused_mask_application_equals_unpack_and_multiply(kind: str, numel: int) -> None:
    from piggyback_core.bitpack import pack_mask, unpack_mask
    from piggyback_core.engine import apply_packed_mask

    g = torch.Generator().manual_seed(numel)
    weight = torch.randn(numel, generator=g)
    u = torch.rand(numel, generator=g)
    mask = (u < 0.6).to(torch.int8) if kind == "binary" else (u < 0.6).to(torch.int8) - (u < 0.2).to(torch.int8)
    packed = pack_mask(mask, kind)
    expected = weight * unpack_mask(packed, numel, kind).float()
    assert torch.equal(apply_packed_mask(weight, packed, kind), expected)
    scratch = torch.full((numel * 8 + 64,), float("nan"))  # a reused buffer with stale contents
    assert torch.equal(apply_packed_mask(weight, packed, kind, out=scratch), expected)


def test_weight_cache_does_not_thrash_when_more_tasks_rotate_than_it_holds(resnet18: Backbone) -> None:
    one = Engine(resnet18).weights_nbytes
    engine = Engine(resnet18, cache_bytes=int(one * 2.5))  # room for two tasks
    for i in range(5):
        engine.add_task(make_task(resnet18, f"t{i}", seed=i))
    x = torch.randn(1, 3, 32, 32)
    for _ in range(4):  # five tasks in turn: a plain LRU would miss every time
        for i in range(5):
            engine.run(f"t{i}", x)
    assert engine.cache.hits == 2 * 3 and engine.cache.bytes == 2 * one  # t0, t1 stay; rounds 2-4 hit
    engine.cache.stale_after = 0  # once the residents go unused, newcomers may evict them
    engine.run("t4", x)
    assert engine.cache.get(("t4", engine.tasks["t4"].version)) is not None


# bfloat16 keeps 8 significant bits: each layer rounds its inputs and weights to about 3 decimal
# digits, and the rounding errors of 20-100 layers add up. Stated tolerance for the bf16 engine
# against the fp32 reference: logits within 5% of the largest logit. (Measured on these random
# backbones, batch 2: 0.2-1.7%, vit_b_16 the largest; top-1 agreement on real images is measured apart.)
BF16_TOLERANCE = 0.05


@pytest.mark.parametrize("arch", list_backbones())
def test_bf16_engine_in_its_layout_matches_the_fp32_reference_within_the_stated_tolerance(arch: str) -> None:
    got, expected, backbone = engine_against_reference(
        arch, dtype=torch.bfloat16, channels_last=get_backbone_spec(arch).channels_last
    )
    assert all(m.weight.dtype == torch.bfloat16 for m in backbone.masked)  # built in the compute dtype
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error < BF16_TOLERANCE, f"{arch}: bf16 logits off by {error:.3%} of the largest logit"


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_large", "densenet121"])
def test_channels_last_fp32_engine_equals_the_reference(arch: str) -> None:
    got, expected, _ = engine_against_reference(arch, channels_last=True)
    _assert_logits_close(got, expected)


def test_float16_is_refused_on_a_cpu() -> None:
    with pytest.raises(ValueError, match="float16"):
        Engine(load_backbone("resnet18", weights="random"), dtype=torch.float16)


def test_the_weight_cache_evicts_least_recently_used_keeps_pinned_and_counts() -> None:
    from piggyback_core import WeightCache

    def weights(n: int) -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(n, dtype=torch.uint8)}

    cache = WeightCache(300, stale_after=0)
    cache.pin("p")
    assert cache.put(("p", "1"), weights(100))
    assert cache.put(("a", "1"), weights(100)) and cache.put(("b", "1"), weights(100))
    cache.get(("a", "1"))  # b is now the least recently used unpinned entry
    assert cache.put(("c", "1"), weights(100))
    assert cache.get(("b", "1")) is None and cache.get(("a", "1")) is not None and cache.evictions == 1
    assert not cache.put(("big", "1"), weights(250))  # only 200 bytes are evictable beside the pin
    assert cache.resident_bytes("p") == 100 and cache.pinned_bytes == 100
    cache.resize(100)  # everything unpinned goes; the pinned entry stays
    assert cache.bytes == 100 and cache.get(("p", "1")) is not None and cache.evictions == 3
    assert cache.task_stats("a") == (2, 0) and cache.task_stats("b") == (0, 1)
    cache.forget("p")
    assert cache.bytes == 0 and not cache.is_pinned("p")


def test_a_pinned_task_is_built_once_and_rebuilt_when_replaced(resnet18: Backbone) -> None:
    engine = Engine(resnet18, cache_bytes=3 * sum(m.weight.nbytes for m in resnet18.masked))
    engine.add_task(make_task(resnet18, "a", seed=1))
    engine.pin("a")
    assert engine.residency("a").built_bytes == engine.weights_nbytes and engine.residency("a").pinned
    x = _input("resnet18", batch=2)
    first = engine.run("a", x)
    assert engine.residency("a").hits == 1 and engine.residency("a").misses == 0
    engine.add_task(make_task(resnet18, "a", seed=2))  # a new version: built and pinned at once
    assert engine.residency("a").built_bytes == engine.weights_nbytes
    assert not torch.equal(engine.run("a", x), first) and engine.residency("a").misses == 0
    small = Engine(resnet18, cache_bytes=1000)
    small.add_task(make_task(resnet18, "b", seed=1))
    with pytest.raises(EngineError, match="cannot be pinned"):
        small.pin("b")
    assert not small.residency("b").pinned


def test_prefill_builds_weights_into_free_room_only(resnet18: Backbone) -> None:
    engine = Engine(resnet18, cache_bytes=int(2.5 * sum(m.weight.nbytes for m in resnet18.masked)))
    for i, name in enumerate("abc"):
        engine.add_task(make_task(resnet18, name, seed=i))
    assert engine.prefill("a") and engine.prefill("b") and not engine.prefill("c")  # no room for a third
    assert engine.residency("c").built_bytes == 0 and engine.cache.evictions == 0
    x = _input("resnet18", batch=1)
    assert torch.equal(engine.run("a", x), Engine(resnet18).run(engine.get_task("a"), x))
    assert engine.residency("a").hits == 1


_STACKABLE = ["resnet18", "vgg16_bn", "mobilenet_v3_large", "efficientnet_b0"]


@pytest.mark.parametrize("arch", _STACKABLE)
def test_a_stacked_mixed_batch_equals_the_same_requests_run_task_by_task(arch: str) -> None:
    engine = Engine(load_backbone(arch, weights="random", seed=0), mixed_path="stacked", channels_last=True)
    order = ["b", "a", "c", "a", "b", "c", "b", "a"]  # segments of 3, 3 and 2 rows: 9 computed for 8
    t = make_task(engine.backbone, "a")
    assert engine._stacks([(0, 3, t), (3, 6, t), (6, 8, t)])
    _assert_mixed_equals_task_by_task(engine, order)


def test_stacking_is_refused_for_backbones_that_mix_channels_and_skipped_when_padding_would_double_the_work(
    resnet18: Backbone,
) -> None:
    for arch in ("densenet121", "convnext_tiny", "vit_b_16"):
        with pytest.raises(ValueError, match="mixes channels"):
            Engine(load_backbone(arch, weights="random", seed=0), mixed_path="stacked")
    assert Engine(resnet18).mixed_path == "segments"  # auto on a CPU
    engine = Engine(resnet18, mixed_path="stacked")
    t = make_task(resnet18, "a")
    assert engine._stacks([(0, 1, t), (1, 2, t)])
    assert engine._stacks([(0, 3, t), (3, 4, t)])  # 6 rows for 4
    assert not engine._stacks([(0, 5, t), (5, 6, t), (6, 7, t)])  # 15 rows for 7
    assert not engine._stacks([(0, 8, t)])


def _count_ops(engine: Engine, x: torch.Tensor, order: list[str]) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Count.n += not func.is_view  # views (slices of the results) launch no kernel
            return func(*args, **(kwargs or {}))

    with Count():
        engine.run_mixed(x, order)
    return Count.n


def test_a_stacked_mixed_batch_runs_as_many_operations_for_eight_tasks_as_for_two(resnet18: Backbone) -> None:
    # What a GPU needs (kernel launches, not FLOPs, bound small segments): with the weights
    # resident, the number of tensor operations does not grow with the number of tasks.
    counts: dict[str, list[int]] = {}
    for path in ("stacked", "segments"):
        engine = Engine(resnet18, mixed_path=path, cache_bytes=1 << 34)
        for i in range(8):
            engine.add_task(make_task(resnet18, f"t{i}", num_labels=3 + i, seed=i))
            engine.prefill(f"t{i}")
        x = _input("resnet18", batch=8, seed=1)
        counts[path] = [_count_ops(engine, x[:s], [f"t{i}" for i in range(s)]) for s in (2, 8)]
    assert counts["stacked"][0] == counts["stacked"][1]
    assert counts["segments"][1] > 2 * counts["segments"][0]  # the check would catch a per-task loop
