"""The task file: one task in one ``.safetensors`` file (format version 1). No pickle anywhere.

Tensors
    ``mask/<key>``    uint8, flat: the packed mask of the backbone parameter ``<key>`` (e.g.
                      ``mask/layer1.0.conv1.weight``); bit order in :mod:`piggyback_core.bitpack`
    ``head/weight``   float ``[num_labels, feature_dim]``; ``head/bias`` float ``[num_labels]``
    ``bn/<module>/{weight,bias,running_mean,running_var}``  optional per-task BatchNorm, float ``[C]``

Metadata (safetensors header strings)
    ``format`` = ``piggyback-task``, ``format_version`` = ``1``, ``task``, ``labels`` (JSON list),
    ``backbone`` (architecture), ``fingerprint`` (of the backbone weights), ``mask_kind``
    (``binary``/``ternary``), ``threshold``, ``bit_order``, ``layers`` (JSON: key -> shape and
    density), ``density`` (kept fraction over all masked weights), ``provenance`` (JSON: dataset,
    method, epochs, accuracy, date, ...), optionally ``preprocessing`` (JSON: resize, crop, mean,
    std, interpolation used in training), ``data_sha256`` (SHA-256 of the tensor data section).

A task's **version** is a hash of its canonical (key-sorted) metadata, so it changes with any
change to the tensors (through ``data_sha256``) or the metadata, and is the same however the
header happens to be ordered.

:meth:`TaskFile.from_bytes` checks that a file is complete and consistent in itself;
:meth:`TaskFile.check_compatible` checks that it fits a given backbone. Each problem raises its own
:class:`~piggyback_core.errors.TaskFileError`.

:meth:`TaskHeader.parse` makes every check that needs only the header and the file's size (names,
dtypes, shapes, offsets, labels, layers, the size of every packed mask), without the tensor data:
what a server checks for each stored task at start. ``from_bytes`` makes the same checks, then the
ones that read the data (checksum, mask bits against the recorded densities, finite heads).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor

from .bitpack import MASK_KINDS, MaskKind, count_nonzero_packed, pack_mask, packed_nbytes, validate_packed
from .errors import (
    BackboneMismatchError,
    FingerprintMismatchError,
    InvalidTaskNameError,
    LabelsError,
    MissingTensorError,
    TaskFileFormatError,
    TaskFileVersionError,
    TensorDtypeError,
    TensorShapeError,
    UnexpectedTensorError,
)
from .images import Preprocessing
from .masking import DEFAULT_THRESHOLD, NormParams
from .names import validate_task_name

if TYPE_CHECKING:
    from .backbones import Backbone

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_DEPTH",
    "MAX_METADATA_DEPTH",
    "LayerInfo",
    "TaskFile",
    "TaskHeader",
    "header_length",
]

FORMAT_NAME = "piggyback-task"
FORMAT_VERSION = "1"
BIT_ORDER = "row-major, lsb-first"
MAX_HEADER_BYTES = 16 * 1024 * 1024
# JSON nesting allowed in the header (a safetensors header nests 3 deep: the header object, a
# tensor's entry, its shape and offsets) and in a JSON metadata value (provenance is the caller's):
# json.loads recurses once per level and raises RecursionError, no ValueError, on a deep document.
MAX_HEADER_DEPTH = 8
MAX_METADATA_DEPTH = 32
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NORM_FIELDS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class LayerInfo:
    shape: tuple[int, ...]
    density: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _MaskStats:
    """What a task file and its header both derive from the layers' records and the mask bytes."""

    layers: dict[str, Any]

    @property
    def num_masked_weights(self) -> int:
        raise NotImplementedError

    @property
    def mask_nbytes(self) -> int:
        raise NotImplementedError

    @property
    def density(self) -> float:
        """Fraction of masked weights the mask keeps (non-zero entries)."""
        total = self.num_masked_weights
        return sum(i.density * i.numel for i in self.layers.values()) / total if total else 1.0

    @property
    def bits_per_parameter(self) -> float:
        """Mask bits stored per masked backbone weight (1 for binary, 2 for ternary, plus padding)."""
        return 8 * self.mask_nbytes / self.num_masked_weights if self.num_masked_weights else 0.0


