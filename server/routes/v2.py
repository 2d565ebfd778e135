"""The Open Inference Protocol (KServe v2) over REST, with Triton's binary tensor data,
classification and model configuration extensions: what Triton's, KServe's and Seldon's clients and
Triton's load generator, ``perf_analyzer``, speak.

Every task is a model; its version is the task's version. Inputs (send exactly one):

* ``image``: ``BYTES [N, 1]`` (or ``[N]``) of encoded images (JPEG, PNG, ...), as Triton's image
  examples send them; in the JSON form each element is base64;
* ``pixels``: ``FP32 [N, 3, H, W]``, already preprocessed the task's way (H = W = its crop size).

The model configuration (``GET .../config``) is Triton's JSON of ``ModelConfig``. Its
``max_batch_size`` is ``max_images_per_request``, the images one request may hold (the batches the
batcher forms across requests are bounded by the ``max_batch_size`` setting instead, which Triton's
config has no field for; ``dynamic_batching`` carries the batcher's ``max_wait_ms``). So every shape
in the metadata starts with the batch dimension ``-1`` and the configuration's ``dims`` leave it
out, as Triton's do. Both inputs are ``optional: true``: a request
leaves out the one it does not send. That is how perf_analyzer (``model_parser.cc``, its data
loader) gets its inputs: from the metadata, sending each input it has data for and refusing to
start without data for one that is not optional. So run it with ``--input-data FILE.json`` holding
one of the two, e.g. ``{"data": [{"image": {"b64": ...}}]}`` (base64 of the BYTES element: its
4-byte little-endian length, then the JPEG) or ``{"data": [{"pixels": {"b64": ...}}]}`` (base64
of the ``3*H*W`` little-endian floats); its default random data fills both inputs, which is refused.

Output ``logits``: ``FP32 [N, labels]``; with ``parameters.classification = K`` it is instead
``BYTES [N, K]`` of ``"score:index:label"``, best first, where the score is the softmax probability
(the ``score`` of ``/classify``). Binary data: a request whose ``Inference-Header-Content-Length``
header is set carries that many bytes of JSON and then the binary inputs in order (each input's
``parameters.binary_data_size``); outputs asked for with ``binary_data`` (or the request's
``binary_data_output``) come back the same way. ``parameters.timeout`` (microseconds, as in Triton)
shortens the request's deadline. Errors are ``{"error": "..."}`` with the statuses of the rest of the
API. Inference goes through the same batcher, queue bound, fairness and metrics as ``/classify``.
The models, the checks of a request and the output tensors are shared with gRPC (``server.oip``);
this module is REST's framing of them.

Spec: kserve/open-inference-protocol ``specification/protocol/inference_rest.md``; Triton's
``docs/protocol/extension_binary_data.md``, ``extension_classification.md`` and
``extension_model_configuration.md``; ``ModelConfig`` in triton-inference-server/common
``protobuf/model_config.proto``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from piggyback_core import LoadedTask, PiggybackError, __version__

from .. import oip
from ..deps import (
    ClassifyAuth,
    MetricsDep,
    OpsAuth,
    ServicesDep,
    SettingsDep,
    TaskName,
    check_alive,
    check_ready,
    error_headers,
    is_internal,
    observe,
    read_body,
    status_for,
)
from ..errors import BadRequestError
from ..metrics import Metrics
from ..services import Services
from ..settings import Settings

__all__ = ["EXTENSIONS", "error", "router"]

# Triton's names for the extensions served (over REST and gRPC alike)
EXTENSIONS = oip.EXTENSIONS
HEADER_LENGTH = "Inference-Header-Content-Length"

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])
models = APIRouter(dependencies=[ClassifyAuth])


def error(exc: PiggybackError) -> JSONResponse:
    """The protocol's error body, ``{"error": "..."}``, with the status the rest of the API uses."""
    status = status_for(exc)
    message = "internal error" if is_internal(status) else str(exc)
    return JSONResponse({"error": message}, status_code=status, headers=error_headers(exc))


# --- bodies ---------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    error: str


def v2_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class RequestInput(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


# --- server and models -----------------------------------------------------------------------------


@router.get(
    "", response_model=ServerMetadata, dependencies=[OpsAuth], responses=v2_errors(401), summary="Server metadata"
)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=oip.SERVER_NAME, version=__version__, extensions=EXTENSIONS)


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


@router.get(
    "/health/live", response_model=Live, dependencies=[OpsAuth], summary="Liveness", responses=v2_errors(401, 503)
)
async def live(request: Request) -> Live:
    check_alive(request)
    return Live(live=True)


@router.get(
    "/health/ready", response_model=Ready, dependencies=[OpsAuth], summary="Readiness", responses=v2_errors(401, 503)
)
async def ready(services: ServicesDep) -> Ready:
    check_ready(services)
    return Ready(ready=True)


Version = Annotated[str, Path(max_length=64, description="the task's version (GET /tasks/{task})")]


@models.get(
    "/models/{task}",
    response_model=oip.ModelMetadata,
    responses=v2_errors(401, 404, 422, 503),
    summary="Model metadata",
)
async def model_metadata(task: TaskName, services: ServicesDep) -> oip.ModelMetadata:
    return oip.metadata(services, await oip.model(services, task, None))


@models.get(
    "/models/{task}/versions/{version}",
    response_model=oip.ModelMetadata,
    responses=v2_errors(401, 404, 422, 503),
    summary="Model metadata of one version",
)
async def version_metadata(task: TaskName, version: Version, services: ServicesDep) -> oip.ModelMetadata:
    return oip.metadata(services, await oip.model(services, task, version))


