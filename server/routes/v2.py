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

Spec: kserve/open-inference-protocol ``specification/protocol/inference_rest.md``; Triton's
``docs/protocol/extension_binary_data.md``, ``extension_classification.md`` and
``extension_model_configuration.md``; ``ModelConfig`` in triton-inference-server/common
``protobuf/model_config.proto``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from piggyback_core import LoadedTask, PiggybackError, Prediction, __version__

from ..deps import (
    ClassifyAuth,
    MetricsDep,
    OpsAuth,
    ServicesDep,
    SettingsDep,
    TaskName,
    check_alive,
    error_headers,
    is_internal,
    observe,
    read_body,
    status_for,
)
from ..errors import BadRequestError, VersionNotFoundError
from ..inference import ImageResult
from ..metrics import Metrics
from ..services import Services
from ..settings import Settings

__all__ = ["EXTENSIONS", "error", "router"]

# Triton's names for the extensions implemented here
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository"]
HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUT = "logits"

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


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InputConfig(BaseModel):
    """An input of Triton's ``ModelConfig``: ``dims`` without the batch dimension."""

    name: str
    data_type: str
    format: str = "FORMAT_NONE"
    dims: list[int]
    reshape: dict[str, list[int]] | None = None
    is_shape_tensor: bool = False
    allow_ragged_batch: bool = False
    optional: bool = False


class OutputConfig(BaseModel):
    name: str
    data_type: str
    dims: list[int]
    label_filename: str = ""
    is_shape_tensor: bool = False


class ModelConfig(BaseModel):
    """Triton's ``ModelConfig`` as its config endpoint prints it (field names as in the proto)."""

    name: str
    platform: str
    backend: str
    version_policy: dict[str, Any]
    max_batch_size: int
    input: list[InputConfig]
    output: list[OutputConfig]
    dynamic_batching: dict[str, Any]
    instance_group: list[dict[str, Any]]


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
    return ServerMetadata(name="piggyback-server", version=__version__, extensions=EXTENSIONS)


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
    return Ready(ready=True)


Version = Annotated[str, Path(max_length=64, description="the task's version (GET /tasks/{task})")]


async def _model(services: Services, task: str, version: str | None) -> LoadedTask:
    loaded = await services.task(task)
    if version is not None and version != loaded.version:
        raise VersionNotFoundError(task=task, version=version, served=loaded.version)
    return loaded


def _metadata(services: Services, task: LoadedTask) -> ModelMetadata:
    size = services.inference.input_size(task)
    return ModelMetadata(
        name=task.name,
        versions=[task.version],
        platform=f"piggyback_{services.backbone.arch}",
        inputs=[
            TensorMetadata(name="image", datatype="BYTES", shape=[-1, 1]),
            TensorMetadata(name="pixels", datatype="FP32", shape=[-1, 3, size, size]),
        ],
        outputs=[TensorMetadata(name=OUTPUT, datatype="FP32", shape=[-1, len(task.labels)])],
    )


@models.get(
    "/models/{task}", response_model=ModelMetadata, responses=v2_errors(401, 404, 422, 503), summary="Model metadata"
)
async def model_metadata(task: TaskName, services: ServicesDep) -> ModelMetadata:
    return _metadata(services, await _model(services, task, None))


@models.get(
    "/models/{task}/versions/{version}",
    response_model=ModelMetadata,
    responses=v2_errors(401, 404, 422, 503),
    summary="Model metadata of one version",
)
async def version_metadata(task: TaskName, version: Version, services: ServicesDep) -> ModelMetadata:
    return _metadata(services, await _model(services, task, version))


# Triton's names for the metadata's datatypes in a model configuration
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}


def _config(services: Services, settings: Settings, task: LoadedTask) -> ModelConfig:
    """The configuration Triton would print for this model, derived from the metadata so the two
    cannot disagree: each shape's batch dimension dropped, both inputs optional (send one)."""
    meta = _metadata(services, task)
    inputs = [
        InputConfig(name=t.name, data_type=CONFIG_TYPES[t.datatype], dims=t.shape[1:], optional=True)
        for t in meta.inputs
    ]
    by_name = {t.name: t for t in inputs}
    by_name["image"].reshape = {"shape": []}  # the model sees one element, an encoded image, per item
    by_name["pixels"].format = "FORMAT_NCHW"
    policy, device = services.batcher.policy, services.engine.device
    return ModelConfig(
        name=meta.name,
        platform=meta.platform,
        backend="piggyback",
        version_policy={"latest": {"num_versions": 1}},
        max_batch_size=settings.max_images_per_request,
        input=inputs,
        output=[OutputConfig(name=t.name, data_type=CONFIG_TYPES[t.datatype], dims=t.shape[1:]) for t in meta.outputs],
        dynamic_batching={
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": round(policy.max_wait_s * 1e6),
            "preserve_ordering": False,
        },
        instance_group=[
            {
                "name": f"{meta.name}_0",
                "kind": "KIND_GPU" if device.type == "cuda" else "KIND_CPU",
                "count": policy.workers,
                "gpus": [device.index or 0] if device.type == "cuda" else [],
            }
        ],
    )


