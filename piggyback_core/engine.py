"""The engine: one resident backbone, any number of tasks, batches of one task or many.

Per task the engine keeps only what the task file holds: packed masks (1 bit per weight, or 2 for
ternary) on the device, the head and optional BatchNorm parameters. For each batch it sorts the
requests into contiguous per-task segments and runs the backbone once under a
:class:`~piggyback_core.masking.MaskPlan`: every masked layer computes each segment with that
task's effective weight ``weight * unpack(mask)``, built on the fly (or taken from an optional LRU
of materialised weights, bounded in bytes). Layers without masks (BatchNorm without per-task
parameters, activations, pooling) run once over the whole batch.

The shared backbone is never written, so concurrent batches from several threads are safe, and a
batch holds the :class:`LoadedTask` objects it started with: replacing or removing a task while a
batch runs does not affect that batch.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from . import device as _device
from .backbones import Backbone, channel_separable
from .bitpack import MaskKind, unpack_binary, unpack_ternary
from .errors import EngineError, TaskNotFoundError, WeightBudgetError
from .images import Preprocessing
from .masking import NormParams, use_plan
from .packed import PackedNetwork, packed_supported, use_weights
from .taskfile import TaskFile

__all__ = [
    "CPU_PATHS",
    "MIXED_PATHS",
    "CpuPath",
    "Engine",
    "HostLogits",
    "LoadedTask",
    "MixedPath",
    "Residency",
    "WeightCache",
    "apply_packed_mask",
    "apply_packed_masks",
]


log = logging.getLogger("piggyback.engine")

# How a CPU runs a batch: "packed" (BatchNorm folded, post-ops fused, each task's weights prepacked
# for oneDNN: piggyback_core.packed), "reference" (weight * mask into the torchvision modules), or
# "auto" (packed where the CPU has AVX-512 or AMX and the network traces).
CpuPath = Literal["auto", "packed", "reference"]
CPU_PATHS: tuple[str, ...] = get_args(CpuPath)

# How a batch that mixes tasks runs: "segments" (each masked layer once per task segment; on a CPU
# small outputs as unfold + one matmul per task), "stacked" (the tasks stacked along channels, one
# grouped convolution per layer whatever the number of tasks: masking's module docstring), or
# "auto": segments, on CUDA too, until a GPU measurement says stacked is faster there (on a CPU it
# measured slower; `make gpu-check` measures both on a GPU).
MixedPath = Literal["auto", "segments", "stacked"]
MIXED_PATHS: tuple[str, ...] = get_args(MixedPath)

_LUTS: dict[tuple[MaskKind, torch.dtype, torch.device], Tensor] = {}
_LUTS_LOCK = threading.Lock()


def _mask_lut(kind: MaskKind, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every byte's unpacked values: ``[256, 8]`` of 0/1 (binary) or ``[256, 4]`` of -1/0/1
    (ternary), in the weights' dtype and on their device; built once per (kind, dtype, device)."""
    key = (kind, dtype, device)
    lut = _LUTS.get(key)
    if lut is None:
        byte = torch.arange(256, dtype=torch.uint8)
        if kind == "binary":
            table = unpack_binary(byte, 256 * 8).view(256, 8)
        else:
            table = unpack_ternary(byte, 256 * 4).view(256, 4)  # code 0b11 never passes validation
        lut = table.to(device=device, dtype=dtype).contiguous()
        with _LUTS_LOCK:
            lut = _LUTS.setdefault(key, lut)
    return lut


def apply_packed_mask(weight: Tensor, packed: Tensor, kind: MaskKind, *, out: Tensor | None = None) -> Tensor:
    """``weight * mask`` for a packed mask, in ``weight``'s dtype and device.

    Fused: one gather from a byte -> values lookup table straight into the result, then one
    in-place multiply; no float or uint8 copy of the unpacked mask is ever made. ``out`` (flat,
    at least ``packed.numel() * 8`` (binary) or ``* 4`` (ternary) elements) is reused when given,
    which saves the allocation (and on CPU the page faults) of a fresh tensor per layer per batch."""
    lut = _mask_lut(kind, weight.dtype, weight.device)
    n = weight.numel()
    full = packed.numel() * lut.shape[1]
    if out is None:
        out = torch.empty(full, dtype=weight.dtype, device=weight.device)
    buffer = out[:full]
    torch.index_select(lut, 0, packed.to(torch.int32), out=buffer.view(-1, lut.shape[1]))
    result = buffer[:n]
    result.mul_(weight.reshape(-1))
    return result.view(weight.shape)