@dataclass(frozen=True)
class TaskFile(_MaskStats):
    """One task, validated in itself. Build with :meth:`create` or :meth:`from_bytes`."""

    name: str
    labels: tuple[str, ...]
    backbone: str
    fingerprint: str
    mask_kind: MaskKind
    threshold: float
    layers: dict[str, LayerInfo]
    masks: dict[str, Tensor] = field(repr=False)
    head_weight: Tensor = field(repr=False)
    head_bias: Tensor = field(repr=False)
    norms: dict[str, NormParams] = field(default_factory=dict, repr=False)
    provenance: dict[str, Any] = field(default_factory=dict)
    preprocessing: Preprocessing | None = None  # how its images were prepared in training
    version: str = ""  # hash of the canonical metadata (which holds the data checksum); set on read

    # --- derived figures ----------------------------------------------------------------------

    @property
    def num_masked_weights(self) -> int:
        return sum(info.numel for info in self.layers.values())

    @property
    def mask_nbytes(self) -> int:
        return sum(t.numel() for t in self.masks.values())

    @property
    def head_nbytes(self) -> int:
        return self.head_weight.nbytes + self.head_bias.nbytes

    def summary(self) -> dict[str, Any]:
        """The metadata as plain JSON values (what ``inspect --json`` and ``GET /tasks`` show)."""
        return _summary(self, sorted(self.norms))

    # --- building -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        *,
        name: str,
        labels: list[str] | tuple[str, ...],
        backbone: Backbone,
        masks: Mapping[str, Tensor],
        head_weight: Tensor,
        head_bias: Tensor,
        mask_kind: MaskKind = "binary",
        threshold: float = DEFAULT_THRESHOLD,
        norms: Mapping[str, NormParams] | None = None,
        provenance: Mapping[str, Any] | None = None,
        preprocessing: Preprocessing | None = None,
    ) -> TaskFile:
        """A task for ``backbone`` from unpacked masks (bool or 0/1 for binary, -1/0/1 for ternary)."""
        validate_task_name(name)
        packed: dict[str, Tensor] = {}
        layers: dict[str, LayerInfo] = {}
        for key, shape in backbone.mask_shapes.items():
            if key not in masks:
                raise MissingTensorError(names=[f"mask/{key}"], task=name)
            m = masks[key].detach().to("cpu")
            if tuple(m.shape) != shape:
                raise TensorShapeError(f"mask for {key} has shape {tuple(m.shape)}, expected {shape}", name=key)
            packed[key] = pack_mask(m, mask_kind)
            layers[key] = LayerInfo(shape, float((m != 0).sum()) / max(m.numel(), 1))
        extra = sorted(set(masks) - set(backbone.mask_shapes))
        if extra:
            raise UnexpectedTensorError(names=[f"mask/{k}" for k in extra], task=name)
        prov = {"created": datetime.now(UTC).isoformat(timespec="seconds"), **(provenance or {})}
        task = cls(
            name=name,
            labels=tuple(labels),
            backbone=backbone.arch,
            fingerprint=backbone.fingerprint,
            mask_kind=mask_kind,
            threshold=float(threshold),
            layers=layers,
            masks=packed,
            head_weight=head_weight.detach().to("cpu", torch.float32).contiguous(),
            head_bias=head_bias.detach().to("cpu", torch.float32).contiguous(),
            norms={
                k: NormParams(*(getattr(v, f).detach().to("cpu", torch.float32).contiguous() for f in _NORM_FIELDS))
                for k, v in (norms or {}).items()
            },
            provenance=prov,
            preprocessing=preprocessing,
        )
        # Round-trip through the reader: what we write is exactly what we would accept.
        return cls.from_bytes(task.to_bytes())

    # --- writing ------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        tensors: dict[str, Tensor] = {f"mask/{k}": v for k, v in self.masks.items()}
        tensors["head/weight"] = self.head_weight
        tensors["head/bias"] = self.head_bias
        for module, p in self.norms.items():
            for f in _NORM_FIELDS:
                tensors[f"bn/{module}/{f}"] = getattr(p, f)
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "task": self.name,
            "labels": json.dumps(list(self.labels)),
            "backbone": self.backbone,
            "fingerprint": self.fingerprint,
            "mask_kind": self.mask_kind,
            "threshold": repr(self.threshold),
            "bit_order": BIT_ORDER,
            "layers": json.dumps({k: {"shape": list(v.shape), "density": v.density} for k, v in self.layers.items()}),
            "density": repr(self.density),
            "provenance": json.dumps(self.provenance),
        }
        if self.preprocessing is not None:
            metadata["preprocessing"] = json.dumps(self.preprocessing.to_dict())
        # The checksum covers the data section, which does not depend on the header: serialise
        # once to learn it, then again with it in the metadata (the data section is identical).
        draft = st_save(tensors, metadata=metadata)
        metadata["data_sha256"] = hashlib.sha256(draft[8 + int.from_bytes(draft[:8], "little") :]).hexdigest()
        return st_save(tensors, metadata=metadata)

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    # --- reading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> TaskFile:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise TaskFileFormatError(f"cannot read task file {str(path)!r}: {exc.strerror}") from exc
        return cls.from_bytes(data)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | mmap.mmap) -> TaskFile:
        """Parse and validate a task file; raise one TaskFileError naming the first problem.

        The tensors are views into the file's bytes: a ``bytearray`` or a writable ``mmap`` (the
        store maps its files copy-on-write) is used as it is, ``bytes`` are copied once into a
        ``bytearray``. The header is checked first (:meth:`TaskHeader.parse`), then the data."""
        head = TaskHeader.parse(data, len(data))
        task = head.name
        if not isinstance(data, bytearray | mmap.mmap):
            data = bytearray(data)
        tensors = {
            name: (
                torch.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=head.data_start + begin)
                if math.prod(shape)
                else torch.empty(0, dtype=dtype)
            ).view(shape)
            for name, (dtype, shape, begin, _) in head.tensors.items()
        }
        if hashlib.sha256(memoryview(data)[head.data_start :]).hexdigest() != head.data_sha256:  # no copy
            raise TaskFileFormatError("tensor data does not match its checksum: the file is corrupt", task=task)
        masks = {key: tensors[f"mask/{key}"] for key in head.layers}
        for key, info in head.layers.items():
            problem = validate_packed(masks[key], info.numel, head.mask_kind)  # the bits: padding, codes
            if problem is not None:
                raise TensorShapeError(f"mask/{key}: {problem}", name=f"mask/{key}", task=task)
            kept = count_nonzero_packed(masks[key], head.mask_kind)
            if kept != round(info.density * info.numel):
                raise TaskFileFormatError(
                    f"metadata says mask/{key} keeps {info.density:.6f} of its weights, but its bits keep "
                    f"{kept / max(info.numel, 1):.6f}: the file is corrupt",
                    task=task,
                )
        head_w, head_b = tensors["head/weight"], tensors["head/bias"]
        _check_finite("head/weight", head_w, task)
        _check_finite("head/bias", head_b, task)
        norms: dict[str, NormParams] = {}
        for module in head.norm_modules:
            parts = [tensors[f"bn/{module}/{f}"] for f in _NORM_FIELDS]
            for f, t in zip(_NORM_FIELDS, parts, strict=True):
                _check_finite(f"bn/{module}/{f}", t, task)
            if bool((parts[3] < 0).any()):
                raise TaskFileFormatError(f"bn/{module}/running_var has negative entries", task=task)
            norms[module] = NormParams(*parts)
        return cls(
            name=task,
            labels=head.labels,
            backbone=head.backbone,
            fingerprint=head.fingerprint,
            mask_kind=head.mask_kind,
            threshold=head.threshold,
            layers=head.layers,
            masks=masks,
            head_weight=head_w,
            head_bias=head_b,
            norms=norms,
            provenance=head.provenance,
            preprocessing=head.preprocessing,
            version=head.version,
        )

    def renamed(self, name: str) -> TaskFile:
        """This task under another name (the name an operator registers it as). The name it was
        trained as stays in ``provenance["trained_as"]``; the version changes with the name."""
        validate_task_name(name)
        if name == self.name:
            return self
        provenance = {**self.provenance, "trained_as": self.provenance.get("trained_as", self.name)}
        return TaskFile.from_bytes(replace(self, name=name, provenance=provenance).to_bytes())

    # --- fitting a backbone -------------------------------------------------------------------

    def check_compatible(self, backbone: Backbone) -> None:
        """Raise unless this task can be served by ``backbone`` exactly as it was trained."""
        norms = {m: int(p.weight.shape[0]) for m, p in self.norms.items()}
        _check_compatible(self, norms, int(self.head_weight.shape[1]), backbone)


