"""The packed CPU path: what ``torch.compile(freezing=True)`` does for one set of weights, done
once per task instead, in plain eager PyTorch.

A ``torch.fx`` pass over the engine's network finds every masked convolution followed by its
BatchNorm (folded into the convolution), then optionally by a ReLU, or by a residual addition and a
ReLU, and replaces the chain with one call of oneDNN's fused convolution
(``mkldnn._convolution_pointwise``, its ``.binary`` form for the addition): the post-ops run inside
the convolution's kernel, and the weight is **prepacked** in oneDNN's blocked layout for the
layer's input shape (``mkldnn._reorder_convolution_weight``) once per task, not at every call.

Masks commute with the folding: ``(W * M) * s = (W * s) * M`` for a per-output-channel scale ``s``,
so the backbone's weights are folded once and each task masks the folded weights (a task with its
own BatchNorm folds its own). A task's packed weights are what the weight cache holds for it.

Anything the pass does not recognise (a convolution without a BatchNorm after it, a BatchNorm
whose input is not a convolution, Linear and attention layers, a backbone that ``torch.fx`` cannot
trace) stays the engine's masked module, computed the reference way: never a wrong answer, only a
slower one. These are PyTorch's internal oneDNN operators (the ones Inductor emits on a CPU): the
torch pin in pyproject.toml is what they are tested with, and ``tests/core/test_packed.py`` fails
loudly if their schemas change.
"""

from __future__ import annotations

import contextvars
import logging
import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .bitpack import MaskKind
from .masking import MaskedConv2d, MaskedLayer, MaskedMultiheadAttention, NormParams, TaskBatchNorm2d

__all__ = ["PACKED_OPS", "FusedConv", "PackedNetwork", "packed_supported"]

log = logging.getLogger("piggyback.packed")

# The schemas these operators had when the path was written and tested (torch 2.14.1).
PACKED_OPS = {
    "_convolution_pointwise.default": "mkldnn::_convolution_pointwise(Tensor X, Tensor W, Tensor? B, int[] padding, "
    "int[] stride, int[] dilation, int groups, str attr, Scalar?[] scalars, str? algorithm) -> Tensor Y",
    "_convolution_pointwise.binary": "mkldnn::_convolution_pointwise.binary(Tensor X, Tensor other, Tensor W, "
    "Tensor? B, int[] padding, int[] stride, int[] dilation, int groups, str binary_attr, Scalar? alpha, "
    "str? unary_attr, Scalar?[] unary_scalars, str? unary_algorithm) -> Tensor Y",
    "_reorder_convolution_weight.default": "mkldnn::_reorder_convolution_weight(Tensor self, int[2] padding=0, "
    "int[2] stride=1, int[2] dilation=1, int groups=1, int[]? input_size=None) -> Tensor Y",
}

BIAS = ":bias"  # a fused layer's bias is kept under its key + BIAS
PACK_BATCH = 8  # the batch the weights are packed for (measured: it serves batch 1 at full speed too)

# The current segment's built weights: {conv key: packed weight, conv key + BIAS: bias} for fused layers and
# {key: weight * mask} for the layers left to the reference path.
_ACTIVE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("piggyback_packed", default=None)


