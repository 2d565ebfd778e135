"""What the web layer serves with: :class:`Services` (the backbone, engine, registry, batcher and
thread pools of one process), built by :func:`build_services` once the lifespan starts.

Every torch operation of the process (loading, validating and registering tasks, the batches)
runs on the workers' threads (``device_thread``): see ``server.app``'s lifespan.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from piggyback_core import (
    Backbone,
    Engine,
    LoadedTask,
    available_memory_bytes,
    load_backbone,
    open_store,
    parse_dtype,
    parse_layout,
    physical_cores,
    validate_task_name,
)
from piggyback_core import device as _device

from .batcher import Batcher, BatchPolicy, BatchStats
from .inference import InferenceService
from .metrics import Metrics
from .registry import TaskRegistry
from .repository import ModelRepository
from .settings import Settings

__all__ = ["Services", "StoreHealth", "build_services", "device_of", "gpu_headroom", "keep_gpu_reserve"]

log = logging.getLogger("piggyback.server")


@dataclass
class StoreHealth:
    """The store poll's last outcome (``/readyz`` and the metrics show it)."""

    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    held_removals: int = 0


@dataclass
class Services:
    settings: Settings
    device_thread: ThreadPoolExecutor
    management: ThreadPoolExecutor  # uploads, deletions and store polls: never the inference workers
    backbone: Backbone
    engine: Engine
    registry: TaskRegistry
    batcher: Batcher
    decoder: ThreadPoolExecutor
    worker_threads: int
    # ready_after=backbone: the background loaders, and the threads that load a pending task at
    # once for a request that needs it (not queued behind the others)
    loaders: list[ThreadPoolExecutor] = field(default_factory=list)
    store_health: StoreHealth = field(default_factory=StoreHealth)
    inference: InferenceService = field(init=False)
    repository: ModelRepository = field(init=False)
    gpu_reserve: int = 0  # GPU bytes kept free beside a full cache (automatic budget on CUDA)

    def __post_init__(self) -> None:
        self.inference = InferenceService(self.batcher, self.decoder, self.settings.max_image_pixels)
        explicit = self.settings.model_control == "explicit"
        self.repository = ModelRepository(self.engine, self.registry, explicit=explicit, loaded=self.settings.pinned)

    async def task(self, name: str, *, loaded_only: bool = True) -> LoadedTask:
        """``name`` as the engine serves it; a stored task not loaded yet (its first use, or its first
        since it was let go) is read and checked now, on a loader thread. With
        ``model_control=explicit``, a task not loaded through the repository API is
        TaskNotLoadedError (404) unless ``loaded_only`` is False (what the task-management routes show)."""
        validate_task_name(name)
        if loaded_only:
            self.repository.check_served(name)
        loaded = self.registry.lookup(name)
        if loaded is None:
            loaded = await asyncio.get_running_loop().run_in_executor(self.loaders[-1], self.registry.load, name)
        return loaded

    @property
    def device_lost(self) -> BaseException | None:
        """The error that made the device unusable (a sticky CUDA error): liveness fails."""
        return self.batcher.device_lost

    def recheck_cache_budget(self) -> None:
        """After tasks were added: see :func:`keep_gpu_reserve` (CUDA with the automatic budget)."""
        if self.settings.cache_bytes == "auto" and self.gpu_reserve:
            keep_gpu_reserve(self.engine, self.gpu_reserve)

    def shutdown(self) -> None:
        for pool in self.loaders:
            pool.shutdown(wait=True, cancel_futures=True)
        self.decoder.shutdown(wait=False)


