"""Triton's model-repository extension over REST, as Triton's and KServe's clients call it:
``POST /v2/repository/index``, ``POST /v2/repository/models/{task}/load`` and ``/unload``
(``server.repository`` says what loading and unloading do).

* Bodies: the index takes ``{"ready": bool}`` or nothing (tritonclient sends nothing); load and
  unload take ``{"parameters": {...}}`` or nothing (KServe's agent and tritonclient send ``{}``).
  Load's ``config`` and ``file:...`` parameters (a configuration or files to load instead of the
  repository's) are refused: the store is the repository (``PUT /tasks/{task}`` adds to it).
  Unload's ``unload_dependents`` is accepted: a task has no dependents.
* Load and unload are task management: they need the management token, as ``PUT /tasks``. The
  index is a read of task names: it needs a token only where ``GET /tasks`` does (a classify token
  is set), where Triton's needs none.
* Load and unload answer 200 with an empty body. Errors are ``{"error": "..."}``; where Triton
  answers 400 for every failure, these have the statuses of the rest of the API: 404 not in the
  store, 409 trained for another backbone, 422 an invalid file, name or body, 507 the pinned
  weights would pass the cache budget, 401/403 the token, 503 the store cannot be reached.
* A model name with a version (``flowers/3``, ``flowers:3``) is refused with a message naming the
  task: a task serves one version, the store's, and Triton's load takes no version either.

Spec: triton-inference-server/server ``docs/protocol/extension_model_repository.md``.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, Field, StrictBool, ValidationError

from .. import oip
from ..deps import ManagementAuth, MetricsDep, ReadAuth, ServicesDep, counted, read_body
from ..errors import BadRequestError
from ..repository import task_name

__all__ = ["router"]

log = logging.getLogger("piggyback.server")

router = APIRouter(prefix="/v2/repository", tags=["Model repository (Triton's extension)"])

MAX_BODY = 64 * 1024
Body = TypeVar("Body", bound=BaseModel)


class RepositoryIndexRequest(BaseModel):
    ready: StrictBool = Field(False, description="only the models ready for inference")


class RepositoryModelRequest(BaseModel):
    parameters: dict[str, Any] = Field(default_factory=dict)


class RepositoryErrorResponse(BaseModel):
    error: str


class ModelIndexPublic(BaseModel):
    name: str
    version: str | None = Field(None, description="the task's version; absent while it is being read")
    state: str = Field(description="READY, LOADING or UNAVAILABLE (Triton's states)")
    reason: str = Field(description="why it is in that state; empty when READY")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": RepositoryErrorResponse} for status in statuses}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": schema}}}}


async def _parse(request: Request, model: type[Body], what: str) -> Body:
    raw = await read_body(request, MAX_BODY, what)
    try:
        return model.model_validate_json(raw if raw.strip() else b"{}")
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:3])
        raise BadRequestError(f"{what}: {where}") from None


ModelName = Annotated[str, Path(max_length=256, description="the task's name (no version)")]


@router.post(
    "/index",
    response_model=list[ModelIndexPublic],
    response_model_exclude_none=True,
    dependencies=[ReadAuth],
    responses=_errors(401, 413, 422, 503),
    openapi_extra=_body(RepositoryIndexRequest),
    summary="Every task of the store, loaded or not, with its state",
)
async def index(request: Request, services: ServicesDep) -> list[ModelIndexPublic]:
    body = await _parse(request, RepositoryIndexRequest, "index request")
    return [ModelIndexPublic(**vars(e)) for e in services.repository.index(ready_only=body.ready)]


@router.post(
    "/models/{name:path}/load",
    response_class=Response,
    dependencies=[ManagementAuth],
    responses={200: {"description": "loaded: empty body"}, **_errors(401, 403, 404, 409, 413, 422, 503, 507)},
    openapi_extra=_body(RepositoryModelRequest),
    summary="Load (or reload) a task: fetch it from the store, build and pin its weights",
)
async def load(name: ModelName, request: Request, services: ServicesDep, metrics: MetricsDep) -> Response:
    with counted(metrics, "load"):
        task = task_name(name)
        body = await _parse(request, RepositoryModelRequest, "load request")
        loaded = await oip.load(services, task, body.parameters)
    metrics.refresh_tasks(services.engine)
    log.info("task %r loaded (version %s): weights built and pinned", task, loaded.version)
    return Response(status_code=200)


@router.post(
    "/models/{name:path}/unload",
    response_class=Response,
    dependencies=[ManagementAuth],
    responses={200: {"description": "unloaded: empty body"}, **_errors(401, 403, 404, 413, 422, 503)},
    openapi_extra=_body(RepositoryModelRequest),
    summary="Unload a task: unpin and evict its built weights (explicit model control: it stops answering)",
)
async def unload(name: ModelName, request: Request, services: ServicesDep, metrics: MetricsDep) -> Response:
    with counted(metrics, "unload"):
        task = task_name(name)
        await _parse(request, RepositoryModelRequest, "unload request")  # unload_dependents: none to unload
        await oip.unload(services, task)
    log.info("task %r unloaded: weights unpinned and evicted", task)
    return Response(status_code=200)
