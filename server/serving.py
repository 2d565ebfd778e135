"""The server process: ``piggyback serve`` is :func:`run_server`.

* **The port first.** The listening socket is bound before anything is loaded, so a busy port is
  one line and a non-zero exit, not a minute of loading and then an error.
* **Never half-alive.** If the backbone or the store cannot be loaded, the process exits non-zero
  with the reason (and ``/healthz`` answers 503 until it does), so Docker or Kubernetes restarts it
  instead of keeping a container whose liveness probe passes while it serves nothing.
* **Graceful drain.** On the first SIGTERM (or SIGINT) the server stops admitting work (new requests
  get 503 with ``Retry-After``; ``/readyz`` turns 503; ``/healthz`` stays 200), waits until every
  request admitted before the signal has had its answer (at most ``body_timeout_s +
  request_timeout_s``, the longest an admitted request can take), then closes the listener and
  exits 0. A second signal skips the wait; a third stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from piggyback_core import PiggybackError

from .app import create_app
from .logs import configure_logging
from .settings import Settings
from .transport import Lifecycle

__all__ = ["bind_socket", "run_server"]

log = logging.getLogger("piggyback.server")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port``; PiggybackError with the reason if it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise PiggybackError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise PiggybackError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server with a drain phase before its own shutdown, and no re-raised signal."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.lifecycle: Lifecycle = app.state.lifecycle
        self.drain_timeout_s = drain_timeout_s
        self.signals = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drainer: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in a signal handler: only flags and a thread-safe call into the loop.
        self.signals += 1
        if self.signals == 1 and self.loop is not None and not self.should_exit:
            self.loop.call_soon_threadsafe(self._begin_drain, sig)
        elif self.signals <= 2:
            self.should_exit = True
        else:
            self.force_exit = True

    def _begin_drain(self, sig: int) -> None:
        self.lifecycle.draining = True
        self.app.state.metrics.ready.set(0)
        log.info(
            "%s: draining, %d request(s) in flight; new requests get 503",
            signal.Signals(sig).name,
            self.lifecycle.in_flight,
        )
        self.drainer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        started = time.monotonic()
        while self.lifecycle.in_flight > 0 and time.monotonic() - started < self.drain_timeout_s:
            await asyncio.sleep(0.02)
        if self.lifecycle.in_flight:
            log.warning("drain timed out after %.0f s with %d request(s) in flight", self.drain_timeout_s,
                        self.lifecycle.in_flight)  # fmt: skip
        else:
            log.info("drained in %.2f s", time.monotonic() - started)
        self.should_exit = True


def run_server(settings: Settings) -> int:
    """Serve until a signal; 0 after a graceful stop, PiggybackError when the start failed."""
    configure_logging(settings.log_level, settings.log_format)
    sock = bind_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d (the backbone loads in the background; /readyz says when)",
             f"[{host}]" if ":" in host else host, port)  # fmt: skip
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        log_config=None,  # ours (server.logs): text or JSON, uvicorn's lines included
        log_level=settings.log_level,
        access_log=False,  # one structured line per classify request comes from the app
        # Chosen, not detected: ray[serve] brings uvloop and httptools, which uvicorn's "auto" would
        # pick up silently and so change this server's behaviour with what else is installed.
        loop="asyncio",
        http="h11",
        # uvicorn refuses a request when the open connections, its own included, reach the limit.
        limit_concurrency=settings.max_connections + 1,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    server = _Server(config, app, drain_timeout_s=settings.body_timeout_s + settings.request_timeout_s)

    def on_fatal(exc: BaseException) -> None:
        server.should_exit = True

    app.state.on_fatal = on_fatal
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if app.state.startup_error is not None:
        raise PiggybackError(f"start-up failed: {app.state.startup_error}")
    return 0
