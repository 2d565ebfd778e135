"""One task replica of a scale-out deployment, and what its ingress does, without Ray
(``server.ray_serve`` wires them into Ray Serve deployments).

* :class:`ReplicaApp` runs our FastAPI app (``create_app``) in-process with its lifespan: the
  engine, batcher, registry and store poll of one server. A request reaches it as a
  :class:`ForwardedRequest` and goes through the whole app (auth, parsing, errors, ``/classify``,
  ``/v2``, ``/tasks``), so the scale-out deployment serves the same API as ``piggyback serve``;
  the answer comes back as a :class:`ForwardedResponse` naming the replica (``X-Piggyback-Replica``).
* :meth:`ReplicaApp.lease` builds one task's weights and keeps them (pinned in the weight cache)
  while the lease holds; :meth:`TaskLease.release` drops them. A batch in flight holds its own
  reference to the weights it runs with, so a release never breaks it: the next batch of that
  task builds its weights again (or finds them in the cache's LRU).
* :func:`route_key` is the task a request is for (the ingress routes on it), :func:`forwarded`
  reads a request into a :class:`ForwardedRequest` with the app's body bounds, and
  :func:`error_reply` answers an error the way the app does (``{"error"}`` under ``/v2``,
  ``{"detail"}`` elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from piggyback_core import TASK_NAME_PATTERN, EngineError

from .app import create_app
from .deps import check_alive_state, error_reply, read_body
from .errors import NotReadyError
from .services import Services
from .settings import Settings

__all__ = [
    "REPLICA_HEADER",
    "ForwardedRequest",
    "ForwardedResponse",
    "ReplicaApp",
    "TaskLease",
    "error_reply",
    "forwarded",
    "route_key",
]

log = logging.getLogger("piggyback.replica")

REPLICA_HEADER = "X-Piggyback-Replica"
MULTIPART_FRAMING = 64 * 1024  # what the app allows beyond max_image_bytes for framing


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request read whole by the ingress (picklable: it crosses processes)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class ForwardedResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == key), None)

    def to_response(self) -> Response:
        response = Response(self.body, status_code=self.status)
        response.raw_headers = list(self.headers)  # as the app sent them, content-length included
        return response


def route_key(method: str, path: str, query_string: bytes = b"") -> str | None:
    """The task ``path`` is for: ``/classify/{task}``, the first of ``/classify?tasks=``,
    ``/v2/models/{task}/...`` and ``/tasks/{task}``; None for the others and for a name that breaks
    the naming rule (any replica answers those: the app refuses a bad name itself)."""
    parts = path.strip("/").split("/")
    name: str | None = None
    if parts[0] == "classify" and len(parts) == 2:
        name = parts[1]
    elif parts == ["classify"]:
        tasks = urllib.parse.parse_qs(query_string.decode("latin-1")).get("tasks", [""])[0]
        name = next((n.strip() for n in tasks.split(",") if n.strip()), None)
    elif parts[:2] == ["v2", "models"] and len(parts) >= 3:
        name = parts[2]
    elif parts[0] == "tasks" and len(parts) == 2:
        name = parts[1]
    return name if name is not None and TASK_NAME_PATTERN.fullmatch(name) else None


def body_limit(method: str, path: str, settings: Settings) -> int:
    """The most the app would read of this request's body: a task file for ``PUT /tasks``, an
    image (with multipart framing) for the rest."""
    if method == "PUT" and path.startswith("/tasks/"):
        return settings.max_task_bytes
    return settings.max_image_bytes + MULTIPART_FRAMING


async def forwarded(request: Request, settings: Settings) -> ForwardedRequest:
    """``request`` read whole, refused with PayloadTooLargeError past what the app would take."""
    path = request.url.path
    body = await read_body(request, body_limit(request.method, path, settings), "request body")
    client = (request.client.host, request.client.port) if request.client else None
    return ForwardedRequest(
        request.method, path, request.scope.get("query_string", b""), list(request.headers.raw), body, client
    )


@dataclass(eq=False)
class TaskLease:
    """One task's built weights held on a replica (``pinned``: in the weight cache; False when
    they did not fit beside the others, and the task is served with weights built per batch)."""

    replica: ReplicaApp
    name: str
    pinned: bool

    def release(self) -> None:
        """Drop the task's built weights (once; a lease replaced by a newer one does nothing)."""
        if self.replica.leases.get(self.name) is not self:
            return
        del self.replica.leases[self.name]
        services = self.replica.services
        # a task also pinned by its owners of record (pin_tasks, the repository API's load) stays
        if self.pinned and services is not None and self.name not in services.repository.loaded:
            services.engine.unpin(self.name)
            services.engine.cache.evict(self.name)  # batches in flight keep their own reference

    def __del__(self) -> None:  # what Ray Serve's multiplexing calls when it evicts a model
        self.release()


class ReplicaApp:
    """Our FastAPI app with its lifespan, answering forwarded requests in this process."""

    def __init__(self, settings: Settings, *, name: str) -> None:
        self.name = name
        self.app = create_app(settings)
        self.leases: dict[str, TaskLease] = {}
        self._lifespan = contextlib.AsyncExitStack()

    @property
    def services(self) -> Services | None:
        services: Services | None = self.app.state.services
        return services

    async def start(self, timeout_s: float = 600.0) -> None:
        """Run the app's lifespan until it is ready; its start-up error if it fails."""
        await self._lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.services is None:
            if self.app.state.startup_error is not None:
                raise self.app.state.startup_error
            if loop.time() > deadline:
                raise NotReadyError(f"replica {self.name} not ready after {timeout_s:.0f} s")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop admitting requests, drain the queue, stop the lifespan's threads."""
        self.app.state.lifecycle.draining = True
        await self._lifespan.aclose()

    def check_health(self) -> None:
        """NotReadyError once the replica cannot serve (a failed start, an unusable device)."""
        check_alive_state(self.app.state)

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a task this replica has (loaded, or loading in the background)."""
        services = self.services
        registry = services.registry if services is not None else None
        return registry is not None and (name in registry or name in services.engine.tasks or registry.is_pending(name))

    async def lease(self, name: str) -> TaskLease:
        """Build ``name``'s weights now (on a worker, between batches) and keep them until the
        lease is released. TaskNotFoundError if the replica has no such task."""
        services = self.services
        if services is None:
            raise NotReadyError()
        await services.task(name)  # a task still loading in the background is loaded now
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(services.device_thread, services.engine.pin, name)
            pinned = True
        except EngineError as exc:  # the cache is full of other leases: served all the same
            log.warning("task %r: weights not kept on replica %s: %s", name, self.name, exc)
            pinned = False
        lease = self.leases.get(name)
        if lease is None or lease.pinned != pinned:
            lease = self.leases[name] = TaskLease(self, name, pinned)
        return lease

    async def handle(self, request: ForwardedRequest) -> ForwardedResponse:
        """``request`` through the app, as if it had come over HTTP."""
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": "http",
            "path": request.path,
            "raw_path": urllib.parse.quote(request.path).encode(),
            "root_path": "",
            "query_string": request.query_string,
            "headers": list(request.headers),
            "client": request.client,
            "server": None,
        }
        sent = asyncio.Event()
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await sent.wait()  # the client stays connected until the answer is complete
            return {"type": "http.disconnect"}

        status, headers, chunks = 500, [], []

        async def send(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status, headers = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    sent.set()

        try:
            await self.app(scope, receive, send)
        finally:
            sent.set()
        headers.append((REPLICA_HEADER.lower().encode(), self.name.encode()))
        return ForwardedResponse(status, headers, b"".join(chunks))
