import asyncio
import itertools
import threading
import time
from collections import deque

import torch

from piggyback_core import Backbone, Engine
from server.batcher import Batcher, BatchPolicy, BatchStats, ImageResult, _Request
from server.errors import NotReadyError
from tests.server.conftest import small_task


def _engine(backbone: Backbone, *names: str) -> Engine:
    engine = Engine(backbone)
    for i, name in enumerate(names):
        engine.add_task(small_task(backbone, name, seed=i))
    return engine


def test_stop_drains_every_admitted_request_and_then_refuses_new_ones(resnet18: Backbone) -> None:
    engine = _engine(resnet18, "a")
    image = torch.randn(3, 32, 32)

    async def scenario() -> tuple[list[object], BaseException | None]:
        batcher = Batcher(engine, BatchPolicy(max_batch_size=4, max_wait_s=0.5, queue_size=64))
        await batcher.start()
        pending = [asyncio.create_task(batcher.submit(engine.get_task("a"), image)) for _ in range(10)]
        await asyncio.sleep(0.01)  # all queued, the first batch still waiting to fill
        await batcher.stop()
        results = await asyncio.gather(*pending, return_exceptions=True)
        try:
            await batcher.submit(engine.get_task("a"), image)
        except NotReadyError as exc:
            return results, exc
        return results, None

    results, refused = asyncio.run(scenario())
    assert all(isinstance(r, ImageResult) and r.logits.shape == (5,) for r in results), results
    assert refused is not None


def test_a_hot_task_cannot_starve_a_cold_one(resnet18: Backbone) -> None:
    engine = _engine(resnet18, "hot", "cold")
    image = torch.randn(3, 32, 32)
    batches: list[BatchStats] = []

    async def scenario() -> int:
        batcher = Batcher(
            engine, BatchPolicy(max_batch_size=4, max_wait_s=0.05, queue_size=64), on_batch=batches.append
        )
        await batcher.start()
        # 20 hot requests queued ahead of the cold one, all before the scheduler next runs
        hot = [asyncio.create_task(batcher.submit(engine.get_task("hot"), image)) for _ in range(20)]
        cold = asyncio.create_task(batcher.submit(engine.get_task("cold"), image))
        await cold
        served_before_cold = len(batches)
        await asyncio.gather(*hot)
        await batcher.stop()
        return served_before_cold

    # the first batch is one whole-task group of hot; cold, deferred by it, rides in the second
    assert asyncio.run(scenario()) == 2
    assert batches[0].tasks == 1 and batches[0].size == 4
    assert batches[1].tasks == 2


def test_a_batch_waits_past_max_wait_for_an_expected_request_and_no_longer_without_one(resnet18: Backbone) -> None:
    engine = _engine(resnet18, "a")
    image = torch.randn(3, 32, 32)
    batches: list[BatchStats] = []

    async def scenario() -> float:
        policy = BatchPolicy(max_batch_size=4, max_wait_s=0.01, queue_size=64, arrival_wait_s=2.0)
        batcher = Batcher(engine, policy, on_batch=batches.append)
        await batcher.start()
        task = engine.get_task("a")
        batcher.expect()  # a second request is being decoded
        first = asyncio.create_task(batcher.submit(task, image))
        await asyncio.sleep(0.2)  # 20 x max_wait: without the expected request the batch would have run
        assert not first.done() and batches == []

        async def arrive() -> tuple[torch.Tensor, int]:
            batcher.arrived()  # decoded: submitted in the same step, as the app does
            return await batcher.submit(task, image)

        await asyncio.gather(first, asyncio.create_task(arrive()))
        started = time.monotonic()
        await batcher.submit(task, image)  # nothing expected: closes at max_wait
        lone = time.monotonic() - started
        await batcher.stop()
        return lone

    lone = asyncio.run(scenario())
    assert batches[0].size == 2 and batches[1].size == 1
    assert lone < 1.0  # far below max_wait + arrival_wait


class _StarvingBatcher(Batcher):
    """The mutation: whole-task groups by oldest request, without deferral (a hot backlog that
    keeps its oldest request ahead of a cold task fills batch after batch)."""

    def _take(self) -> list[_Request]:
        now = time.monotonic()
        batch: list[_Request] = []
        for name in sorted((n for n, q in self._queues.items() if q), key=lambda n: self._queues[n][0].enqueued):
            queue = self._queues[name]
            while len(batch) < self.policy.max_batch_size and (req := self._pop_live(queue, now)) is not None:
                batch.append(req)
        return batch


