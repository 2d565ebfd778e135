"""The FastAPI application: ``create_app(settings)`` assembles the routers (``server.routes``),
the error handlers and the lifespan.

The lifespan starts loading in the background (backbone, engine, store, every stored task, one
warm-up batch), so ``/healthz`` answers at once and ``/readyz`` turns 200 when loading is done. It
then polls the store for other replicas' changes every ``store_poll_s``. On shutdown it stops
admitting requests and drains the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import torch
from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from piggyback_core import PiggybackError, __version__, auto_workers, dtype_name

from .deps import STATUS_BY_ERROR, Auth, error_reply, error_response
from .metrics import Metrics
from .routes import classify, console, ops, repository, tasks, v2
from .services import Services, build_services, device_of
from .settings import Settings, get_settings
from .transport import BodyBudget, Lifecycle, RequestGuard

__all__ = ["STATUS_BY_ERROR", "Services", "create_app"]

log = logging.getLogger("piggyback.server")


def _grpc_module() -> ModuleType:
    """``server.grpc_server``, imported only when the gRPC port is on: grpcio and tritonclient's
    stubs are an extra."""
    try:
        return importlib.import_module(".grpc_server", __package__)
    except ImportError as exc:
        raise PiggybackError(
            f"grpc_port is set but gRPC support is not installed ({exc}): pip install 'piggyback-server[grpc]' "
            "(grpcio and tritonclient[grpc]), or leave grpc_port at 0"
        ) from None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics(top_tasks=settings.metrics_top_tasks, tasks=settings.metric_task_names)
    grpc_module = _grpc_module() if settings.grpc_port else None

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
        workers, threads = auto_workers(device_of(settings), settings.workers, settings.worker_threads)
        device_thread = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="piggyback-device",
            initializer=torch.set_num_threads,
            initargs=(threads,),
        )
        # Task management (uploads, deletions, store polls: read, hash, validate, write, move to
        # the device) runs on its own thread, single-threaded in torch (no second OpenMP pool), so
        # an inference never waits behind an upload: only the final swap touches the engine.
        management = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="piggyback-manage", initializer=torch.set_num_threads, initargs=(1,)
        )
        metrics.workers.set(workers)
        metrics.worker_threads.set(threads)
        loop = asyncio.get_running_loop()

        async def start() -> None:
            if app.state.startup_error is not None:  # the gRPC port could not be had: nothing to load
                return
            try:
                services = await loop.run_in_executor(
                    device_thread, build_services, settings, metrics, device_thread, workers, management
                )
                await services.batcher.start()
                app.state.services = services
                metrics.refresh_tasks(services.engine)
                metrics.store_failed_tasks.set(len(services.registry.failed))
                metrics.ready.set(1)
                engine = services.engine
                metrics.compute_info.labels(dtype_name(engine.dtype), engine.layout).set(1)
                metrics.watch_engine(engine)
                log.info("ready: %s on %s, %s, %s, %s path, %d worker(s) x %d thread(s)", services.backbone.arch,
                         engine.device, dtype_name(engine.dtype), engine.layout, engine.cpu_path if
                         engine.device.type == "cpu" else "cuda", workers, threads)  # fmt: skip
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
            """Picks up other replicas' changes. Survives anything: a poll that fails is logged,
            counted and shown on /readyz, and the next one runs as planned."""
            while True:
                await asyncio.sleep(settings.store_poll_s)
                services = app.state.services
                if services is None:
                    continue
                health = services.store_health
                try:
                    # Its own thread: listing 10,000 files takes 0.1-0.25 s, which a worker would
                    # lose every poll (single-threaded torch there: no second OpenMP pool).
                    report = await loop.run_in_executor(management, services.registry.sync)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if isinstance(exc, PiggybackError):
                        log.error("store sync failed: %s", exc)
                    else:
                        log.exception("store sync failed: %s", exc)
                    health.last_error, health.last_error_at = f"{type(exc).__name__}: {exc}", time.time()
                    metrics.store_sync_errors.inc()
                    continue
                health.last_success, health.last_error, health.last_error_at = time.time(), None, None
                health.held_removals = len(report.held)
                metrics.store_sync_success.set(health.last_success)
                metrics.store_held_removals.set(len(report.held))
                metrics.store_failed_tasks.set(len(services.registry.failed))
                metrics.store_syncs.labels("loaded").inc(len(report.loaded))
                metrics.store_syncs.labels("removed").inc(len(report.removed))
                metrics.store_syncs.labels("failed").inc(len(report.failed))
                if report.loaded or report.removed:
                    await loop.run_in_executor(management, services.recheck_cache_budget)
                    log.info("store sync: loaded %s, removed %s", report.loaded, report.removed)
                    metrics.refresh_tasks(services.engine)

        async def prefill_cache() -> None:
            """After ready: build tasks' weights into the cache's free room, one task at a time on
            the workers (between batches), so that traffic finds them built instead of filling the
            cache one miss at a time. Evicts nothing; stops when the budget is full."""
            await starter
            services = app.state.services
            if services is None or not settings.prefill or services.repository.explicit:
                return  # explicit: the loaded tasks are pinned (built) already, the others not served
            engine, registry, built = services.engine, services.registry, 0
            while registry.loading:  # ready_after=backbone: the headers are still being checked
                await asyncio.sleep(0.2)
            await loop.run_in_executor(management, services.recheck_cache_budget)  # their masks took memory
            for name in sorted(registry.names(), key=lambda n: hashlib.sha256(n.encode()).digest()):
                if engine.cache.free_bytes < engine.weights_nbytes:
                    break
                if name not in engine.tasks:  # loaded for it, as far as loaded tasks have room
                    if not registry.has_room():
                        break
                    await loop.run_in_executor(services.loaders[0], registry.ensure, name)
                if await loop.run_in_executor(device_thread, engine.prefill, name):
                    built += 1
            log.info("weight cache prefilled: %d task(s), %.0f MiB", built, engine.cache.bytes / 2**20)

        # The gRPC port, like the HTTP one, answers while the backbone loads (ServerReady: false)
        grpc_server = None
        if grpc_module is not None:
            try:
                grpc_server = await grpc_module.start_grpc(app.state, settings)
                log.info("listening for gRPC on %s", grpc_module.address(settings.host, settings.grpc_port))
            except PiggybackError as exc:
                app.state.startup_error = exc
                log.error("start-up failed: %s", exc)
                on_fatal = getattr(app.state, "on_fatal", None)
                if on_fatal is not None:
                    on_fatal(exc)
        starter = asyncio.create_task(start())
        prefiller = asyncio.create_task(prefill_cache())
        poller = asyncio.create_task(poll_store())
        try:
            yield
        finally:
            poller.cancel()
            prefiller.cancel()
            await starter
            if grpc_server is not None:  # calls in flight finish first (the batcher still runs)
                await grpc_server.stop(grace=settings.request_timeout_s)
            services = app.state.services
            if services is not None:
                await services.batcher.stop(drain_timeout_s=settings.request_timeout_s)
                services.shutdown()
            management.shutdown(wait=True)
            device_thread.shutdown(wait=True)

    # /docs and /redoc from the assets that fastapi-offline ships (no CDN: works air-gapped)
    app = FastAPIOffline(
        title="piggyback-server",
        version=__version__,
        description="Many image classifiers served from one frozen backbone with 1-bit Piggyback masks.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.auth = Auth.from_settings(settings)
    app.state.lifecycle = lifecycle = Lifecycle()
    app.state.services = None
    app.state.startup_error = None
    app.state.body_budget = body_budget = BodyBudget(settings.max_body_bytes_in_flight)
    metrics.watch_body_budget(body_budget)
    app.add_middleware(
        RequestGuard, body_timeout_s=settings.body_timeout_s, lifecycle=lifecycle, body_budget=body_budget
    )

    @app.exception_handler(PiggybackError)
    async def domain_error(request: Request, exc: PiggybackError) -> JSONResponse:
        return error_reply(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'query')}: {e.get('msg')}" for e in exc.errors()]
        if request.url.path.startswith("/v2"):
            return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)
        return error_response(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(HTTPException)
    async def routing_error(request: Request, exc: HTTPException) -> Response:
        """No route (404) or no such method (405, with ``Allow``): under /v2 in the protocol's body,
        which Triton's clients read; elsewhere FastAPI's ``{"detail": ...}``."""
        if request.url.path.startswith("/v2"):
            return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        if request.url.path.startswith("/v2"):
            return JSONResponse({"error": "internal error"}, status_code=500)
        return error_response(500, "internal error")

    for module in (classify, tasks, ops, v2, repository, console):
        app.include_router(module.router)
    app.mount("/console", console.ConsoleFiles(), name="console")
    return app