@dataclass(frozen=True)
class TaskHeader(_MaskStats):
    """What a task file's header says, checked in itself and against the file's size, without its
    tensor data (:meth:`parse`). Enough to list the task (:meth:`summary`) and to check that it fits
    a backbone (:meth:`check_compatible`); :meth:`TaskFile.from_bytes` then checks the data."""

    name: str
    labels: tuple[str, ...]
    backbone: str
    fingerprint: str
    mask_kind: MaskKind
    threshold: float
    layers: dict[str, LayerInfo]
    # every tensor: name -> (dtype, shape, begin, end), the byte range within the data section
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = field(repr=False)
    provenance: dict[str, Any] = field(default_factory=dict)
    preprocessing: Preprocessing | None = None
    version: str = ""
    data_sha256: str = field(default="", repr=False)
    data_start: int = 0  # where the data section begins: 8 + the header's length
    size: int = 0  # the whole file's bytes

    @classmethod
    def parse(cls, prefix: bytes | bytearray | mmap.mmap, size: int) -> TaskHeader:
        """The header at the start of ``prefix`` (the first :func:`header_length` bytes of the file at
        least) of a file of ``size`` bytes; one TaskFileError naming the first problem."""
        meta, header = _read_metadata(prefix, size)
        task = meta["task"]
        data_start = 8 + int.from_bytes(prefix[:8], "little")
        try:
            table = _tensor_table(header, size - data_start)
        except TaskFileFormatError as exc:
            raise TaskFileFormatError(str(exc), task=task) from None
        labels = _parse_labels(meta["labels"], task)
        mask_kind = meta["mask_kind"]
        if mask_kind not in MASK_KINDS:
            raise TaskFileFormatError(f"unknown mask kind {mask_kind!r}", task=task)
        threshold = _parse_float(meta["threshold"], "threshold", task)
        layers = _parse_layers(meta["layers"], task)

        norm_parts: dict[str, set[str]] = {}
        unexpected: list[str] = []
        for tname in table:
            kind, _, rest = tname.partition("/")
            if kind == "mask" and rest in layers:
                continue
            if kind == "bn" and rest.rpartition("/")[2] in _NORM_FIELDS and rest.rpartition("/")[0]:
                module, _, f = rest.rpartition("/")
                norm_parts.setdefault(module, set()).add(f)
            elif tname not in ("head/weight", "head/bias"):
                unexpected.append(tname)
        if unexpected:
            raise UnexpectedTensorError(names=sorted(unexpected), task=task)
        missing = [f"mask/{k}" for k in layers if f"mask/{k}" not in table]
        missing += [n for n in ("head/weight", "head/bias") if n not in table]
        missing += [f"bn/{m}/{f}" for m, parts in norm_parts.items() for f in _NORM_FIELDS if f not in parts]
        if missing:
            raise MissingTensorError(names=missing, task=task)

        for key, info in layers.items():  # the layout of each packed mask; its bits wait for the data
            dtype, shape = table[f"mask/{key}"][:2]
            if dtype != torch.uint8:
                raise TensorDtypeError(name=f"mask/{key}", expected="uint8", actual=str(dtype), task=task)
            expected = packed_nbytes(info.numel, mask_kind)
            if len(shape) != 1:
                problem = f"shape is {shape}, expected a flat byte vector"
                raise TensorShapeError(f"mask/{key}: {problem}", name=f"mask/{key}", task=task)
            if shape[0] != expected:
                problem = (
                    f"holds {shape[0]} bytes, but a {mask_kind} mask over {info.numel} weights takes exactly {expected}"
                )
                raise TensorShapeError(f"mask/{key}: {problem}", name=f"mask/{key}", task=task)

        (w_dtype, w_shape), (b_dtype, b_shape) = table["head/weight"][:2], table["head/bias"][:2]
        _check_float_dtype("head/weight", w_dtype, task)
        _check_float_dtype("head/bias", b_dtype, task)
        if len(w_shape) != 2 or len(b_shape) != 1 or b_shape[0] != w_shape[0]:
            raise TensorShapeError(
                f"head has weight {w_shape} and bias {b_shape}; expected [num_labels, features] and [num_labels]",
                name="head/weight",
                task=task,
            )
        if w_shape[0] != len(labels):
            raise LabelsError(f"{len(labels)} labels for a head of {w_shape[0]} outputs", task=task)
        for module in norm_parts:
            sizes = {table[f"bn/{module}/{f}"][1] for f in _NORM_FIELDS}
            for f in _NORM_FIELDS:
                _check_float_dtype(f"bn/{module}/{f}", table[f"bn/{module}/{f}"][0], task)
            if len(sizes) != 1 or len(next(iter(sizes))) != 1:
                raise TensorShapeError(f"bn/{module}: tensors of shapes {sorted(sizes)}", name=module, task=task)

        return cls(
            name=task,
            labels=labels,
            backbone=meta["backbone"],
            fingerprint=meta["fingerprint"],
            mask_kind=mask_kind,
            threshold=threshold,
            layers=layers,
            tensors=table,
            provenance=_parse_json(meta.get("provenance", "{}"), "provenance", dict, task),
            preprocessing=_parse_preprocessing(meta.get("preprocessing"), task),
            version=hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16],
            data_sha256=meta["data_sha256"],
            data_start=data_start,
            size=size,
        )

    @property
    def norm_modules(self) -> list[str]:
        """The modules with per-task BatchNorm, sorted."""
        return sorted({n[3:].rpartition("/")[0] for n in self.tensors if n.startswith("bn/")})

    @property
    def num_masked_weights(self) -> int:
        return sum(info.numel for info in self.layers.values())

    @property
    def mask_nbytes(self) -> int:
        return sum(self.tensors[f"mask/{k}"][3] - self.tensors[f"mask/{k}"][2] for k in self.layers)

    @property
    def head_nbytes(self) -> int:
        return sum(self.tensors[n][3] - self.tensors[n][2] for n in ("head/weight", "head/bias"))

    def summary(self) -> dict[str, Any]:
        """What :meth:`TaskFile.summary` says about the same file."""
        return _summary(self, self.norm_modules)

    def check_compatible(self, backbone: Backbone) -> None:
        """What :meth:`TaskFile.check_compatible` checks, from the header."""
        norms = {m: self.tensors[f"bn/{m}/weight"][1][0] for m in self.norm_modules}
        _check_compatible(self, norms, self.tensors["head/weight"][1][1], backbone)


