"""Ray Serve's real request router in the fleet simulation (model multiplexing).

Ray Serve (2.60.0) routes a request that carries ``serve_multiplexed_model_id`` with its
``PowerOfTwoChoicesRequestRouter`` (ray/serve/_private/request_router/pow_2_router.py:52,
``choose_replicas``): two random replicas among those that hold the model id
(``MultiplexMixin.apply_multiplex_routing``, request_router.py:290), the one with the shorter queue
among them taking it (``_select_from_candidate_replicas``, request_router.py:1062); with no holder,
or both holders full (``max_ongoing_requests``), the replicas with the fewest models loaded, and
after a 1-2 s matching timeout all replicas, with exponential backoff between rounds. This module
runs that code itself, not a copy: it constructs the router with stand-in replicas
(:class:`SimReplica`, a ``RunningReplica`` whose queue length and model ids come from the simulated
replica) and calls ``_choose_replica_for_request`` on the simulation's virtual-time event loop,
with the router's clock (``time.time`` in request_router.py) pointed at the virtual one.

What happens around the router is what ray/serve/_private/router.py does with
``enable_strict_max_ongoing_requests`` (its default): ``_route_and_send_request_once`` (router.py:1024)
sends the request to the chosen replica, which rejects it when it already has
``max_ongoing_requests`` in flight (the router then records the replica's queue length and routes
again, ``route_and_send_request``, router.py:1136); an accepted request updates the router's queue
length cache and decrements it when done. Replicas report their model ids (here: the tasks whose
built weights their cache holds) every ``PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S`` (0.1 s), and the
router sees them through ``update_replicas``, as the controller's broadcast does.

Not simulated: the control plane's RPC latencies (queue-length probes answer at once).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
    RunningReplicaInfo,
)
from ray.serve._private.constants import PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S
from ray.serve._private.request_router import request_router as _router_module
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve._private.request_router.replica_wrapper import RunningReplica

from benchmarks.fleet_sim import Fleet, Replica, Request, Routing

_DEPLOYMENT = DeploymentID(name="piggyback", app_name="fleet")


class SimReplica(RunningReplica):
    """A RunningReplica backed by a simulated replica instead of an actor."""

    def __init__(self, replica: Replica, max_ongoing_requests: int) -> None:
        replica_id = ReplicaID(unique_id=replica.name, deployment_id=_DEPLOYMENT)
        # a hash fixed by the replica's index, not by Python's per-process string hash: the
        # router's candidate sets are then iterated in the same order in every run
        object.__setattr__(replica_id, "_hash", replica.index)
        self._replica_info = RunningReplicaInfo(
            replica_id=replica_id,
            node_id=None,
            node_ip=None,
            availability_zone=None,
            actor_name=replica.name,
            max_ongoing_requests=max_ongoing_requests,
        )
        self._multiplexed_model_ids: set[str] = set()
        self.replica = replica

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.replica.inflight


class _VirtualTime:
    """Stands in for the ``time`` module inside request_router.py (it calls ``time.time()``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def time(self) -> float:
        return self.loop.time()


class RayMultiplexedRouting(Routing):
    is_async = True

    def __init__(self, fleet: Fleet, rng: random.Random, max_ongoing_requests: int = 16) -> None:
        super().__init__(fleet, rng)
        self.name = f"ray ({max_ongoing_requests})"
        self.max_ongoing = max_ongoing_requests
        self.wrappers: dict[int, SimReplica] = {}
        self.router: PowerOfTwoChoicesRequestRouter | None = None
        self.count = 0
        self.published: dict[int, frozenset[int]] = {}

    def begin(self) -> None:
        """Inside the running loop: the router, its replicas, the model-id pushes."""
        self.saved_time = _router_module.time
        _router_module.time = _VirtualTime(self.fleet.loop)  # type: ignore[assignment]
        self.router = PowerOfTwoChoicesRequestRouter(
            deployment_id=_DEPLOYMENT,
            handle_source=DeploymentHandleSource.UNKNOWN,
            use_replica_queue_len_cache=True,  # what enable_strict_max_ongoing_requests (the default) sets
            get_curr_time_s=self.fleet.loop.time,
        )
        self.replicas_changed()
        self.fleet.loop.call_later(PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S, self._push_model_ids)

    def end(self) -> None:
        _router_module.time = self.saved_time  # type: ignore[assignment]

    def replicas_changed(self) -> None:
        if self.router is None:
            return
        for r in self.fleet.up:
            if r.index not in self.wrappers:
                self.wrappers[r.index] = SimReplica(r, self.max_ongoing)
        self._update(force=True)

    def _update(self, *, force: bool) -> None:
        changed = force
        for r in self.fleet.up:
            resident = frozenset(r.resident())
            if self.published.get(r.index) != resident:
                self.published[r.index] = resident
                self.wrappers[r.index]._multiplexed_model_ids = {str(t) for t in resident}
                changed = True
        if changed:
            assert self.router is not None
            self.router.update_replicas([self.wrappers[r.index] for r in self.fleet.up])

    def _push_model_ids(self) -> None:
        if self.fleet.drained.done():
            return
        self._update(force=False)
        self.fleet.loop.call_later(PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S, self._push_model_ids)

    async def route_async(self, req: Request) -> None:
        """router.py's route_and_send_request with the rejection protocol, until the deadline."""
        assert self.router is not None
        router = self.router
        self.count += 1
        metadata = RequestMetadata(
            request_id=str(self.count), internal_request_id=str(self.count), multiplexed_model_id=str(req.task)
        )
        pr = PendingRequest(args=[], kwargs={}, metadata=metadata, created_at=self.fleet.now)
        is_retry = False
        try:
            async with asyncio.timeout_at(req.deadline):
                while True:
                    wrapper: Any = await router._choose_replica_for_request(pr, is_retry=is_retry)
                    replica: Replica = wrapper.replica
                    queue_len = replica.inflight
                    if replica.up and queue_len < self.max_ongoing:
                        router.on_send_request(wrapper.replica_id)
                        router.on_new_queue_len_info(wrapper.replica_id, queue_len + 1)
                        req.callbacks.append(lambda _req, rid=wrapper.replica_id: router.decrement_queue_len_cache(rid))
                        replica.submit(req)
                        return
                    router.on_new_queue_len_info(wrapper.replica_id, queue_len)
                    is_retry = True
        except TimeoutError:
            self.fleet.finish(req, 504)