@models.get(
    "/models/{task}/config",
    response_model=ModelConfig,
    response_model_exclude_none=True,
    responses=v2_errors(401, 404, 422, 503),
    summary="Model configuration (Triton's model configuration extension)",
)
async def model_config(task: TaskName, services: ServicesDep, settings: SettingsDep) -> ModelConfig:
    return _config(services, settings, await _model(services, task, None))


@models.get(
    "/models/{task}/versions/{version}/config",
    response_model=ModelConfig,
    response_model_exclude_none=True,
    responses=v2_errors(401, 404, 422, 503),
    summary="Model configuration of one version",
)
async def version_config(task: TaskName, version: Version, services: ServicesDep, settings: SettingsDep) -> ModelConfig:
    return _config(services, settings, await _model(services, task, version))


@models.get(
    "/models/{task}/ready",
    response_model=ModelReady,
    responses=v2_errors(401, 404, 422, 503),
    summary="Model readiness",
)
async def model_ready(task: TaskName, services: ServicesDep) -> ModelReady:
    return ModelReady(name=(await _model(services, task, None)).name, ready=True)


@models.get(
    "/models/{task}/versions/{version}/ready",
    response_model=ModelReady,
    responses=v2_errors(401, 404, 422, 503),
    summary="Version readiness",
)
async def version_ready(task: TaskName, version: Version, services: ServicesDep) -> ModelReady:
    return ModelReady(name=(await _model(services, task, version)).name, ready=True)


# --- inference -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parsed:
    request: InferenceRequest
    requested: list[tuple[int | None, bool]]
    timeout_s: float | None
    inputs: list[bytes] | np.ndarray  # encoded images, or pixels float32 [N, 3, H, W]


def _parse(header_length: str | None, body: bytes, size: int, limit: int) -> _Parsed:
    """An inference request's body, checked whole before anything is computed (off the event loop)."""
    req, binary = _split_body(header_length, body)
    raw = _binary_inputs(req, binary)
    if len(req.inputs) != 1 or req.inputs[0].name not in ("image", "pixels"):
        names = [t.name for t in req.inputs]
        raise BadRequestError(
            f"inputs {names}: send exactly one input, 'image' (BYTES) or 'pixels' (FP32); both are optional"
        )
    tensor = req.inputs[0]
    expected = {"image": "BYTES", "pixels": "FP32"}[tensor.name]
    if tensor.datatype != expected:
        raise BadRequestError(f"input {tensor.name!r} is {expected}, not {tensor.datatype}")
    if tensor.name not in raw and tensor.data is None:
        raise BadRequestError(f"input {tensor.name!r} has no data")
    timeout = req.parameters.get("timeout")
    if timeout is not None and (not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0):
        raise BadRequestError(f"parameters.timeout must be a positive number of microseconds, not {timeout!r}")
    timeout_s = None if timeout is None else timeout / 1e6
    requested = _requested(req)
    if tensor.name == "image":
        inputs: list[bytes] | np.ndarray = _images(tensor, raw.get("image"), limit)
    else:
        inputs = _pixels(tensor, raw.get("pixels"), size, limit)
    return _Parsed(req, requested, timeout_s, inputs)


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


