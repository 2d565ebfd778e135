"""The registry of backbones, their weights, their fingerprint and their preprocessing.

A backbone is a torchvision classification network whose own ImageNet classifier is replaced by
:class:`torch.nn.Identity` (a task brings its own head) and whose Conv2d, Linear and attention
layers are swapped for the masked modules of :mod:`piggyback_core.masking`. It is frozen: no
parameter requires a gradient, and nothing in this library writes to it.

Weights come from one of three places (``weights=``):

* a torchvision weights name, ``"IMAGENET1K_V1"``, ``"DEFAULT"`` or ``"ResNet50_Weights.IMAGENET1K_V2"``
  (downloaded by torchvision into ``$TORCH_HOME`` the first time, then read from there);
* a local file: ``.safetensors``, or a torch checkpoint read with ``weights_only=True`` (never
  unpickling code); a state dict, optionally under ``"state_dict"`` or ``"model"``;
* ``"random"``: the architecture's own initialisation drawn from ``seed``, so that two processes
  given the same arguments build bit-identical backbones (for tests and offline demos).

The **fingerprint** is a SHA-256 over every tensor of the frozen feature extractor (names, dtypes,
shapes and bytes, in sorted name order; BatchNorm's ``num_batches_tracked`` counters excluded). A
task file records the fingerprint of the weights it was trained on and is served only by a
backbone with the same one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from .errors import UnknownBackboneError, WeightsError
from .images import Preprocessing
from .masking import MaskedConv2d, MaskedLinear, MaskedParam, TaskBatchNorm2d, convert_to_masked

__all__ = [
    "Backbone",
    "BackboneSpec",
    "channel_separable",
    "fingerprint_state_dict",
    "get_backbone_spec",
    "list_backbones",
    "load_backbone",
    "register_backbone",
    "weights_from_description",
]


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    head: str  # dotted path of the network's own classifier, replaced by the task head
    build: Callable[..., nn.Module]  # build(*, weights) -> torchvision model
    # Whether NHWC activations (channels_last) run faster than NCHW: the layout of layout="auto".
    # Measured per backbone by benchmarks/layouts.py (results/layouts.md).
    channels_last: bool = False


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str, *, head: str, channels_last: bool = False
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``build(*, weights=None) -> nn.Module`` under ``name``; ``head`` names its classifier;
    ``channels_last`` says whether it runs faster on NHWC activations (measure it)."""

    def decorator(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = BackboneSpec(name=name, head=head, build=build, channels_last=channels_last)
        return build

    return decorator


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackboneError(name=name, available=list_backbones()) from None


def _register_torchvision(name: str, head: str, channels_last: bool) -> None:
    def build(*, weights: Any = None) -> nn.Module:
        return torchvision.models.get_model(name, weights=weights)

    register_backbone(name, head=head, channels_last=channels_last)(build)


# channels_last: speed-up of NHWC over NCHW on a 2-core AMD EPYC with AVX-512-BF16, batch 8
# (benchmarks/results/layouts.md): 1.11-1.45 in fp32 and 1.14-1.60 in bf16 for the convolutional
# networks; convnext_tiny 1.09 in fp32 and 0.98-1.03 in bf16 (kept); vit_b_16 has one convolution
# (the patch embedding) and measured 0.99-1.00.
for _name, _head, _cl in [
    # The paper's three.
    ("vgg16", "classifier.6", True),
    ("vgg16_bn", "classifier.6", True),
    ("resnet50", "fc", True),
    ("densenet121", "classifier", True),
    # More of the same families.
    ("resnet18", "fc", True),
    ("resnet34", "fc", True),
    ("resnet101", "fc", True),
    # Modern ones.
    ("mobilenet_v3_large", "classifier.3", True),
    ("efficientnet_b0", "classifier.1", True),
    ("convnext_tiny", "classifier.2", True),
    ("vit_b_16", "heads.head", False),
]:
    _register_torchvision(_name, _head, _cl)


# Modules that keep channels independent, so that S tasks stacked along channels run as one network
# (a stacked MaskPlan, piggyback_core.masking): convolutions become grouped, BatchNorm and
# activations act per channel, pooling per channel, and these containers only add, scale by a
# per-channel gate (squeeze-excitation) or flatten. Anything else (channel concatenation in
# DenseNet, LayerNorm in ConvNeXt and ViT, attention) mixes channels across tasks.
_CHANNEL_SEPARABLE: tuple[type[nn.Module], ...] = (
    nn.Sequential,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    MaskedConv2d,
    MaskedLinear,
    TaskBatchNorm2d,
    torchvision.models.ResNet,
    torchvision.models.resnet.BasicBlock,
    torchvision.models.resnet.Bottleneck,
    torchvision.models.VGG,
    torchvision.models.MobileNetV3,
    torchvision.models.mobilenetv3.InvertedResidual,
    torchvision.models.EfficientNet,
    torchvision.models.efficientnet.MBConv,
    torchvision.ops.misc.Conv2dNormActivation,
    torchvision.ops.misc.SqueezeExcitation,
    torchvision.ops.StochasticDepth,
)


def channel_separable(model: nn.Module) -> bool:
    """Whether every module of ``model`` keeps channels independent (see ``_CHANNEL_SEPARABLE``):
    the condition for running several tasks stacked along channels. Exact types only, so a
    subclass with its own forward is not taken on trust."""
    return all(type(m) in _CHANNEL_SEPARABLE for m in model.modules())


@dataclass
class Backbone:
    """A loaded, frozen, masked-ready backbone. Build it with :func:`load_backbone`."""

    arch: str
    weights: str
    model: nn.Module
    fingerprint: str
    feature_dim: int
    preprocessing: Preprocessing
    masked: list[MaskedParam] = field(repr=False)
    mask_shapes: dict[str, tuple[int, ...]] = field(init=False, repr=False)
    norm_sizes: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.mask_shapes = {m.key: tuple(m.weight.shape) for m in self.masked}
        self.norm_sizes = {m.mask_key: m.num_features for m in self.model.modules() if isinstance(m, TaskBatchNorm2d)}

    @property
    def num_masked_weights(self) -> int:
        return sum(m.weight.numel() for m in self.masked)


def fingerprint_state_dict(state: Mapping[str, Tensor]) -> str:
    """``sha256:<hex>`` over names, dtypes, shapes and bytes of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        if name.endswith("num_batches_tracked"):
            continue
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many kinds; all mean "unreadable"
        raise WeightsError(f"cannot read weights file {str(path)!r}: {exc}", weights=str(path)) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"weights file {str(path)!r} does not hold a state dict of tensors", weights=str(path))
    return {k.removeprefix("module."): v for k, v in state.items()}


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".safetensors", ".pt", ".pth", ".bin")) or Path(weights).exists()


def _build(spec: BackboneSpec, weights: str, seed: int) -> tuple[nn.Module, Preprocessing, str]:
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return spec.build(weights=None), Preprocessing(), f"random:{seed}"
    if _looks_like_path(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {weights!r} does not exist", weights=weights)
        state = _read_state_dict(path)
        with torch.random.fork_rng(devices=[]):
            model = spec.build(weights=None)
        head_keys = {f"{spec.head}.weight", f"{spec.head}.bias"}
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise WeightsError(f"weights file {weights!r} does not fit {spec.name}: {exc}", weights=weights) from exc
        missing = sorted(set(result.missing_keys) - head_keys)
        if missing or result.unexpected_keys:
            raise WeightsError(
                f"weights file {weights!r} does not fit {spec.name}: "
                f"missing {missing[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}",
                weights=weights,
            )
        return model, Preprocessing(), f"file:{path.resolve()}"
    enum = torchvision.models.get_model_weights(spec.name)
    member = weights.rpartition(".")[2]
    try:
        tv_weights = enum[member]
    except KeyError:
        available = ", ".join(["random", "DEFAULT", *(w.name for w in enum)])
        raise WeightsError(
            f"unknown weights {weights!r} for {spec.name}; use a file path or one of: {available}",
            weights=weights,
        ) from None
    try:
        model = spec.build(weights=tv_weights)
    except Exception as exc:  # network, disk, hash check: all mean "not available here"
        raise WeightsError(
            f"cannot load torchvision weights {tv_weights} ({exc}); without network, place the file in "
            "$TORCH_HOME/hub/checkpoints or pass a local weights file",
            weights=weights,
        ) from exc
    return model, Preprocessing.from_torchvision(tv_weights.transforms()), str(tv_weights)


def weights_from_description(description: str) -> tuple[str, int]:
    """The ``(weights, seed)`` arguments of :func:`load_backbone` that rebuild a backbone whose
    :attr:`Backbone.weights` is ``description`` (what a task file's provenance records):
    ``random:SEED``, ``file:PATH`` or a torchvision weights name such as
    ``ResNet50_Weights.IMAGENET1K_V1``."""
    kind, _, rest = description.partition(":")
    if kind == "random" and rest.isdigit():
        return "random", int(rest)
    if kind == "file" and rest:
        return rest, 0
    if description and ":" not in description:
        return description, 0
    raise WeightsError(f"unrecognised weights description {description!r}", weights=description)


def load_backbone(arch: str = "resnet50", *, weights: str = "random", seed: int = 0) -> Backbone:
    """Build ``arch`` with ``weights``, drop its classifier, freeze it, mask-enable it, fingerprint it."""
    spec = get_backbone_spec(arch)
    model, preprocessing, description = _build(spec, weights, seed)
    head = model.get_submodule(spec.head)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{arch}: {spec.head} is {type(head).__name__}, expected Linear")
    parent_name, _, attr = spec.head.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())
    model.eval().requires_grad_(False)
    fingerprint = fingerprint_state_dict(model.state_dict())
    masked = convert_to_masked(model)
    return Backbone(
        arch=arch,
        weights=description,
        model=model,
        fingerprint=fingerprint,
        feature_dim=head.in_features,
        preprocessing=preprocessing,
        masked=masked,
    )