def header_length(prefix: bytes | bytearray) -> int:
    """How many bytes of a task file its header takes (8 + the length its first 8 bytes give);
    TaskFileFormatError when they claim more than :data:`MAX_HEADER_BYTES`."""
    if len(prefix) < 8:
        raise TaskFileFormatError(f"not a task file: {len(prefix)} bytes, too short for a safetensors header")
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise TaskFileFormatError(f"not a task file: header claims {n} bytes (limit {MAX_HEADER_BYTES})")
    return 8 + n


def _summary(t: TaskFile | TaskHeader, norm_modules: list[str]) -> dict[str, Any]:
    return {
        "task": t.name,
        "version": t.version,
        "labels": list(t.labels),
        "num_labels": len(t.labels),
        "backbone": t.backbone,
        "fingerprint": t.fingerprint,
        "mask_kind": t.mask_kind,
        "threshold": t.threshold,
        "bits_per_parameter": t.bits_per_parameter,
        "density": t.density,
        "masked_out": 1.0 - t.density,
        "num_masked_weights": t.num_masked_weights,
        "mask_bytes": t.mask_nbytes,
        "head_bytes": t.head_nbytes,
        "per_task_batchnorm": norm_modules,
        "preprocessing": t.preprocessing.to_dict() if t.preprocessing else None,
        "layers": {k: {"shape": list(v.shape), "density": v.density} for k, v in t.layers.items()},
        "provenance": t.provenance,
        "format_version": FORMAT_VERSION,
    }


