"""Operations: ``GET /healthz`` (liveness), ``GET /readyz`` (readiness) and ``GET /metrics``
(Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from piggyback_core import dtype_name

from ..deps import MetricsDep, OpsAuth, ServicesDep, check_alive, check_ready, errors
from ..schemas import HealthResponse, ReadyResponse, StoreSyncPublic

__all__ = ["router"]

router = APIRouter(dependencies=[OpsAuth])


@router.get("/healthz", response_model=HealthResponse, responses=errors(401, 503), summary="Liveness")
async def healthz(request: Request) -> HealthResponse:
    check_alive(request)  # a failed start or a lost device is not alive: restart me
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadyResponse, responses=errors(401, 503), summary="Readiness")
async def readyz(services: ServicesDep) -> ReadyResponse:
    check_ready(services)
    engine, health = services.engine, services.store_health
    return ReadyResponse(
        status="ready",
        backbone=services.backbone.arch,
        fingerprint=services.backbone.fingerprint,
        device=str(engine.device),
        dtype=dtype_name(engine.dtype),
        layout=engine.layout,
        mixed_path=engine.mixed_path,
        cpu_path=engine.cpu_path,
        tasks=len(services.registry),
        tasks_loaded=len(engine.tasks),
        tasks_loading=services.registry.loading,
        workers=services.batcher.policy.workers,
        worker_threads=services.worker_threads,
        cache_budget_bytes=engine.cache.max_bytes,
        tasks_failed=len(services.registry.failed),
        store=StoreSyncPublic(
            last_success_unix_s=health.last_success,
            last_error=health.last_error,
            last_error_unix_s=health.last_error_at,
            held_removals=health.held_removals,
        ),
    )


@router.get("/metrics", response_class=PlainTextResponse, responses=errors(401), summary="Prometheus metrics")
async def prometheus(request: Request, metrics: MetricsDep) -> Response:
    services = request.app.state.services
    if services is not None:
        metrics.queue_depth.set(services.batcher.depth)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
