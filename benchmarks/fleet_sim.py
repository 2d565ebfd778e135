"""The fleet's discrete-event simulation: replicas with the server's batcher and weight cache, and
the routings in front of them (benchmarks.fleet runs the scenarios).

Time is virtual: the simulation runs on an asyncio event loop whose clock jumps to the next
scheduled event (the loop's timer heap is the event heap), so Ray Serve's real request router,
which is asyncio code, runs inside it unchanged, its backoff sleeps and timeouts in simulated time.

A replica (:class:`Replica`) is one server process as the server runs it:

* per-task FIFO queues bounded by ``queue_size`` in all (beyond it: 503), batches of up to
  ``max_batch`` closed when full or when the oldest request has waited ``max_wait_s``, formed by
  server.batcher's affinity policy (deferred tasks first, then whole-task groups by age);
* one batch at a time; a batch costs the sum of its segments' measured batch times, plus the
  measured build time for each segment whose task's weights are not resident;
* the engine's own :class:`~piggyback_core.engine.WeightCache` (byte budget, LRU, admission that
  evicts only stale entries), holding stand-ins of ``weights_nbytes`` bytes per task;
* requests past their deadline are dropped when their turn comes (504).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import math
import random
import selectors
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from piggyback_core.engine import WeightCache


class _Clock:
    now = 0.0


class _VirtualSelector(selectors.SelectSelector):
    """No I/O: waiting ``timeout`` seconds moves the virtual clock to the next timer."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise RuntimeError("the simulation stalled: nothing scheduled and nothing ready")
        self.clock.now += timeout
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.clock = _Clock()
        super().__init__(_VirtualSelector(self.clock))

    def time(self) -> float:
        return self.clock.now


@dataclass(frozen=True)
class Costs:
    """One replica's measured costs (benchmarks.fleet_costs)."""

    batch_s: tuple[float, ...]  # batch_s[b - 1]: one task's batch of b images, weights resident
    build_s: float  # one task's weights built from its masks
    weights_nbytes: int  # one task's built weights in the cache

    @classmethod
    def of(cls, arch: dict[str, Any]) -> Costs:
        return cls(tuple(arch["batch_s"]), arch["build_s"], arch["weights_nbytes"])

    @property
    def max_batch(self) -> int:
        return len(self.batch_s)


@dataclass(eq=False)
class Request:
    task: int
    arrived: float
    deadline: float
    measured: bool
    replica: Replica | None = None
    hit: bool = False
    status: int = 0  # 200, 503 (a full queue), 504 (deadline)
    done_at: float = 0.0
    callbacks: list[Callable[[Request], None]] = field(default_factory=list)