@models.get(
    "/models/{task}/config",
    response_model=oip.ModelConfig,
    response_model_exclude_none=True,
    responses=v2_errors(401, 404, 422, 503),
    summary="Model configuration (Triton's model configuration extension)",
)
async def model_config(task: TaskName, services: ServicesDep, settings: SettingsDep) -> oip.ModelConfig:
    return oip.config(services, settings, await oip.model(services, task, None))


@models.get(
    "/models/{task}/versions/{version}/config",
    response_model=oip.ModelConfig,
    response_model_exclude_none=True,
    responses=v2_errors(401, 404, 422, 503),
    summary="Model configuration of one version",
)
async def version_config(
    task: TaskName, version: Version, services: ServicesDep, settings: SettingsDep
) -> oip.ModelConfig:
    return oip.config(services, settings, await oip.model(services, task, version))


@models.get(
    "/models/{task}/ready",
    response_model=ModelReady,
    responses=v2_errors(401, 404, 422, 503),
    summary="Model readiness",
)
async def model_ready(task: TaskName, services: ServicesDep) -> ModelReady:
    check_ready(services)
    return ModelReady(name=(await oip.model(services, task, None)).name, ready=True)


@models.get(
    "/models/{task}/versions/{version}/ready",
    response_model=ModelReady,
    responses=v2_errors(401, 404, 422, 503),
    summary="Version readiness",
)
async def version_ready(task: TaskName, version: Version, services: ServicesDep) -> ModelReady:
    check_ready(services)
    return ModelReady(name=(await oip.model(services, task, version)).name, ready=True)


# --- inference -------------------------------------------------------------------------------------


def _parse(header_length: str | None, body: bytes, size: int, limit: int) -> tuple[InferenceRequest, oip.Checked]:
    """An inference request's body, checked whole before anything is computed (off the event loop)."""
    req, binary = _split_body(header_length, body)
    raw = _binary_inputs(req, binary)
    inputs = [oip.InputTensor(t.name, t.datatype, t.shape, raw.get(t.name), t.data) for t in req.inputs]
    outputs = None if req.outputs is None else [oip.OutputRequest(o.name, o.parameters) for o in req.outputs]
    binary_output = bool(req.parameters.get("binary_data_output", False))
    checked = oip.check(inputs, req.parameters, outputs, size=size, limit=limit, binary_output=binary_output)
    return req, checked


def _split_body(length: str | None, body: bytes) -> tuple[InferenceRequest, bytes]:
    if length is not None:
        if not (length.isascii() and length.isdigit()) or int(length) > len(body):
            raise BadRequestError(f"{HEADER_LENGTH} is {length!r} for a body of {len(body)} bytes")
        header, binary = body[: int(length)], body[int(length) :]
    else:
        header, binary = body, b""
    try:
        return InferenceRequest.model_validate_json(header), binary
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
        raise BadRequestError(f"not an inference request: {where}") from None


def _binary_inputs(req: InferenceRequest, binary: bytes) -> dict[str, bytes]:
    """Each binary input's bytes, in the order of ``inputs``; every byte accounted for."""
    out, offset = {}, 0
    for tensor in req.inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise BadRequestError(f"input {tensor.name!r}: binary_data_size {size!r} overruns the binary data")
        out[tensor.name] = binary[offset : offset + size]
        offset += size
    if offset != len(binary):
        raise BadRequestError(f"{len(binary) - offset} bytes of binary data belong to no input")
    return out


_INFER_OK: dict[str, Any] = {
    "description": "the outputs: JSON, or JSON then binary tensor data (Inference-Header-Content-Length)",
    "content": {"application/json": {"schema": {"type": "object"}}, "application/octet-stream": {}},
}


@models.post(
    "/models/{task}/infer",
    responses={200: _INFER_OK, **v2_errors(401, 404, 413, 422, 503, 504)},
    summary="Inference (JSON, or binary tensor data with Inference-Header-Content-Length)",
)
async def infer(
    task: TaskName, request: Request, services: ServicesDep, settings: SettingsDep, metrics: MetricsDep
) -> Response:
    return await _infer(task, None, request, services, settings, metrics)


@models.post(
    "/models/{task}/versions/{version}/infer",
    responses={200: _INFER_OK, **v2_errors(401, 404, 413, 422, 503, 504)},
    summary="Inference on one version (404 if it is not the one loaded)",
)
async def infer_version(
    task: TaskName,
    version: Version,
    request: Request,
    services: ServicesDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> Response:
    return await _infer(task, version, request, services, settings, metrics)


async def _infer(
    task: str, version: str | None, request: Request, services: Services, settings: Settings, metrics: Metrics
) -> Response:
    async with observe(request, metrics, "v2-infer", task) as seen:
        loaded = await oip.model(services, task, version)
        seen.label = metrics.task_label(task)
        body = await read_body(request, settings.max_image_bytes + 64 * 1024, "inference request")
        # Parsing a JSON body of up to 20 MiB (a pixels tensor as numbers) takes long enough to stall
        # every other request: it runs on the decoding threads (the workers on a CPU), as decoding does.
        size = services.inference.input_size(loaded)
        req, checked = await asyncio.get_running_loop().run_in_executor(
            services.decoder, _parse, request.headers.get(HEADER_LENGTH), body, size, settings.max_images_per_request
        )
        results = await oip.infer(services, loaded, checked)
        seen.batch_size = max(r.batch_size for r in results)
        response = _response(req, loaded, oip.outputs(checked, results))
        seen.status = 200
        return response


def _response(req: InferenceRequest, task: LoadedTask, tensors: list[oip.OutputTensor]) -> Response:
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in tensors:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if tensor.binary:
            blobs.append(tensor.raw())
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = tensor.values()
        entries.append(entry)
    body: dict[str, Any] = {"model_name": task.name, "model_version": task.version, "outputs": entries}
    if req.id is not None:
        body["id"] = req.id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


router.include_router(models)
