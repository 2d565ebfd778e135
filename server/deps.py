"""What the routers share: the services dependency, the task-name path parameter, authentication,
the bounded body reader, error statuses and bodies, and the per-request metrics and access log."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from starlette.datastructures import State
from starlette.requests import ClientDisconnect

from piggyback_core import (
    TASK_NAME_PATTERN,
    BackboneMismatchError,
    EngineError,
    FingerprintMismatchError,
    ImageDecodeError,
    ImageTooLargeError,
    InvalidTaskNameError,
    PiggybackError,
    StoreError,
    TaskFileError,
    TaskNotFoundError,
    WeightBudgetError,
)

from .errors import (
    AuthenticationError,
    BadRequestError,
    BodyBudgetError,
    ClientDisconnectedError,
    DeadlineExceededError,
    DeviceMemoryError,
    DrainingError,
    ManagementDisabledError,
    NotReadyError,
    PayloadTooLargeError,
    QueueFullError,
    RequestTimeoutError,
    TaskNotLoadedError,
    UnsupportedMediaTypeError,
    VersionNotFoundError,
)
from .metrics import Metrics
from .schemas import ErrorResponse
from .services import Services
from .settings import Settings

__all__ = [
    "STATUS_BY_ERROR",
    "Auth",
    "ClassifyAuth",
    "ManagementAuth",
    "MetricsDep",
    "Observed",
    "OpsAuth",
    "ReadAuth",
    "ServicesDep",
    "SettingsDep",
    "TaskName",
    "access_line",
    "check_alive",
    "check_alive_state",
    "check_bearer",
    "error_headers",
    "error_reply",
    "error_response",
    "errors",
    "is_internal",
    "observe",
    "read_body",
    "ready_services",
    "services_of",
    "counted",
    "check_ready",
    "status_for",
    "track",
]

log = logging.getLogger("piggyback.server")
access_log = logging.getLogger("piggyback.access")

# Domain errors to HTTP statuses, looked up along the exception's MRO (most specific first).
STATUS_BY_ERROR: dict[type[PiggybackError], int] = {
    InvalidTaskNameError: 422,
    TaskNotFoundError: 404,
    VersionNotFoundError: 404,
    TaskNotLoadedError: 404,
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
    BodyBudgetError: 503,
    DeviceMemoryError: 503,
    NotReadyError: 503,
    DeadlineExceededError: 504,
    StoreError: 503,
    WeightBudgetError: 507,  # Insufficient Storage: the pinned weights would pass the cache budget
    EngineError: 500,
    PiggybackError: 500,
}


def status_for(exc: PiggybackError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def is_internal(status: int) -> bool:
    """A status whose error is a fault of ours: answered "internal error", its message only logged
    (503, 504 and 507 say what the client can do about them)."""
    return status >= 500 and status not in (503, 504, 507)


def error_headers(exc: PiggybackError) -> dict[str, str] | None:
    """The headers an error response carries: when to retry, or to drop the connection."""
    if isinstance(exc, QueueFullError | DeviceMemoryError):
        return {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, NotReadyError):
        return {"Retry-After": "5"}
    if isinstance(exc, BodyBudgetError):
        # the rest of the body is never read: close the connection instead of draining it
        return {"Retry-After": str(exc.retry_after_s), "Connection": "close"}
    if isinstance(exc, RequestTimeoutError):
        return {"Connection": "close"}  # the rest of the body may never come: drop the connection
    return None


def check_alive(request: Request) -> None:
    """Liveness (``/healthz``, ``/v2/health/live``): NotReadyError (503) after a failed start or
    once the device is unusable, so that the orchestrator restarts the process."""
    check_alive_state(request.app.state)


def check_alive_state(state: State) -> None:
    """:func:`check_alive` for any protocol: ``state`` is the app's (``app.state``)."""
    if state.startup_error is not None:
        raise NotReadyError(f"start-up failed: {state.startup_error}")
    services: Services | None = state.services
    if services is not None and services.device_lost is not None:
        raise NotReadyError(f"the device is unusable: {services.device_lost}")


