"""Task management: ``GET /tasks`` (paginated), ``GET /tasks/{task}``, ``PUT /tasks/{task}`` (register or
replace: the body is a task file) and ``DELETE /tasks/{task}``."""

from __future__ import annotations

import asyncio
import bisect
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from piggyback_core import LoadedTask, PiggybackError, validate_task_name

from ..deps import ManagementAuth, MetricsDep, ReadAuth, ServicesDep, SettingsDep, TaskName, errors, read_body
from ..schemas import ResidencyPublic, TaskListResponse, TaskPublic, TaskSummaryPublic
from ..services import Services

__all__ = ["router"]

log = logging.getLogger("piggyback.server")

router = APIRouter()


def _summary(task: LoadedTask) -> dict[str, Any]:
    return task.file.summary() | {"version": task.version}


def _public(services: Services, task: LoadedTask) -> TaskPublic:
    r = services.engine.residency(task.name)
    residency = ResidencyPublic(packed_bytes=r.packed_bytes, built_bytes=r.built_bytes, pinned=r.pinned,
                                cache_hits=r.hits, cache_misses=r.misses)  # fmt: skip
    return TaskPublic(**_summary(task), residency=residency)


@router.get(
    "/tasks",
    response_model=TaskListResponse,
    dependencies=[ReadAuth],
    responses=errors(401, 422, 503),
    summary="List registered tasks, a page at a time",
)
async def list_tasks(
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="tasks per page")] = 100,
    after: Annotated[str | None, Query(max_length=64, description="the previous page's `next`")] = None,
) -> TaskListResponse:
    registry = services.registry
    names = sorted(set(registry.names()) | set(services.engine.tasks))
    start = bisect.bisect_right(names, after) if after is not None else 0
    page = names[start : start + limit]
    failed = dict.fromkeys(registry.failed, "cannot be loaded; see the server log")
    # a loaded task's summary is at hand; another's is read from its header (off the event loop)
    summaries = await asyncio.get_running_loop().run_in_executor(
        services.loaders[-1], lambda: [registry.summary(n) for n in page]
    )
    return TaskListResponse(
        tasks=[TaskSummaryPublic(**s) for s in summaries if s is not None],
        failed=failed,
        total=len(names),
        next=page[-1] if start + limit < len(names) else None,
    )


@router.get(
    "/tasks/{task}",
    response_model=TaskPublic,
    dependencies=[ReadAuth],
    responses=errors(401, 404, 422, 503),
    summary="One task",
)
async def get_task(task: TaskName, services: ServicesDep) -> TaskPublic:
    return _public(services, await services.task(task, loaded_only=False))


@router.put(
    "/tasks/{task}",
    response_model=TaskPublic,
    status_code=201,
    dependencies=[ManagementAuth],
    responses={
        200: {"model": TaskPublic, "description": "replaced"},
        **errors(401, 403, 409, 413, 422, 503),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    summary="Register or replace a task (body: a task file)",
)
async def put_task(
    task: TaskName,
    request: Request,
    response: Response,
    services: ServicesDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> TaskPublic:
    validate_task_name(task)
    data = await read_body(request, settings.max_task_bytes, "task file")
    try:
        registration = await asyncio.get_running_loop().run_in_executor(
            services.management, services.registry.register, task, data
        )
    except PiggybackError:
        metrics.registrations.labels("error").inc()
        raise
    await asyncio.get_running_loop().run_in_executor(services.management, services.recheck_cache_budget)
    metrics.registrations.labels("created" if registration.created else "replaced").inc()
    metrics.refresh_tasks(services.engine)
    response.status_code = 201 if registration.created else 200
    log.info("task %r %s (version %s)", task, "registered" if registration.created else "replaced",
             registration.task.version)  # fmt: skip
    return _public(services, registration.task)


@router.delete(
    "/tasks/{task}",
    status_code=204,
    dependencies=[ManagementAuth],
    responses=errors(401, 403, 404, 422, 503),
    summary="Unregister a task (requests already admitted finish first)",
)
async def delete_task(task: TaskName, services: ServicesDep, metrics: MetricsDep) -> Response:
    validate_task_name(task)
    await asyncio.get_running_loop().run_in_executor(services.management, services.registry.delete, task)
    metrics.deletions.inc()
    metrics.refresh_tasks(services.engine)
    log.info("task %r deleted", task)
    return Response(status_code=204)
