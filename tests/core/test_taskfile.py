import hashlib
import json
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from piggyback_core import (
    Backbone,
    BackboneMismatchError,
    Engine,
    FingerprintMismatchError,
    InvalidTaskNameError,
    LabelsError,
    MissingTensorError,
    TaskFile,
    TaskFileError,
    TaskFileFormatError,
    TaskFileVersionError,
    TensorDtypeError,
    TensorShapeError,
    UnexpectedTensorError,
    load_backbone,
    validate_task_name,
)
from piggyback_core.bitpack import unpack_binary
from tests.conftest import TaskFactory


def rewrite(
    data: bytes,
    *,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
    metadata: Callable[[dict[str, str]], None] | None = None,
) -> bytes:
    """Rebuild a task file with its tensors and/or metadata edited: a well-formed but wrong file."""
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta: dict[str, str] = header["__metadata__"]
    ts = st_load(data)
    if tensors:
        tensors(ts)
    if metadata:
        metadata(meta)
    draft = st_save(ts, metadata=meta)  # a careful forger keeps the checksum valid
    meta["data_sha256"] = hashlib.sha256(draft[8 + int.from_bytes(draft[:8], "little") :]).hexdigest()
    return st_save(ts, metadata=meta)


@pytest.fixture
def good(task_factory: TaskFactory) -> bytes:
    return task_factory("flowers", num_labels=4).to_bytes()


def test_task_file_round_trips_every_field(resnet18: Backbone, task_factory: TaskFactory) -> None:
    task = task_factory("flowers", num_labels=4, kind="ternary", norms=True)
    again = TaskFile.from_bytes(task.to_bytes())
    assert again.version == task.version and len(again.version) == 16
    assert (again.name, again.labels, again.mask_kind) == ("flowers", task.labels, "ternary")
    assert (again.backbone, again.fingerprint) == ("resnet18", resnet18.fingerprint)
    assert again.layers == task.layers
    assert all(torch.equal(again.masks[k], task.masks[k]) for k in task.masks)
    assert torch.equal(again.head_weight, task.head_weight) and torch.equal(again.head_bias, task.head_bias)
    assert set(again.norms) == set(resnet18.norm_sizes)
    assert again.provenance["dataset"] == "synthetic" and "created" in again.provenance
    again.check_compatible(resnet18)