def apply_packed_masks(weight: Tensor, packed: Sequence[Tensor], kind: MaskKind) -> Tensor:
    """``weight * mask_s`` for S packed masks of one kind at once, stacked along the first
    dimension (``[S * out, ...]``): one gather from the lookup table over the S masks side by side
    and one broadcast multiply, a fixed number of operations whatever S (the stacked path's cache
    misses)."""
    lut = _mask_lut(kind, weight.dtype, weight.device)
    s, n = len(packed), weight.numel()
    codes = torch.stack(list(packed)).to(torch.int32)  # [S, bytes]
    values = lut[codes].view(s, -1)  # [S, bytes * per_byte]
    if values.shape[1] != n:  # the last byte's padding bits
        values = values[:, :n].contiguous()
    return values.mul_(weight.reshape(1, -1)).view(s * weight.shape[0], *weight.shape[1:])


@dataclass(frozen=True)
class HostLogits:
    """A batch's logits on the host, ``float32``: every row's logits end to end in one buffer
    (what one device-to-host copy brought back); :meth:`row` is row ``i``'s ``[labels]`` view."""

    flat: Tensor
    offsets: tuple[int, ...]  # row i is flat[offsets[i]:offsets[i + 1]]

    def row(self, i: int) -> Tensor:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1


class _Workspace(threading.local):
    """Per-thread scratch for weights that live only for one layer call (no cache): one buffer per
    (device, dtype), grown to the largest layer, reused by every layer of every batch."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.staging: dict[tuple[torch.dtype, str], Tensor] = {}  # pinned host buffers: images in, logits out

    def pinned(self, numel: int, dtype: torch.dtype, purpose: str) -> Tensor:
        """A page-locked host buffer of at least ``numel`` elements, reused by this thread's batches
        (each batch waits for its device work before it returns, so the next may reuse it)."""
        buffer = self.staging.get((dtype, purpose))
        if buffer is None or buffer.numel() < numel:
            buffer = _device.pin(torch.empty(max(numel, 1), dtype=dtype))
            self.staging[(dtype, purpose)] = buffer
        return buffer

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buffer = self.buffers.get((device, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self.buffers[(device, dtype)] = buffer
        return buffer


@dataclass(frozen=True)
class Residency:
    """One task's memory: ``packed_bytes`` (masks, head, per-task BatchNorm: always resident) and
    ``built_bytes`` (its built weights in the cache: 0 when they are built per batch)."""

    packed_bytes: int
    built_bytes: int
    pinned: bool
    hits: int
    misses: int


@dataclass(frozen=True, eq=False)
class LoadedTask:
    """A task as the engine holds it, on the engine's device. Immutable: replacing a task makes
    a new one, and batches that hold the old one finish with it."""

    name: str
    version: str
    labels: tuple[str, ...]
    mask_kind: MaskKind
    masks: dict[str, Tensor] = field(repr=False)
    head_weight: Tensor = field(repr=False)
    head_bias: Tensor = field(repr=False)
    norms: dict[str, NormParams] = field(repr=False)
    file: TaskFile = field(repr=False)
    # how its images are prepared: its own, from training, or else the backbone's (the one place
    # that rule is applied: serving, evaluation and the engine's normalisation read it here)
    preprocessing: Preprocessing = field(repr=False)
    # the task's preprocessing mean and std, [1, 3, 1, 1] float32 on the device: uint8 images are
    # normalised there (made once per task, so a batch copies nothing small to the device)
    normalize: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def resident_bytes(self) -> int:
        """Device bytes this task holds: packed masks, head and per-task BatchNorm."""
        n = sum(t.nbytes for t in self.masks.values()) + self.head_weight.nbytes + self.head_bias.nbytes
        return n + sum(t.nbytes for p in self.norms.values() for t in vars(p).values())


class WeightCache:
    """LRU of built per-task weights (``{key: weight * mask}``, in the compute dtype), bounded in
    bytes, with pinned tasks.

    ``max_bytes=0`` disables it: built weights then live only for the layer that uses them.

    * **LRU within the budget**: a new entry evicts the least recently used unpinned entries.
    * **No thrash**: a new entry may evict only entries that have not been used in the last
      ``stale_after`` lookups. When more tasks take turns than the cache holds (8 tasks in
      rotation, room for 2), a plain LRU would miss on every batch and pay an allocation each
      time; this cache keeps the entries it has (hits for those tasks) and lets the others build
      their weights in the reused workspace.
    * **Pinned** tasks (:meth:`pin`) are never evicted; they count against the budget.

    Counters: ``hits``, ``misses`` (one per task per batch), ``evictions``; per task, the hits and
    misses of each name (:meth:`task_stats`)."""

    def __init__(self, max_bytes: int, *, stale_after: int = 64) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.stale_after = stale_after
        self._entries: OrderedDict[tuple[str, str], tuple[dict[str, Tensor], int]] = OrderedDict()
        self._last_used: dict[tuple[str, str], int] = {}
        self._pinned: set[str] = set()
        self._task_counts: dict[str, list[int]] = {}  # name -> [hits, misses]
        self._clock = 0
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: tuple[str, str]) -> dict[str, Tensor] | None:
        with self._lock:
            self._clock += 1
            counts = self._task_counts.setdefault(key[0], [0, 0])
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                counts[1] += 1
                return None
            self._entries.move_to_end(key)
            self._last_used[key] = self._clock
            self.hits += 1
            counts[0] += 1
            return entry[0]

    def _evictable(self, key: tuple[str, str], *, stale_only: bool) -> bool:
        if key[0] in self._pinned:
            return False
        return not stale_only or self._clock - self._last_used.get(key, 0) > self.stale_after

    def admits(self, size: int) -> bool:
        """Whether an entry of ``size`` bytes would be stored, evicting only stale entries."""
        if size > self.max_bytes:
            return False
        with self._lock:
            free = self.max_bytes - self.bytes
            for key, (_, entry_size) in self._entries.items():  # least recently used first
                if free >= size:
                    break
                if not self._evictable(key, stale_only=True):
                    if key[0] in self._pinned:
                        continue
                    return False
                free += entry_size
            return free >= size

    def put(self, key: tuple[str, str], weights: dict[str, Tensor]) -> bool:
        """Store ``weights`` under ``key``, evicting least recently used unpinned entries; False
        (nothing stored) if they do not fit beside the pinned entries."""
        size = sum(t.nbytes for t in weights.values())
        with self._lock:
            if key in self._entries:
                return True
            evictable = sum(n for k, (_, n) in self._entries.items() if self._evictable(k, stale_only=False))
            if self.bytes - evictable + size > self.max_bytes:
                return False
            self._evict_to(self.max_bytes - size)
            self._entries[key] = (weights, size)
            self._last_used[key] = self._clock
            self.bytes += size
            return True

    def evict(self, name: str) -> None:
        """Drop every version of ``name`` (replaced or removed; not counted as an eviction)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == name]:
                self.bytes -= self._entries.pop(key)[1]
                self._last_used.pop(key, None)

    def put_if_free(self, key: tuple[str, str], weights: dict[str, Tensor]) -> bool:
        """Store ``weights`` only into free room (evicting nothing): what prefilling uses."""
        size = sum(t.nbytes for t in weights.values())
        with self._lock:
            if key in self._entries or self.bytes + size > self.max_bytes:
                return False
            self._entries[key] = (weights, size)
            self._entries.move_to_end(key, last=False)  # least recently used: first to go
            self._last_used[key] = 0
            self.bytes += size
            return True

    @property
    def free_bytes(self) -> int:
        return self.max_bytes - self.bytes

    def forget(self, name: str) -> None:
        """``name`` is gone: drop its entries, pin and counters."""
        self.evict(name)
        with self._lock:
            self._pinned.discard(name)
            self._task_counts.pop(name, None)

    def pin(self, name: str) -> None:
        with self._lock:
            self._pinned.add(name)

    def unpin(self, name: str) -> None:
        with self._lock:
            self._pinned.discard(name)

    def resize(self, max_bytes: int) -> None:
        """A new budget; least recently used unpinned entries go until the rest fit."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        with self._lock:
            self.max_bytes = max_bytes
            self._evict_to(max_bytes)

    def _evict_to(self, limit: int) -> None:
        """Evict least recently used unpinned entries until at most ``limit`` bytes are held
        (the caller holds the lock)."""
        for old in [k for k in self._entries if self._evictable(k, stale_only=False)]:
            if self.bytes <= limit:
                break
            self.bytes -= self._entries.pop(old)[1]
            self._last_used.pop(old, None)
            self.evictions += 1

    def is_pinned(self, name: str) -> bool:
        return name in self._pinned

    @property
    def pinned_bytes(self) -> int:
        with self._lock:
            return sum(n for k, (_, n) in self._entries.items() if k[0] in self._pinned)

    @property
    def pinned_tasks(self) -> int:
        """Pinned tasks holding built weights."""
        with self._lock:
            return len({k[0] for k in self._entries if k[0] in self._pinned})

    def resident_bytes(self, name: str) -> int:
        """Bytes of ``name``'s built weights held now (0: built per batch)."""
        with self._lock:
            return sum(n for k, (_, n) in self._entries.items() if k[0] == name)

    def task_stats(self, name: str) -> tuple[int, int]:
        """(hits, misses) of ``name`` since it was loaded."""
        with self._lock:
            hits, misses = self._task_counts.get(name, (0, 0))
            return hits, misses

    def __len__(self) -> int:
        return len(self._entries)


