"""A replica costs nothing per stored task until the task is used: headers only at start, the file
read and checked in full at first use, loaded tasks bounded, a changed file checked again, and an
S3 store's bodies in a bounded disk cache."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from piggyback_core import (
    Backbone,
    Engine,
    FileSystemStore,
    S3Store,
    StoreError,
    TaskFileError,
    TaskHeader,
    TaskUnavailableError,
    open_store,
)
from server.registry import TaskRegistry
from tests.conftest import encode, make_task
from tests.server.conftest import AppFactory, small_task


class _CountingStore(FileSystemStore):
    """Counts the bytes each method reads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.header_bytes = 0
        self.bodies: list[str] = []

    def head(self, name: str, version: str | None = None) -> Any:
        head = super().head(name, version)
        self.header_bytes += len(head.prefix)
        return head

    def map(self, name: str, version: str | None = None) -> Any:
        self.bodies.append(name)
        return super().map(name, version)

    def get(self, name: str) -> Any:
        raise AssertionError("the registry reads a stored task with map, never get")


def _corrupt_body(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # in the tensor data: the header still checks out
    path.write_bytes(bytes(data))


def test_a_sync_reads_headers_only_and_the_first_use_reads_the_file(tmp_path: Path, resnet18: Backbone) -> None:
    writer = FileSystemStore(tmp_path)
    for i in range(4):
        writer.put(f"t{i}", make_task(resnet18, f"t{i}", seed=i).to_bytes())
    file_bytes = sum(p.stat().st_size for p in tmp_path.iterdir())
    store = _CountingStore(tmp_path)
    engine = Engine(resnet18)
    registry = TaskRegistry(engine, store)
    report = registry.sync()
    assert report.loaded == ["t0", "t1", "t2", "t3"] and registry.names() == report.loaded
    assert store.bodies == [] and engine.tasks == {}
    assert 0 < store.header_bytes < file_bytes / 50  # a few KiB a task, of ~1.4 MB files
    task = registry.load("t2")
    assert task.name == "t2" and store.bodies == ["t2"] and list(engine.tasks) == ["t2"]
    assert registry.load("t2") is task and store.bodies == ["t2"]  # loaded once


def test_a_corrupt_body_starts_fine_and_fails_its_first_use_clearly_and_alone(
    app_client: AppFactory, tmp_path: Path, resnet18: Backbone
) -> None:
    store = FileSystemStore(tmp_path / "store")
    for name in ("good", "rotten"):
        store.put(name, small_task(resnet18, name).to_bytes())
    _corrupt_body(tmp_path / "store" / "rotten.safetensors")
    image = {"content": encode("PNG"), "headers": {"Content-Type": "image/png"}}
    with app_client(prefill=False) as client:
        ready = client.get("/readyz").json()
        assert ready["tasks"] == 2 and ready["tasks_failed"] == 0  # its header is fine: known, listed
        assert [t["task"] for t in client.get("/tasks").json()["tasks"]] == ["good", "rotten"]
        r = client.post("/classify/rotten", **image)
        assert r.status_code == 503 and "rotten" in r.json()["detail"] and "checksum" in r.json()["detail"]
        assert client.post("/classify/good", **image).status_code == 200
        ready = client.get("/readyz").json()
        assert ready["tasks_failed"] == 1 and ready["tasks"] == 1
        listing = client.get("/tasks").json()
        assert [t["task"] for t in listing["tasks"]] == ["good"] and list(listing["failed"]) == ["rotten"]
        again = client.post("/classify/rotten", **image)  # still clear, and not read again
        assert again.status_code == 503 and "checksum" in again.json()["detail"]
        v2 = client.post("/v2/models/rotten/infer", json={"inputs": []})
        assert v2.status_code == 503 and "checksum" in v2.json()["error"]


def test_a_foreign_fingerprint_is_refused_at_start_from_the_header(tmp_path: Path, resnet18: Backbone) -> None:
    from piggyback_core import load_backbone

    other = load_backbone("resnet18", weights="random", seed=1)
    store = _CountingStore(tmp_path)
    FileSystemStore(tmp_path).put("foreign", make_task(other, "foreign").to_bytes())
    registry = TaskRegistry(Engine(resnet18), store)
    report = registry.sync()
    assert list(report.failed) == ["foreign"] and other.fingerprint in report.failed["foreign"]
    assert store.bodies == [] and registry.names() == []
    with pytest.raises(TaskUnavailableError, match="fingerprint"):
        registry.load("foreign")


def test_loaded_tasks_stay_within_their_byte_bound_least_recently_used_out(tmp_path: Path, resnet18: Backbone) -> None:
    store = FileSystemStore(tmp_path)
    for i in range(5):
        store.put(f"t{i}", make_task(resnet18, f"t{i}", seed=i).to_bytes())
    engine = Engine(resnet18)
    one = TaskRegistry(engine, store)
    one.sync()
    per_task = one.load("t0").resident_bytes
    engine.remove_task("t0")
    registry = TaskRegistry(engine, store, max_loaded_bytes=2 * per_task)
    registry.sync()
    for name in ("t0", "t1", "t2"):
        registry.load(name)
    assert sorted(engine.tasks) == ["t1", "t2"] and registry.loaded_bytes <= 2 * per_task
    registry.lookup("t1")  # a use: t2 is now the least recently used
    registry.load("t3")
    assert sorted(engine.tasks) == ["t1", "t3"] and registry.evictions == 2
    engine.cache.resize(2**31)
    engine.pin("t1")  # never let go while pinned
    registry.load("t4")
    registry.load("t0")
    assert "t1" in engine.tasks and sorted(engine.tasks) == ["t0", "t1"]
    assert registry.load("t2").name == "t2"  # let go is not forgotten: read again at its next use
    assert registry.names() == ["t0", "t1", "t2", "t3", "t4"]


def test_a_file_that_changes_on_disk_is_checked_again(tmp_path: Path, resnet18: Backbone) -> None:
    store = FileSystemStore(tmp_path)
    store.put("a", make_task(resnet18, "a", seed=1).to_bytes())
    store.put("b", make_task(resnet18, "b", seed=2).to_bytes())
    engine = Engine(resnet18)
    registry = TaskRegistry(engine, store)
    registry.sync()
    old = registry.load("a")
    replacement = make_task(resnet18, "a", seed=3)
    FileSystemStore(tmp_path).put("a", replacement.to_bytes())  # another replica replaces it
    assert registry.sync().loaded == ["a"]
    assert engine.get_task("a").version == replacement.version != old.version  # loaded: reloaded at once
    # a file of a known, not loaded task replaced by a broken one: refused at its first use ...
    FileSystemStore(tmp_path).put("b", make_task(resnet18, "b", seed=4).to_bytes())
    _corrupt_body(tmp_path / "b.safetensors")  # (a rewrite in place: a new mtime and size)
    registry.sync()
    with pytest.raises(TaskUnavailableError, match="checksum"):
        registry.load("b")
    # ... and repaired: known again at the next sync, and served
    FileSystemStore(tmp_path).put("b", make_task(resnet18, "b", seed=5).to_bytes())
    assert registry.sync().loaded == ["b"] and registry.failed == {}
    assert registry.load("b").name == "b"


def test_the_header_check_agrees_with_the_full_check_on_every_header_problem(resnet18: Backbone) -> None:
    from tests.core.test_taskfile import BAD_FILE_EDITS, rewrite

    good = make_task(resnet18, "flowers", num_labels=4).to_bytes()
    in_the_data = 0
    for edit, error, match in BAD_FILE_EDITS:
        bad = rewrite(good, **edit)
        try:
            TaskHeader.parse(bad, len(bad))
        except TaskFileError as exc:  # what the header shows is refused with the full check's error
            assert type(exc) is error and re.search(match, str(exc)), (edit, exc)
        else:  # the rest is in the data: densities against the bits, non-finite values
            assert match in ("non-finite", "corrupt"), edit
            in_the_data += 1
    assert in_the_data == 2


def test_the_s3_disk_cache_holds_at_most_its_bound_and_evicts_the_least_recently_used(
    s3_url: str, tmp_path: Path, resnet18: Backbone
) -> None:
    writer = S3Store(s3_url)
    files = {f"t{i}": make_task(resnet18, f"t{i}", seed=i).to_bytes() for i in range(4)}
    for name, data in files.items():
        writer.put(name, data)
    size = len(files["t0"])
    cache_dir = tmp_path / "cache"
    store = open_store(s3_url, cache_dir=cache_dir, cache_bytes=2 * size + 100)
    assert isinstance(store, S3Store) and store.cache is not None
    listing = store.snapshot()
    head = store.head("t1", listing["t1"])  # a ranged read: the header, not the file
    assert len(head.prefix) < size / 10 and head.size == size and head.version == listing["t1"]
    assert TaskHeader.parse(head.prefix, head.size).name == "t1"
    for name in ("t0", "t1", "t0", "t2"):  # t0 used again: t1 is the least recently used
        blob = store.map(name, listing[name])
        assert bytes(blob.data[:]) == files[name]
    on_disk = sorted(p.name.split(".")[0] for p in cache_dir.iterdir())
    assert on_disk == ["t0", "t2"] and sum(p.stat().st_size for p in cache_dir.iterdir()) <= 2 * size + 100
    # a restart finds the cache as it was, bound and order included
    again = S3Store(s3_url, cache_dir=cache_dir, cache_bytes=2 * size + 100)
    assert again.cache is not None and sorted(f.split(".")[0] for f in again.cache.files()) == ["t0", "t2"]
    # a new version in the bucket replaces the cached one
    writer.put("t2", make_task(resnet18, "t2", seed=9).to_bytes())
    version = again.snapshot()["t2"]
    assert again.map("t2", version).version == version
    assert sum(f.startswith("t2.") for f in again.cache.files()) == 1


def test_an_s3_body_that_does_not_match_its_etag_is_refused(s3_url: str, tmp_path: Path, resnet18: Backbone) -> None:
    S3Store(s3_url).put("t", make_task(resnet18, "t").to_bytes())
    store = S3Store(s3_url, cache_dir=tmp_path / "cache", cache_bytes=1 << 30)
    real_get = store.get

    def tampered(name: str) -> Any:
        blob = real_get(name)
        data = bytearray(blob.data)
        data[-1] ^= 1
        return type(blob)(name=blob.name, version=blob.version, data=data)

    store.get = tampered  # type: ignore[method-assign]
    with pytest.raises(StoreError, match="does not match its ETag"):
        store.map("t")
    assert os.listdir(tmp_path / "cache") == []


def test_a_server_over_s3_reads_headers_at_start_and_bodies_into_its_disk_cache(
    app_client: AppFactory, s3_url: str, tmp_path: Path, resnet18: Backbone
) -> None:
    S3Store(s3_url).put("birds", small_task(resnet18, "birds").to_bytes())
    cache = tmp_path / "s3cache"
    with app_client(store=s3_url, s3_cache_dir=cache, prefill=False) as client:
        assert client.get("/readyz").json()["tasks"] == 1
        r = client.post("/classify/birds", content=encode("PNG"), headers={"Content-Type": "image/png"})
        assert r.status_code == 200
        assert [p.name.split(".")[0] for p in cache.iterdir()] == ["birds"]