def _batches_a_cold_request_waits(cls: type[Batcher], backbone: Backbone) -> list[int]:
    """A hot task keeps a backlog of 40 (each of its requests older than any cold one); every
    batch, one new cold task sends one request. Returns, per cold request, how many batches were
    formed after it arrived until the one that took it (1: the next batch)."""
    engine = _engine(backbone, "hot", *(f"cold{i}" for i in range(12)))
    loop = asyncio.new_event_loop()
    batcher = cls(engine, BatchPolicy(max_batch_size=8, queue_size=1000))
    clock = itertools.count()

    def request(name: str) -> _Request:
        batcher._pending += 1
        return _Request(engine.get_task(name), torch.empty(0), 0, next(clock), float("inf"), loop.create_future())

    batcher._queues["hot"] = deque(request("hot") for _ in range(40))
    waited: dict[str, int] = {}
    arrived: dict[str, int] = {}
    for formed in range(12):
        cold = f"cold{formed}"
        batcher._queues[cold] = deque([request(cold)])
        arrived[cold] = formed
        for req in batcher._take():
            if req.task.name != "hot":
                waited[req.task.name] = formed - arrived[req.task.name] + 1
        while len(batcher._queues["hot"]) < 40:  # the hot backlog stays, always older
            batcher._queues["hot"].appendleft(request("hot"))
            batcher._queues["hot"][0].enqueued = -1.0
    loop.close()
    return [waited.get(f"cold{i}", 99) for i in range(11)]


def test_affinity_batching_serves_a_one_request_task_within_one_batch_of_a_backlog(resnet18: Backbone) -> None:
    waits = _batches_a_cold_request_waits(Batcher, resnet18)
    assert max(waits) <= 2, waits  # the next batch, or (deferred by a whole-task group) the one after


def test_the_fairness_check_fails_for_a_policy_that_starves(resnet18: Backbone) -> None:
    waits = _batches_a_cold_request_waits(_StarvingBatcher, resnet18)
    assert max(waits) > 2, waits


def test_a_batch_is_made_of_whole_task_groups_not_round_robin(resnet18: Backbone) -> None:
    engine = _engine(resnet18, "a", "b", "c")
    loop = asyncio.new_event_loop()
    batcher = Batcher(engine, BatchPolicy(max_batch_size=8, queue_size=100))
    for t, name in enumerate(["a"] * 6 + ["b"] * 6 + ["c"]):
        batcher._queues.setdefault(name, deque()).append(
            _Request(engine.get_task(name), torch.empty(0), 0, float(t), float("inf"), loop.create_future())
        )
        batcher._pending += 1
    first = [r.task.name for r in batcher._take()]
    second = [r.task.name for r in batcher._take()]
    loop.close()
    assert first == ["a"] * 6 + ["b"] * 2  # two segments (round-robin would make three: a, b, c)
    assert second == ["c"] + ["b"] * 4  # c, deferred by the first batch, goes first


def test_requests_submitted_together_stay_in_one_batch_whatever_the_spread_limit(resnet18: Backbone) -> None:
    engine = _engine(resnet18, "a", "b", "c")
    loop = asyncio.new_event_loop()
    batcher = Batcher(engine, BatchPolicy(max_batch_size=8, queue_size=100, workers=2, spread=True))
    alone = _Request(engine.get_task("a"), torch.empty(0), 0, 0.0, float("inf"), loop.create_future())
    together: list[_Request] = []
    for t, name in enumerate(["c", "a", "b"]):  # one image for three tasks: POST /classify?tasks=c,a,b
        together.append(
            _Request(engine.get_task(name), torch.empty(0), 0, 1.0 + t, float("inf"), loop.create_future(), together)
        )
    for req in [alone, *together]:
        batcher._queues.setdefault(req.task.name, deque()).append(req)
        batcher._pending += 1
    first = batcher._take(limit=2)  # the spread limit for 4 requests and 2 idle workers
    second = batcher._take(limit=2)
    loop.close()
    assert first[:2] == [alone, together[1]] and set(map(id, first)) == {id(alone), *map(id, together)}
    assert second == [] and batcher._pending == 0