def packed_supported() -> bool:
    """Whether this build and CPU run oneDNN's fused convolutions well: x86 with AVX-512 (AMX
    included; PyTorch's own probe of the CPU), the operators present."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    x86_wide = "AVX512" in capability.upper() or "AMX" in capability.upper()
    return x86_wide and all(hasattr(torch.ops.mkldnn, name.split(".")[0]) for name in PACKED_OPS)


@contextmanager
def use_weights(weights: dict[str, Any]) -> Iterator[None]:
    token = _ACTIVE.set(weights)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class FusedConv(nn.Module):
    """One masked convolution with its BatchNorm folded in and its post-ops fused: ``attr`` is
    ``"none"`` or ``"relu"``; called with ``other``, ``attr(conv(x) + other)`` (ResNet's residual)."""

    def __init__(self, conv: MaskedConv2d, attr: str) -> None:
        super().__init__()
        assert not isinstance(conv.padding, str)
        self.key = conv.mask_key
        self.attr = attr
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups

    def forward(self, x: Tensor, other: Tensor | None = None) -> Tensor:
        weights = _ACTIVE.get()
        assert weights is not None, "a packed network runs inside use_weights()"
        w, b = weights[self.key], weights[self.key + BIAS]
        x = x.contiguous(memory_format=torch.channels_last)
        if other is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, w, b, self.padding, self.stride, self.dilation, self.groups, self.attr, [], ""
            )
        other = other.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, w, b, self.padding, self.stride, self.dilation, self.groups, "add", 1.0, self.attr, [], ""
        )


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, MaskedLayer | TaskBatchNorm2d | MaskedMultiheadAttention) or super().is_leaf_module(
            m, qualname
        )


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.ReLU)
    return node.op == "call_function" and node.target in (F.relu, torch.relu, torch.relu_)


def _is_add(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add) and not node.kwargs


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


@dataclass(frozen=True)
class _Layer:
    conv: MaskedConv2d
    norm: nn.BatchNorm2d | None
    norm_name: str | None
    input_size: list[int]