def _check_compatible(t: TaskFile | TaskHeader, norms: dict[str, int], head_features: int, backbone: Backbone) -> None:
    """Raise unless the task ``t`` (its per-task BatchNorm channels ``norms``, its head's input
    features) can be served by ``backbone`` exactly as it was trained."""
    if t.backbone != backbone.arch:
        raise BackboneMismatchError(expected=backbone.arch, actual=t.backbone, task=t.name)
    if t.fingerprint != backbone.fingerprint:
        raise FingerprintMismatchError(expected=backbone.fingerprint, actual=t.fingerprint, task=t.name)
    missing = [f"mask/{k}" for k in backbone.mask_shapes if k not in t.layers]
    if missing:
        raise MissingTensorError(names=missing, task=t.name)
    extra = [f"mask/{k}" for k in t.layers if k not in backbone.mask_shapes]
    extra += [f"bn/{m}" for m in norms if m not in backbone.norm_sizes]
    if extra:
        raise UnexpectedTensorError(names=extra, task=t.name)
    for key, shape in backbone.mask_shapes.items():
        if t.layers[key].shape != shape:
            raise TensorShapeError(
                f"mask/{key} is for shape {t.layers[key].shape}, the backbone's weight is {shape}",
                name=f"mask/{key}",
                task=t.name,
            )
    if head_features != backbone.feature_dim:
        raise TensorShapeError(
            f"head takes {head_features} features, the backbone gives {backbone.feature_dim}",
            name="head/weight",
            task=t.name,
        )
    for module, channels in norms.items():
        expected = backbone.norm_sizes[module]
        if channels != expected:
            raise TensorShapeError(
                f"bn/{module} has {channels} channels, the backbone's has {expected}",
                name=f"bn/{module}",
                task=t.name,
            )