def test_the_core_budget_gives_a_batch_that_is_all_the_work_every_core_and_others_their_share() -> None:
    policy = BatchPolicy(max_batch_size=8, workers=2, cores=2)
    assert policy.threads_for(free=2, in_flight=0, left=0) == 2  # nothing else in sight
    assert policy.threads_for(free=2, in_flight=0, left=0, expected=1) == 1  # another on the way
    assert policy.threads_for(free=2, in_flight=0, left=4) == 1  # split: the rest goes beside it
    assert policy.threads_for(free=1, in_flight=1, left=0) == 1
    assert policy.threads_for(free=0, in_flight=1, left=20) == 0  # wait for a running batch
    assert BatchPolicy(max_batch_size=8, workers=4, cores=16).threads_for(free=8, in_flight=2, left=40) == 4


def test_the_work_in_sight_is_spread_over_the_idle_workers() -> None:
    policy = BatchPolicy(max_batch_size=8, workers=2, cores=2, spread=True)
    assert policy.batch_limit(in_flight=0, waiting=8) == 4  # two batches of 4 side by side
    assert policy.batch_limit(in_flight=0, waiting=3, expected=4) == 4  # being decoded counts too
    assert policy.batch_limit(in_flight=0, waiting=40) == 8  # a backlog: full batches
    assert policy.batch_limit(in_flight=0, waiting=1) == 8  # one image: nothing to split
    assert policy.batch_limit(in_flight=1, waiting=8) == 8  # one idle worker takes what fits
    assert BatchPolicy(max_batch_size=8, workers=4, spread=True).batch_limit(in_flight=1, waiting=7) == 3
    # without spread (a GPU: one worker, batches as large as they come) batches are never split
    assert BatchPolicy(max_batch_size=8, workers=2).batch_limit(in_flight=0, waiting=8) == 8


def test_batches_in_flight_never_hold_more_threads_than_the_cores(resnet18: Backbone) -> None:
    engine = _engine(resnet18, "a")
    image = torch.randn(3, 32, 32)
    seen: list[tuple[int, int]] = []  # (threads of this batch, threads held by all batches in flight)
    sizes: list[int] = []
    held = [0]
    lock = threading.Lock()
    run_mixed = engine.run_mixed_host

    def recording(images, tasks):  # noqa: ANN001, ANN202
        threads = torch.get_num_threads()
        with lock:
            held[0] += threads
            seen.append((threads, held[0]))
            sizes.append(len(tasks))
        time.sleep(0.05)  # long enough for batches to overlap
        try:
            return run_mixed(images, tasks)
        finally:
            with lock:
                held[0] -= threads

    engine.run_mixed_host = recording  # type: ignore[method-assign]

    async def scenario(requests: int) -> None:
        policy = BatchPolicy(max_batch_size=4, max_wait_s=0.001, queue_size=256, workers=2, cores=2, spread=True)
        batcher = Batcher(engine, policy)
        await batcher.start()
        await asyncio.gather(*(batcher.submit(engine.get_task("a"), image) for _ in range(requests)))
        await batcher.stop()

    asyncio.run(scenario(1))  # a lone image: every core
    assert seen == [(2, 2)]
    seen.clear()

    async def one_request(images: int) -> None:
        policy = BatchPolicy(max_batch_size=8, max_wait_s=0.001, queue_size=256, workers=2, cores=2, spread=True)
        batcher = Batcher(engine, policy)
        await batcher.start()
        await batcher.submit_many([(engine.get_task("a"), image)] * images)
        await batcher.stop()

    asyncio.run(one_request(4))  # one request's images: one batch, all the work there is, every core
    assert seen == [(2, 2)]
    seen.clear()
    asyncio.run(scenario(3))  # split over the two idle workers, one core each, side by side
    assert sorted(sizes[2:]) == [1, 2] and sorted(seen) == [(1, 1), (1, 2)]
    seen.clear()
    asyncio.run(scenario(40))  # a backlog: single-threaded batches side by side, never over budget
    assert max(held for _, held in seen) <= 2
    assert (1, 2) in seen  # two one-thread batches did overlap