class PackedNetwork:
    """The engine's network with its conv-BatchNorm(-ReLU)(-add-ReLU) chains fused and packed.

    ``graph`` runs a batch of one task inside :func:`use_weights` with what :meth:`build` made for
    it; ``fused`` counts the chains replaced, ``left`` the masked layers left to the reference path.
    Raises (``torch.fx`` errors) where the network cannot be traced: the engine then keeps its
    unpacked path."""

    def __init__(self, model: nn.Module, crop_size: int, dtype: torch.dtype) -> None:
        self.dtype = dtype
        modules = dict(model.named_modules())
        graph = _Tracer().trace(model)
        shapes = _input_sizes(model, crop_size, dtype)
        self.layers: dict[str, _Layer] = {}
        fused_modules: dict[str, nn.Module] = {}
        nodes: list[fx.Node] = list(graph.nodes)
        for node in nodes:
            other: fx.Node | None
            add: fx.Node | None
            conv = modules.get(str(node.target)) if node.op == "call_module" else None
            if not isinstance(conv, MaskedConv2d) or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
                continue
            bn_node = _only_user(node)
            bn = modules.get(str(bn_node.target)) if bn_node is not None and bn_node.op == "call_module" else None
            if bn_node is None or not isinstance(bn, nn.BatchNorm2d) or bn_node.args[0] is not node:
                continue
            if bn.running_mean is None or bn.running_var is None:
                continue
            tail: fx.Node = bn_node
            attr, other, add = "none", None, None  # other, add: fx.Node | None
            nxt = _only_user(bn_node)
            if nxt is not None and _is_relu(nxt, modules):
                tail, attr = nxt, "relu"
            elif nxt is not None and _is_add(nxt) and len(nxt.args) == 2:
                after = _only_user(nxt)
                candidate = nxt.args[1] if nxt.args[0] is bn_node else nxt.args[0]
                if after is not None and _is_relu(after, modules) and isinstance(candidate, fx.Node):
                    tail, attr, other, add = after, "relu", candidate, nxt
            source = node.args[0]
            if not isinstance(source, fx.Node):
                continue
            fused_name = f"fused_{len(self.layers)}"
            fused = FusedConv(conv, attr)
            with graph.inserting_before(tail):
                new = graph.call_module(fused_name, (source,) if other is None else (source, other))
            tail.replace_all_uses_with(new)
            # the old chain, in order (each node's only user is erased before it)
            chain: list[fx.Node] = [tail, *([add] if add is not None else []), bn_node, node]
            for dead in dict.fromkeys(chain):
                graph.erase_node(dead)
            self.layers[conv.mask_key] = _Layer(conv, bn, str(bn_node.target), shapes[conv.mask_key])
            fused_modules[fused_name] = fused
        graph.lint()
        self.graph = fx.GraphModule(_Root(model, fused_modules), graph)
        self.fused = len(self.layers)
        self.left = sum(1 for m in modules.values() if isinstance(m, MaskedLayer)) - self.fused
        self._folded: dict[str, tuple[Tensor, Tensor]] = {}  # shared BatchNorm folded once: (W * s, shift)

    def nbytes(self, other_bytes: int) -> int:
        """Bytes of one task's built weights: the fused layers' packed weights (oneDNN's blocked
        layout may pad channels) and biases, plus ``other_bytes`` for the layers left."""
        total = other_bytes
        with torch.inference_mode():
            for layer in self.layers.values():
                weight, bias = self._fold(layer, None)
                total += _pack(layer, weight).nbytes + bias.nbytes
        return total

    def _fold(self, layer: _Layer, own: NormParams | None) -> tuple[Tensor, Tensor]:
        """(the conv's weight scaled by the BatchNorm, the BatchNorm's shift plus the scaled conv bias)."""
        if own is None and layer.conv.mask_key in self._folded:
            return self._folded[layer.conv.mask_key]
        bn = layer.norm
        assert bn is not None and bn.running_mean is not None and bn.running_var is not None
        p = own or NormParams(bn.weight, bn.bias, bn.running_mean, bn.running_var)
        scale = p.weight.float() / torch.sqrt(p.running_var.float() + bn.eps)
        shift = p.bias.float() - p.running_mean.float() * scale
        conv = layer.conv
        if conv.bias is not None:
            shift = shift + conv.bias.float() * scale
        folded = ((conv.weight.float() * scale.view(-1, 1, 1, 1)).to(self.dtype), shift.to(self.dtype))
        if own is None:
            self._folded[conv.mask_key] = folded
        return folded

    def build(
        self,
        masks: dict[str, Tensor],
        kind: MaskKind,
        norms: dict[str, NormParams],
        build_other: Callable[[str], Tensor],
    ) -> dict[str, Any]:
        """One task's weights for this network: each fused layer's ``fold(W) * mask``, prepacked,
        and its bias; every other masked layer's ``W * mask`` (``build_other(key)``)."""
        from .engine import apply_packed_mask  # the engine imports this module

        out: dict[str, Any] = {}
        for key, layer in self.layers.items():
            weight, bias = self._fold(layer, norms.get(layer.norm_name or ""))
            out[key], out[key + BIAS] = _pack(layer, apply_packed_mask(weight, masks[key], kind)), bias
        for key in masks:
            if key not in self.layers:
                out[key] = build_other(key)
        return out


def _pack(layer: _Layer, weight: Tensor) -> Tensor:
    """``weight`` (the layer's shape) in oneDNN's blocked layout for the layer's input shape."""
    conv = layer.conv
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight.contiguous(memory_format=torch.channels_last),
        list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, layer.input_size,
    )  # fmt: skip


class _Root(nn.Module):
    """The traced network's owner: the original modules, parameters and buffers by their names
    (shared, not copied), and the fused layers."""

    def __init__(self, model: nn.Module, fused: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        for name, module in fused.items():
            self.add_module(name, module)


def _input_sizes(model: nn.Module, crop_size: int, dtype: torch.dtype) -> dict[str, list[int]]:
    """Each masked convolution's input shape for a batch of ``PACK_BATCH`` (what the weights are
    packed for)."""
    sizes: dict[str, list[int]] = {}
    hooks = [
        m.register_forward_hook(lambda m, inp, out: sizes.__setitem__(m.mask_key, [PACK_BATCH, *inp[0].shape[1:]]))
        for m in model.modules()
        if isinstance(m, MaskedConv2d)
    ]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, crop_size, crop_size, dtype=dtype).contiguous(memory_format=torch.channels_last))
    finally:
        for h in hooks:
            h.remove()
    return sizes