_NORM_FIELDS = ("weight", "bias", "running_mean", "running_var")


class _Plan:
    """The MaskPlan of one forward pass: contiguous segments, one task each, or (``stack`` > 0)
    the tasks stacked along channels."""

    def __init__(
        self,
        bounds: list[tuple[int, int]],
        tasks: list[LoadedTask],
        cache: WeightCache,
        workspace: _Workspace,
        weights_nbytes: int,
        *,
        stack: bool = False,
    ) -> None:
        self.bounds = bounds
        self.tasks = tasks
        self.stack = len(tasks) if stack else 0
        self.workspace = workspace
        use_cache = cache.max_bytes > 0
        self.cached = [cache.get((t.name, t.version)) if use_cache else None for t in tasks]
        # Admission: cache what this batch builds only if all of it fits, evicting only stale
        # entries (WeightCache.admits). Otherwise a batch mixing more tasks than the cache holds
        # would evict its own entries (thrash) and pay for fresh allocations on every batch.
        missing = sum(c is None for c in self.cached)
        admit = use_cache and missing > 0 and cache.admits(missing * weights_nbytes)
        self.fresh: list[dict[str, Tensor] | None] = [{} if admit and c is None else None for c in self.cached]

    def weight(self, segment: int, key: str, weight: Tensor) -> Tensor:
        cached = self.cached[segment]
        if cached is not None:
            return cached[key]
        task = self.tasks[segment]
        packed = task.masks[key]
        fresh = self.fresh[segment]
        if fresh is not None:  # kept for the cache: a tensor of its own
            w = apply_packed_mask(weight, packed, task.mask_kind)
            fresh[key] = w
            return w
        # Used by this one layer call only (the layer runs before the next weight is asked for,
        # and on CUDA in stream order), so the thread's scratch buffer serves every layer.
        per_byte = 8 if task.mask_kind == "binary" else 4
        out = self.workspace.take(packed.numel() * per_byte, weight.dtype, weight.device)
        return apply_packed_mask(weight, packed, task.mask_kind, out=out)

    def norm(self, segment: int, name: str) -> NormParams | None:
        return self.tasks[segment].norms.get(name)

    def stacked_weight(self, key: str, weight: Tensor) -> Tensor:
        """The S tasks' weights of one layer side by side: the cached ones as they are, the missing
        ones built together (one gather and one multiply per mask kind, whatever their number)."""
        parts: list[Tensor | None] = [c[key] if c is not None else None for c in self.cached]
        for kind in ("binary", "ternary"):
            missing = [i for i, t in enumerate(self.tasks) if parts[i] is None and t.mask_kind == kind]
            if not missing:
                continue
            built = apply_packed_masks(weight, [self.tasks[i].masks[key] for i in missing], kind)
            if len(missing) == len(self.tasks):
                if any(f is not None for f in self.fresh):
                    self._keep(key, built.chunk(len(missing)), missing)
                return built
            pieces = built.chunk(len(missing))
            self._keep(key, pieces, missing)
            for i, piece in zip(missing, pieces, strict=True):
                parts[i] = piece
        return torch.cat(parts)  # type: ignore[arg-type]

    def _keep(self, key: str, pieces: Sequence[Tensor], tasks: list[int]) -> None:
        """The pieces of the tasks admitted to the cache, as tensors of their own."""
        for i, piece in zip(tasks, pieces, strict=True):
            fresh = self.fresh[i]
            if fresh is not None:
                fresh[key] = piece.clone()

    def stacked_norm(self, name: str, own: NormParams) -> NormParams:
        parts = [t.norms.get(name) or own for t in self.tasks]
        return NormParams(*(torch.cat([getattr(p, f) for p in parts]) for f in _NORM_FIELDS))


