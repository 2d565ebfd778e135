"""Hostile task files and names through ``PUT /tasks``: each is refused before it touches the store,
and the registered tasks (what the server serves, and the bytes in the store) stay as they were."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save

from piggyback_core import (
    Backbone,
    FileSystemStore,
    LayerInfo,
    NormParams,
    Preprocessing,
    TaskFile,
    TaskFileError,
    TaskFileFormatError,
    load_backbone,
)
from piggyback_core.bitpack import pack_mask
from piggyback_core.taskfile import MAX_HEADER_DEPTH, MAX_METADATA_DEPTH, _nested_deeper_than
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
            response = client.request(
                method, path, content=good if method == "PUT" else None, headers=AUTH, follow_redirects=False
            )
            # 404 where the path never reaches the route (a slash), 422 for a bad name; a path the
            # client normalised to "/" ("/tasks/..") is the web console's redirect (GET) or a 405
            statuses = {404, 405, 422} | ({307} if response.request.url.path == "/" else set())
            assert_refused_and_nothing_changed(client, store, before, response, statuses, f"{method} {name!r}")
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


# --- headers that parse badly: deep nesting, text that is not text, values of the wrong type -------

DEEP = 100_000


def with_header(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """``data`` with its safetensors header edited and its tensor data kept, so its checksum (over
    the data only) stays valid."""
    start = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(data[8:start])
    edit(header)
    return with_raw_header(data, json.dumps(header).encode())


def raw_header(data: bytes) -> bytes:
    return data[8 : 8 + int.from_bytes(data[:8], "little")]


def with_raw_header(data: bytes, raw: bytes) -> bytes:
    return len(raw).to_bytes(8, "little") + raw + data[8 + len(raw_header(data)) :]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def with_member(data: bytes, member: bytes) -> bytes:
    """``data`` with one more member in its header object, given as raw JSON (``"key":value``)."""
    return with_raw_header(data, raw_header(data).rstrip()[:-1] + b"," + member + b"}")


def deep_header(data: bytes, depth: int = DEEP) -> bytes:
    """``data`` with one more header entry: an array nested ``depth - 1`` deep, ``depth`` in all."""
    return with_member(data, b'"deep":' + nested(depth - 1).encode())


def set_meta(key: str, value: str) -> Callable[[dict[str, Any]], None]:
    return lambda header: header["__metadata__"].__setitem__(key, value)


def set_entry(field: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        header[next(k for k in header if k.startswith("mask/"))][field] = value

    return edit


def add_empty_tensor(shape: list[int]) -> Callable[[dict[str, Any]], None]:
    return lambda header: header.__setitem__("bn/x/weight", {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]})


PREPROCESSING = {"resize_size": 1e999, "crop_size": 32, "mean": [0.5] * 3, "std": [0.2] * 3, "interpolation": "nearest"}
HOSTILE_HEADERS: list[tuple[str, Callable[[bytes], bytes]]] = [
    ("header nested 100,000 deep", deep_header),
    ("header of 100,000 unclosed brackets", lambda g: with_raw_header(g, b'{"a":' + b"[" * DEEP)),
    ("labels nested 100,000 deep", lambda g: with_header(g, set_meta("labels", nested(DEEP)))),
    ("layers nested 100,000 deep", lambda g: with_header(g, set_meta("layers", '{"a":' + nested(DEEP) + "}"))),
    ("provenance nested 100,000 deep", lambda g: with_header(g, set_meta("provenance", '{"a":' + nested(DEEP) + "}"))),
    ("preprocessing nested 100,000 deep", lambda g: with_header(g, set_meta("preprocessing", "{" * DEEP))),
    ("a 5,000-digit number in the header", lambda g: with_member(g, b'"n":' + b"1" * 5000)),
    ("a 5,000-digit number in the labels", lambda g: with_header(g, set_meta("labels", "[" + "1" * 5000 + "]"))),
    ("a lone surrogate in a label", lambda g: with_header(g, set_meta("labels", '["\\ud800", "b", "c", "d"]'))),
    ("a lone surrogate in the header", lambda g: with_header(g, set_meta("backbone", "\ud800"))),
    ("a header in UTF-16", lambda g: with_raw_header(g, raw_header(g).decode().encode("utf-16-le"))),
    ("a dtype that is a list", lambda g: with_header(g, set_entry("dtype", ["U8"]))),
    ("a dtype that is an object", lambda g: with_header(g, set_entry("dtype", {"U8": 1}))),
    ("an empty tensor with a dimension past int64", lambda g: with_header(g, add_empty_tensor([0, 2**70]))),
    ("an infinite resize size", lambda g: with_header(g, set_meta("preprocessing", json.dumps(PREPROCESSING)))),
]  # fmt: skip


@pytest.fixture(scope="module")
def good_file(resnet18: Backbone) -> bytes:
    return small_task(resnet18, "flowers", num_labels=4).to_bytes()


@pytest.mark.parametrize("what,hostile", HOSTILE_HEADERS, ids=[what for what, _ in HOSTILE_HEADERS])
def test_each_hostile_header_is_refused_with_a_task_file_error(
    good_file: bytes, what: str, hostile: Callable[[bytes], bytes]
) -> None:
    with pytest.raises(TaskFileError):  # never RecursionError, ValueError, TypeError, OverflowError ...
        TaskFile.from_bytes(hostile(good_file))


def test_a_header_nested_100000_deep_is_refused_before_it_is_parsed(good_file: bytes) -> None:
    for data in (deep_header(good_file), bytearray(deep_header(good_file))):
        with pytest.raises(TaskFileFormatError, match=f"header nested deeper than {MAX_HEADER_DEPTH} levels"):
            TaskFile.from_bytes(data)
    # at the limit the header parses, and is refused for what it holds (the entry is no tensor)
    with pytest.raises(TaskFileFormatError, match="entry 'deep' is malformed"):
        TaskFile.from_bytes(deep_header(good_file, MAX_HEADER_DEPTH))
    with pytest.raises(TaskFileFormatError, match="nested deeper"):
        TaskFile.from_bytes(deep_header(good_file, MAX_HEADER_DEPTH + 1))


@pytest.mark.parametrize("key", ["labels", "layers", "provenance", "preprocessing"])
def test_metadata_nested_100000_deep_is_refused_with_a_task_file_error(good_file: bytes, key: str) -> None:
    with pytest.raises(TaskFileError, match=f"metadata '{key}' nested deeper than {MAX_METADATA_DEPTH} levels"):
        TaskFile.from_bytes(with_header(good_file, set_meta(key, "[" + nested(DEEP) + "]")))


def test_a_valid_file_with_brackets_quotes_and_escapes_in_its_text_still_loads(resnet18: Backbone) -> None:
    labels = ['a "[[[" b', "back\\slash\\", "emoji 😀 数据", '{"}\\"]]]']
    task = small_task(resnet18, "flowers", num_labels=4, labels=labels)
    provenance = {"recipe": {"steps": [[[1, 2], [3]], {"x": [[]]}]}, "note": '\\"[{'}
    again = TaskFile.from_bytes(with_header(task.to_bytes(), set_meta("provenance", json.dumps(provenance))))
    assert again.labels == tuple(labels) and again.provenance == provenance


def slow_depth(text: bytes) -> int:
    """The deepest nesting of a JSON text, read a byte at a time as JSON reads it."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in text:
        c = chr(byte)
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def test_the_depth_check_agrees_with_a_byte_at_a_time_reader(cases: Callable) -> None:
    rng = random.Random(0)
    keys = ["a", "[", "{", '"', "\\", "\\\\", '\\"', "]", "}", "😀", ""]

    def document(depth: int) -> object:
        pick = rng.random()
        if depth == 0 or pick < 0.3:
            return rng.choice([1, None, True, *keys])
        if pick < 0.65:
            return [document(depth - 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(keys) + str(i): document(depth - 1) for i in range(rng.randint(0, 3))}

    n = 3000
    for _ in range(n):
        text = json.dumps(document(rng.randint(0, 8)), ensure_ascii=rng.random() < 0.5).encode()
        limit = rng.randint(0, 8)
        assert _nested_deeper_than(text, limit) == (slow_depth(text) > limit), (text, limit)
    cases(SUITE, n)


def tiny_task_file() -> bytes:
    """A complete task file of a few hundred bytes (no backbone needed to read one), for fuzzing."""
    g = torch.Generator().manual_seed(0)
    masks = {"a.weight": torch.rand(3, 4, generator=g) < 0.5, "b.weight": torch.rand(5, generator=g) < 0.5}
    task = TaskFile(
        name="tiny",
        labels=("x", "y"),
        backbone="resnet18",
        fingerprint="0" * 16,
        mask_kind="binary",
        threshold=0.005,
        layers={k: LayerInfo(tuple(m.shape), float(m.float().mean())) for k, m in masks.items()},
        masks={k: pack_mask(m, "binary") for k, m in masks.items()},
        head_weight=torch.randn(2, 3, generator=g),
        head_bias=torch.randn(2, generator=g),
        norms={"bn1": NormParams(torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3))},
        provenance={"dataset": "d", "recipe": {"lr": 0.1}},
        preprocessing=Preprocessing(resize_size=36, crop_size=32),
    )
    data = task.to_bytes()  # its metadata in an order that changes from run to run (a Rust HashMap):
    return with_raw_header(data, json.dumps(json.loads(raw_header(data)), sort_keys=True).encode())  # fixed


