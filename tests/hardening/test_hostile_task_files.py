"""Hostile task files and names through ``PUT /tasks``: each is refused before it touches the store,
and the registered tasks (what the server serves, and the bytes in the store) stay as they were."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save

from piggyback_core import Backbone, FileSystemStore, load_backbone
from tests.core.test_taskfile import BAD_FILE_EDITS, rewrite
from tests.server.conftest import AUTH, small_task

SUITE = "hostile task files"


@pytest.fixture
def setup(app_client, tmp_path: Path, resnet18: Backbone) -> Iterator[tuple[TestClient, Path, bytes]]:
    store = tmp_path / "store"
    FileSystemStore(store).put("flowers", small_task(resnet18, "flowers", num_labels=4).to_bytes())
    good = small_task(resnet18, "flowers", num_labels=4, seed=5).to_bytes()  # a valid replacement
    with app_client(store=store, max_task_bytes=20_000_000) as client:
        yield client, store, good


def state(client: TestClient, store: Path) -> tuple[object, dict[str, str]]:
    """What the server serves and what the store holds (every file, temp files included, by hash)."""
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(store.iterdir())}
    return client.get("/tasks").json(), files


def assert_refused_and_nothing_changed(
    client: TestClient, store: Path, before: object, response, statuses: set[int], what: str
) -> None:
    assert response.status_code in statuses, (what, response.status_code, response.text)
    if response.headers.get("content-type", "").startswith("application/json"):
        detail = response.json()["detail"]
        assert detail and "Traceback" not in str(detail), what
    assert state(client, store) == before, what


NAMES = [
    "../x", "..", "a/b", "a\\b", "%2e%2e", "..%2fx", "Flowers", "flöwers", "数据", "x" * 65, "-lead", "_lead",
    "a b", "a.b", "a:b", "a\x00b", "con", " flowers",
]  # fmt: skip


def test_hostile_names_are_refused_before_the_store(setup, cases: Callable) -> None:
    client, store, good = setup
    before = state(client, store)
    n = 0
    for name in NAMES:
        if name == "con":  # a valid name on POSIX (Windows' reserved device name): must work
            continue
        for method in ("PUT", "DELETE", "GET"):
            path = f"/tasks/{quote(name, safe='/%')}"  # sent as a client would: percent-encoded
            response = client.request(method, path, content=good if method == "PUT" else None, headers=AUTH)
            # 404 where the path never reaches the route (a slash), 422 for a bad name
            assert_refused_and_nothing_changed(client, store, before, response, {404, 405, 422}, f"{method} {name!r}")
            n += 1
    empty = client.put("/tasks/", content=good, headers=AUTH)
    assert_refused_and_nothing_changed(client, store, before, empty, {404, 405}, "empty name")
    cases(SUITE, n + 1)
    assert not list(store.glob(".tmp-*")) and not (store.parent / "x.safetensors").exists()


def test_wrong_backbones_formats_and_lying_headers_are_refused(setup, cases: Callable) -> None:
    client, store, good = setup
    before = state(client, store)
    other = load_backbone("resnet18", weights="random", seed=1)  # same architecture, other weights
    resnet34 = load_backbone("resnet34", weights="random")
    header_len = int.from_bytes(good[:8], "little")
    bodies: list[tuple[str, bytes, set[int]]] = [
        ("wrong fingerprint", small_task(other, "flowers").to_bytes(), {409}),
        ("wrong architecture", small_task(resnet34, "flowers").to_bytes(), {409}),
        ("empty body", b"", {422}),
        ("pickle renamed .safetensors", pickle.dumps({"weights": torch.zeros(3).tolist()}), {422}),
        ("torch.save zip", b"PK\x03\x04" + b"\x00" * 200, {422}),
        ("foreign safetensors", st_save({"w": torch.zeros(3)}), {422}),
        ("huge header claim", (2**40).to_bytes(8, "little") + b"{}", {422}),
        ("header longer than the file", (len(good) * 2).to_bytes(8, "little") + good[8:], {422}),
        ("header says 0", (0).to_bytes(8, "little") + good[8:], {422}),
        ("header not json", good[:8] + b"[" + good[9:], {422}),
        ("truncated body", good[: len(good) - 100], {422}),
        ("truncated header", good[: 8 + header_len // 2], {422}),
        ("trailing garbage", good + b"\x00" * 64, {422}),
        ("flipped data bit", good[:-50] + bytes([good[-50] ^ 1]) + good[-49:], {422}),
        ("only the length field", good[:8], {422}),
        ("over the upload limit", good + b"\x00" * 20_000_001, {413}),
    ]
    for edit, _error, match in BAD_FILE_EDITS:  # well-formed, checksum kept valid, but wrong
        bodies.append((f"bad file: {match}", rewrite(good, **edit), {422}))
    for what, body, statuses in bodies:
        response = client.put("/tasks/flowers", content=body, headers=AUTH)
        assert_refused_and_nothing_changed(client, store, before, response, statuses, what)
    cases(SUITE, len(bodies))
    assert not list(store.glob(".tmp-*"))
    # and a valid replacement still goes through afterwards
    assert client.put("/tasks/flowers", content=good, headers=AUTH).status_code == 200


def test_a_stream_over_the_limit_without_a_length_is_refused(setup, cases: Callable) -> None:
    client, store, good = setup
    before = state(client, store)

    def chunks() -> Iterator[bytes]:
        yield good
        for _ in range(400):
            yield b"\x00" * 65536  # 26 MB in all, past the 20 MB limit

    response = client.put("/tasks/flowers", content=chunks(), headers=AUTH)
    assert_refused_and_nothing_changed(client, store, before, response, {413}, "chunked over the limit")
    cases(SUITE, 1)
