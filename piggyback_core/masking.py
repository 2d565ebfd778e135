"""Masked layers with the semantics of Piggyback (Mallya et al., ECCV 2018).

Training keeps a real-valued *score* per weight. The forward pass uses ``weight * mask(score)``:

* binary:  ``mask = 1 where score > threshold else 0``                 (threshold 5e-3)
* ternary: ``mask = -1 where score < 0; 1 where score > threshold; else 0``

and the backward pass treats the thresholding as the identity (a straight-through estimator), so
``d loss / d score = d loss / d mask = (d loss / d masked_weight) * weight``. The backbone's own
weights never receive a gradient and are never written.

Each layer comes as a function and a Module: :func:`masked_conv2d` / :class:`MaskedConv2d`,
:func:`masked_linear` / :class:`MaskedLinear`, and :class:`MaskedMultiheadAttention` (for the
attention blocks of vision transformers, whose ``in_proj_weight`` is a bare parameter).

At serving time the same modules run many tasks over one set of weights: the engine installs a
:class:`MaskPlan` for the duration of one forward pass (a context variable, so concurrent threads
never see each other's plan). A plan splits the batch into contiguous per-task segments and hands
every masked layer the task's effective weight for its segment. The modules' own parameters are
never modified, which is what makes one resident backbone safe to share.

A plan may instead be *stacked* (``plan.stack = S > 1``): the batch then arrives as ``[m, S*C, H,
W]``, task ``s``'s images in channels ``[s*C, (s+1)*C)`` (segments padded to ``m`` rows). Every
convolution runs once with ``groups * S`` over the S tasks' weights stacked along output channels,
every Linear as one batched matmul, every BatchNorm once over the S tasks' parameters side by side,
and activations, pooling and residual additions are unchanged. The number of operations then does
not grow with the number of tasks in the batch (what a GPU, bound by kernel launches at small
segments, needs). It applies only to backbones whose every module keeps channels independent
(:data:`piggyback_core.backbones` says which).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bitpack import MaskKind

__all__ = [
    "DEFAULT_SCORE_INIT",
    "DEFAULT_THRESHOLD",
    "MaskPlan",
    "MaskedConv2d",
    "MaskedLayer",
    "MaskedLinear",
    "MaskedMultiheadAttention",
    "MaskedParam",
    "NormParams",
    "ScoreInit",
    "TaskBatchNorm2d",
    "attach_scores",
    "binarize",
    "convert_to_masked",
    "init_scores",
    "iter_masked_params",
    "mask_from_scores",
    "masked_conv2d",
    "masked_linear",
    "ternarize",
    "use_plan",
]

DEFAULT_THRESHOLD = 5e-3
# A masked conv of a mixed batch whose output has at most this many positions runs as unfold + one
# matmul per task instead of one convolution per task (measured per layer: benchmarks/mixed.py).
UNFOLD_MAX_OUTPUT = 64
DEFAULT_SCORE_INIT = 1e-2
ScoreInit = Literal["1s", "uniform"]


# --- straight-through thresholding ------------------------------------------------------------


class _Binarizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, scores: Tensor, threshold: float) -> Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _Ternarizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, scores: Tensor, threshold: float) -> Tensor:
        out = (scores > threshold).to(scores.dtype)
        return out.masked_fill_(scores < 0, -1.0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def binarize(scores: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """``1.0 where scores > threshold else 0.0``; the gradient passes straight through."""
    return _Binarizer.apply(scores, threshold)


def ternarize(scores: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """``-1 where scores < 0, 1 where scores > threshold, else 0``; straight-through gradient."""
    return _Ternarizer.apply(scores, threshold)


def mask_from_scores(scores: Tensor, kind: MaskKind, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    if kind == "binary":
        return binarize(scores, threshold)
    if kind == "ternary":
        return ternarize(scores, threshold)
    raise ValueError(f"unknown mask kind {kind!r}; expected 'binary' or 'ternary'")


def init_scores(weight: Tensor, init: ScoreInit = "1s", scale: float = DEFAULT_SCORE_INIT) -> Tensor:
    """Initial scores for ``weight``: all ``scale`` ("1s", the paper's default) or U(-scale, scale)."""
    scores = torch.empty_like(weight, dtype=torch.float32)
    if init == "1s":
        return scores.fill_(scale)
    if init == "uniform":
        return scores.uniform_(-scale, scale)
    raise ValueError(f"unknown score init {init!r}; expected '1s' or 'uniform'")


# --- functional forms ------------------------------------------------------------------------


def masked_conv2d(
    x: Tensor,
    weight: Tensor,
    mask: Tensor | None,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Tensor:
    """``conv2d(x, weight * mask)``; ``mask=None`` means the unmasked weight."""
    w = weight if mask is None else weight * mask
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)


def masked_linear(x: Tensor, weight: Tensor, mask: Tensor | None, bias: Tensor | None = None) -> Tensor:
    """``linear(x, weight * mask)``; ``mask=None`` means the unmasked weight."""
    return F.linear(x, weight if mask is None else weight * mask, bias)


# --- the serving hook ------------------------------------------------------------------------


@dataclass(frozen=True)
class NormParams:
    """Per-task BatchNorm parameters and statistics, replacing the backbone's for one task."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor


class MaskPlan(Protocol):
    """What the engine provides to masked layers for one forward pass.

    ``bounds`` are the contiguous ``[start, stop)`` batch rows of each segment (one task each);
    ``weight`` returns a segment's effective weight for a masked parameter; ``norm`` returns a
    segment's own BatchNorm parameters for a BatchNorm module, or None to use the backbone's.

    ``stack`` is 0 for a segmented pass, or the number of tasks S of a stacked one (module
    docstring); then ``stacked_weight`` returns the S effective weights concatenated along dim 0
    and ``stacked_norm`` the S tasks' BatchNorm parameters concatenated (``own`` where a task has
    none of its own).
    """

    @property
    def bounds(self) -> Sequence[tuple[int, int]]: ...

    @property
    def stack(self) -> int: ...

    def weight(self, segment: int, key: str, weight: Tensor) -> Tensor: ...

    def norm(self, segment: int, name: str) -> NormParams | None: ...

    def stacked_weight(self, key: str, weight: Tensor) -> Tensor: ...

    def stacked_norm(self, name: str, own: NormParams) -> NormParams: ...


_ACTIVE_PLAN: contextvars.ContextVar[MaskPlan | None] = contextvars.ContextVar("piggyback_mask_plan", default=None)


@contextmanager
def use_plan(plan: MaskPlan) -> Iterator[None]:
    """Run the masked modules under ``plan`` (in this thread / context only)."""
    token = _ACTIVE_PLAN.set(plan)
    try:
        yield
    finally:
        _ACTIVE_PLAN.reset(token)


def _segmented(plan: MaskPlan, x: Tensor, fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    if len(plan.bounds) == 1:
        return fn(x, 0)
    return torch.cat([fn(x[a:b], i) for i, (a, b) in enumerate(plan.bounds)], dim=0)


# --- modules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskedParam:
    """One masked weight: its key (the parameter's name in the backbone), the weight, its scores."""

    key: str
    weight: Tensor
    scores: nn.Parameter | None


class MaskedLayer:
    """Mixin for modules that own masked weights."""

    mask_key: str
    mask_kind: MaskKind = "binary"  # attach_scores sets both for training
    threshold: float = DEFAULT_THRESHOLD

    def masked_params(self) -> list[MaskedParam]:
        raise NotImplementedError

    def _mask(self, scores: nn.Parameter | None) -> Tensor | None:
        return None if scores is None else mask_from_scores(scores, self.mask_kind, self.threshold)


def _adopt(cls: type[nn.Module], old: nn.Module, key: str) -> Any:
    """A module of ``cls`` sharing ``old``'s configuration, parameters and buffers (no copies),
    with ``key`` naming its masked weight (or, for BatchNorm, the module)."""
    new: Any = cls.__new__(cls)
    new.__dict__.update(old.__dict__)
    new._parameters = dict(old._parameters)
    new._buffers = dict(old._buffers)
    new._modules = dict(old._modules)
    new.mask_key = key
    return new


class MaskedConv2d(nn.Conv2d, MaskedLayer):
    """A Conv2d whose weight is multiplied by a per-task mask."""

    scores: nn.Parameter | None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, key: str) -> MaskedConv2d:
        if conv.padding_mode != "zeros":
            raise ValueError(f"{key}: padding_mode {conv.padding_mode!r} is not supported")
        new: MaskedConv2d = _adopt(cls, conv, key)
        new.scores = None
        return new

    def masked_params(self) -> list[MaskedParam]:
        return [MaskedParam(self.mask_key, self.weight, self.scores)]

    def _output_size(self, x: Tensor) -> tuple[int, int]:
        assert not isinstance(self.padding, str)
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        out_h = (x.shape[2] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        out_w = (x.shape[3] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        return out_h, out_w

    def _unfold_pays(self, x: Tensor) -> bool:
        if self.groups != 1 or x.device.type != "cpu" or isinstance(self.padding, str):
            return False
        out_h, out_w = self._output_size(x)
        return out_h * out_w <= UNFOLD_MAX_OUTPUT

    def _conv(self, x: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _unfolded(self, x: Tensor, plan: MaskPlan) -> Tensor:
        """The segments of a mixed batch as one unfold and a matmul per task: for small outputs
        (the last stage of a ResNet) this is 0.6-0.8 of a convolution per segment on a CPU
        (benchmarks/mixed.py), because one image's convolution there is mostly overhead."""
        assert not isinstance(self.padding, str)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, Cin*kh*kw, L]
        out_h, out_w = self._output_size(x)
        out = torch.cat(
            [
                torch.matmul(plan.weight(i, self.mask_key, self.weight).reshape(self.out_channels, -1), cols[a:b])
                for i, (a, b) in enumerate(plan.bounds)
            ]
        )
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1)
        y = out.view(x.shape[0], self.out_channels, out_h, out_w)
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y

    def forward(self, x: Tensor) -> Tensor:
        plan = _ACTIVE_PLAN.get()
        if plan is not None and plan.stack:
            w = plan.stacked_weight(self.mask_key, self.weight)
            bias = None if self.bias is None else self.bias.repeat(plan.stack)
            return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups * plan.stack)
        if plan is not None:
            if len(plan.bounds) > 1 and self._unfold_pays(x):
                return self._unfolded(x, plan)
            return _segmented(plan, x, lambda xs, i: self._conv(xs, plan.weight(i, self.mask_key, self.weight)))
        return masked_conv2d(
            x,
            self.weight,
            self._mask(self.scores),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


class MaskedLinear(nn.Linear, MaskedLayer):
    """A Linear whose weight is multiplied by a per-task mask."""

    scores: nn.Parameter | None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, key: str) -> MaskedLinear:
        new: MaskedLinear = _adopt(cls, linear, key)
        new.scores = None
        return new

    def masked_params(self) -> list[MaskedParam]:
        return [MaskedParam(self.mask_key, self.weight, self.scores)]

    def _stacked(self, x: Tensor, plan: MaskPlan) -> Tensor:
        s = plan.stack
        w = plan.stacked_weight(self.mask_key, self.weight).view(s, self.out_features, self.in_features)
        xs = x.reshape(-1, s, self.in_features).transpose(0, 1)  # [S, rows, in]
        y = torch.bmm(xs, w.transpose(1, 2))  # [S, rows, out]
        if self.bias is not None:
            y = y + self.bias
        return y.transpose(0, 1).reshape(*x.shape[:-1], s * self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        plan = _ACTIVE_PLAN.get()
        if plan is not None and plan.stack:
            return self._stacked(x, plan)
        if plan is not None:
            return _segmented(
                plan, x, lambda xs, i: F.linear(xs, plan.weight(i, self.mask_key, self.weight), self.bias)
            )
        return masked_linear(x, self.weight, self._mask(self.scores), self.bias)


class MaskedMultiheadAttention(nn.MultiheadAttention, MaskedLayer):
    """Batch-first self/cross attention with a masked ``in_proj_weight`` and a masked ``out_proj``.

    Numerically the computation of ``nn.MultiheadAttention`` for what vision transformers use:
    packed q/k/v projection, no attention or padding mask, ``need_weights=False``.
    """

    in_proj_scores: nn.Parameter | None

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, *, key: str) -> MaskedMultiheadAttention:
        if not (mha.batch_first and mha._qkv_same_embed_dim) or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(f"{key}: only batch-first attention with a packed in_proj is supported")
        new: MaskedMultiheadAttention = _adopt(cls, mha, key)
        new.in_proj_scores = None
        return new

    def masked_params(self) -> list[MaskedParam]:
        return [MaskedParam(self.mask_key, self.in_proj_weight, self.in_proj_scores)]

    def _attend(self, q_in: Tensor, k_in: Tensor, v_in: Tensor, w: Tensor) -> Tensor:
        b = self.in_proj_bias
        if q_in is k_in and k_in is v_in:
            q, k, v = F.linear(q_in, w, b).chunk(3, dim=-1)
        else:
            wq, wk, wv = w.chunk(3)
            bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
            q, k, v = F.linear(q_in, wq, bq), F.linear(k_in, wk, bk), F.linear(v_in, wv, bv)
        n, lq, e = q.shape
        h = self.num_heads
        q, k, v = (t.reshape(n, t.shape[1], h, e // h).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).reshape(n, lq, e)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        if key_padding_mask is not None or attn_mask is not None or need_weights or is_causal:
            raise NotImplementedError("MaskedMultiheadAttention supports need_weights=False without attention masks")
        plan = _ACTIVE_PLAN.get()
        if plan is not None and plan.stack:
            raise NotImplementedError("attention mixes channels: a stacked plan cannot run it")
        if plan is not None:

            def segment(q: Tensor, i: int) -> Tensor:
                a, b = plan.bounds[i]
                k = q if key is query else key[a:b]
                v = k if value is key else value[a:b]
                return self._attend(q, k, v, plan.weight(i, self.mask_key, self.in_proj_weight))

            attended = _segmented(plan, query, segment)
        else:
            mask = self._mask(self.in_proj_scores)
            w = self.in_proj_weight if mask is None else self.in_proj_weight * mask
            attended = self._attend(query, key, value, w)
        return self.out_proj(attended), None


class TaskBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose parameters and statistics a task may replace (Piggyback's ``--train-bn``)."""

    mask_key: str  # the module's name: per-task parameters are looked up under it

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, *, key: str) -> TaskBatchNorm2d:
        new: TaskBatchNorm2d = _adopt(cls, bn, key)
        return new

    def _segment(self, x: Tensor, plan: MaskPlan, i: int) -> Tensor:
        p = plan.norm(i, self.mask_key)
        if p is None:
            return super().forward(x)
        return F.batch_norm(x, p.running_mean, p.running_var, p.weight, p.bias, False, 0.0, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        plan = _ACTIVE_PLAN.get()
        if plan is None or self.training:
            return super().forward(x)
        if plan.stack:
            assert self.running_mean is not None and self.running_var is not None
            own = NormParams(self.weight, self.bias, self.running_mean, self.running_var)
            p = plan.stacked_norm(self.mask_key, own)
            return F.batch_norm(x, p.running_mean, p.running_var, p.weight, p.bias, False, 0.0, self.eps)
        return _segmented(plan, x, lambda xs, i: self._segment(xs, plan, i))


# --- whole-network helpers -------------------------------------------------------------------


def convert_to_masked(model: nn.Module) -> list[MaskedParam]:
    """Swap every Conv2d, Linear, MultiheadAttention and BatchNorm2d of ``model`` for its masked
    counterpart, in place and sharing the same tensors. Returns the masked weights in order."""
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, MaskedLayer | TaskBatchNorm2d):
            continue
        if isinstance(module, nn.MultiheadAttention):
            replacements.append((name, MaskedMultiheadAttention.from_mha(module, key=f"{name}.in_proj_weight")))
        elif isinstance(module, nn.Conv2d):
            replacements.append((name, MaskedConv2d.from_conv(module, key=f"{name}.weight")))
        elif isinstance(module, nn.Linear):
            replacements.append((name, MaskedLinear.from_linear(module, key=f"{name}.weight")))
        elif type(module) is nn.BatchNorm2d:
            replacements.append((name, TaskBatchNorm2d.from_bn(module, key=name)))
    # Replace parents before children so a child lands in the parent object that stays in the tree.
    for name, new in replacements:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    return list(iter_masked_params(model))


def iter_masked_params(model: nn.Module) -> Iterator[MaskedParam]:
    for module in model.modules():
        if isinstance(module, MaskedLayer):
            yield from module.masked_params()


def attach_scores(
    model: nn.Module,
    *,
    kind: MaskKind = "binary",
    init: ScoreInit = "1s",
    scale: float = DEFAULT_SCORE_INIT,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[nn.Parameter]:
    """Give every masked layer trainable scores and freeze every backbone weight.

    Returns the score parameters (what the optimiser trains)."""
    for p in model.parameters():
        p.requires_grad_(False)
    scores: list[nn.Parameter] = []
    for module in model.modules():
        if not isinstance(module, MaskedLayer):
            continue
        module.mask_kind, module.threshold = kind, threshold
        for mp in module.masked_params():
            s = nn.Parameter(init_scores(mp.weight, init, scale))
            if isinstance(module, MaskedMultiheadAttention):
                module.in_proj_scores = s
            else:
                module.scores = s
            scores.append(s)
    return scores