def test_binary_task_file_takes_one_bit_per_weight(resnet18: Backbone, task_factory: TaskFactory) -> None:
    task = task_factory(num_labels=4)
    assert task.mask_nbytes == sum(-(-n // 8) for n in (m.weight.numel() for m in resnet18.masked))
    assert 1.0 <= task.bits_per_parameter < 1.0001
    assert task_factory(kind="ternary").bits_per_parameter == pytest.approx(2.0, abs=1e-4)
    size = len(task.to_bytes())
    assert size < task.mask_nbytes + task.head_nbytes + 20_000  # header overhead is small


def test_masks_from_training_pack_exactly(resnet18: Backbone) -> None:
    from tests.conftest import random_masks

    masks = random_masks(resnet18, keep=0.3, seed=4)
    task = TaskFile.create(
        name="x", labels=["a", "b"], backbone=resnet18, masks=masks,
        head_weight=torch.zeros(2, 512), head_bias=torch.zeros(2),
    )  # fmt: skip
    key = "layer2.0.conv1.weight"
    unpacked = unpack_binary(task.masks[key], masks[key].numel()).view(masks[key].shape).bool()
    assert torch.equal(unpacked, masks[key])
    assert task.layers[key].density == pytest.approx(masks[key].float().mean().item())


def test_truncated_file_is_refused(good: bytes) -> None:
    for cut in (0, 7, 100, len(good) // 2, len(good) - 1):
        with pytest.raises(TaskFileFormatError):
            TaskFile.from_bytes(good[:cut])


def test_trailing_garbage_is_refused(good: bytes) -> None:
    with pytest.raises(TaskFileFormatError, match="not a valid safetensors file"):
        TaskFile.from_bytes(good + b"\x00garbage")


@pytest.mark.parametrize("where", [1 / 3, 1 / 2, 0.999])
def test_any_flipped_bit_in_the_tensor_data_is_refused(good: bytes, where: float) -> None:
    corrupted = bytearray(good)
    corrupted[int(len(good) * where)] ^= 0b0000_0100
    with pytest.raises(TaskFileFormatError, match="does not match its checksum"):
        TaskFile.from_bytes(bytes(corrupted))


def test_mask_bits_that_disagree_with_the_recorded_density_are_refused(good: bytes) -> None:
    def flip_one_bit(t: dict[str, torch.Tensor]) -> None:
        t[f"mask/{CONV}"][10] ^= 1

    with pytest.raises(TaskFileFormatError, match=f"mask/{CONV} keeps .* the file is corrupt"):
        TaskFile.from_bytes(rewrite(good, tensors=flip_one_bit))


def test_version_is_stable_across_serialisations_and_changes_with_content(task_factory: TaskFactory) -> None:
    task = task_factory()
    assert TaskFile.from_bytes(task.to_bytes()).version == TaskFile.from_bytes(task.to_bytes()).version
    assert task_factory(seed=1).version != task.version


def test_corrupted_header_is_refused(good: bytes) -> None:
    corrupted = bytearray(good)
    corrupted[9] = ord("[")
    with pytest.raises(TaskFileFormatError, match="not JSON"):
        TaskFile.from_bytes(bytes(corrupted))


def test_a_pickle_renamed_safetensors_is_refused_without_unpickling() -> None:
    with pytest.raises(TaskFileFormatError, match="not a task file"):
        TaskFile.from_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(TaskFileFormatError, match="not a task file"):
        TaskFile.from_bytes(b"PK\x03\x04" + b"\x00" * 64)  # torch.save's zip container


def test_a_foreign_safetensors_file_is_refused() -> None:
    with pytest.raises(TaskFileFormatError, match="not a task file"):
        TaskFile.from_bytes(st_save({"w": torch.zeros(3)}))


def test_a_text_file_is_refused_as_not_safetensors() -> None:
    with pytest.raises(TaskFileFormatError) as info:
        TaskFile.from_bytes(b"Hello, this is a README, not a task file.\n" * 10)
    assert str(info.value) == "not a task file (not safetensors)"


def test_renamed_task_carries_the_new_name_and_remembers_the_trained_one(task_factory: TaskFactory) -> None:
    task = task_factory("colours")
    renamed = task.renamed("colours2")
    assert renamed.name == "colours2" and renamed.provenance["trained_as"] == "colours"
    assert renamed.version != task.version
    assert TaskFile.from_bytes(renamed.to_bytes()).name == "colours2"
    assert renamed.renamed("colours3").provenance["trained_as"] == "colours"  # the first name stays
    assert torch.equal(renamed.head_weight, task.head_weight) and renamed.masks.keys() == task.masks.keys()
    with pytest.raises(InvalidTaskNameError):
        task.renamed("Bad.Name")


def test_huge_header_claim_is_refused_before_reading_it() -> None:
    with pytest.raises(TaskFileFormatError, match="header claims"):
        TaskFile.from_bytes((2**40).to_bytes(8, "little") + b"{}")


def test_foreign_fingerprint_is_refused_naming_both(task_factory: TaskFactory) -> None:
    other = load_backbone("resnet18", weights="random", seed=1)
    task = task_factory()
    with pytest.raises(FingerprintMismatchError) as info:
        task.check_compatible(other)
    assert info.value.expected == other.fingerprint and info.value.actual == task.fingerprint
    assert other.fingerprint in str(info.value) and task.fingerprint in str(info.value)
    with pytest.raises(FingerprintMismatchError):
        Engine(other).add_task(task)


def test_other_architecture_is_refused(task_factory: TaskFactory) -> None:
    with pytest.raises(BackboneMismatchError, match="'resnet18'.*'resnet34'"):
        task_factory().check_compatible(load_backbone("resnet34", weights="random"))


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        d[key] = value

    return edit


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.pop(key)  # type: ignore[arg-type,return-value]


def _layers(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, str]], None]:
    def change(meta: dict[str, str]) -> None:
        layers = json.loads(meta["layers"])
        edit(layers)
        meta["layers"] = json.dumps(layers)

    return change


CONV = "layer1.0.conv1.weight"


# Well-formed but wrong task files: (edit for rewrite(), the error, what its message names).
BAD_FILE_EDITS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"tensors": _drop(f"mask/{CONV}")}, MissingTensorError, f"mask/{CONV}"),
    ({"tensors": _drop("head/bias")}, MissingTensorError, "head/bias"),
    ({"tensors": _set("extra/thing", torch.zeros(1))}, UnexpectedTensorError, "extra/thing"),
    ({"tensors": _set(f"mask/{CONV}", torch.zeros(4608, dtype=torch.int16))}, TensorDtypeError, "uint8"),
    (
        {"tensors": _set(f"mask/{CONV}", torch.zeros(4609, dtype=torch.uint8))},
        TensorShapeError,
        "exactly 4608",
    ),
    (
        {"tensors": _set("head/weight", torch.zeros(4, 512, dtype=torch.int32))},
        TensorDtypeError,
        "head/weight",
    ),
    ({"tensors": _set("head/weight", torch.zeros(3, 512))}, TensorShapeError, r"\(3, 512\)"),
    (
        {"tensors": _set("head/weight", torch.full((4, 512), float("nan")))},
        TaskFileFormatError,
        "non-finite",
    ),
    ({"metadata": _set("labels", '["a", "b"]')}, LabelsError, "2 labels for a head of 4"),
    ({"metadata": _set("labels", '["a", "a", "b", "c"]')}, LabelsError, "unique"),
    ({"metadata": _set("labels", "not json")}, TaskFileFormatError, "labels"),
    ({"metadata": _set("format_version", "99")}, TaskFileVersionError, "'99'"),
    ({"metadata": _set("task", "../etc/passwd")}, TaskFileFormatError, "invalid task"),
    ({"metadata": _set("mask_kind", "quaternary")}, TaskFileFormatError, "mask kind"),
    ({"metadata": _drop("fingerprint")}, TaskFileFormatError, "lacks fingerprint"),
    # ternary data in a binary file: 2 bits per weight is twice the bytes a binary layer takes
    ({"metadata": _set("mask_kind", "ternary")}, TensorShapeError, "ternary mask over"),
    # a header that lies about a layer's size
    (
        {"metadata": _layers(lambda ls: ls[CONV].update(shape=[64, 64, 3, 4]))},
        TensorShapeError,
        "exactly",
    ),
    ({"metadata": _layers(lambda ls: ls[CONV].update(density=0.5))}, TaskFileFormatError, "corrupt"),
    ({"metadata": _layers(lambda ls: ls.pop(CONV))}, UnexpectedTensorError, f"mask/{CONV}"),
]