class Engine:
    """Runs batches of images for any of its tasks over one frozen backbone.

    ``dtype`` is the compute dtype: float32; bfloat16 (on a CPU, fast only where the processor has
    it natively: :func:`~piggyback_core.hardware.native_bf16`); float16 on CUDA only (CPUs have
    no fast float16 kernels). The backbone's weights are converted to it **in place** (one copy of
    the weights in memory), so every task's weights are built directly in the compute dtype; build
    one backbone per engine of another dtype or device. ``channels_last`` feeds the convolutions
    NHWC activations (faster for most convolutional backbones on CPU and CUDA). ``cache_bytes``
    bounds the LRU of materialised task weights (0: none; each batch then builds the weights it
    needs)."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        cache_bytes: int = 0,
        mixed_path: MixedPath = "auto",
        cpu_path: CpuPath = "auto",
    ) -> None:
        self.device = torch.device(device)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        if dtype == torch.float16 and self.device.type != "cuda":
            raise ValueError(f"float16 has no fast {self.device.type} kernels; use bfloat16 or float32")
        self.backbone = backbone
        self.dtype = dtype
        self.channels_last = channels_last
        # The weights stay in the default (contiguous) layout: the mask multiply then reads and
        # writes them in order; only activations are NHWC, which is what selects the NHWC kernels.
        self.model = backbone.model.to(self.device, dtype).eval()
        self.device = next(self.model.parameters()).device  # "cuda" -> "cuda:0": one key for its lookup tables
        self.cache = WeightCache(cache_bytes)
        self._workspace = _Workspace()
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self._weights_nbytes = sum(m.weight.numel() for m in backbone.masked) * itemsize  # one task's built weights
        self._tasks: dict[str, LoadedTask] = {}
        self._normalizers: dict[Preprocessing, tuple[Tensor, Tensor]] = {}
        self._lock = threading.Lock()
        if mixed_path not in MIXED_PATHS:
            raise ValueError(f"unknown mixed path {mixed_path!r}; expected one of {', '.join(MIXED_PATHS)}")
        separable = channel_separable(self.model)
        if mixed_path == "stacked" and not separable:
            raise ValueError(f"{backbone.arch} mixes channels across tasks: its mixed batches cannot run stacked")
        if mixed_path == "auto":
            mixed_path = "segments"  # see MixedPath: stacked only when asked for, until measured faster
        self.mixed_path: MixedPath = mixed_path
        if cpu_path not in CPU_PATHS:
            raise ValueError(f"unknown CPU path {cpu_path!r}; expected one of {', '.join(CPU_PATHS)}")
        self._packed: PackedNetwork | None = None
        wanted = cpu_path == "packed" or (cpu_path == "auto" and packed_supported())
        if wanted and self.device.type == "cpu" and mixed_path == "segments" and dtype != torch.float16:
            try:
                self._packed = PackedNetwork(self.model, backbone.preprocessing.crop_size, dtype)
                self._weights_nbytes = self._packed.nbytes(itemsize * sum(
                    m.weight.numel() for m in backbone.masked if m.key not in self._packed.layers
                ))  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - torch.fx cannot trace it: the reference path serves
                log.warning("%s: no packed CPU path (%s: %s); the reference path serves", backbone.arch,
                            type(exc).__name__, exc)  # fmt: skip
        elif cpu_path == "packed":
            raise ValueError("the packed CPU path needs a CPU device, the segments mixed path and float32 or bfloat16")
        self.cpu_path: CpuPath = "packed" if self._packed is not None else "reference"

    # --- tasks --------------------------------------------------------------------------------

    def add_task(self, task: TaskFile) -> LoadedTask:
        """Check ``task`` against the backbone, move it to the device and (re)place it atomically.

        Raises a TaskFileError (nothing changes) if the task does not fit this backbone."""
        task.check_compatible(self.backbone)
        masks = {k: v.to(self.device) for k, v in task.masks.items()}
        file = task
        if self.device.type != "cpu":
            # The host bytes the file was read from are let go once the masks live on the device
            # (else host memory holds every task twice): the file keeps its metadata, the device
            # masks, and shape-only (meta) stand-ins for the head and BatchNorm tensors.
            file = dataclasses.replace(
                task,
                masks=masks,
                head_weight=task.head_weight.to("meta"),
                head_bias=task.head_bias.to("meta"),
                norms={k: NormParams(*(t.to("meta") for t in vars(p).values())) for k, p in task.norms.items()},
            )
        preprocessing = task.preprocessing or self.backbone.preprocessing
        _mask_lut(task.mask_kind, self.dtype, self.device)  # made now: a batch copies nothing small to the device
        loaded = LoadedTask(
            name=task.name,
            version=task.version,
            labels=task.labels,
            mask_kind=task.mask_kind,
            masks=masks,
            head_weight=task.head_weight.to(self.device, self.dtype),
            head_bias=task.head_bias.to(self.device, self.dtype),
            norms={
                k: NormParams(*(t.to(self.device, self.dtype) for t in vars(p).values())) for k, p in task.norms.items()
            },
            file=file,
            preprocessing=preprocessing,
            normalize=self._normalize_constants(preprocessing),
        )
        with self._lock:  # the swap and the old version's eviction are one step for _cache_put
            previous = self._tasks.get(task.name)
            self._tasks[task.name] = loaded
            if previous is not None:
                self.cache.evict(task.name)
        pinned = self.cache.is_pinned(task.name)
        if pinned and not self._cache_put(loaded, self.build_weights(loaded)) and self._tasks.get(task.name) is loaded:
            # the task is served all the same, its weights built per batch; the registration stands
            log.warning("task %r is no longer pinned: its built weights do not fit the cache budget", task.name)
            self.cache.unpin(task.name)
        return loaded

    def remove_task(self, name: str) -> LoadedTask:
        with self._lock:
            try:
                removed = self._tasks.pop(name)
            except KeyError:
                raise TaskNotFoundError(task=name) from None
            self.cache.forget(name)
        return removed

    def _cache_put(self, task: LoadedTask, weights: dict[str, Tensor], *, only_free: bool = False) -> bool:
        """Cache ``task``'s built weights only while it is the version served: a batch admitted
        before a replacement or a removal finishes with the old version but never caches it (a
        pinned name would otherwise hold an old version's weights for ever)."""
        with self._lock:
            if self._tasks.get(task.name) is not task:
                return False
            put = self.cache.put_if_free if only_free else self.cache.put
            return put((task.name, task.version), weights)

    def build_weights(self, task: str | LoadedTask) -> dict[str, Tensor]:
        """Every masked weight of ``task`` built (``weight * mask`` in the compute dtype); on the
        packed CPU path, its fused layers' folded, masked and prepacked weights and biases."""
        t = self.get_task(task) if isinstance(task, str) else task
        weights = {mp.key: mp.weight for mp in self.backbone.masked}
        with torch.inference_mode():
            if self._packed is not None:
                return self._packed.build(
                    t.masks,
                    t.mask_kind,
                    t.norms,
                    lambda key: apply_packed_mask(weights[key], t.masks[key], t.mask_kind),
                )
            return {key: apply_packed_mask(w, t.masks[key], t.mask_kind) for key, w in weights.items()}

    def pin(self, name: str) -> None:
        """Build ``name``'s weights now and keep them in the cache until :meth:`unpin` (the first
        request is then as fast as the hundredth); a new version registered later is built and
        pinned at once. WeightBudgetError (nothing pinned) if they do not fit the budget."""
        task = self.get_task(name)
        cache = self.cache
        if not cache.is_pinned(name) and cache.pinned_bytes + self._weights_nbytes > cache.max_bytes:
            raise self._budget_error(name)  # refused before anything is built
        cache.pin(name)
        if not self._cache_put(task, self.build_weights(task)):
            cache.unpin(name)
            raise self._budget_error(name)

    def _budget_error(self, name: str) -> WeightBudgetError:
        cache = self.cache
        return WeightBudgetError(task=name, needed=self._weights_nbytes, pinned=cache.pinned_bytes,
                                 pinned_tasks=cache.pinned_tasks, budget=cache.max_bytes)  # fmt: skip

    def unpin(self, name: str) -> None:
        self.cache.unpin(name)

    def prefill(self, name: str) -> bool:
        """Build ``name``'s weights into the cache's free room (evicting nothing). True when they
        are held (built now or already); False when there is no room left or the task is gone."""
        task = self._tasks.get(name)
        if task is None or self.cache.free_bytes < self._weights_nbytes:
            return False
        if self.cache.resident_bytes(name):
            return True
        return self._cache_put(task, self.build_weights(task), only_free=True)

    def residency(self, name: str) -> Residency:
        """Where ``name``'s memory is and how its cache lookups went."""
        task = self.get_task(name)
        hits, misses = self.cache.task_stats(name)
        return Residency(
            packed_bytes=task.resident_bytes,
            built_bytes=self.cache.resident_bytes(name),
            pinned=self.cache.is_pinned(name),
            hits=hits,
            misses=misses,
        )

    def get_task(self, name: str) -> LoadedTask:
        try:
            return self._tasks[name]
        except KeyError:
            raise TaskNotFoundError(task=name) from None

    @property
    def tasks(self) -> dict[str, LoadedTask]:
        """A snapshot of the loaded tasks."""
        with self._lock:
            return dict(self._tasks)

    @property
    def weights_nbytes(self) -> int:
        """Bytes of one task's built weights (what the cache holds per task)."""
        return self._weights_nbytes

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def resident_mask_bytes(self) -> int:
        return sum(t.resident_bytes for t in self.tasks.values())

    # --- running ------------------------------------------------------------------------------

    def run(self, task: str | LoadedTask, images: Tensor) -> Tensor:
        """Logits ``float32 [B, num_labels]`` of one task for a batch ``[B, 3, H, W]``."""
        t = self.get_task(task) if isinstance(task, str) else task
        self._check_images(images, 1)
        return self._forward(images, [(0, images.shape[0], t)])[0]

    def run_mixed(self, images: Tensor, tasks: Sequence[str | LoadedTask]) -> list[Tensor]:
        """Logits for a batch whose row ``i`` is for ``tasks[i]``: one ``float32 [num_labels]``
        tensor per row (on the engine's device), in the order given."""
        rows, segments, permuted = self._arrange(images, tasks)
        per_segment = self._forward(permuted, segments)
        out: list[Tensor] = [torch.empty(0)] * len(rows)
        for (a, _, _), logits in zip(segments, per_segment, strict=True):
            for j, row_logits in enumerate(logits):
                out[rows[a + j]] = row_logits
        return out

    def run_mixed_host(self, images: Tensor, tasks: Sequence[str | LoadedTask]) -> HostLogits:
        """:meth:`run_mixed` with the logits brought to the host in **one** device-to-host copy
        (into a pinned buffer, asynchronously, then one wait for the device): what a server hands
        back. Nothing waits for the device before that copy. ``images`` may be ``uint8`` (0-255,
        not normalised: each task's mean and std are applied on the device) or already
        normalised floats, on the host (pinned and copied asynchronously) or on the device."""
        rows, segments, permuted = self._arrange(images, tasks)
        per_segment = self._forward(permuted, segments)
        flat = per_segment[0].reshape(-1) if len(per_segment) == 1 else torch.cat([x.reshape(-1) for x in per_segment])
        if flat.device.type != "cpu":
            host = self._workspace.pinned(flat.numel(), torch.float32, "logits")[: flat.numel()]
            host.copy_(flat, non_blocking=True)
            _device.synchronize(flat.device)
            flat = host.clone()  # the pinned buffer is reused by this thread's next batch
        # row i of the request order: its segment's place in the flat buffer
        sizes = [t.head_weight.shape[0] for a, b, t in segments for _ in range(b - a)]
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        order = [0] * len(rows)
        for position, row in enumerate(rows):
            order[row] = position
        if order == list(range(len(rows))):
            return HostLogits(flat, tuple(starts))
        gathered = torch.cat([flat[starts[p] : starts[p + 1]] for p in order])  # host: a few hundred floats
        offsets = [0]
        for p in order:
            offsets.append(offsets[-1] + sizes[p])
        return HostLogits(gathered, tuple(offsets))

    def stage(self, images: Sequence[Tensor]) -> Tensor:
        """``images`` (each ``[3, H, W]``, one dtype) stacked into one host batch: on CUDA into this
        thread's pinned staging buffer, so that the copy to the device is asynchronous. The buffer
        is reused by the thread's next ``stage``: pass the result to :meth:`run_mixed_host` (which
        waits for the device before it returns), not to an asynchronous call."""
        if self.device.type == "cpu":
            return torch.stack(list(images))
        first = images[0]
        numel = len(images) * first.numel()
        buffer = self._workspace.pinned(numel, first.dtype, "images")[:numel].view(len(images), *first.shape)
        return torch.stack(list(images), out=buffer)

    def _arrange(
        self, images: Tensor, tasks: Sequence[str | LoadedTask]
    ) -> tuple[list[int], list[tuple[int, int, LoadedTask]], Tensor]:
        """(the rows in segment order, the contiguous per-task segments, the images in that order)."""
        self._check_images(images, len(tasks))
        resolved = [self.get_task(t) if isinstance(t, str) else t for t in tasks]
        order: dict[int, list[int]] = {}  # first-seen task order; rows grouped by task object
        by_id: dict[int, LoadedTask] = {}
        for row, t in enumerate(resolved):
            order.setdefault(id(t), []).append(row)
            by_id[id(t)] = t
        rows = [r for group in order.values() for r in group]
        segments: list[tuple[int, int, LoadedTask]] = []
        start = 0
        for key, group in order.items():
            segments.append((start, start + len(group), by_id[key]))
            start += len(group)
        permuted = images if rows == list(range(len(rows))) else images[_index_on(rows, images.device)]
        return rows, segments, permuted

    def _check_images(self, images: Tensor, n: int) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise EngineError(f"images must be a [B, 3, H, W] tensor, got {shape}")
        if images.shape[0] == 0:
            raise EngineError("empty batch")
        if n != 1 and images.shape[0] != n:
            raise EngineError(f"{images.shape[0]} images for {n} task names")
        if not images.is_floating_point() and images.dtype != torch.uint8:
            raise EngineError(f"images must be floating point (normalised) or uint8 (0-255), got {images.dtype}")

    def _stacks(self, segments: list[tuple[int, int, LoadedTask]]) -> bool:
        """Whether this batch runs stacked: the engine's mixed path is, the batch mixes tasks, and
        padding every segment to the longest at most doubles the rows computed."""
        if self.mixed_path != "stacked" or len(segments) < 2:
            return False
        longest = max(b - a for a, b, _ in segments)
        return len(segments) * longest <= 2 * segments[-1][1]

    def _forward_packed(self, images: Tensor, segments: list[tuple[int, int, LoadedTask]]) -> list[Tensor]:
        """Each segment through the packed network with its task's packed weights (cached or built
        now), the layers the pass left through the reference path with the same weights."""
        assert self._packed is not None
        logits = []
        with torch.inference_mode():
            x = self._input(images, segments)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for a, b, t in segments:
                weights = self._task_weights(t)
                with use_plan(_OneTask(t, weights)), use_weights(weights):
                    features = self._packed.graph(x[a:b])
                logits.append(F.linear(features, t.head_weight, t.head_bias).float())
        return logits

    def _task_weights(self, task: LoadedTask) -> dict[str, Tensor]:
        """``task``'s built weights: from the cache, or built now (and cached if they fit)."""
        cache = self.cache
        if cache.max_bytes > 0:
            cached = cache.get((task.name, task.version))
            if cached is not None:
                return cached
        weights = self.build_weights(task)
        if cache.max_bytes > 0 and cache.admits(self._weights_nbytes):
            self._cache_put(task, weights)
        return weights

    def _forward(self, images: Tensor, segments: list[tuple[int, int, LoadedTask]]) -> list[Tensor]:
        if self._packed is not None:
            return self._forward_packed(images, segments)
        tasks = [t for _, _, t in segments]
        stack = self._stacks(segments)
        plan = _Plan(
            [(a, b) for a, b, _ in segments], tasks, self.cache, self._workspace, self._weights_nbytes, stack=stack
        )
        with torch.inference_mode():
            x = self._input(images, segments)
            if stack:
                x, rows = _stack_segments(x, segments)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with use_plan(plan):
                features = self.model(x)
            if stack:
                logits = _stacked_heads(features, segments, rows)
            else:
                logits = [F.linear(features[a:b], t.head_weight, t.head_bias).float() for a, b, t in segments]
        for t, fresh in zip(tasks, plan.fresh, strict=True):
            if fresh is not None and len(fresh) == len(t.masks):
                self._cache_put(t, fresh)
        return logits

    def _input(self, images: Tensor, segments: list[tuple[int, int, LoadedTask]]) -> Tensor:
        """The batch on the device in the compute dtype. Host images travel as they are (uint8:
        a quarter of float32's bytes) from pinned memory without waiting; uint8 images are then
        normalised on the device with each segment's task's mean and std (in float32, as the
        host preprocessing computes them, so the results are the same)."""
        if images.device != self.device:
            images = _device.pin(images).to(self.device, non_blocking=True)
        if images.dtype != torch.uint8:
            return images.to(self.dtype)
        # each row's task's mean and std side by side (views of the per-task constants, one cat
        # each), then one normalisation for the whole batch: a fixed number of operations
        constants = [t.normalize or self._normalize_constants(self.backbone.preprocessing) for _, _, t in segments]
        if len({id(c) for c in constants}) == 1:
            mean, std = constants[0]
        else:
            mean = torch.cat([c[0].expand(b - a, 3, 1, 1) for c, (a, b, _) in zip(constants, segments, strict=True)])
            std = torch.cat([c[1].expand(b - a, 3, 1, 1) for c, (a, b, _) in zip(constants, segments, strict=True)])
        return images.to(torch.float32).div_(255.0).sub_(mean).div_(std).to(self.dtype)

    def _normalize_constants(self, preprocessing: Preprocessing) -> tuple[Tensor, Tensor]:
        """A preprocessing's mean and std on the device, made once (tasks that share one share them)."""
        with self._lock:
            constants = self._normalizers.get(preprocessing)
            if constants is None:
                mean, std = (
                    torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)
                    for v in (preprocessing.mean, preprocessing.std)
                )
                constants = self._normalizers[preprocessing] = (mean.to(self.device), std.to(self.device))
            return constants