# --- parsing helpers -----------------------------------------------------------------------------

_REQUIRED_METADATA = (
    "task", "labels", "backbone", "fingerprint", "mask_kind", "threshold", "layers", "data_sha256",
)  # fmt: skip


# safetensors' dtype names, for the ones a task file may hold
_ST_DTYPES: dict[str, torch.dtype] = {
    "U8": torch.uint8, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F64": torch.float64, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}  # fmt: skip


def _tensor_table(header: dict[str, Any], size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """Every tensor of a safetensors header as (dtype, shape, begin, end) within a data section of
    ``size`` bytes, after the checks safetensors' own reader makes: known dtypes, integer shapes,
    every byte range within the data section and the size its shape and dtype say, the ranges
    tiling the section without overlap or gap. (:meth:`TaskFile.from_bytes` makes views of them
    itself, without a copy: safetensors' ``load(bytes)`` copies every tensor once more.)"""
    table: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise TaskFileFormatError(f"not a valid safetensors file: entry {name!r} is malformed")
        dtype = _ST_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None  # a list: unhashable
        shape, offsets = entry["shape"], entry["data_offsets"]
        if dtype is None:
            raise TaskFileFormatError(f"not a valid safetensors file: tensor {name!r} has dtype {entry['dtype']!r}")
        ints = isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
        if not ints or not all(type(v) is int and v >= 0 for v in [*shape, *offsets]):
            raise TaskFileFormatError(f"not a valid safetensors file: tensor {name!r} has a malformed shape or offsets")
        begin, end = offsets
        numel = math.prod(shape)
        if not begin <= end <= size or end - begin != numel * dtype.itemsize:
            raise TaskFileFormatError(
                f"not a valid safetensors file: tensor {name!r} spans bytes {begin}-{end} of {size}, "
                f"but {entry['dtype']}{shape} takes {numel * dtype.itemsize}"
            )
        if numel == 0 and any(d >= 2**63 for d in shape):  # torch cannot make an empty tensor that wide
            raise TaskFileFormatError(f"not a valid safetensors file: tensor {name!r} has shape {shape}")
        table[name] = (dtype, tuple(shape), begin, end)
    position = 0
    for begin, end, name in sorted((b, e, n) for n, (_, _, b, e) in table.items()):
        if begin != position:
            raise TaskFileFormatError(f"not a valid safetensors file: tensor {name!r} overlaps another or leaves a gap")
        position = end
    if position != size:
        raise TaskFileFormatError(f"not a valid safetensors file: {size - position} bytes after the last tensor")
    return table


def _read_metadata(data: bytes | bytearray | mmap.mmap, size: int) -> tuple[dict[str, str], dict[str, Any]]:
    """(the task metadata, the whole safetensors header), checked; ``data`` holds the header at
    least, of a file of ``size`` bytes."""
    if not isinstance(data, bytes | bytearray | memoryview | mmap.mmap):
        raise TaskFileFormatError("a task file is bytes")
    if size < 8 or len(data) < 8:
        raise TaskFileFormatError(f"not a task file: {size} bytes, too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if data[8:9] != b"{":  # a safetensors header is a JSON object, so its first byte is '{'
        raise TaskFileFormatError("not a task file (not safetensors)")
    if n > MAX_HEADER_BYTES:
        raise TaskFileFormatError(f"not a task file: header claims {n} bytes (limit {MAX_HEADER_BYTES})")
    if 8 + n > size:
        raise TaskFileFormatError(f"truncated task file: header claims {n} bytes, file has {size - 8}")
    if 8 + n > len(data):
        raise TaskFileFormatError(f"only {len(data)} bytes of a header of {8 + n} were read")
    raw = bytes(data[8 : 8 + n])
    if _nested_deeper_than(raw, MAX_HEADER_DEPTH):
        raise TaskFileFormatError(f"not a task file: header nested deeper than {MAX_HEADER_DEPTH} levels")
    try:
        header = _loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError, ...
        raise TaskFileFormatError(f"not a task file: header is not JSON ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise TaskFileFormatError("not a task file: no safetensors metadata")
    if meta.get("format") != FORMAT_NAME:
        raise TaskFileFormatError(f"not a task file: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    task = meta.get("task")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TaskFileVersionError(
            found=str(meta.get("format_version")),
            supported=FORMAT_VERSION,
            task=task if isinstance(task, str) else None,
        )
    absent = [k for k in _REQUIRED_METADATA if k not in meta]
    if absent:
        raise TaskFileFormatError(f"task file metadata lacks {', '.join(absent)}")
    try:
        validate_task_name(task)
    except InvalidTaskNameError as exc:
        raise TaskFileFormatError(f"task file names an invalid task: {exc}") from exc
    return meta, header


_NOT_SYNTAX = bytes(b for b in range(256) if b not in b'"[]{}')
_ONE_BRACKET = bytes.maketrans(b"{}", b"[]")
_STRING = re.compile(rb'"[^"]*"')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how JSON writes a surrogate (a lone one or a pair)


def _nested_deeper_than(text: bytes, limit: int) -> bool:
    """Whether the JSON ``text`` nests arrays and objects more than ``limit`` deep, found in a few
    passes at C speed (no Python loop over the bytes). Exact for valid JSON; where it says False
    about invalid JSON, json.loads recurses at most ``2 * limit`` deep before it refuses the text."""
    # Escapes as JSON reads them, left to right: '\\' then '\"' (others hold no quote); then only
    # quotes and brackets kept, '{}' read as '[]'; then the strings dropped with their brackets.
    # Dropping '""' first changes no bracket's side of a quote, and leaves few strings to match.
    s = text.replace(b"\\\\", b"").replace(b'\\"', b"").translate(_ONE_BRACKET, _NOT_SYNTAX)
    s = _STRING.sub(b"", s.replace(b'""', b"")).replace(b'"', b"")  # an unclosed string's brackets count
    for _ in range(limit):  # a pass drops the innermost pairs: a balanced text d deep is gone after d
        before = len(s)
        s = s.replace(b"[]", b"")
        if len(s) == before:
            break
    # What is left: pairs that nest deeper than the limit, or brackets that pair with none
    return b"[]" in s or s.count(b"[") > limit


def _loads(text: bytes) -> Any:
    """``json.loads`` of UTF-8 (never UTF-16 or -32, which it would detect and which the depth check
    does not read), refusing a lone surrogate (``"\\ud800"``) with a ValueError: it is no text, no
    UTF-8 encoder takes it, and a JSON response holding it (a label, a name in an error) would fail."""
    value = json.loads(text.decode("utf-8"))
    if _SURROGATE_ESCAPE.search(text):  # rare: the costlier check only then (a pair, an emoji, is fine)
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("it holds a lone surrogate, which is not text") from None
    return value


def _parse_json(raw: str, what: str, kind: type, task: str) -> Any:
    text = raw.encode("utf-8", "surrogatepass")  # a surrogate raw in the header: json.loads refuses it
    if _nested_deeper_than(text, MAX_METADATA_DEPTH):
        raise TaskFileFormatError(f"metadata {what!r} nested deeper than {MAX_METADATA_DEPTH} levels", task=task)
    try:
        value = _loads(text)
    except (ValueError, RecursionError) as exc:
        raise TaskFileFormatError(f"metadata {what!r} is not JSON: {exc}", task=task) from exc
    if not isinstance(value, kind):
        raise TaskFileFormatError(f"metadata {what!r} is not a JSON {kind.__name__}", task=task)
    return value


def _parse_preprocessing(raw: str | None, task: str) -> Preprocessing | None:
    if raw is None:
        return None
    value = _parse_json(raw, "preprocessing", dict, task)
    try:
        return Preprocessing.from_dict(value)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # Overflow: int(1e999)
        raise TaskFileFormatError(f"metadata 'preprocessing' is malformed: {exc}", task=task) from exc


def _parse_float(raw: str, what: str, task: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise TaskFileFormatError(f"metadata {what!r} is not a number: {raw!r}", task=task) from None
    if not math.isfinite(value):
        raise TaskFileFormatError(f"metadata {what!r} is not finite", task=task)
    return value


def _parse_labels(raw: str, task: str) -> tuple[str, ...]:
    labels = _parse_json(raw, "labels", list, task)
    if not labels or not all(isinstance(x, str) and x for x in labels):
        raise LabelsError("labels must be a non-empty JSON list of non-empty strings", task=task)
    if len(set(labels)) != len(labels):
        raise LabelsError("labels must be unique", task=task)
    return tuple(labels)


def _parse_layers(raw: str, task: str) -> dict[str, LayerInfo]:
    layers = _parse_json(raw, "layers", dict, task)
    out: dict[str, LayerInfo] = {}
    for key, info in layers.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        density = info.get("density") if isinstance(info, dict) else None
        if (
            not isinstance(shape, list)
            or not shape
            or not all(isinstance(d, int) and 0 < d < 2**31 for d in shape)
            or not isinstance(density, int | float)
            or not 0.0 <= density <= 1.0
        ):
            raise TaskFileFormatError(f"metadata 'layers' entry {key!r} is malformed", task=task)
        out[key] = LayerInfo(tuple(shape), float(density))
    if not out:
        raise TaskFileFormatError("metadata 'layers' lists no masked layer", task=task)
    return out


def _check_float_dtype(name: str, dtype: torch.dtype, task: str) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise TensorDtypeError(name=name, expected="float32, float16 or bfloat16", actual=str(dtype), task=task)


def _check_finite(name: str, t: Tensor, task: str) -> None:
    # The sum is finite only if every element is (a NaN or an infinity makes it NaN or infinite);
    # 15x faster than isfinite().all(), which runs only when the sum overflows or is not finite.
    if not math.isfinite(float(t.float().sum())) and not bool(torch.isfinite(t).all()):
        raise TaskFileFormatError(f"tensor {name!r} holds non-finite values", task=task)