@pytest.mark.parametrize("edit,error,match", BAD_FILE_EDITS)
def test_each_kind_of_bad_task_file_is_refused_with_its_own_error(
    good: bytes, edit: dict[str, Any], error: type[Exception], match: str
) -> None:
    bad = rewrite(good, **edit)
    with pytest.raises(error, match=match) as info:
        TaskFile.from_bytes(bad)
    assert isinstance(info.value, TaskFileError)


def test_a_mask_for_a_layer_the_backbone_lacks_or_of_another_shape_is_refused(resnet18: Backbone, good: bytes) -> None:
    renamed = rewrite(
        good,
        tensors=lambda t: t.__setitem__("mask/layer9.conv.weight", t.pop(f"mask/{CONV}")),
        metadata=_layers(lambda ls: ls.__setitem__("layer9.conv.weight", ls.pop(CONV))),
    )
    task = TaskFile.from_bytes(renamed)  # consistent in itself ...
    with pytest.raises(MissingTensorError, match=f"mask/{CONV}"):  # ... but not for this backbone
        task.check_compatible(resnet18)
    reshaped = TaskFile.from_bytes(rewrite(good, metadata=_layers(lambda ls: ls[CONV].update(shape=[64, 64, 9]))))
    with pytest.raises(TensorShapeError, match=r"\(64, 64, 3, 3\)"):
        reshaped.check_compatible(resnet18)