def _release_freed_memory() -> None:
    """Hand the heap memory freed since start back to the system (glibc's ``malloc_trim``): the
    header scan parses thousands of headers on several threads, and what it frees stays in their
    malloc arenas otherwise. A no-op where the C library has no such call."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def device_of(settings: Settings) -> str:
    if settings.device == "auto":
        return "cuda" if _device.cuda_available() else "cpu"
    return settings.device


def gpu_headroom(engine: Engine, max_batch_size: int) -> int:
    """Free GPU memory after a warm-up of the largest batch the engine can form: ``max_batch_size``
    uint8 images through the mixed path with weights built per batch (the workspace at its
    largest), and on the stacked path the rows doubled by padding with every task's weights of the
    largest layer side by side (``torch.cat`` of S tasks)."""
    size = engine.backbone.preprocessing.crop_size
    images = torch.zeros(max_batch_size, 3, size, size, dtype=torch.uint8)
    tasks = list(engine.tasks.values())
    if tasks:
        rows = [tasks[i % len(tasks)] for i in range(max_batch_size)]
        engine.run_mixed_host(images, rows)
    else:
        with torch.inference_mode():
            engine.model(images.to(engine.device, engine.dtype))
    scratch = None
    if engine.mixed_path == "stacked":  # S tasks' weights of the largest layer built, then side by side
        largest = max(m.weight.numel() for m in engine.backbone.masked)
        scratch = torch.empty(2 * max_batch_size * largest, dtype=engine.dtype, device=engine.device)
    free, _ = _device.mem_get_info(engine.device)
    del scratch  # its block stays reserved by the caching allocator for the batches that need it
    return free


def _free_for_us(device: torch.device) -> int:
    """GPU bytes this process can still take: the driver's free memory, and what the caching
    allocator holds unused (e.g. weights just evicted)."""
    return _device.mem_get_info(device)[0] + _device.cached_unused(device)


def keep_gpu_reserve(engine: Engine, reserve: int) -> int:
    """Tasks added since the cache budget was set took GPU memory (masks, heads): shrink the budget
    until the cache, full, would still leave ``reserve`` bytes free (what the largest batch needs
    beside it). Returns the budget."""
    cache = engine.cache
    if engine.device.type != "cuda":
        return cache.max_bytes
    free = _free_for_us(engine.device)
    left_when_full = free - (cache.max_bytes - cache.bytes)
    if left_when_full < reserve:
        budget = max(0, cache.max_bytes - (reserve - left_when_full))
        log.warning("weight cache budget %.0f -> %.0f MiB: tasks added since start take GPU memory",
                    cache.max_bytes / 2**20, budget / 2**20)  # fmt: skip
        cache.resize(budget)
    return cache.max_bytes


def _cache_budget(settings: Settings, engine: Engine, max_batch_size: int) -> tuple[int, str]:
    """The weight cache's byte budget and how it was chosen."""
    if settings.cache_bytes != "auto":
        return settings.cache_bytes, "set"
    if engine.device.type == "cuda":
        free = gpu_headroom(engine, max_batch_size)
        return int(free * 0.8), f"auto: 80% of {free / 2**30:.1f} GiB free GPU memory after the largest batch"
    available = available_memory_bytes()
    return available // 2, f"auto: half of {available / 2**30:.1f} GiB available memory"