async def services_of(request: Request) -> Services:
    """The app's services once loaded and warmed up; NotReadyError (503) before."""
    if request.app.state.lifecycle.draining:
        # refused before any handler runs: the access line is written here, with its request id
        path = urllib.parse.quote(request.url.path[:256])  # decoded by the server: %0A would be a newline
        _access_line(request, path, task="", status=503, latency_ms=0.0, batch_size=0)
    return ready_services(request.app.state)


def ready_services(state: State) -> Services:
    """:func:`services_of` for any protocol: DrainingError while draining, NotReadyError before ready."""
    if state.lifecycle.draining:
        raise DrainingError()
    services: Services | None = state.services
    if services is None:
        if state.startup_error is not None:
            raise NotReadyError(f"start-up failed: {state.startup_error}")
        raise NotReadyError()
    return services


# Every dependency is a coroutine function, though none of them awaits: FastAPI runs a plain `def`
# dependency in its thread pool, a hand-off to another thread and back for each one of each request
# (on 2 cores, 4 of them were 15% of the event loop's time and ~1 ms of every request's latency).
ServicesDep = Annotated[Services, Depends(services_of)]


def check_ready(services: Services) -> None:
    """Readiness beyond being loaded (``/readyz``, ``/v2/health/ready``, gRPC ServerReady):
    NotReadyError (503) once the device is unusable; liveness fails too, and the process is
    restarted."""
    if services.device_lost is not None:
        raise NotReadyError(f"the device is unusable: {services.device_lost}")


# The contract's name rule, in the OpenAPI schema too (clients and fuzzers see it); a name that
# breaks it is refused with 422 before any handler runs.
TaskName = Annotated[
    str, Path(pattern=f"^{TASK_NAME_PATTERN.pattern}$", description="task name: ^[a-z0-9][a-z0-9_-]{0,63}$")
]


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def error_reply(path: str, exc: PiggybackError) -> JSONResponse:
    """A domain error answered on ``path`` (the app's handler, and the Ray replica's forwarding):
    the Open Inference Protocol's shape under ``/v2``; an internal error says no more than that (its
    message only logged)."""
    if path.startswith("/v2"):
        from .routes import v2  # the route module imports this one

        return v2.error(exc)
    status = status_for(exc)
    if is_internal(status):
        log.error("internal error on %s: %r", path, exc)
        return error_response(status, "internal error")
    return error_response(status, str(exc), error_headers(exc))


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse} for s in statuses}


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]


# --- authentication ------------------------------------------------------------------------------


def _digest(secret: SecretStr | None) -> bytes | None:
    return None if secret is None else hashlib.sha256(secret.get_secret_value().encode()).digest()


@dataclass(frozen=True)
class Auth:
    """The configured tokens as SHA-256 digests, hashed once: compared in constant time and
    constant length, so a comparison reveals neither a token nor its length.

    The rule: management (``PUT``/``DELETE /tasks``) needs the management token. With a classify
    token set, everything that reads task data (``/classify``, ``GET /tasks``, ``/v2/models``)
    needs a token: the classify token, or the management token for the reads of ``/tasks``.
    ``/metrics``, ``/healthz``, ``/readyz`` and ``/v2``'s server and health routes stay open unless
    ``ops_need_token`` closes them too (then with the same tokens as the reads)."""

    management: bytes | None
    classify: bytes | None
    allow_unauthenticated: bool
    ops: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth:
        return cls(
            _digest(settings.token),
            _digest(settings.classify_token),
            settings.allow_unauthenticated,
            settings.ops_need_token,
        )


def _require_bearer(request: Request, *expected_digests: bytes | None) -> None:
    check_bearer(request.headers.get("authorization", ""), *expected_digests)


