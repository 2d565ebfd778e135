"""The Open Inference Protocol (KServe v2) without its transport: what REST (``routes/v2.py``) and
gRPC (``grpc_server.py``) share, so the two cannot disagree.

* **Models**: every task is a model, its version the task's version (:func:`model`); its metadata
  (:func:`metadata`) and Triton's model configuration (:func:`config`).
* **Requests**: each transport turns its request into :class:`InputTensor` and
  :class:`OutputRequest` lists and calls :func:`check`, which validates the whole request before
  anything is computed (exactly one input, ``image`` BYTES ``[N]``/``[N, 1]`` or ``pixels`` FP32
  ``[N, 3, H, W]``; 1 to ``max_images_per_request`` images; the classification extension's K; the
  ``timeout`` parameter in microseconds) and raises BadRequestError naming what is wrong.
* **Inference**: :func:`infer` runs a checked request through the one inference service (decode,
  batcher, compute, postprocess) and :func:`outputs` shapes the results into the output tensors,
  ``logits`` FP32 ``[N, labels]`` or, with the classification extension, BYTES ``[N, K]`` of
  ``"score:index:label"``, best first (the score is the softmax probability, as ``/classify``'s).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel

from piggyback_core import LoadedTask, Prediction

from .errors import BadRequestError, VersionNotFoundError
from .inference import ImageResult
from .repository import check_load_parameters
from .services import Services
from .settings import Settings

__all__ = [
    "CONFIG_TYPES",
    "EXTENSIONS",
    "INPUTS",
    "OUTPUT",
    "SERVER_NAME",
    "Checked",
    "InputTensor",
    "ModelConfig",
    "ModelMetadata",
    "OutputRequest",
    "OutputTensor",
    "TensorMetadata",
    "check",
    "config",
    "infer",
    "metadata",
    "model",
    "outputs",
]

SERVER_NAME = "piggyback-server"
# Triton's names for the extensions implemented (binary tensor data: REST's; gRPC is binary anyway)
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository"]
INPUTS = {"image": "BYTES", "pixels": "FP32"}  # send exactly one; both optional
OUTPUT = "logits"
# Triton's names for the metadata's datatypes in a model configuration
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}


# --- models ----------------------------------------------------------------------------------------


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


async def model(services: Services, task: str, version: str | None) -> LoadedTask:
    """The task serving as model ``task``; VersionNotFoundError for a version it does not serve."""
    loaded = await services.task(task)
    if version and version != loaded.version:
        raise VersionNotFoundError(task=task, version=version, served=loaded.version)
    return loaded


async def load(services: Services, task: str, parameters: Iterable[str]) -> LoadedTask:
    """The repository extension's load, for REST and gRPC: ``task`` (a name already checked)
    fetched from the store, its weights built and pinned, on the management thread; the cache's
    budget checked again (the task's masks took memory) and the task gauges refreshed."""
    check_load_parameters(task, parameters)
    loop = asyncio.get_running_loop()
    loaded = await loop.run_in_executor(services.management, services.repository.load, task)
    await loop.run_in_executor(services.management, services.recheck_cache_budget)
    return loaded


async def unload(services: Services, task: str) -> None:
    """The repository extension's unload, for REST and gRPC: ``task``'s weights unpinned and evicted."""
    await asyncio.get_running_loop().run_in_executor(services.management, services.repository.unload, task)


def metadata(services: Services, task: LoadedTask) -> ModelMetadata:
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


def config(services: Services, settings: Settings, task: LoadedTask) -> ModelConfig:
    """The configuration Triton would print for this model, derived from the metadata so the two
    cannot disagree: each shape's batch dimension dropped, both inputs optional (send one).

    Its ``max_batch_size`` is ``max_images_per_request``, the images one request may hold (the
    batches the batcher forms across requests are bounded by the ``max_batch_size`` setting, which
    Triton's config has no field for; ``dynamic_batching`` carries the batcher's wait)."""
    meta = metadata(services, task)
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


# --- requests --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputTensor:
    """An input as a transport received it: its bytes (``raw``: REST's binary tensor data, gRPC's
    ``raw_input_contents``; little-endian, a BYTES element as a 4-byte length and its bytes) or its
    values (``data``: REST's JSON, base64 strings for BYTES; gRPC's typed contents, ``bytes`` for
    BYTES and a float32 array for FP32)."""

    name: str
    datatype: str
    shape: Sequence[int]
    raw: bytes | None = None
    data: Any = None


@dataclass(frozen=True)
class OutputRequest:
    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Checked:
    """A request checked whole: its images (encoded) or pixels (``float32 [N, 3, H, W]``), each
    requested output as (classification K or None, binary), and its own deadline."""

    inputs: list[bytes] | np.ndarray
    requested: list[tuple[int | None, bool]]
    timeout_s: float | None

    @property
    def top_k(self) -> int:
        """The predictions the postprocessing must keep: the largest K asked for."""
        return max((k or 0 for k, _ in self.requested), default=0)


def check(
    inputs: Sequence[InputTensor],
    parameters: dict[str, Any],
    requested: Sequence[OutputRequest] | None,
    *,
    size: int,
    limit: int,
    binary_output: bool = False,
) -> Checked:
    """The whole request checked before anything is computed; BadRequestError naming the fault.
    ``size`` is the task's crop size, ``limit`` the images one request may hold."""
    if len(inputs) != 1 or inputs[0].name not in INPUTS:
        names = [t.name for t in inputs]
        raise BadRequestError(
            f"inputs {names}: send exactly one input, 'image' (BYTES) or 'pixels' (FP32); both are optional"
        )
    tensor = inputs[0]
    if any(d < 0 for d in tensor.shape):
        raise BadRequestError(f"input {tensor.name!r} has a negative dimension in its shape {list(tensor.shape)}")
    expected = INPUTS[tensor.name]
    if tensor.datatype != expected:
        raise BadRequestError(f"input {tensor.name!r} is {expected}, not {tensor.datatype}")
    if tensor.raw is None and tensor.data is None:
        raise BadRequestError(f"input {tensor.name!r} has no data")
    timeout = parameters.get("timeout")
    if timeout is not None and (not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0):
        raise BadRequestError(f"parameters.timeout must be a positive number of microseconds, not {timeout!r}")
    outs = _requested(requested, binary_output)
    if tensor.name == "image":
        images: list[bytes] | np.ndarray = _images(tensor, limit)
    else:
        images = _pixels(tensor, size, limit)
    return Checked(images, outs, None if timeout is None else timeout / 1e6)


def _requested(requested: Sequence[OutputRequest] | None, binary_output: bool) -> list[tuple[int | None, bool]]:
    """Each requested output as (classification K or None, binary), checked before any compute."""
    out = []
    for output in requested if requested is not None else [OutputRequest(OUTPUT, {})]:
        if output.name != OUTPUT:
            raise BadRequestError(f"unknown output {output.name!r}; this model has {OUTPUT!r}")
        k = output.parameters.get("classification")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise BadRequestError(f"output {OUTPUT!r}: classification must be a positive integer, not {k!r}")
        out.append((k, bool(output.parameters.get("binary_data", binary_output))))
    return out


def _flat(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    return [x for item in data for x in _flat(item)]


def deserialize_bytes(raw: bytes, what: str) -> list[bytes]:
    """BYTES elements from their binary form: each a 4-byte little-endian length, then its bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequestError(f"{what}: a truncated BYTES element length")
        (size,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + size > len(raw):
            raise BadRequestError(f"{what}: a BYTES element overruns the binary data")
        elements.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return elements


def serialize_bytes(items: Sequence[str]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in items))


def _images(tensor: InputTensor, limit: int) -> list[bytes]:
    """A BYTES input of encoded images: binary elements, ``bytes`` values or base64 strings."""
    shape = list(tensor.shape)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise BadRequestError(f"input 'image' has shape {shape}; expected [N] or [N, 1] of encoded images")
    n = shape[0]
    images: list[bytes] = []
    if tensor.raw is not None:
        images = deserialize_bytes(tensor.raw, "input 'image'")
    else:
        for item in _flat(tensor.data):
            if isinstance(item, bytes):
                images.append(item)
                continue
            if not isinstance(item, str):
                raise BadRequestError("input 'image': in JSON, each element is a base64 string of an encoded image")
            try:
                images.append(base64.b64decode(item, validate=True))
            except binascii.Error:
                raise BadRequestError("input 'image': an element is not base64") from None
    if len(images) != n:
        raise BadRequestError(f"input 'image' has shape {shape} but holds {len(images)} elements")
    if not 1 <= n <= limit:
        raise BadRequestError(f"{n} images in one request; from 1 to {limit}")
    return images


def _pixels(tensor: InputTensor, size: int, limit: int) -> np.ndarray:
    """An FP32 input ``[N, 3, size, size]``: little-endian floats, a float32 array or numbers."""
    shape = list(tensor.shape)
    if len(shape) != 4 or shape[1:] != [3, size, size]:
        raise BadRequestError(f"input 'pixels' has shape {shape}; this task takes [N, 3, {size}, {size}]")
    if not 1 <= shape[0] <= limit:
        raise BadRequestError(f"{shape[0]} images in one request; from 1 to {limit}")
    count = math.prod(shape)
    if tensor.raw is not None:
        if len(tensor.raw) != count * 4:
            raise BadRequestError(
                f"input 'pixels' has {len(tensor.raw)} bytes; shape {shape} of FP32 takes {count * 4}"
            )
        array = np.frombuffer(tensor.raw, dtype="<f4")
    elif isinstance(tensor.data, np.ndarray):
        if tensor.data.size != count:
            raise BadRequestError(f"input 'pixels' holds {tensor.data.size} values; shape {shape} takes {count}")
        array = tensor.data
    else:
        values = _flat(tensor.data)
        if len(values) != count or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise BadRequestError(f"input 'pixels' must hold {count} numbers for shape {shape}")
        array = np.asarray(values, dtype=np.float32)
    pixels = array.astype(np.float32).reshape(shape)
    if not np.isfinite(pixels).all():
        raise BadRequestError("input 'pixels' holds non-finite values")
    return pixels


# --- inference -------------------------------------------------------------------------------------


async def infer(services: Services, task: LoadedTask, checked: Checked) -> list[ImageResult]:
    """A checked request through the inference service: each image's host result."""
    inference, k, timeout_s = services.inference, checked.top_k, checked.timeout_s
    if isinstance(checked.inputs, list):
        return await inference.classify(task, checked.inputs, top_k=k, timeout_s=timeout_s)
    return await inference.classify_pixels(task, checked.inputs, top_k=k, timeout_s=timeout_s)


@dataclass(frozen=True)
class OutputTensor:
    """An output tensor: FP32 logits (``array``) or the classification extension's strings."""

    name: str
    datatype: str
    shape: list[int]
    binary: bool  # asked for as binary data (REST); gRPC always answers raw_output_contents
    array: np.ndarray | None = None
    strings: list[str] | None = None

    def raw(self) -> bytes:
        """The tensor's binary form: little-endian floats, or length-prefixed BYTES elements."""
        if self.strings is not None:
            return serialize_bytes(self.strings)
        assert self.array is not None
        return self.array.astype("<f4").tobytes()

    def values(self) -> list[Any]:
        """The tensor's values, flat in row-major order (REST's JSON form)."""
        if self.strings is not None:
            return self.strings
        assert self.array is not None
        return list(self.array.reshape(-1).tolist())


def _classes(predictions: list[Prediction]) -> list[str]:
    """The classification extension's strings, from the predictions ``/classify`` gives."""
    return [f"{p.score!r}:{p.index}:{p.label}" for p in predictions]


def outputs(checked: Checked, results: list[ImageResult]) -> list[OutputTensor]:
    """The output tensors asked for, in the order asked."""
    out = []
    for k, binary in checked.requested:
        if k is not None:
            rows = [_classes(r.predictions[:k]) for r in results]
            flat = [s for row in rows for s in row]
            out.append(OutputTensor(OUTPUT, "BYTES", [len(rows), len(rows[0])], binary, strings=flat))
        else:
            array = np.stack([r.logits for r in results]).astype(np.float32)
            out.append(OutputTensor(OUTPUT, "FP32", list(array.shape), binary, array=array))
    return out