def build_services(
    settings: Settings,
    metrics: Metrics,
    device_thread: ThreadPoolExecutor,
    workers: int,
    management: ThreadPoolExecutor,
) -> Services:
    """Runs on ``device_thread``, like every other tensor operation of the server."""
    device = device_of(settings)
    started = time.perf_counter()
    backbone = load_backbone(settings.backbone, weights=settings.weights, seed=settings.seed)
    engine = Engine(
        backbone,
        device=device,
        dtype=parse_dtype(settings.dtype, device),
        channels_last=parse_layout(settings.layout, settings.backbone),
        mixed_path=settings.mixed_path,
        cpu_path=settings.cpu_path,
    )
    s3_cache = settings.s3_cache_dir or Path(tempfile.gettempdir()) / "piggyback-s3-cache"
    store = open_store(settings.store, cache_dir=s3_cache, cache_bytes=settings.s3_cache_bytes)
    registry = TaskRegistry(engine, store, removal_guard=settings.store_removal_guard)

    # At start only the headers are read and checked (in parallel: single-threaded torch in each,
    # so no second OpenMP pool); a task's file is read and checked in full at its first use, on
    # the "load-now" threads (not queued behind a background scan).
    def load_pool(threads: int, name: str) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,))

    load_threads = settings.load_threads or min(physical_cores(), 4)
    loading = time.perf_counter()
    loaders = [load_pool(load_threads, "piggyback-load"), load_pool(2, "piggyback-load-now")]
    first: str | None = None
    if settings.ready_after == "tasks":
        report = registry.sync(loaders[0])
        for name, reason in report.failed.items():
            log.error("skipped task %r: %s", name, reason)
        log.info("%d task(s) in %s, headers checked in %.1f s (backbone: %.1f s)", len(report.loaded),
                 settings.store, time.perf_counter() - loading, loading - started)  # fmt: skip
        candidates = registry.names()[:3]
        _release_freed_memory()  # what parsing the headers left in the threads' malloc arenas
    else:
        count = registry.start_background(loaders[0])
        log.info("checking %d task(s) of %s in the background (backbone: %.1f s)", count, settings.store,
                 loading - started)  # fmt: skip
        candidates = sorted(registry.store.snapshot())[:1]
    for name in settings.pinned:
        registry.ensure(name)  # pinned tasks loaded before ready
    for name in candidates:  # and one task for the warm-up
        registry.ensure(name)
        if name in engine.tasks:
            first = name
            break
    max_batch_size = settings.max_batch_size or (32 if device == "cuda" else 8)
    budget, how = _cache_budget(settings, engine, max_batch_size)
    engine.cache.resize(budget)
    if settings.task_cache_bytes == "auto":
        registry.max_loaded_bytes = max(512 * 2**20, budget // 8)
    else:
        registry.max_loaded_bytes = settings.task_cache_bytes
    gpu_reserve = 0
    if engine.device.type == "cuda" and settings.cache_bytes == "auto":
        gpu_reserve = _free_for_us(engine.device) - budget  # the 20% the budget leaves
    per_task = engine.weights_nbytes
    log.info("weight cache: %.0f MiB (%s): built weights of %s task(s) of %.1f MiB", budget / 2**20, how,
             budget // per_task if per_task else "any number of", per_task / 2**20)  # fmt: skip
    size = backbone.preprocessing.crop_size
    for name in settings.pinned:
        if name not in engine.tasks:
            log.warning("pinned task %r is not in the store; it is pinned when it is registered", name)
            engine.cache.pin(name)
            continue
        engine.pin(name)  # EngineError (start-up fails, one line) if it does not fit the budget
        engine.run(name, torch.zeros(1, 3, size, size))
        log.info("pinned task %r (built and warmed up)", name)
    # Warm-up: one batch through every code path the first request would take.
    with torch.inference_mode():
        engine.model(torch.zeros(1, 3, size, size, device=engine.device, dtype=engine.dtype))
    if engine.tasks and not settings.pinned:
        engine.run(first or next(iter(engine.tasks.values())), torch.zeros(1, 3, size, size))

    def on_batch(stats: BatchStats) -> None:
        metrics.batch_size.observe(stats.size)
        metrics.batch_tasks.observe(stats.tasks)
        metrics.compute_seconds.observe(stats.compute_s)
        for wait in stats.queue_waits_s:
            metrics.queue_seconds.observe(wait)

    # Automatic threads on a CPU with several workers: the batches in flight share the cores (a
    # batch that is all the work gets them all, others run single-threaded side by side; batcher.py).
    # Threads set by the operator stay fixed per worker.
    shared = device == "cpu" and settings.worker_threads is None and workers > 1
    policy = BatchPolicy(
        max_batch_size=max_batch_size,
        workers=workers,
        max_wait_s=settings.max_wait_ms / 1000,
        queue_size=settings.queue_size,
        timeout_s=settings.request_timeout_s,
        cores=workers * torch.get_num_threads() if shared else 0,  # this runs on a worker: its threads
        spread=settings.spread_batches and device == "cpu" and workers > 1,
    )
    batcher = Batcher(
        engine,
        policy,
        on_batch=on_batch,
        on_depth=metrics.queue_depth.set,
        executor=device_thread,
        on_oom=metrics.device_oom.inc,
    )
    # On a CPU the workers already use every core: decoding in more threads oversubscribes them,
    # and torch's OpenMP threads then wait on descheduled peers (measured with 64 clients on 2
    # cores: 10.7 img/s with 2 decode threads). Decoding on the worker threads, between batches,
    # is the plain loop's order. On a GPU, decoding in threads overlaps with the GPU's work.
    threads = settings.decode_threads if settings.decode_threads is not None else (4 if device == "cuda" else 0)
    if threads == 0:
        decoder = device_thread
    else:
        decoder = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="piggyback-decode")
    services = Services(
        settings,
        device_thread,
        management,
        backbone,
        engine,
        registry,
        batcher,
        decoder,
        torch.get_num_threads(),
        loaders,
    )
    services.gpu_reserve = gpu_reserve
    return services