class _OneTask:
    """The MaskPlan of one task's segment on the packed path: the layers the pass left read the
    same built weights (and the task's own BatchNorm) as the fused ones."""

    stack = 0

    def __init__(self, task: LoadedTask, weights: dict[str, Tensor]) -> None:
        self.task = task
        self.weights = weights
        self.bounds = [(0, 1 << 62)]

    def weight(self, segment: int, key: str, weight: Tensor) -> Tensor:
        return self.weights[key]

    def norm(self, segment: int, name: str) -> NormParams | None:
        return self.task.norms.get(name)

    def stacked_weight(self, key: str, weight: Tensor) -> Tensor:
        raise AssertionError("a packed segment is never stacked")

    def stacked_norm(self, name: str, own: NormParams) -> NormParams:
        raise AssertionError("a packed segment is never stacked")


def _index_on(index: list[int], device: torch.device) -> Tensor:
    """An index tensor on ``device``: on a GPU copied from pinned memory, without waiting."""
    host = torch.tensor(index, dtype=torch.int64)
    return host if device.type == "cpu" else _device.pin(host).to(device, non_blocking=True)


def _stack_segments(x: Tensor, segments: list[tuple[int, int, LoadedTask]]) -> tuple[Tensor, int]:
    """``[B, C, H, W]`` in contiguous segments -> ``[m, S*C, H, W]``: task ``s``'s rows in channels
    ``[s*C, (s+1)*C)``, every segment padded to the longest (``m`` rows) by repeating its last row
    (computed and dropped). One gather and one copy, whatever S."""
    m = max(b - a for a, b, _ in segments)
    index = [a + min(j, b - a - 1) for a, b, _ in segments for j in range(m)]
    gathered = x[_index_on(index, x.device)]  # [S*m, C, H, W], segment-major
    s, (c, h, w) = len(segments), x.shape[1:]
    return gathered.view(s, m, c, h, w).transpose(0, 1).reshape(m, s * c, h, w), m


def _stacked_heads(features: Tensor, segments: list[tuple[int, int, LoadedTask]], rows: int) -> list[Tensor]:
    """Each task's logits from stacked features ``[m, S*F]``: one matmul of every row against every
    head side by side (cross-task products are computed and dropped: heads are small), then views;
    a fixed number of operations whatever S."""
    s = len(segments)
    feats = features.view(rows, s, -1).transpose(0, 1).reshape(s * rows, -1)
    weight = torch.cat([t.head_weight for _, _, t in segments])
    bias = torch.cat([t.head_bias for _, _, t in segments])
    logits = torch.addmm(bias, feats, weight.t()).float()  # [S*m, sum of labels]
    out, col = [], 0
    for i, (a, b, t) in enumerate(segments):
        labels = t.head_weight.shape[0]
        out.append(logits[i * rows : i * rows + (b - a), col : col + labels])
        col += labels
    return out
