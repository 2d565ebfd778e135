import asyncio
import time

import torch

from piggyback_core import Backbone, Engine
from server.batcher import Batcher, BatchPolicy, BatchStats
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
    assert all(isinstance(r, tuple) and r[0].shape == (5,) for r in results), results
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

    assert asyncio.run(scenario()) == 1  # the cold request rode in the very first batch
    assert batches[0].tasks == 2 and batches[0].size == 4


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
