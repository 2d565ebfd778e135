"""The FastAPI application: ``create_app(settings)``.

The lifespan starts loading in the background (backbone, engine, store, every stored task, one
warm-up batch), so ``/healthz`` answers at once and ``/readyz`` turns 200 when loading is done. It
then polls the store for other replicas' changes every ``store_poll_s``. On shutdown it stops
admitting requests and drains the queue.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from piggyback_core import (
    TASK_NAME_PATTERN,
    Backbone,
    BackboneMismatchError,
    Engine,
    EngineError,
    FingerprintMismatchError,
    ImageDecodeError,
    ImageTooLargeError,
    InvalidTaskNameError,
    LoadedTask,
    PiggybackError,
    StoreError,
    TaskFileError,
    TaskNotFoundError,
    __version__,
    auto_workers,
    available_memory_bytes,
    decode_image,
    dtype_name,
    load_backbone,
    open_store,
    parse_dtype,
    parse_layout,
    physical_cores,
    predictions_from_logits,
    validate_task_name,
)

from .batcher import Batcher, BatchPolicy, BatchStats
from .errors import (
    AuthenticationError,
    BadRequestError,
    ClientDisconnectedError,
    DeadlineExceededError,
    DrainingError,
    ManagementDisabledError,
    NotReadyError,
    PayloadTooLargeError,
    QueueFullError,
    RequestTimeoutError,
    UnsupportedMediaTypeError,
)
from .metrics import Metrics
from .registry import TaskRegistry
from .schemas import (
    ClassifyResponse,
    ErrorResponse,
    HealthResponse,
    ReadyResponse,
    ResidencyPublic,
    TaskListResponse,
    TaskPublic,
    TaskSummaryPublic,
)
from .settings import Settings, get_settings
from .transport import Lifecycle, RequestGuard

__all__ = ["STATUS_BY_ERROR", "Services", "create_app"]

log = logging.getLogger("piggyback.server")
access_log = logging.getLogger("piggyback.access")

# Domain errors to HTTP statuses, looked up along the exception's MRO (most specific first).
STATUS_BY_ERROR: dict[type[PiggybackError], int] = {
    InvalidTaskNameError: 422,
    TaskNotFoundError: 404,
    FingerprintMismatchError: 409,
    BackboneMismatchError: 409,
    TaskFileError: 422,
    ImageTooLargeError: 413,
    ImageDecodeError: 422,
    PayloadTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    BadRequestError: 422,
    RequestTimeoutError: 408,
    ClientDisconnectedError: 499,
    AuthenticationError: 401,
    ManagementDisabledError: 403,
    QueueFullError: 503,
    NotReadyError: 503,
    DeadlineExceededError: 504,
    StoreError: 503,
    EngineError: 500,
    PiggybackError: 500,
}


def status_for(exc: PiggybackError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


@dataclass
class Services:
    settings: Settings
    device_thread: ThreadPoolExecutor
    backbone: Backbone
    engine: Engine
    registry: TaskRegistry
    batcher: Batcher
    decoder: ThreadPoolExecutor
    worker_threads: int
    # ready_after=backbone: the background loaders, and the threads that load a pending task at
    # once for a request that needs it (not queued behind the others)
    loaders: list[ThreadPoolExecutor] = field(default_factory=list)

    async def task(self, name: str) -> LoadedTask:
        """``name`` as the engine serves it; a task still loading in the background is loaded now."""
        validate_task_name(name)
        if self.registry.is_pending(name):
            await asyncio.get_running_loop().run_in_executor(self.loaders[-1], self.registry.ensure, name)
        return self.engine.get_task(name)

    def shutdown(self) -> None:
        for pool in self.loaders:
            pool.shutdown(wait=True, cancel_futures=True)
        self.decoder.shutdown(wait=False)


def _device(settings: Settings) -> str:
    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return settings.device


def _cache_budget(settings: Settings, engine: Engine, max_batch_size: int) -> tuple[int, str]:
    """The weight cache's byte budget and how it was chosen."""
    if settings.cache_bytes != "auto":
        return settings.cache_bytes, "set"
    if engine.device.type == "cuda":
        # after the backbone, the tasks and the activations of the largest batch (warmed up)
        size = engine.backbone.preprocessing.crop_size
        with torch.inference_mode():
            engine.model(torch.zeros(max_batch_size, 3, size, size, device=engine.device, dtype=engine.dtype))
        free, _ = torch.cuda.mem_get_info(engine.device)
        return int(free * 0.8), f"auto: 80% of {free / 2**30:.1f} GiB free GPU memory"
    available = available_memory_bytes()
    return available // 2, f"auto: half of {available / 2**30:.1f} GiB available memory"


