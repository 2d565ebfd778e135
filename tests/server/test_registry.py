"""The registry against a real store and engine: a store that lists nothing, a file that breaks a
parser, and the races of a task's lifecycle (pending loads, replacements of pinned tasks)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from piggyback_core import Backbone, Engine, FileSystemStore, TaskFile, TaskHeader, TaskUnavailableError
from server.registry import TaskRegistry
from tests.conftest import make_task


@pytest.fixture
def engine(resnet18: Backbone) -> Engine:
    return Engine(resnet18)


def _stored(registry: TaskRegistry, resnet18: Backbone, *names: str) -> None:
    for i, name in enumerate(names):
        registry.register(name, make_task(resnet18, name, seed=i).to_bytes())


def test_a_store_that_suddenly_lists_nothing_unloads_nothing_until_it_lists_nothing_twice(
    tmp_path: Path, engine: Engine, resnet18: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileSystemStore(tmp_path)
    registry = TaskRegistry(engine, store)
    _stored(registry, resnet18, "a", "b", "c")
    listing = store.snapshot()

    monkeypatch.setattr(store, "snapshot", dict)  # an unmounted volume: an empty, readable directory
    report = registry.sync()
    assert report.removed == [] and report.held == ["a", "b", "c"]
    assert sorted(engine.tasks) == ["a", "b", "c"]

    monkeypatch.setattr(store, "snapshot", lambda: dict(listing))  # mounted again: nothing happened
    assert registry.sync().held == []
    monkeypatch.setattr(store, "snapshot", dict)
    assert registry.sync().held == ["a", "b", "c"]  # a listing between resets the count
    report = registry.sync()  # the same empty listing twice in a row: the store really is empty
    assert report.removed == ["a", "b", "c"] and report.held == []
    assert engine.tasks == {}


def test_a_removal_below_the_guard_is_applied_at_once_and_one_above_it_waits_a_poll(
    tmp_path: Path, engine: Engine, resnet18: Backbone
) -> None:
    store = FileSystemStore(tmp_path)
    registry = TaskRegistry(engine, store, removal_guard=0.5)
    _stored(registry, resnet18, "a", "b", "c", "d")
    other = FileSystemStore(tmp_path)  # another replica deletes
    other.delete("a")
    assert registry.sync().removed == ["a"]  # 1 of 4: a quarter, below the guard
    other.delete("b")
    other.delete("c")
    report = registry.sync()  # 2 of 3: held once
    assert report.removed == [] and report.held == ["b", "c"]
    assert registry.sync().removed == ["b", "c"]
    assert sorted(engine.tasks) == ["d"]


def test_the_removal_guard_must_be_a_share(engine: Engine, tmp_path: Path) -> None:
    for bad in (0.0, -1.0, 1.5):
        with pytest.raises(ValueError, match="removal_guard"):
            TaskRegistry(engine, FileSystemStore(tmp_path), removal_guard=bad)


def test_an_unexpected_error_while_reading_one_file_is_that_files_error(
    tmp_path: Path, engine: Engine, resnet18: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileSystemStore(tmp_path)
    for i, name in enumerate(["good", "poison"]):
        store.put(name, make_task(resnet18, name, seed=i).to_bytes())
    real = TaskFile.from_bytes

    def parser_with_a_bug(data: Any) -> TaskFile:
        task = real(data)
        if task.name == "poison":
            raise RecursionError("maximum recursion depth exceeded while decoding a JSON object")
        return task

    real_header = TaskHeader.parse

    def header_parser_with_a_bug(prefix: Any, size: int) -> TaskHeader:
        header = real_header(prefix, size)
        if header.name == "poison":
            raise RecursionError("maximum recursion depth exceeded while decoding a JSON object")
        return header

    # in the header check at start ...
    with monkeypatch.context() as patched:
        patched.setattr(TaskHeader, "parse", staticmethod(header_parser_with_a_bug))
        registry = TaskRegistry(engine, store)
        report = registry.sync()
    assert report.loaded == ["good"] and list(report.failed) == ["poison"]
    assert "RecursionError" in report.failed["poison"]
    assert list(registry.failed) == ["poison"] and registry.names() == ["good"]
    # ... and in the full check at first use
    monkeypatch.setattr(TaskFile, "from_bytes", staticmethod(parser_with_a_bug))
    registry = TaskRegistry(engine, store)
    assert registry.sync().loaded == ["good", "poison"]  # the headers are fine
    assert registry.load("good").name == "good"
    with pytest.raises(TaskUnavailableError, match="RecursionError"):
        registry.load("poison")
    assert list(registry.failed) == ["poison"] and list(engine.tasks) == ["good"] and registry.names() == ["good"]


class _SlowStore(FileSystemStore):
    """Counts the reads of each task and makes each one last ``delay_s``."""

    def __init__(self, root: Path, delay_s: float) -> None:
        super().__init__(root)
        self.delay_s = delay_s
        self.reads: dict[str, int] = {}

    def map(self, name: str, version: str | None = None) -> Any:
        self.reads[name] = self.reads.get(name, 0) + 1
        time.sleep(self.delay_s)
        return super().map(name, version)


def test_two_requests_for_a_pending_task_read_its_file_once(tmp_path: Path, engine: Engine, resnet18: Backbone) -> None:
    store = _SlowStore(tmp_path, delay_s=0.3)
    store.put("late", make_task(resnet18, "late").to_bytes())
    registry = TaskRegistry(engine, store)
    gate = threading.Event()
    with ThreadPoolExecutor(1) as background:
        background.submit(gate.wait)  # the background loader is busy: the requests load it themselves
        registry.start_background(background)
        with ThreadPoolExecutor(2) as requests:
            for f in [requests.submit(registry.ensure, "late") for _ in range(2)]:
                f.result(timeout=10)
        gate.set()
    assert "late" in engine.tasks
    assert store.reads == {"late": 1}


def test_a_pending_task_is_always_pending_or_served_never_neither(
    tmp_path: Path, engine: Engine, resnet18: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileSystemStore(tmp_path)
    for i, name in enumerate(["a", "b", "c"]):
        store.put(name, make_task(resnet18, name, seed=i).to_bytes())
    registry = TaskRegistry(engine, store)
    seen: list[bool] = []
    head = store.head

    def slow_head(name: str, version: str | None = None) -> Any:
        time.sleep(0.05)
        return head(name, version)

    monkeypatch.setattr(store, "head", slow_head)
    done = threading.Event()

    def request_side() -> None:  # what a request (Services.task -> load) sees: a 404 if neither
        while not done.is_set():
            seen.append(all(registry.is_pending(n) or n in registry for n in "abc"))

    with ThreadPoolExecutor(1) as requests:
        with ThreadPoolExecutor(2) as pool:
            registry.start_background(pool)
            watcher = requests.submit(request_side)
        done.set()
        watcher.result()
    assert registry.names() == ["a", "b", "c"] and registry.loading == 0
    assert seen and all(seen)


def test_a_batch_admitted_before_a_pinned_task_was_replaced_does_not_keep_the_old_weights(
    engine: Engine, resnet18: Backbone
) -> None:
    engine.cache.resize(2**31)
    old = engine.add_task(make_task(resnet18, "pinned", seed=1))
    engine.pin("pinned")
    new = engine.add_task(make_task(resnet18, "pinned", seed=2))
    assert new.version != old.version
    x = torch.zeros(1, 3, 32, 32)
    engine.run(old, x)  # admitted with the old version, computed after the replacement
    engine.run(new, x)
    assert engine.cache.resident_bytes("pinned") == engine.weights_nbytes  # one version built, the new one
    engine.remove_task("pinned")
    engine.run(new, x)  # admitted before the removal
    assert engine.cache.bytes == 0


def test_a_pending_task_the_engine_cannot_take_is_failed_not_pending_for_ever(
    tmp_path: Path, engine: Engine, resnet18: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileSystemStore(tmp_path)
    store.put("big", make_task(resnet18, "big").to_bytes())
    registry = TaskRegistry(engine, store)

    def out_of_memory(task: TaskFile) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(engine, "add_task", out_of_memory)
    with ThreadPoolExecutor(1) as pool:
        registry.start_background(pool)
    registry.ensure("big")
    assert registry.loading == 0 and not registry.is_pending("big")
    assert list(registry.failed) == ["big"] and "big" not in engine.tasks
