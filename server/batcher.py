"""The dynamic batcher: one scheduler owns the device.

Requests wait in per-task FIFO queues with one bound on their total (``queue_size``); a full queue
answers at once (QueueFullError -> 503 + Retry-After) instead of growing. A batch closes when it
holds ``max_batch_size`` requests or when its oldest request has waited ``max_wait``.

**Affinity with fairness.** A batch is formed from whole-task groups, so that a mixed batch has
few, large segments (each segment is one task's network; fewer segments is faster). Exactly:

1. Waiting tasks are ranked: tasks *deferred* by the previous batch first, then by the arrival time
   of each task's oldest waiting request.
2. Every deferred task gets one place, in rank order.
3. The rest of the batch is filled in rank order, each task contributing all its waiting requests
   that fit (oldest first), before the next task.
4. Every task that waited and got no place is deferred to the next batch.

So a task with one request never waits behind another task's backlog for more than one batch: it
is either in the next batch or deferred, and a deferred task is in the batch after that (as long as
fewer tasks than ``max_batch_size`` are deferred at once; beyond that, oldest first).

**Workers.** Up to ``workers`` batches run at once, each on its own thread of the executor (on a
CPU, each with its own intra-op threads: see server.app). While every worker is busy, requests
accumulate, so the next batch is fuller.

**Spread** (``spread``: a CPU with several workers). The work in sight, requests waiting and being
decoded, is split over the idle workers: 8 requests and 2 idle workers make two batches of 4 side
by side, not one batch of 8 that leaves the other worker idle until its clients come back. On one
core, a batch of 4 costs 1.03x a batch of 8 per image (resnet18, bf16, packed; 1.08x for a batch
of 1), and the workers go out of phase, so that one computes while the other's clients send their
next requests. A backlog still makes full batches.

**Cores** (``cores`` > 0: a CPU with several workers and automatic threads). The batches in flight
share ``cores`` intra-op threads and never hold more: a batch that is all the work there is (nothing
else running, left waiting or being decoded: a lone image, the images of one request, or everything
when not spreading) gets all the free cores, and any other batch ``cores // workers`` (independent
single-threaded workers); a batch that would find too few free cores waits for a running one.
Measured over HTTP with wrk on 2 cores (resnet18, one task; docs/performance.md): with spread, and
with no dependency run in a thread pool, the server beats the rule before (a batch that started
alone and took every waiting request got every core) by 1.37x at 2 clients, 1.16x at 4, 1.05x at 8
and 1.23x at 16.

**Arrivals.** A request whose body has been read and whose image is being decoded is *expected*
(:meth:`Batcher.expect`). A batch that is not full waits for expected requests past ``max_wait``,
up to ``arrival_wait`` more: on a CPU the decodes run on the device thread ahead of the batch, so
waiting for them costs no device time and the batch runs full (8 decoded images in one forward,
instead of a forward per 1-2 images). With nothing expected, a batch closes at ``max_wait`` as
before, so a lone client waits no longer.

**Deadlines.** Each request carries a deadline. One that expires while queued is answered with
DeadlineExceededError (-> 504) and never reaches the device; its caller stops waiting at the
deadline in any case.

**Results on the host.** Batches mix tasks and run through :meth:`Engine.run_mixed_host` on the
worker threads, so the event loop stays free for HTTP: a batch's images are stacked into a pinned
staging buffer, its logits come back in one device-to-host copy, and each request's top-k
(softmax) is computed there too. The event loop receives plain host results
(:class:`ImageResult`) and never waits for a device. Requests hold the :class:`LoadedTask` they
were admitted with, so replacing or deleting a task never fails a request already admitted.

**Device failures.** A batch that runs out of device memory is split in two halves, each retried
once (after the allocator's cache is emptied); what still fails is answered 503
(:class:`DeviceMemoryError`) and counted (``on_oom``). An error after which the device is unusable
(a sticky CUDA error) is kept in :attr:`Batcher.device_lost` (liveness then fails: the process
must be restarted) and answered 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from piggyback_core import Engine, HostLogits, LoadedTask, Prediction, predictions_from_logits
from piggyback_core import device as _device

from .errors import DeadlineExceededError, DeviceMemoryError, NotReadyError, QueueFullError

__all__ = ["BatchPolicy", "BatchStats", "Batcher", "ImageResult"]

log = logging.getLogger("piggyback.batcher")


@dataclass(frozen=True)
class ImageResult:
    """One image's answer, on the host: its logits (``float32 [labels]``), its top-k predictions
    (softmax scores, best first; as many as the request asked for) and the size of its batch."""

    logits: np.ndarray = field(repr=False)
    predictions: list[Prediction]
    batch_size: int


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_wait_s: float = 0.005
    queue_size: int = 256
    timeout_s: float = 30.0
    arrival_wait_s: float = 0.05  # how much longer than max_wait a batch may wait for expected requests
    workers: int = 1  # batches running at once (threads of the executor)
    cores: int = 0  # intra-op threads shared by the batches in flight (0: as the executor set them)
    spread: bool = False  # split the work in sight over the idle workers (a CPU: see batch_limit)

    @property
    def share(self) -> int:
        """Each worker's share of the cores: the threads a batch needs free to start."""
        return max(1, self.cores // self.workers)

    def threads_for(self, free: int, in_flight: int, left: int, expected: int = 0) -> int:
        """Intra-op threads for a batch just taken, with ``left`` requests still waiting: all the
        free cores when nothing else runs, waits or is being decoded (the batch is all the work
        there is: a lone image, one request's images, or everything when not spreading); else the
        per-worker share (0: too few cores free, the batch must wait)."""
        if in_flight == 0 and left == 0 and expected == 0:
            return free
        return self.share if free >= self.share else 0

    def batch_limit(self, in_flight: int, waiting: int, expected: int = 0) -> int:
        """How many requests the next batch takes: ``max_batch_size``, or, with ``spread`` and
        several idle workers, the work in sight (waiting and being decoded) spread over them, so
        that the idle workers' batches run side by side instead of one batch taking it all while
        the other workers wait for the next requests."""
        idle = self.workers - in_flight
        work = waiting + expected
        if not self.spread or idle < 2 or work < 2:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, -(-work // min(idle, work))))


@dataclass(frozen=True)
class BatchStats:
    size: int
    tasks: int
    queue_waits_s: list[float]
    compute_s: float


@dataclass(eq=False)
class _Request:
    task: LoadedTask
    image: Tensor
    top_k: int
    enqueued: float
    deadline: float
    future: asyncio.Future[ImageResult] = field(repr=False)
    # the requests submitted together with this one (itself included), kept in one batch; None alone
    siblings: list[_Request] | None = field(default=None, repr=False)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        policy: BatchPolicy,
        *,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        executor: ThreadPoolExecutor | None = None,
        on_oom: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self._queues: OrderedDict[str, deque[_Request]] = OrderedDict()
        self._deferred: set[str] = set()  # tasks passed over by the last batch: first in the next
        self._in_flight = 0
        self._threads_in_use = 0  # intra-op threads held by the batches in flight (policy.cores)
        self._pending = 0
        self._expected = 0  # requests being decoded, about to be submitted
        self._wakeup = asyncio.Event()
        # The one thread that runs tensor work (see server.app: every torch op of the process runs
        # there, because a second thread using torch's OpenMP pool slows every later forward pass).
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=policy.workers, thread_name_prefix="piggyback-device"
        )
        self._running: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._on_batch = on_batch or (lambda _: None)
        self._on_depth = on_depth or (lambda _: None)
        self._on_oom = on_oom or (lambda: None)
        self.device_lost: BaseException | None = None  # a sticky device error: the process must restart

    @property
    def depth(self) -> int:
        return self._pending

    async def start(self) -> None:
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name="piggyback-batcher")

    async def stop(self, *, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting requests, answer the queued ones (up to ``drain_timeout_s``), stop."""
        self._accepting = False
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout_s)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        for queue in self._queues.values():
            for req in queue:
                if not req.future.done():
                    req.future.set_exception(NotReadyError("the server is shutting down"))
        self._queues.clear()
        if self._own_executor:
            self._executor.shutdown(wait=True)

    def expect(self) -> None:
        """A request is on its way (its image is being decoded); pair with :meth:`arrived`."""
        self._expected += 1

    def arrived(self) -> None:
        """The expected request was decoded (call :meth:`submit` next, with no await between) or
        failed."""
        self._expected -= 1
        self._wakeup.set()

    async def submit(
        self, task: LoadedTask, image: Tensor, *, top_k: int = 0, timeout_s: float | None = None
    ) -> ImageResult:
        """One image of ``task`` (``uint8 [3, H, W]``, or normalised floats): its host result."""
        return (await self.submit_many([(task, image)], top_k=top_k, timeout_s=timeout_s))[0]

    async def submit_many(
        self, items: list[tuple[LoadedTask, Tensor]], *, top_k: int = 0, timeout_s: float | None = None
    ) -> list[ImageResult]:
        """Each image's host result (logits, its ``top_k`` predictions, batch size), for images of
        one task or several, queued together (all or none: the queue bound counts every image) so
        that they can share a batch. ``timeout_s`` shortens the policy's deadline for these (a
        client's own deadline)."""
        if not self._accepting:
            raise NotReadyError("the server is not accepting requests")
        if self._pending + len(items) > self.policy.queue_size:
            raise QueueFullError(limit=self.policy.queue_size)
        timeout = self.policy.timeout_s if timeout_s is None else min(timeout_s, self.policy.timeout_s)
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[ImageResult]] = []
        siblings: list[_Request] | None = [] if len(items) > 1 else None
        for task, image in items:
            futures.append(loop.create_future())
            request = _Request(task, image, top_k, now, now + timeout, futures[-1], siblings)
            self._queues.setdefault(task.name, deque()).append(request)
            if siblings is not None:
                siblings.append(request)
        self._pending += len(items)
        self._on_depth(self._pending)
        self._wakeup.set()
        try:
            return list(await asyncio.wait_for(asyncio.gather(*(asyncio.shield(f) for f in futures)), timeout))
        except TimeoutError:
            for future in futures:
                if not future.done():
                    future.cancel()  # the scheduler skips it
            raise DeadlineExceededError(timeout_s=timeout) from None

    def _oldest(self) -> float | None:
        heads = [q[0].enqueued for q in self._queues.values() if q]
        return min(heads) if heads else None

    def _pop_live(self, queue: deque[_Request], now: float) -> _Request | None:
        """The oldest request of ``queue`` that still has a caller and time left; the others are
        dropped (an expired one is answered with DeadlineExceededError)."""
        while queue:
            req = queue.popleft()
            if self._still_live(req, now):
                return req
        return None

    def _still_live(self, req: _Request, now: float) -> bool:
        """For a request just taken off its queue: whether it still has a caller (else its caller
        gave up) and time left (else it is answered with DeadlineExceededError)."""
        self._pending -= 1
        if req.future.done():
            return False
        if req.deadline <= now:
            req.future.set_exception(DeadlineExceededError(timeout_s=self.policy.timeout_s))
            return False
        return True

    def _take(self, limit: int | None = None) -> list[_Request]:
        """Up to ``limit`` (max_batch_size) live requests, by the affinity policy in the module
        docstring."""
        now = time.monotonic()
        for name in [n for n, q in self._queues.items() if not q]:
            del self._queues[name]
        ranked = sorted(self._queues, key=lambda n: (n not in self._deferred, self._queues[n][0].enqueued))
        room = self.policy.max_batch_size if limit is None else limit
        groups: dict[str, list[_Request]] = {}
        for name in ranked:  # 2. one place for every deferred task
            if room == 0 or name not in self._deferred:
                break
            req = self._pop_live(self._queues[name], now)
            if req is not None:
                groups[name] = [req]
                room -= 1
        for name in ranked:  # 3. whole-task groups in rank order
            if room == 0:
                break
            queue = self._queues[name]
            while room and (req := self._pop_live(queue, now)) is not None:
                groups.setdefault(name, []).append(req)
                room -= 1
        # requests submitted together stay together (a spread limit never splits them; the batch's
        # size bound does)
        taken = {id(r) for group in groups.values() for r in group}
        room = self.policy.max_batch_size - len(taken)
        for req in [r for group in list(groups.values()) for r in group]:
            for sibling in req.siblings or ():
                if room == 0:
                    break
                queue = self._queues.get(sibling.task.name)
                if id(sibling) in taken or queue is None or sibling not in queue:
                    continue
                queue.remove(sibling)
                taken.add(id(sibling))
                if self._still_live(sibling, now):
                    groups.setdefault(sibling.task.name, []).append(sibling)
                    room -= 1
        # 4. passed over: first in the next batch
        self._deferred = {n for n in ranked if n not in groups and self._queues[n]}
        for name in [n for n, q in self._queues.items() if not q]:
            del self._queues[name]
        self._on_depth(self._pending)
        return [req for group in groups.values() for req in group]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._accepting or self._pending or self._in_flight:
            if self._in_flight >= self.policy.workers or not self._pending:
                self._wakeup.clear()
                if not (self._accepting or self._pending or self._in_flight):
                    break
                await self._wakeup.wait()
                continue
            limit = self.policy.batch_limit(self._in_flight, self._pending, self._expected)
            oldest = self._oldest()
            if oldest is not None and self._accepting and self._pending < limit:
                close_at = oldest + self.policy.max_wait_s
                if self._expected > 0:
                    close_at += self.policy.arrival_wait_s
                delay = close_at - time.monotonic()
                if delay > 0:
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), delay)
                    continue
            threads = 0
            if self.policy.cores and self.policy.cores - self._threads_in_use < self.policy.share:
                self._wakeup.clear()  # too few free cores: a running batch's end wakes us
                await self._wakeup.wait()
                continue
            batch = self._take(limit)
            if self.policy.cores:
                free = self.policy.cores - self._threads_in_use
                threads = self.policy.threads_for(free, self._in_flight, self._pending, self._expected)
            if batch:
                self._in_flight += 1
                self._threads_in_use += threads
                running = asyncio.create_task(self._execute(loop, batch, threads))
                self._running.add(running)
                running.add_done_callback(functools.partial(self._finished, threads=threads))

    def _finished(self, running: asyncio.Task[None], *, threads: int) -> None:
        self._running.discard(running)
        self._in_flight -= 1
        self._threads_in_use -= threads
        self._wakeup.set()

    def _run_group(
        self, reqs: list[_Request], threads: int
    ) -> Sequence[tuple[np.ndarray, list[Prediction]] | BaseException]:
        """On a worker thread: the batch computed, brought to the host and finished there; after an
        out-of-memory retry, a half that failed again has its error in its requests' places (the
        other half's results stand)."""
        if threads:
            torch.set_num_threads(threads)  # per thread: this worker's intra-op threads for this batch
        try:
            return self._compute(reqs)
        except Exception as exc:
            if not _device.is_oom(exc):
                raise
        # Out of device memory (outside the except: its traceback no longer holds the failed frames'
        # tensors): the allocator's cache emptied, each half retried once.
        self._on_oom()
        _device.empty_cache(self.engine.device)
        halves = [reqs] if len(reqs) == 1 else [reqs[: len(reqs) // 2], reqs[len(reqs) // 2 :]]
        out: list[tuple[np.ndarray, list[Prediction]] | BaseException] = []
        for half in halves:
            try:
                out += self._compute(half)
            except Exception as exc:
                failure: BaseException = exc
                if _device.is_oom(exc):
                    _device.empty_cache(self.engine.device)
                    failure = DeviceMemoryError(images=len(half))
                    failure.__cause__ = exc
                out += [failure] * len(half)
        return out

    def device_part(self, reqs: list[_Request]) -> HostLogits:
        """A batch's work up to its logits on the host: its images stacked into the pinned staging
        buffer, the forward, one device-to-host copy (and the one wait for the device after it)."""
        # Stacking is a tensor op too: it belongs on the worker thread, not the event loop.
        return self.engine.run_mixed_host(self.engine.stage([r.image for r in reqs]), [r.task for r in reqs])

    def _compute(self, reqs: list[_Request]) -> list[tuple[np.ndarray, list[Prediction]]]:
        try:
            host = self.device_part(reqs)
        except Exception as exc:
            if _device.is_sticky_error(exc) and self.device_lost is None:
                self.device_lost = exc
                log.critical("the device is unusable (%s): liveness fails so that the process is restarted", exc)
            raise
        out = []
        for i, r in enumerate(reqs):
            row = host.row(i)
            k = min(r.top_k, len(r.task.labels))
            out.append((row.numpy(), predictions_from_logits(row, r.task.labels, k) if k else []))
        return out

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Request], threads: int = 0) -> None:
        started = time.monotonic()
        # Tasks may be trained at different resolutions: one engine call per input shape and dtype.
        groups: dict[tuple[object, ...], list[_Request]] = {}
        for req in batch:
            groups.setdefault((*req.image.shape, req.image.dtype), []).append(req)
        for reqs in groups.values():
            try:
                rows = await loop.run_in_executor(self._executor, self._run_group, reqs, threads)
            except Exception as exc:  # noqa: BLE001 - delivered to each waiting request
                for r in reqs:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            for r, row in zip(reqs, rows, strict=True):
                if r.future.done():
                    continue
                if isinstance(row, BaseException):
                    r.future.set_exception(row)
                else:
                    r.future.set_result(ImageResult(row[0], row[1], len(batch)))
        waits = [started - r.enqueued for r in batch]
        # compute_s is the batch's whole time on the worker, device included (each batch waits for
        # its results before it returns)
        self._on_batch(BatchStats(len(batch), len({r.task.name for r in batch}), waits, time.monotonic() - started))