def _build(settings: Settings, metrics: Metrics, device_thread: ThreadPoolExecutor, workers: int) -> Services:
    """Runs on ``device_thread``, like every other tensor operation of the server."""
    device = _device(settings)
    started = time.perf_counter()
    backbone = load_backbone(settings.backbone, weights=settings.weights, seed=settings.seed)
    engine = Engine(
        backbone,
        device=device,
        dtype=parse_dtype(settings.dtype, device),
        channels_last=parse_layout(settings.layout, settings.backbone),
        mixed_path=settings.mixed_path,
    )
    registry = TaskRegistry(engine, open_store(settings.store))

    # Reading and validating the files runs in parallel (single-threaded torch in each, so no
    # second OpenMP pool; the checksum and the read release the GIL); the engine takes the tasks
    # one by one.
    def load_pool(threads: int, name: str) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,))

    load_threads = settings.load_threads or min(physical_cores(), 4)
    loading = time.perf_counter()
    loaders = []
    first: str | None = None
    if settings.ready_after == "tasks":
        with load_pool(load_threads, "piggyback-load") as pool:
            report = registry.sync(pool)
        for name, reason in report.failed.items():
            log.error("skipped task %r: %s", name, reason)
        log.info("loaded %d task(s) from %s in %.1f s (backbone: %.1f s)", len(report.loaded), settings.store,
                 time.perf_counter() - loading, loading - started)  # fmt: skip
    else:
        loaders = [load_pool(load_threads, "piggyback-load"), load_pool(2, "piggyback-load-now")]
        count = registry.start_background(loaders[0])
        log.info("loading %d task(s) from %s in the background (backbone: %.1f s)", count, settings.store,
                 loading - started)  # fmt: skip
        for name in [*settings.pinned, *sorted(registry.store.snapshot())[:1]]:
            registry.ensure(name)  # pinned tasks, and one task for the warm-up, before ready
            first = first or (name if name in engine.tasks else None)
    max_batch_size = settings.max_batch_size or (32 if device == "cuda" else 8)
    budget, how = _cache_budget(settings, engine, max_batch_size)
    engine.cache.resize(budget)
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

    policy = BatchPolicy(
        max_batch_size=max_batch_size,
        workers=workers,
        max_wait_s=settings.max_wait_ms / 1000,
        queue_size=settings.queue_size,
        timeout_s=settings.request_timeout_s,
    )
    batcher = Batcher(engine, policy, on_batch=on_batch, on_depth=metrics.queue_depth.set, executor=device_thread)
    # On a CPU the workers already use every core: decoding in more threads oversubscribes them,
    # and torch's OpenMP threads then wait on descheduled peers (measured with 64 clients on 2
    # cores: 10.7 img/s with 2 decode threads). Decoding on the worker threads, between batches,
    # is the plain loop's order. On a GPU, decoding in threads overlaps with the GPU's work.
    threads = settings.decode_threads if settings.decode_threads is not None else (4 if device == "cuda" else 0)
    if threads == 0:
        decoder = device_thread
    else:
        decoder = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="piggyback-decode")
    return Services(
        settings, device_thread, backbone, engine, registry, batcher, decoder, torch.get_num_threads(), loaders
    )