def _flat(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    return [x for item in data for x in _flat(item)]


def _images(tensor: RequestInput, raw: bytes | None, limit: int) -> list[bytes]:
    """A BYTES input: 4-byte little-endian lengths and bytes (binary), or base64 strings (JSON)."""
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise BadRequestError(f"input 'image' has shape {tensor.shape}; expected [N] or [N, 1] of encoded images")
    n = tensor.shape[0]
    images: list[bytes] = []
    if raw is not None:
        offset = 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise BadRequestError("input 'image': a truncated BYTES element length")
            (size,) = struct.unpack_from("<I", raw, offset)
            if offset + 4 + size > len(raw):
                raise BadRequestError("input 'image': a BYTES element overruns the binary data")
            images.append(raw[offset + 4 : offset + 4 + size])
            offset += 4 + size
    else:
        for item in _flat(tensor.data):
            if not isinstance(item, str):
                raise BadRequestError("input 'image': in JSON, each element is a base64 string of an encoded image")
            try:
                images.append(base64.b64decode(item, validate=True))
            except binascii.Error:
                raise BadRequestError("input 'image': an element is not base64") from None
    if len(images) != n:
        raise BadRequestError(f"input 'image' has shape {tensor.shape} but holds {len(images)} elements")
    if not 1 <= n <= limit:
        raise BadRequestError(f"{n} images in one request; from 1 to {limit}")
    return images


def _pixels(tensor: RequestInput, raw: bytes | None, size: int, limit: int) -> np.ndarray:
    """An FP32 input ``[N, 3, size, size]``: little-endian floats (binary) or numbers (JSON)."""
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != [3, size, size]:
        raise BadRequestError(f"input 'pixels' has shape {shape}; this task takes [N, 3, {size}, {size}]")
    if not 1 <= shape[0] <= limit:
        raise BadRequestError(f"{shape[0]} images in one request; from 1 to {limit}")
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * 4:
            raise BadRequestError(f"input 'pixels' has {len(raw)} bytes; shape {shape} of FP32 takes {count * 4}")
        array = np.frombuffer(raw, dtype="<f4")
    else:
        values = _flat(tensor.data)
        if len(values) != count or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise BadRequestError(f"input 'pixels' must hold {count} numbers for shape {shape}")
        array = np.asarray(values, dtype=np.float32)
    pixels = array.astype(np.float32).reshape(shape)
    if not np.isfinite(pixels).all():
        raise BadRequestError("input 'pixels' holds non-finite values")
    return pixels


def _classes(predictions: list[Prediction]) -> list[str]:
    """The classification extension's strings, from the predictions ``/classify`` gives."""
    return [f"{p.score!r}:{p.index}:{p.label}" for p in predictions]


def _requested(req: InferenceRequest) -> list[tuple[int | None, bool]]:
    """Each requested output as (classification K or None, binary), checked before any compute."""
    all_binary = bool(req.parameters.get("binary_data_output", False))
    out = []
    for output in req.outputs if req.outputs is not None else [RequestOutput(name=OUTPUT)]:
        if output.name != OUTPUT:
            raise BadRequestError(f"unknown output {output.name!r}; this model has {OUTPUT!r}")
        k = output.parameters.get("classification")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise BadRequestError(f"output {OUTPUT!r}: classification must be a positive integer, not {k!r}")
        out.append((k, bool(output.parameters.get("binary_data", all_binary))))
    return out


_INFER_OK: dict[str, Any] = {
    "description": "the outputs: JSON, or JSON then binary tensor data (Inference-Header-Content-Length)",
    "content": {"application/json": {"schema": {"type": "object"}}, "application/octet-stream": {}},
}


def _serialize_bytes(items: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in items))


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
        loaded = await _model(services, task, version)
        seen.label = metrics.task_label(task)
        body = await read_body(request, settings.max_image_bytes + 64 * 1024, "inference request")
        # Parsing a JSON body of up to 20 MiB (a pixels tensor as numbers) takes long enough to stall
        # every other request: it runs on the decoding threads (the workers on a CPU), as decoding does.
        size = services.inference.input_size(loaded)
        parsed = await asyncio.get_running_loop().run_in_executor(
            services.decoder, _parse, request.headers.get(HEADER_LENGTH), body, size, settings.max_images_per_request
        )
        top_k = max((k or 0 for k, _ in parsed.requested), default=0)  # the classification extension's K
        if isinstance(parsed.inputs, list):
            results = await services.inference.classify(loaded, parsed.inputs, top_k=top_k, timeout_s=parsed.timeout_s)
        else:
            results = await services.inference.classify_pixels(
                loaded, parsed.inputs, top_k=top_k, timeout_s=parsed.timeout_s
            )
        seen.batch_size = max(r.batch_size for r in results)
        response = _response(parsed.request, parsed.requested, loaded, results)
        seen.status = 200
        return response


def _response(
    req: InferenceRequest, requested: list[tuple[int | None, bool]], task: LoadedTask, results: list[ImageResult]
) -> Response:
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for k, binary in requested:
        entry: dict[str, Any] = {"name": OUTPUT}
        if k is not None:
            rows = [_classes(r.predictions[:k]) for r in results]
            flat = [s for row in rows for s in row]
            entry |= {"datatype": "BYTES", "shape": [len(rows), len(rows[0])]}
            blob, data = (_serialize_bytes(flat), None) if binary else (None, flat)
        else:
            array = np.stack([r.logits for r in results])
            entry |= {"datatype": "FP32", "shape": list(array.shape)}
            blob, data = (array.astype("<f4").tobytes(), None) if binary else (None, array.reshape(-1).tolist())
        if blob is not None:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = data
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