def check_bearer(header: str, *expected_digests: bytes | None) -> None:
    """``header`` (an ``Authorization`` value, ``Bearer <token>``) carries one of the tokens whose
    digests are given; AuthenticationError otherwise."""
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise AuthenticationError("missing bearer token (Authorization: Bearer <token>)")
    digest = hashlib.sha256(presented.encode()).digest()
    # every configured token is compared (no early exit): the time does not tell which one matched
    matches = [hmac.compare_digest(digest, expected) for expected in expected_digests if expected is not None]
    if not any(matches):
        raise AuthenticationError("invalid bearer token")


async def _management_auth(request: Request) -> None:
    auth: Auth = request.app.state.auth
    if auth.management is not None:
        _require_bearer(request, auth.management)
    elif not auth.allow_unauthenticated:
        raise ManagementDisabledError()


async def _classify_auth(request: Request) -> None:
    auth: Auth = request.app.state.auth
    if auth.classify is not None:
        _require_bearer(request, auth.classify)


async def _read_auth(request: Request) -> None:
    auth: Auth = request.app.state.auth
    if auth.classify is not None:
        _require_bearer(request, auth.classify, auth.management)


async def _ops_auth(request: Request) -> None:
    auth: Auth = request.app.state.auth
    if auth.ops and auth.classify is not None:
        _require_bearer(request, auth.classify, auth.management)


ManagementAuth = Depends(_management_auth)
ClassifyAuth = Depends(_classify_auth)
ReadAuth = Depends(_read_auth)  # reads of task data (GET /tasks)
OpsAuth = Depends(_ops_auth)  # /metrics, /healthz, /readyz and /v2's server routes


# --- bodies --------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes."""
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


# --- metrics and the access log --------------------------------------------------------------------


@dataclass
class Observed:
    """What one inference request reports: set ``status`` (and ``batch_size``) as it goes."""

    task: str
    label: str = "_unknown"
    status: int = 500
    batch_size: int = 0


@contextlib.asynccontextmanager
async def observe(request: Request, metrics: Metrics, route: str, task: str) -> AsyncIterator[Observed]:
    """Count the request in ``piggyback_requests_total`` and its latency, and write its access line
    (``route`` names it: classify, classify-tasks, v2-infer); a domain error sets the status."""
    async with track(metrics, route, task, request_id=getattr(request.state, "request_id", None)) as record:
        yield record


@contextlib.asynccontextmanager
async def track(
    metrics: Metrics, route: str, task: str, *, request_id: str | None, **fields: Any
) -> AsyncIterator[Observed]:
    """:func:`observe` for any protocol (gRPC too): the request's id and extra access-line fields given."""
    started = time.perf_counter()
    record = Observed(task=task)
    try:
        yield record
    except PiggybackError as exc:
        record.status = status_for(exc)
        raise
    finally:
        elapsed = time.perf_counter() - started
        metrics.requests.labels(record.label, str(record.status)).inc()
        if record.status == 200:
            metrics.request_seconds.labels(record.label).observe(elapsed)
        access_line(route, task=task, status=record.status, latency_ms=round(elapsed * 1000, 1),
                    batch_size=record.batch_size, **fields, request_id=request_id)  # fmt: skip


@contextlib.contextmanager
def counted(metrics: Metrics, action: str) -> Iterator[None]:
    """Count a load or unload in ``piggyback_repository_actions_total`` by its status."""
    try:
        yield
    except PiggybackError as exc:
        metrics.repository_actions.labels(action, str(status_for(exc))).inc()
        raise
    metrics.repository_actions.labels(action, "200").inc()


def _access_line(request: Request, route: str, *, task: str, **fields: Any) -> None:
    access_line(route, task=task, **fields, request_id=getattr(request.state, "request_id", None))


def access_line(route: str, *, task: str, **fields: Any) -> None:
    """One access-log line. The task names come from the client and may not be valid yet: they are
    percent-encoded (a ``%0A`` in ``?tasks=`` cannot forge a line, a space cannot forge a field)."""
    line: dict[str, Any] = {"task": urllib.parse.quote(task[:256], safe=",")[:256], **fields}
    access_log.info("%s %s", route, " ".join(f"{k}={v}" for k, v in line.items()), extra={"fields": line})