@pytest.mark.parametrize("name", ["", "../x", "a/b", "A", "-a", "é", "a" * 65, "a b", "a.b", None, 3])
def test_invalid_task_names_are_refused(name: object) -> None:
    with pytest.raises(InvalidTaskNameError):
        validate_task_name(name)


@pytest.mark.parametrize("name", ["a", "0", "flowers_102", "cub-200", "a" * 64])
def test_valid_task_names_pass(name: str) -> None:
    assert validate_task_name(name) == name


def _edit_header(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """The same data section (checksum still valid) under an edited safetensors header."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def _first_two_by_offset(header: dict[str, Any]) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def _overlap(h: dict[str, Any]) -> None:
    a, b = _first_two_by_offset(h)
    h[b]["data_offsets"] = [
        h[a]["data_offsets"][0],
        h[a]["data_offsets"][0] + h[b]["data_offsets"][1] - h[b]["data_offsets"][0],
    ]


HEADER_EDITS: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("unknown dtype", lambda h: h["head/bias"].update(dtype="F8_E4M3X")),
    ("size and shape disagree", lambda h: h["head/bias"].update(shape=[h["head/bias"]["shape"][0] + 1])),
    ("range past the data", lambda h: h["head/bias"].update(data_offsets=[10**9, 10**9 + 16])),
    ("negative offset", lambda h: h["head/bias"].update(data_offsets=[-16, 0])),
    ("float shape", lambda h: h["head/bias"].update(shape=[4.0])),
    ("missing offsets", lambda h: h["head/bias"].pop("data_offsets")),
    ("a gap", lambda h: h.pop(_first_two_by_offset(h)[0])),
    ("overlapping ranges", _overlap),
]


@pytest.mark.parametrize("what,edit", HEADER_EDITS, ids=[w for w, _ in HEADER_EDITS])
def test_a_header_that_misplaces_tensors_is_refused_as_safetensors_itself_refuses_it(
    good: bytes, what: str, edit: Callable[[dict[str, Any]], None]
) -> None:
    # The tensors are views into the file's bytes (no copy), so our reader checks what
    # safetensors' reader checks; each case is also refused by safetensors itself.
    bad = _edit_header(good, edit)
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own or a Python error
        st_load(bad)
    with pytest.raises(TaskFileFormatError, match="not a valid safetensors file"):
        TaskFile.from_bytes(bad)


def test_the_tensors_read_as_views_equal_what_safetensors_reads(good: bytes) -> None:
    task = TaskFile.from_bytes(bytearray(good))
    reference = st_load(good)
    assert set(reference) == {f"mask/{k}" for k in task.masks} | {"head/weight", "head/bias"}
    for key, packed in task.masks.items():
        assert torch.equal(packed, reference[f"mask/{key}"])
    assert torch.equal(task.head_weight, reference["head/weight"]) and torch.equal(
        task.head_bias, reference["head/bias"]
    )
    from_bytes = TaskFile.from_bytes(good)  # copied once into a bytearray
    assert from_bytes.version == task.version and torch.equal(from_bytes.head_weight, task.head_weight)