JUNK: list[object] = [
    None, True, -1, 0, 2**64, 1e308, "", "U8", "BOOL", [], [-1], [0, 2**70], [[1]], {}, {"a": 1}, "\ud800",
    "[", "null", "NaN", "1e999", '["x"]', '{"a.weight": {"shape": [0], "density": 0}}',
]  # fmt: skip


def mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with one random edit: a header value swapped for junk (the checksum kept valid), or
    bytes of the header or the data overwritten, inserted, deleted or cut off."""
    start = 8 + int.from_bytes(data[:8], "little")
    if rng.random() < 0.6:
        try:
            header = json.loads(data[8:start])
        except ValueError:
            header = None
        if isinstance(header, dict) and isinstance(header.get("__metadata__"), dict) and len(header) > 1:
            key = rng.choice(list(header))
            target = header[key] if isinstance(header[key], dict) else header
            field = rng.choice([*target, "extra"])
            value = rng.choice(JUNK)
            target[field] = json.dumps(value) if key == "__metadata__" and rng.random() < 0.5 else value
            return with_raw_header(data, json.dumps(header).encode())
    b = bytearray(data)
    i = rng.randrange(8, len(b)) if rng.random() < 0.7 and start < len(b) else rng.randrange(len(b))
    edit = rng.random()
    if edit < 0.4:
        b[i] = rng.choice(b'[]{}",:\\0123456789-.eE ') if i < start else rng.randrange(256)
    elif edit < 0.6:
        b[i:i] = bytes(rng.choice(b'[]{}",:\\0-e') for _ in range(rng.randint(1, 4)))
    elif edit < 0.8:
        del b[i : i + rng.randint(1, 8)]
    else:
        del b[i:]
    return bytes(b)


def test_random_mutations_of_a_task_file_raise_only_task_file_errors(cases: Callable) -> None:
    good = tiny_task_file()
    assert TaskFile.from_bytes(good).name == "tiny"
    rng = random.Random(0)
    n = loaded = 0
    for _ in range(3000):
        data = good
        for _ in range(rng.randint(1, 3)):
            data = mutate(data, rng)
        try:
            TaskFile.from_bytes(data).summary()
            loaded += 1
        except TaskFileError:
            pass
        n += 1
    assert loaded < n
    cases(SUITE, n, f"mutations fuzzed: {n}, of which still valid: {loaded}")


def test_hostile_headers_through_put_are_refused_and_nothing_changes(setup, cases: Callable) -> None:
    client, store, good = setup
    before = state(client, store)
    for what, hostile in HOSTILE_HEADERS:
        response = client.put("/tasks/flowers", content=hostile(good), headers=AUTH)
        assert_refused_and_nothing_changed(client, store, before, response, {422}, what)
    cases(SUITE, len(HOSTILE_HEADERS))
    assert client.put("/tasks/flowers", content=good, headers=AUTH).status_code == 200
