"""Ray Serve as the scale-out engine (``pip install 'piggyback-server[ray]'``).

Two deployments, one application (``serve run deploy/ray/serve.yaml``):

* **PiggybackIngress** takes every HTTP request, reads it whole within the app's body bounds and
  forwards it to a task replica, with the task it is for (``/classify/{task}``, ``/v2/models/{task}``,
  ``/tasks/{task}``; :func:`server.replica.route_key`) as the **multiplexed model id**: Ray Serve
  sends a task's requests to the replicas that hold it, and a task none holds to the replica with
  the fewest. Requests for no task (``/healthz``, ``GET /tasks``, ``/metrics``, ``/v2`` server
  routes) go to any replica.
* **TaskReplica** runs our FastAPI app (auth, parsing, errors, ``/classify``, ``/v2``, ``/tasks``)
  over its own engine, batcher and registry, all replicas on one store; its multiplexed loader
  builds a task's weights and keeps them, Ray's LRU eviction (``tasks_per_replica``) drops them.
  Every answer names the replica that gave it (``X-Piggyback-Replica``).

A replica that dies under a request is retried once on another (a classify is idempotent; a
``DELETE`` is not retried); a second failure is 503 with ``Retry-After``.

Arguments (``args:`` in the Serve config): ``settings`` (``PIGGYBACK_*`` settings by field name;
the environment fills the rest) and ``tasks_per_replica`` (default 8).
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from piggyback_core import PiggybackError, TaskNotFoundError

from .errors import NotReadyError
from .replica import ForwardedRequest, ForwardedResponse, ReplicaApp, error_reply, forwarded, route_key
from .settings import Settings

__all__ = ["PiggybackIngress", "TaskReplica", "app_builder"]

log = logging.getLogger("piggyback.ray")

DEFAULT_TASKS_PER_REPLICA = 8


@serve.deployment(name="TaskReplica", max_ongoing_requests=64, health_check_period_s=5)
class TaskReplica:
    """One engine, batcher and registry behind our FastAPI app; tasks multiplexed onto it."""

    async def __init__(self, settings: dict[str, Any], tasks_per_replica: int = DEFAULT_TASKS_PER_REPLICA) -> None:  # type: ignore[misc]
        name = serve.get_replica_context().replica_id.unique_id
        self.replica = ReplicaApp(Settings(**settings), name=name)
        await self.replica.start()

        async def load(task: str) -> Any:
            return await self.replica.lease(task)

        # set up here (Ray Serve detects it on the instance): the bound comes from the arguments
        self._lease = serve.multiplexed(max_num_models_per_replica=tasks_per_replica)(load)

    async def forward(self, request: ForwardedRequest) -> ForwardedResponse:
        task = serve.get_multiplexed_model_id()
        if task and self.replica.serves(task):
            try:
                await self._lease(task)  # built on first use here; Ray Serve now routes the task here
            except TaskNotFoundError:
                pass  # deleted meanwhile: the app answers 404
        response = await self.replica.handle(request)
        if task and request.method == "PUT" and response.status in (200, 201):
            await self._lease(task)  # registered here: served here
        return response

    def check_health(self) -> None:
        self.replica.check_health()

    async def __del__(self) -> None:
        await self.replica.stop()


@serve.deployment(name="PiggybackIngress", max_ongoing_requests=1024)
class PiggybackIngress:
    """The HTTP entry: each request to the task replicas, routed by its task."""

    def __init__(self, replicas: DeploymentHandle, settings: dict[str, Any]) -> None:
        self.replicas = replicas
        self.settings = Settings(**settings)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        try:
            forward = await forwarded(request, self.settings)
        except PiggybackError as exc:
            return error_reply(path, exc)
        task = route_key(forward.method, path, forward.query_string)
        handle = self.replicas.options(multiplexed_model_id=task) if task else self.replicas
        attempts = 1 if forward.method == "DELETE" else 2
        for attempt in range(1, attempts + 1):
            try:
                reply: ForwardedResponse = await handle.forward.remote(forward)
                return reply.to_response()
            except RayActorError as exc:
                log.warning("replica lost under %s %s (attempt %d of %d): %s", forward.method, path, attempt,
                            attempts, type(exc).__name__)  # fmt: skip
            except BackPressureError:  # every replica's queue is full (max_queued_requests)
                return error_reply(path, NotReadyError("every task replica is at capacity; retry shortly"))
            except Exception:  # a bug: logged here, never a traceback to the client
                log.exception("replica failed on %s %s", forward.method, path)
                return error_reply(path, PiggybackError("internal error"))
        return error_reply(path, NotReadyError("the replica serving this request stopped; retry"))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application of ``deploy/ray/serve.yaml``: the settings are validated here, at deploy
    time, so a bad one fails the deployment instead of every replica."""
    settings = dict(args.get("settings") or {})
    Settings(**settings)
    tasks_per_replica = int(args.get("tasks_per_replica", DEFAULT_TASKS_PER_REPLICA))
    if tasks_per_replica < 1:
        raise ValueError(f"tasks_per_replica must be >= 1, got {tasks_per_replica}")
    # serve.deployment made the classes Deployments (its typing keeps them classes)
    replicas = TaskReplica.bind(settings, tasks_per_replica)  # type: ignore[attr-defined]
    return PiggybackIngress.bind(replicas, settings)  # type: ignore[attr-defined]