class _Weights:
    """A stand-in for a task's built weights: only its size matters to the cache."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


class Replica:
    def __init__(self, sim: Fleet, index: int) -> None:
        self.sim = sim
        self.index = index
        self.name = f"replica-{index}"
        self.up = True
        self.cache = WeightCache(sim.cache_bytes)
        self.queues: dict[int, deque[Request]] = {}
        self.deferred: set[int] = set()
        self.pending = 0  # requests queued
        self.running = 0  # requests in the batch running
        self.busy = False
        self.close_timer: asyncio.TimerHandle | None = None
        self.served = 0  # measured requests completed

    @property
    def inflight(self) -> int:
        return self.pending + self.running

    def resident(self) -> set[int]:
        """The tasks whose built weights this replica holds."""
        return {int(name) for name, _ in self.cache._entries}  # the cache's own keys (no public listing)

    def restart(self) -> None:
        """Back from a restart: a new process, its cache cold."""
        self.cache = WeightCache(self.sim.cache_bytes)
        self.up = True

    def submit(self, req: Request) -> None:
        req.replica = self
        if self.pending >= self.sim.queue_size:
            self.sim.finish(req, 503)
            return
        self.queues.setdefault(req.task, deque()).append(req)
        self.pending += 1
        self._maybe_start()

    def _maybe_start(self) -> None:
        if self.busy or not self.pending:
            return
        if self.pending >= self.sim.costs.max_batch:
            self._start()
            return
        if self.close_timer is None:
            oldest = min(q[0].arrived for q in self.queues.values())
            self.close_timer = self.sim.loop.call_at(max(oldest + self.sim.max_wait_s, self.sim.now), self._close)

    def _close(self) -> None:
        self.close_timer = None
        if not self.busy and self.pending:
            self._start()

    def _take(self) -> list[list[Request]]:
        """server.batcher.Batcher._take: deferred tasks one place each, then whole-task groups by
        the age of their oldest request; tasks passed over are deferred."""
        now = self.sim.now
        ranked = sorted(self.queues, key=lambda t: (t not in self.deferred, self.queues[t][0].arrived))
        room = self.sim.costs.max_batch
        groups: dict[int, list[Request]] = {}

        def pop(task: int) -> Request | None:
            queue = self.queues[task]
            while queue:
                req = queue.popleft()
                self.pending -= 1
                if req.deadline <= now:
                    self.sim.finish(req, 504)
                    continue
                return req
            return None

        for task in ranked:
            if room == 0 or task not in self.deferred:
                break
            if (req := pop(task)) is not None:
                groups[task] = [req]
                room -= 1
        for task in ranked:
            if room == 0:
                break
            while room and (req := pop(task)) is not None:
                groups.setdefault(task, []).append(req)
                room -= 1
        self.deferred = {t for t in ranked if t not in groups and self.queues[t]}
        for task in [t for t, q in self.queues.items() if not q]:
            del self.queues[task]
        return list(groups.values())

    def _start(self) -> None:
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        segments = self._take()
        if not segments:
            self._maybe_start()
            return
        costs = self.sim.costs
        seconds = 0.0
        for segment in segments:
            # Engine._task_weights: a lookup per segment; a miss builds, and caches if admitted
            key = (str(segment[0].task), "v1")
            hit = self.cache.get(key) is not None
            if not hit:
                seconds += costs.build_s
                if self.cache.admits(costs.weights_nbytes):
                    self.cache.put(key, {"w": _Weights(costs.weights_nbytes)})  # type: ignore[dict-item]
            for req in segment:
                req.hit = hit
            seconds += costs.batch_s[len(segment) - 1]
        self.busy = True
        self.running = sum(len(s) for s in segments)
        self.sim.loop.call_at(self.sim.now + seconds, self._done, segments)

    def _done(self, segments: list[list[Request]]) -> None:
        self.busy = False
        self.running = 0
        for segment in segments:
            for req in segment:
                self.served += req.measured
                self.sim.finish(req, 200)
        self._maybe_start()


# --- routings ------------------------------------------------------------------------------------


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Routing:
    name = ""
    is_async = False

    def __init__(self, fleet: Fleet, rng: random.Random) -> None:
        self.fleet = fleet
        self.rng = rng

    def begin(self) -> None:
        """Inside the running loop, before the first request."""

    def end(self) -> None:
        """After the run."""

    def replicas_changed(self) -> None:
        """The set of replicas that are up changed (a scale-out, a restart)."""

    def route(self, req: Request) -> Replica:
        raise NotImplementedError

    async def route_async(self, req: Request) -> None:
        raise NotImplementedError


class RandomRouting(Routing):
    """A plain Kubernetes Service (kube-proxy: each connection to a random ready endpoint)."""

    name = "random"

    def route(self, req: Request) -> Replica:
        up = self.fleet.up
        return up[self.rng.randrange(len(up))]


class RingHashRouting(Routing):
    """Envoy's ring_hash load balancer on a request header (the task): each replica at
    ``ring_size / replicas`` points of a 64-bit ring (Envoy's minimum_ring_size default, 1,024),
    a request to the first point clockwise of its key's hash. The ring holds the ready replicas."""

    name = "ring hash"
    ring_size = 1024

    def __init__(self, fleet: Fleet, rng: random.Random) -> None:
        super().__init__(fleet, rng)
        self.replicas_changed()

    def replicas_changed(self) -> None:
        up = self.fleet.up
        per = math.ceil(self.ring_size / len(up))
        points = sorted((_hash64(f"{r.name}_{i}"), r.index) for r in up for i in range(per))
        self.hashes = [h for h, _ in points]
        self.owners = [self.fleet.replicas[i] for _, i in points]
        self.task_hash: dict[int, int] = {}

    def first_point(self, task: int) -> int:
        h = self.task_hash.get(task)
        if h is None:
            h = self.task_hash[task] = _hash64(f"t{task}")
        return bisect.bisect(self.hashes, h) % len(self.hashes)

    def route(self, req: Request) -> Replica:
        return self.owners[self.first_point(req.task)]


class BoundedLoadRouting(RingHashRouting):
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018; Envoy's
    ``hash_balance_factor``, HAProxy's ``hash-balance-factor``): a replica takes a request only while
    its requests in flight stay under ``ceil(c * (all in flight + 1) / replicas)``; otherwise the
    request walks on clockwise to the next replica under the bound."""

    name = "bounded load"

    def __init__(self, fleet: Fleet, rng: random.Random, c: float = 1.25) -> None:
        super().__init__(fleet, rng)
        self.c = c

    def route(self, req: Request) -> Replica:
        up = self.fleet.up
        bound = math.ceil(self.c * (sum(r.inflight for r in up) + 1) / len(up))
        i = self.first_point(req.task)
        n = len(self.owners)
        for step in range(n):
            replica = self.owners[(i + step) % n]
            if replica.inflight < bound:
                return replica
        return self.owners[i]


# --- the fleet -----------------------------------------------------------------------------------


class Fleet:
    """Replicas on a virtual clock, requests routed by ``routing``; per-request outcomes in
    :attr:`requests`."""

    def __init__(
        self,
        loop: VirtualLoop,
        costs: Costs,
        replicas: int,
        *,
        cache_bytes: int,
        queue_size: int = 256,
        max_wait_s: float = 0.005,
        timeout_s: float = 30.0,
    ) -> None:
        self.loop = loop
        self.costs = costs
        self.cache_bytes = cache_bytes
        self.queue_size = queue_size
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self.replicas = [Replica(self, i) for i in range(replicas)]
        self.up = list(self.replicas)
        self.routing: Routing | None = None
        self.finished: list[Request] = []
        self.outstanding = 0
        self.all_arrived = False
        self.drained: asyncio.Future[None] = loop.create_future()

    @property
    def now(self) -> float:
        return self.loop.time()

    def refresh_up(self) -> None:
        self.up = [r for r in self.replicas if r.up]
        assert self.routing is not None
        self.routing.replicas_changed()

    def add_replica(self) -> Replica:
        replica = Replica(self, len(self.replicas))
        self.replicas.append(replica)
        self.refresh_up()
        return replica

    def arrive(self, req: Request) -> None:
        self.outstanding += 1
        assert self.routing is not None
        if self.routing.is_async:
            self.loop.create_task(self.routing.route_async(req))
        else:
            self.routing.route(req).submit(req)

    def finish(self, req: Request, status: int) -> None:
        req.status = status
        req.done_at = self.now
        self.finished.append(req)
        for callback in req.callbacks:
            callback(req)
        self.outstanding -= 1
        if self.all_arrived and self.outstanding == 0 and not self.drained.done():
            self.drained.set_result(None)
