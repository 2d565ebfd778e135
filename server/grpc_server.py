"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``, what
``tritonclient.grpc``, KServe's and Seldon's gRPC clients and ``perf_analyzer -i grpc`` speak, on
its own port (``grpc_port``; off unless set).

A thin adapter, as ``routes/v2.py`` is for REST: the same models, checks and output tensors
(``server.oip``), the same inference service, batcher, queue bound and deadlines, the same tokens,
metrics and access log. It runs as a ``grpc.aio`` server in the app's event loop, started and
stopped by the app's lifespan, so a draining server refuses new calls (``UNAVAILABLE``) and waits
for those in flight as it does for HTTP requests.

* **RPCs**: ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata, ModelConfig,
  ModelInfer, and the model repository's RepositoryIndex, RepositoryModelLoad and
  RepositoryModelUnload (as REST's ``/v2/repository``; load and unload need the management token).
  The others (statistics, shared memory, streaming, trace and log settings) answer ``UNIMPLEMENTED``.
* **Tensors**: inputs as ``raw_input_contents`` (what ``tritonclient.grpc`` sends) or as typed
  ``contents`` (``bytes_contents`` for ``image``, ``fp32_contents`` for ``pixels``); outputs always
  as ``raw_output_contents``, as Triton answers.
* **Auth**: the ``authorization`` metadata (``Bearer <token>``), by the rules of REST: the model
  RPCs need the classify token when one is set, the server RPCs only with ``ops_need_token``.
* **Errors**: the domain errors of the REST API, mapped to status codes as Triton's are
  (:func:`status_of`); an internal error is ``INTERNAL: internal error``, never a stack trace.
* **Limits**: a message is at most ``max_image_bytes`` + 64 KiB (REST's bound on an inference
  body; past it gRPC answers ``RESOURCE_EXHAUSTED``), counts against ``max_body_bytes_in_flight``
  while it is served, and at most ``max_connections`` calls run at once. A client's gRPC deadline
  bounds its request's time in the queue, as ``parameters.timeout`` does.

Spec: kserve/open-inference-protocol ``specification/protocol/inference_grpc.md``; the service is
``grpc_service.proto`` of triton-inference-server/common, whose generated stubs ship with
``tritonclient[grpc]`` (``tritonclient.grpc.service_pb2``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from starlette.datastructures import State
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from piggyback_core import InvalidTaskNameError, PiggybackError, TaskNotFoundError, __version__

from . import oip
from .deps import Auth, check_alive_state, check_bearer, check_ready, counted, ready_services, status_for, track
from .errors import (
    BadRequestError,
    BodyBudgetError,
    DeviceMemoryError,
    ManagementDisabledError,
    NotReadyError,
    QueueFullError,
    VersionNotFoundError,
)
from .metrics import Metrics
from .repository import task_name
from .settings import Settings
from .transport import SANE_ID

__all__ = ["InferenceServicer", "address", "start_grpc", "status_of"]

log = logging.getLogger("piggyback.server")

Code = grpc.StatusCode
# REST's statuses to gRPC's codes, as Triton maps its errors (and as grpc-gateway maps them back)
CODE_BY_STATUS: dict[int, grpc.StatusCode] = {
    400: Code.INVALID_ARGUMENT,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    408: Code.DEADLINE_EXCEEDED,
    409: Code.FAILED_PRECONDITION,
    413: Code.INVALID_ARGUMENT,  # an image over max_image_pixels (a message over the bound never gets here)
    415: Code.INVALID_ARGUMENT,
    422: Code.INVALID_ARGUMENT,
    499: Code.CANCELLED,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
    507: Code.RESOURCE_EXHAUSTED,  # a pin past the weight cache budget
}
# Capacity: the caller may retry shortly (REST's 503 with Retry-After)
CODE_BY_ERROR: dict[type[PiggybackError], grpc.StatusCode] = {
    QueueFullError: Code.RESOURCE_EXHAUSTED,
    BodyBudgetError: Code.RESOURCE_EXHAUSTED,
}
INFERENCE_LIMIT_MARGIN = 64 * 1024  # REST's framing allowance over max_image_bytes, kept for gRPC


def status_of(exc: PiggybackError) -> tuple[grpc.StatusCode, str]:
    """The status code and message a domain error is answered with."""
    for cls in type(exc).__mro__:
        if cls in CODE_BY_ERROR:
            return CODE_BY_ERROR[cls], str(exc)
    code = CODE_BY_STATUS.get(status_for(exc), Code.INTERNAL)
    return code, "internal error" if code is Code.INTERNAL else str(exc)


def _retry_after(exc: PiggybackError) -> tuple[tuple[str, str], ...]:
    """REST's ``Retry-After``, as trailing metadata."""
    if isinstance(exc, QueueFullError | BodyBudgetError | DeviceMemoryError):
        return (("retry-after", str(exc.retry_after_s)),)
    if isinstance(exc, NotReadyError):
        return (("retry-after", "5"),)
    return ()


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[["InferenceServicer", Req, grpc.aio.ServicerContext], Awaitable[Resp]]


Access = Literal["ops", "model", "management"]


def _rpc(
    access: Access,
) -> Callable[[Handler[Req, Resp]], Handler[Req, Resp]]:
    """An RPC's frame: the token check, the in-flight count a drain waits for, the per-method
    counter, and the mapping of errors to status codes."""

    def wrap(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
        name = method.__name__

        @functools.wraps(method)
        async def handler(self: InferenceServicer, request: Req, context: grpc.aio.ServicerContext) -> Resp:
            lifecycle = self.state.lifecycle
            counted = not lifecycle.draining  # calls that come while draining are refused, not waited for
            lifecycle.in_flight += counted
            code, message = Code.OK, ""
            trailing: tuple[tuple[str, str], ...] = ()
            try:
                self._authenticate(access, context)
                return await method(self, request, context)
            except PiggybackError as exc:
                code, message = status_of(exc)
                trailing = _retry_after(exc)
                if code is Code.INTERNAL:
                    log.error("internal error in gRPC %s: %r", name, exc)
            except Exception:
                log.exception("unhandled error in gRPC %s", name)
                code, message = Code.INTERNAL, "internal error"
            finally:
                lifecycle.in_flight -= counted
                self.metrics.grpc_requests.labels(name, code.name).inc()
            await context.abort(code, message, trailing_metadata=trailing)
            raise AssertionError("unreachable: abort raises")

        return handler

    return wrap


def _unimplemented(what: str) -> Callable[..., Awaitable[None]]:
    async def handler(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.metrics.grpc_requests.labels(what, Code.UNIMPLEMENTED.name).inc()
        await context.abort(Code.UNIMPLEMENTED, f"{what} is not implemented by this server")

    handler.__name__ = what
    return handler


def _parameter(p: service_pb2.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _parameters(params: Any) -> dict[str, Any]:
    return {key: _parameter(value) for key, value in params.items()}


def _check(request: service_pb2.ModelInferRequest, size: int, limit: int) -> oip.Checked:
    """The request's tensors for ``oip.check`` (off the event loop, as REST parses its body)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequestError(f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        contents = tensor.contents
        data: Any = None
        if raw:
            if contents.ByteSize():
                raise BadRequestError(f"input {tensor.name!r} has contents and raw_input_contents: send one")
        elif tensor.datatype == "BYTES" and contents.bytes_contents:
            data = list(contents.bytes_contents)
        elif tensor.datatype == "FP32" and contents.fp32_contents:
            data = np.asarray(contents.fp32_contents, dtype=np.float32)
        inputs.append(oip.InputTensor(tensor.name, tensor.datatype, list(tensor.shape), raw[i] if raw else None, data))
    outputs = [oip.OutputRequest(o.name, _parameters(o.parameters)) for o in request.outputs] or None
    return oip.check(inputs, _parameters(request.parameters), outputs, size=size, limit=limit)


def _request_id(context: grpc.aio.ServicerContext) -> str:
    """The client's ``x-request-id`` metadata when it is a sane token, else a fresh one (as REST)."""
    presented = dict(context.invocation_metadata() or ()).get("x-request-id")
    return presented if isinstance(presented, str) and SANE_ID.match(presented.encode()) else uuid.uuid4().hex


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the app's state (``app.state``: services, settings,
    metrics, tokens, lifecycle)."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.settings: Settings = state.settings
        self.metrics: Metrics = state.metrics
        self.auth: Auth = state.auth

    def _authenticate(self, access: Access, context: grpc.aio.ServicerContext) -> None:
        auth = self.auth
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        if access == "management":  # as PUT /tasks and REST's repository load and unload
            if auth.management is not None:
                check_bearer(header, auth.management)
            elif not auth.allow_unauthenticated:
                raise ManagementDisabledError()
            return
        if auth.classify is None or (access == "ops" and not auth.ops):
            return
        if access == "model":
            check_bearer(header, auth.classify)
        else:
            check_bearer(header, auth.classify, auth.management)

    # --- server ------------------------------------------------------------------------------------

    @_rpc("ops")
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> service_pb2.ServerLiveResponse:
        try:
            check_alive_state(self.state)
        except NotReadyError:
            return service_pb2.ServerLiveResponse(live=False)
        return service_pb2.ServerLiveResponse(live=True)

    @_rpc("ops")
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> service_pb2.ServerReadyResponse:
        try:
            check_ready(ready_services(self.state))
        except NotReadyError:
            return service_pb2.ServerReadyResponse(ready=False)
        return service_pb2.ServerReadyResponse(ready=True)

    @_rpc("ops")
    async def ServerMetadata(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerMetadataResponse:
        return service_pb2.ServerMetadataResponse(name=oip.SERVER_NAME, version=__version__, extensions=oip.EXTENSIONS)

    # --- the model repository (as REST's /v2/repository: server/routes/repository.py) ---------------

    @_rpc("ops")
    async def RepositoryIndex(
        self, request: service_pb2.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.RepositoryIndexResponse:
        services = ready_services(self.state)
        entry = service_pb2.RepositoryIndexResponse.ModelIndex
        return service_pb2.RepositoryIndexResponse(
            models=[
                entry(name=e.name, version=e.version or "", state=e.state, reason=e.reason)
                for e in services.repository.index(ready_only=request.ready)
            ]
        )

    @_rpc("management")
    async def RepositoryModelLoad(
        self, request: service_pb2.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.RepositoryModelLoadResponse:
        services = ready_services(self.state)
        with counted(self.metrics, "load"):
            task = task_name(request.model_name)
            loaded = await oip.load(services, task, request.parameters.keys())
        self.metrics.refresh_tasks(services.engine)
        log.info("task %r loaded over gRPC (version %s): weights built and pinned", task, loaded.version)
        return service_pb2.RepositoryModelLoadResponse()

    @_rpc("management")
    async def RepositoryModelUnload(
        self, request: service_pb2.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.RepositoryModelUnloadResponse:
        services = ready_services(self.state)
        with counted(self.metrics, "unload"):
            task = task_name(request.model_name)
            await oip.unload(services, task)
        log.info("task %r unloaded over gRPC: weights unpinned and evicted", task)
        return service_pb2.RepositoryModelUnloadResponse()

    # --- models ------------------------------------------------------------------------------------

    @_rpc("model")
    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelReadyResponse:
        """Not an error for a model that is not served (Triton's answer): ``ready: false``."""
        try:
            services = ready_services(self.state)
            check_ready(services)
            await oip.model(services, request.name, request.version)
        except (TaskNotFoundError, VersionNotFoundError, InvalidTaskNameError, NotReadyError):
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    @_rpc("model")
    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelMetadataResponse:
        services = ready_services(self.state)
        meta = oip.metadata(services, await oip.model(services, request.name, request.version))
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
        )

    @_rpc("model")
    async def ModelConfig(
        self, request: service_pb2.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelConfigResponse:
        services = ready_services(self.state)
        config = oip.config(services, self.settings, await oip.model(services, request.name, request.version))
        message = json_format.ParseDict(config.model_dump(exclude_none=True), model_config_pb2.ModelConfig())
        return service_pb2.ModelConfigResponse(config=message)

    @_rpc("model")
    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        services = ready_services(self.state)
        metrics, settings, budget = self.metrics, self.settings, self.state.body_budget
        task = request.model_name
        async with track(metrics, "grpc-infer", task, request_id=_request_id(context)) as seen:
            size = request.ByteSize()
            budget.take(size)  # BodyBudgetError: RESOURCE_EXHAUSTED
            try:
                loaded = await oip.model(services, task, request.model_version)
                seen.label = metrics.task_label(task)
                crop = services.inference.input_size(loaded)
                checked = await asyncio.get_running_loop().run_in_executor(
                    services.decoder, _check, request, crop, settings.max_images_per_request
                )
                remaining = context.time_remaining()  # the client's gRPC deadline, if it set one
                if remaining is not None and (checked.timeout_s is None or remaining < checked.timeout_s):
                    checked = dataclasses.replace(checked, timeout_s=max(remaining, 1e-6))
                results = await oip.infer(services, loaded, checked)
            finally:
                budget.held -= size
            response = service_pb2.ModelInferResponse(
                model_name=loaded.name, model_version=loaded.version, id=request.id
            )
            for tensor in oip.outputs(checked, results):
                response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
                response.raw_output_contents.append(tensor.raw())
            seen.status, seen.batch_size = 200, max(r.batch_size for r in results)
            return response

    # statistics, shared memory, streaming, trace and log settings
    ModelStatistics = _unimplemented("ModelStatistics")
    ModelStreamInfer = _unimplemented("ModelStreamInfer")
    SystemSharedMemoryStatus = _unimplemented("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = _unimplemented("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = _unimplemented("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = _unimplemented("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = _unimplemented("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = _unimplemented("CudaSharedMemoryUnregister")
    TraceSetting = _unimplemented("TraceSetting")
    LogSettings = _unimplemented("LogSettings")


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc(state: State, settings: Settings) -> grpc.aio.Server:
    """The gRPC server on ``host:grpc_port``, started in the running event loop; PiggybackError
    with the reason if the port cannot be had."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_image_bytes + INFERENCE_LIMIT_MARGIN),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not silently shared
        ],
        maximum_concurrent_rpcs=settings.max_connections,
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state), server)
    where = address(settings.host, settings.grpc_port)
    try:
        server.add_insecure_port(where)
    except RuntimeError as exc:
        raise PiggybackError(f"cannot listen for gRPC on {where}: {exc}") from None
    await server.start()
    return server
