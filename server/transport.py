"""What happens to a request before and around its handler: a pure ASGI middleware.

* **Request id.** Every HTTP request gets an id: the client's ``X-Request-ID`` when it is a sane
  token (``[A-Za-z0-9._:-]``, at most 128 characters), a fresh one otherwise. It is echoed in the
  response's ``X-Request-ID`` header and written on the request's access-log line.
* **Body deadline.** The whole body must arrive within ``body_timeout_s`` of the request's start.
  A client that stalls mid-upload (slowloris) gets ``408`` and its connection is closed, instead of
  holding a connection, a task and a buffer for ever. The deadline covers only the body: a handler
  that waits for the device afterwards is bounded by the request deadline (504) instead.
* **In-flight count.** The number of requests being handled, so that a draining server knows when
  every admitted request has had its answer.
* **Body bytes in flight.** Every body byte received counts against one budget for the whole
  process (``max_body_bytes_in_flight``) until its request has been answered: a request whose bytes
  would pass it gets ``503`` with ``Retry-After`` and its connection is closed, so 1,000 clients
  each sending 20 MiB cannot hold 20 GB. A body is only ever held in memory, never spooled to disk.

A bound on concurrent connections (``max_connections``) is uvicorn's ``limit_concurrency``: past
it, uvicorn answers ``503`` and closes the connection before the app sees the request.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import BodyBudgetError, RequestTimeoutError

__all__ = ["REQUEST_ID_HEADER", "SANE_ID", "BodyBudget", "Lifecycle", "RequestGuard"]

REQUEST_ID_HEADER = "x-request-id"
SANE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


@dataclass
class Lifecycle:
    """Shared by the middleware, the routes and the process runner (``server.serving``)."""

    in_flight: int = 0  # HTTP requests being handled
    draining: bool = False  # SIGTERM received: admit nothing new, finish what was admitted


@dataclass
class BodyBudget:
    """Request-body bytes held at once, over every connection (the event loop's thread only)."""

    limit: int
    held: int = 0
    refused: int = 0  # requests answered 503 for it

    def take(self, n: int) -> None:
        if self.held + n > self.limit:
            self.refused += 1
            raise BodyBudgetError(limit=self.limit)
        self.held += n


class RequestGuard:
    def __init__(
        self, app: ASGIApp, *, body_timeout_s: float, lifecycle: Lifecycle, body_budget: BodyBudget | None = None
    ) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.lifecycle = lifecycle
        self.body_budget = body_budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        presented = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER.encode()), None)
        request_id = presented.decode() if presented is not None and SANE_ID.match(presented) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        timeout_s = self.body_timeout_s
        deadline = time.monotonic() + timeout_s
        body_done = False
        budget, held = self.body_budget, 0

        async def receive_with_deadline() -> Message:
            nonlocal body_done, held
            if body_done:
                return await receive()  # after the body: only http.disconnect is left to wait for
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeoutError(timeout_s=timeout_s) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            if budget is not None and message["type"] == "http.request":
                size = len(message.get("body", b""))
                budget.take(size)  # BodyBudgetError: 503, and the rest of the body is never read
                held += size
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[Any] = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        # Requests that arrive while draining are answered 503 at once and are not waited for.
        counted = not self.lifecycle.draining
        self.lifecycle.in_flight += counted
        try:
            await self.app(scope, receive_with_deadline, send_with_id)
        finally:
            self.lifecycle.in_flight -= counted
            if budget is not None:
                budget.held -= held
