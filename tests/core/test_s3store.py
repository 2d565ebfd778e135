"""The S3 store against a local S3-compatible endpoint (moto's server over real HTTP), and the
store contract that both stores must keep: the same tests run over the filesystem store."""

from __future__ import annotations

import threading
from pathlib import Path

import boto3
import pytest

from piggyback_core import (
    Backbone,
    Engine,
    FileSystemStore,
    InvalidTaskNameError,
    MaskStore,
    S3Store,
    StoreError,
    TaskFile,
    TaskNotFoundError,
    diff_snapshots,
    open_store,
)
from piggyback_core.s3store import parse_s3_url
from server.registry import TaskRegistry
from tests.conftest import SMALL, make_task


@pytest.fixture(params=["filesystem", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> MaskStore:
    if request.param == "filesystem":
        return open_store(tmp_path / "store")
    return open_store(request.getfixturevalue("s3_url"))


def test_open_store_picks_the_backend_from_the_location(tmp_path: Path, s3_url: str) -> None:
    assert isinstance(open_store(tmp_path / "dir"), FileSystemStore)
    assert isinstance(open_store(s3_url), S3Store)
    with pytest.raises(StoreError, match="unsupported store location"):
        open_store("gs://bucket/x")


def test_contract_put_get_list_delete(store: MaskStore) -> None:
    stored = store.put("flowers", b"v1")
    blob = store.get("flowers")
    assert (blob.data, blob.version, stored.size) == (b"v1", stored.version, 2)
    store.put("birds", b"v1")
    assert [(t.name, t.size) for t in store.list()] == [("birds", 2), ("flowers", 2)]
    assert "birds" in store and "cars" not in store
    store.delete("birds")
    assert [t.name for t in store.list()] == ["flowers"]
    with pytest.raises(TaskNotFoundError):
        store.get("birds")
    with pytest.raises(TaskNotFoundError):
        store.delete("birds")


def test_contract_snapshots_show_every_change(store: MaskStore) -> None:
    store.put("a", b"1")
    store.put("b", b"1")
    before = store.snapshot()
    store.put("a", b"2")
    store.delete("b")
    store.put("c", b"1")
    after = store.snapshot()
    changes = diff_snapshots(before, after)
    assert (changes.added, changes.changed, changes.removed) == (["c"], ["a"], ["b"])
    assert after["a"] == store.get("a").version  # the token a get returns is the one a poll sees
    assert not diff_snapshots(after, store.snapshot())


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "UPPER", "x" * 65, "a\x00b", "é"])
def test_contract_invalid_names_are_refused_before_any_request(store: MaskStore, name: str) -> None:
    for op in (lambda: store.put(name, b"x"), lambda: store.get(name), lambda: store.delete(name)):
        with pytest.raises(InvalidTaskNameError):
            op()
    assert store.list() == []


def test_s3_ignores_foreign_objects_and_other_prefixes(s3_url: str) -> None:
    store = S3Store(s3_url)
    store.put("a", b"1")
    client = boto3.client("s3")
    for key in ("tasks/notes.txt", "tasks/Bad Name.safetensors", "tasks/sub/b.safetensors", "other/c.safetensors"):
        client.put_object(Bucket=store.bucket, Key=key, Body=b"x")
    assert [t.name for t in store.list()] == ["a"]
    assert client.get_object(Bucket=store.bucket, Key="tasks/a.safetensors")["Body"].read() == b"1"


def test_s3_version_is_the_content_etag(s3_url: str) -> None:
    store = S3Store(s3_url)
    first = store.put("a", b"same").version
    assert store.put("a", b"same").version == first  # same bytes: nothing for replicas to reload
    assert store.put("a", b"other").version != first


def test_s3_lists_more_than_one_page(s3_url: str) -> None:
    store = S3Store(s3_url)
    names = [f"t{i:04d}" for i in range(1005)]
    client = store.client
    for name in names:  # straight to the bucket: 1005 puts through the store would be slow for no reason
        client.put_object(Bucket=store.bucket, Key=f"tasks/{name}.safetensors", Body=b"x")
    assert [t.name for t in store.list()] == names


def test_s3_errors_are_store_errors_with_the_location(s3_endpoint: str, s3_url: str) -> None:
    bucket, prefix = parse_s3_url(s3_url)
    assert prefix == "tasks/"
    assert parse_s3_url("s3://b") == ("b", "")
    for bad in ("s3://", "http://b/x", "s3://b/x?y=1"):
        with pytest.raises(StoreError):
            parse_s3_url(bad)
    with pytest.raises(StoreError, match="does not exist"):
        S3Store("s3://no-such-bucket-here/x")
    with pytest.raises(StoreError, match="cannot open the store"):
        S3Store(s3_url, endpoint_url="http://127.0.0.1:9")  # nothing listens on the discard port


def test_s3_refuses_a_body_corrupted_in_transit(s3_url: str) -> None:
    """The Content-MD5 header makes the endpoint check the bytes it received."""
    store = S3Store(s3_url)

    def corrupt(request, **_: object) -> None:  # type: ignore[no-untyped-def]
        request.body = b"XXXX" + bytes(request.body)[4:]

    store.client.meta.events.register("before-send.s3.PutObject", corrupt)
    with pytest.raises(StoreError, match="cannot store task 'a'"):
        store.put("a", b"real bytes")
    assert store.list() == []


@pytest.mark.parametrize("backend", ["filesystem", "s3"])
def test_two_replicas_registering_one_name_at_once_converge_on_the_store_winner(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, resnet18: Backbone
) -> None:
    location = tmp_path / "store" if backend == "filesystem" else request.getfixturevalue("s3_url")
    replicas = [TaskRegistry(Engine(resnet18), open_store(location)) for _ in range(2)]
    files = [make_task(resnet18, "dup", num_labels=3, seed=s, preprocessing=SMALL).to_bytes() for s in (1, 2)]
    for _ in range(5):
        barrier = threading.Barrier(2)

        def put(i: int, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            replicas[i].register("dup", files[i])

        threads = [threading.Thread(target=put, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for replica in replicas:
            replica.sync()  # one poll
        winner = open_store(location).get("dup").data
        assert winner in files
        versions = {r.engine.tasks["dup"].version for r in replicas}
        assert versions == {TaskFile.from_bytes(winner).version}


def test_a_task_registered_through_one_s3_replica_reaches_the_other(s3_url: str, resnet18: Backbone) -> None:
    a, b = (TaskRegistry(Engine(resnet18), open_store(s3_url)) for _ in range(2))
    a.register("flowers", make_task(resnet18, "flowers", preprocessing=SMALL).to_bytes())
    assert b.sync().loaded == ["flowers"]
    a.delete("flowers")
    assert b.sync().held == ["flowers"]  # every task gone at once: held until a second listing says so
    assert b.sync().removed == ["flowers"] and "flowers" not in b.engine.tasks