def services_of(request: Request) -> Services:
    """The app's services once loaded and warmed up; NotReadyError (503) before."""
    if request.app.state.lifecycle.draining:
        raise DrainingError()
    services: Services | None = request.app.state.services
    if services is None:
        if request.app.state.startup_error is not None:
            raise NotReadyError(f"start-up failed: {request.app.state.startup_error}")
        raise NotReadyError()
    return services


ServicesDep = Annotated[Services, Depends(services_of)]
# The contract's name rule, in the OpenAPI schema too (clients and fuzzers see it); a name that
# breaks it is refused with 422 before any handler runs.
TaskName = Annotated[
    str, Path(pattern=f"^{TASK_NAME_PATTERN.pattern}$", description="task name: ^[a-z0-9][a-z0-9_-]{0,63}$")
]


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse} for s in statuses}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics(top_tasks=settings.metrics_top_tasks, tasks=settings.metric_task_names)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = None
        app.state.startup_error = None

        # Every torch operation of the process (loading, validating and registering tasks, the
        # batches) runs on this one thread. Measured: once a second thread has used torch's OpenMP
        # pool, every later ResNet-50 forward pass is ~60% slower on a 2-core CPU. Decoding
        # threads use PIL and numpy only.
        #
        # With several workers (settings.workers), each thread has its own intra-op threads
        # (torch.set_num_threads is per thread): independent single-threaded workers share the
        # backbone and the masks and never share an OpenMP pool.
        workers, threads = auto_workers(_device(settings), settings.workers, settings.worker_threads)
        device_thread = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="piggyback-device",
            initializer=torch.set_num_threads,
            initargs=(threads,),
        )
        store_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="piggyback-store", initializer=torch.set_num_threads, initargs=(1,)
        )
        metrics.workers.set(workers)
        metrics.worker_threads.set(threads)
        loop = asyncio.get_running_loop()

        async def start() -> None:
            try:
                services = await loop.run_in_executor(device_thread, _build, settings, metrics, device_thread, workers)
                await services.batcher.start()
                app.state.services = services
                _refresh_gauges(services)
                metrics.ready.set(1)
                engine = services.engine
                metrics.compute_info.labels(dtype_name(engine.dtype), engine.layout).set(1)
                metrics.watch_engine(engine)
                log.info("ready: %s on %s, %s, %s, %d worker(s) x %d thread(s)", services.backbone.arch,
                         engine.device, dtype_name(engine.dtype), engine.layout, workers, threads)  # fmt: skip
            except Exception as exc:
                app.state.startup_error = exc
                if isinstance(exc, PiggybackError | OSError):
                    log.error("start-up failed: %s", exc)  # a reason, not a bug: one line
                else:
                    log.exception("start-up failed: %s", exc)
                # The process must not stay half-alive (liveness green, everything else 503): the
                # runner (server.serving) exits non-zero; /healthz answers 503 meanwhile.
                on_fatal = getattr(app.state, "on_fatal", None)
                if on_fatal is not None:
                    on_fatal(exc)

        async def poll_store() -> None:
            while True:
                await asyncio.sleep(settings.store_poll_s)
                services = app.state.services
                if services is None:
                    continue
                try:
                    # Its own thread: listing 10,000 files takes 0.1-0.25 s, which a worker would
                    # lose every poll (single-threaded torch there: no second OpenMP pool).
                    report = await loop.run_in_executor(store_thread, services.registry.sync)
                except PiggybackError as exc:
                    log.error("store sync failed: %s", exc)
                    continue
                metrics.store_syncs.labels("loaded").inc(len(report.loaded))
                metrics.store_syncs.labels("removed").inc(len(report.removed))
                if report.loaded or report.removed:
                    log.info("store sync: loaded %s, removed %s", report.loaded, report.removed)
                    _refresh_gauges(services)

        async def prefill_cache() -> None:
            """After ready: build tasks' weights into the cache's free room, one task at a time on
            the workers (between batches), so that traffic finds them built instead of filling the
            cache one miss at a time. Evicts nothing; stops when the budget is full."""
            await starter
            services = app.state.services
            if services is None or not settings.prefill:
                return
            engine, built = services.engine, 0
            while services.registry.loading:  # ready_after=backbone: the tasks are still loading
                await asyncio.sleep(0.2)
            for name in sorted(engine.tasks, key=lambda n: hashlib.sha256(n.encode()).digest()):
                if engine.cache.free_bytes < engine.weights_nbytes:
                    break
                if await loop.run_in_executor(device_thread, engine.prefill, name):
                    built += 1
            log.info("weight cache prefilled: %d task(s), %.0f MiB", built, engine.cache.bytes / 2**20)

        starter = asyncio.create_task(start())
        prefiller = asyncio.create_task(prefill_cache())
        poller = asyncio.create_task(poll_store())
        try:
            yield
        finally:
            poller.cancel()
            prefiller.cancel()
            await starter
            services = app.state.services
            if services is not None:
                await services.batcher.stop(drain_timeout_s=settings.request_timeout_s)
                services.shutdown()
            store_thread.shutdown(wait=True)
            device_thread.shutdown(wait=True)

    def _refresh_gauges(services: Services) -> None:
        metrics.tasks_loaded.set(len(services.engine.tasks))
        metrics.mask_bytes.set(services.engine.resident_mask_bytes)

    app = FastAPI(
        title="piggyback-server",
        version=__version__,
        description="Many image classifiers served from one frozen backbone with 1-bit Piggyback masks.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle = Lifecycle()
    app.state.services = None
    app.state.startup_error = None
    app.add_middleware(RequestGuard, body_timeout_s=settings.body_timeout_s, lifecycle=lifecycle)

    @app.exception_handler(PiggybackError)
    async def domain_error(request: Request, exc: PiggybackError) -> JSONResponse:
        status = status_for(exc)
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFullError) else None
        if isinstance(exc, NotReadyError):
            headers = {"Retry-After": "5"}
        if isinstance(exc, RequestTimeoutError):
            headers = {"Connection": "close"}  # the rest of the body may never come: drop the connection
        if status >= 500 and status not in (503, 504):
            log.error("internal error on %s: %r", request.url.path, exc)
            return _error(status, "internal error")
        return _error(status, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'query')}: {e.get('msg')}" for e in exc.errors()]
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, "internal error")

    def _digest(secret: SecretStr | None) -> bytes | None:
        return None if secret is None else hashlib.sha256(secret.get_secret_value().encode()).digest()

    # Compared as SHA-256 digests: constant time and constant length, so a comparison reveals
    # neither the token nor its length. The configured tokens are hashed once, here.
    management_digest, classify_digest = _digest(settings.token), _digest(settings.classify_token)

    def require_bearer(request: Request, expected_digest: bytes) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise AuthenticationError("missing bearer token (Authorization: Bearer <token>)")
        if not hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), expected_digest):
            raise AuthenticationError("invalid bearer token")

    def management_auth(request: Request) -> None:
        if management_digest is not None:
            require_bearer(request, management_digest)
        elif not settings.allow_unauthenticated:
            raise ManagementDisabledError()

    def classify_auth(request: Request) -> None:
        if classify_digest is not None:
            require_bearer(request, classify_digest)

    async def read_body(request: Request, limit: int, what: str) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise PayloadTooLargeError(limit=limit, what=what)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(limit=limit, what=what)
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientDisconnectedError() from None
        return b"".join(chunks)

    async def image_bytes(request: Request) -> bytes:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type.startswith("image/"):
            return await read_body(request, settings.max_image_bytes, "image")
        if content_type != "multipart/form-data":
            raise UnsupportedMediaTypeError(
                f"content type {content_type or 'missing'!r} is not an image: send image/* or "
                "multipart/form-data with a field 'image'"
            )
        body = await read_body(request, settings.max_image_bytes + 64 * 1024, "upload")

        async def stream() -> AsyncGenerator[bytes, None]:
            yield body

        parser = MultiPartParser(
            Headers(raw=request.headers.raw), stream(), max_files=4, max_fields=16, max_part_size=1024 * 1024
        )
        try:
            try:
                form = await parser.parse()
            except MultiPartException as exc:
                raise BadRequestError(f"malformed multipart body: {exc.message}") from exc
            try:
                field = form.get("image")
                if field is None or isinstance(field, str):
                    raise BadRequestError("multipart body has no file field 'image'")
                data = await field.read()
            finally:
                await form.close()
        finally:
            # Starlette leaves the temp file of a part cut off by the end of the body open (it is
            # in no form field); found by tests/hardening. Close whatever the parser opened.
            for spooled in getattr(parser, "_files_to_close_on_error", ()):
                spooled.close()
        if len(data) > settings.max_image_bytes:
            raise PayloadTooLargeError(limit=settings.max_image_bytes, what="image")
        return data

    def _prepare(services: Services, task: LoadedTask, data: bytes) -> torch.Tensor:
        preprocessing = task.file.preprocessing or services.backbone.preprocessing
        image = decode_image(data, max_pixels=settings.max_image_pixels, draft_min_side=preprocessing.decode_min_side)
        return preprocessing(image)

    @app.post(
        "/classify/{task}",
        response_model=ClassifyResponse,
        dependencies=[Depends(classify_auth)],
        responses=_errors(401, 404, 413, 415, 422, 503, 504),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"image": {"type": "string", "format": "binary"}},
                            "required": ["image"],
                        }
                    },
                },
            }
        },
        summary="Classify one image with a task",
    )
    async def classify(
        task: TaskName,
        request: Request,
        services: ServicesDep,
        top_k: Annotated[int, Query(ge=1, le=1000, description="number of predictions")] = 5,
    ) -> ClassifyResponse:
        started = time.perf_counter()
        status, label, batch_size = 500, "_unknown", 0
        try:
            loaded = await services.task(task)
            label = metrics.task_label(task)
            data = await image_bytes(request)
            loop = asyncio.get_running_loop()
            services.batcher.expect()  # a batch closing now waits for this image (see batcher.py)
            try:
                tensor = await loop.run_in_executor(services.decoder, _prepare, services, loaded, data)
            finally:
                services.batcher.arrived()
            logits, batch_size = await services.batcher.submit(loaded, tensor)
            predictions = predictions_from_logits(logits, loaded.labels, top_k)
            status = 200
            return ClassifyResponse(
                task=task,
                version=loaded.version,
                predictions=[vars(p) for p in predictions],
                batch_size=batch_size,
            )
        except PiggybackError as exc:
            status = status_for(exc)
            raise
        finally:
            elapsed = time.perf_counter() - started
            metrics.requests.labels(label, str(status)).inc()
            if status == 200:
                metrics.request_seconds.labels(label).observe(elapsed)
            fields = {
                "task": task[:64],
                "status": status,
                "latency_ms": round(elapsed * 1000, 1),
                "batch_size": batch_size,
                "request_id": getattr(request.state, "request_id", None),
            }
            access_log.info("classify %s", " ".join(f"{k}={v}" for k, v in fields.items()), extra={"fields": fields})

    def _summary(task: LoadedTask) -> dict[str, Any]:
        return task.file.summary() | {"version": task.version}

    @app.get(
        "/tasks",
        response_model=TaskListResponse,
        responses=_errors(422, 503),
        summary="List registered tasks, a page at a time",
    )
    async def list_tasks(
        services: ServicesDep,
        limit: Annotated[int, Query(ge=1, le=1000, description="tasks per page")] = 100,
        after: Annotated[str | None, Query(max_length=64, description="the previous page's `next`")] = None,
    ) -> TaskListResponse:
        names = sorted(services.engine.tasks)
        start = bisect.bisect_right(names, after) if after is not None else 0
        page = names[start : start + limit]
        tasks = services.engine.tasks
        failed = dict.fromkeys(services.registry.failed, "cannot be loaded; see the server log")
        return TaskListResponse(
            tasks=[TaskSummaryPublic(**_summary(tasks[n])) for n in page if n in tasks],
            failed=failed,
            total=len(names),
            next=page[-1] if start + limit < len(names) else None,
        )

    def _public(services: Services, task: LoadedTask) -> TaskPublic:
        r = services.engine.residency(task.name)
        residency = ResidencyPublic(packed_bytes=r.packed_bytes, built_bytes=r.built_bytes, pinned=r.pinned,
                                    cache_hits=r.hits, cache_misses=r.misses)  # fmt: skip
        return TaskPublic(**_summary(task), residency=residency)

    @app.get("/tasks/{task}", response_model=TaskPublic, responses=_errors(404, 422, 503), summary="One task")
    async def get_task(task: TaskName, services: ServicesDep) -> TaskPublic:
        return _public(services, await services.task(task))

    @app.put(
        "/tasks/{task}",
        response_model=TaskPublic,
        status_code=201,
        dependencies=[Depends(management_auth)],
        responses={
            200: {"model": TaskPublic, "description": "replaced"},
            **_errors(401, 403, 409, 413, 422, 503),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
        summary="Register or replace a task (body: a task file)",
    )
    async def put_task(task: TaskName, request: Request, response: Response, services: ServicesDep) -> TaskPublic:
        validate_task_name(task)
        data = await read_body(request, settings.max_task_bytes, "task file")
        try:
            registration = await asyncio.get_running_loop().run_in_executor(
                services.device_thread, services.registry.register, task, data
            )
        except PiggybackError:
            metrics.registrations.labels("error").inc()
            raise
        metrics.registrations.labels("created" if registration.created else "replaced").inc()
        _refresh_gauges(services)
        response.status_code = 201 if registration.created else 200
        log.info("task %r %s (version %s)", task, "registered" if registration.created else "replaced",
                 registration.task.version)  # fmt: skip
        return _public(services, registration.task)

    @app.delete(
        "/tasks/{task}",
        status_code=204,
        dependencies=[Depends(management_auth)],
        responses=_errors(401, 403, 404, 422, 503),
        summary="Unregister a task (requests already admitted finish first)",
    )
    async def delete_task(task: TaskName, services: ServicesDep) -> Response:
        validate_task_name(task)
        await asyncio.get_running_loop().run_in_executor(services.device_thread, services.registry.delete, task)
        metrics.deletions.inc()
        _refresh_gauges(services)
        log.info("task %r deleted", task)
        return Response(status_code=204)

    @app.get("/healthz", response_model=HealthResponse, responses=_errors(503), summary="Liveness")
    async def healthz(request: Request) -> HealthResponse:
        if request.app.state.startup_error is not None:  # a failed start is not alive: restart me
            raise NotReadyError(f"start-up failed: {request.app.state.startup_error}")
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=ReadyResponse, responses=_errors(503), summary="Readiness")
    async def readyz(services: ServicesDep) -> ReadyResponse:
        return ReadyResponse(
            status="ready",
            backbone=services.backbone.arch,
            fingerprint=services.backbone.fingerprint,
            device=str(services.engine.device),
            dtype=dtype_name(services.engine.dtype),
            layout=services.engine.layout,
            mixed_path=services.engine.mixed_path,
            tasks=len(services.engine.tasks),
            tasks_loading=services.registry.loading,
            workers=services.batcher.policy.workers,
            worker_threads=services.worker_threads,
            cache_budget_bytes=services.engine.cache.max_bytes,
        )

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus() -> Response:
        services = app.state.services
        if services is not None:
            metrics.queue_depth.set(services.batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
