import copy

import pytest
import torch
from torch import nn

from piggyback_core import (
    MaskedConv2d,
    MaskedLinear,
    MaskedMultiheadAttention,
    attach_scores,
    binarize,
    convert_to_masked,
    init_scores,
    load_backbone,
    masked_conv2d,
    masked_linear,
    ternarize,
)

W = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
SCORES = [[0.01, 0.001], [0.006, -0.02]]


def test_binarizer_thresholds_at_5e_3_and_passes_gradient_straight_through() -> None:
    scores = torch.tensor(SCORES, requires_grad=True)
    mask = binarize(scores)
    assert mask.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    # y = (W * mask) @ x with x = [1, 1]; L = sum(y)  =>  dL/d(masked W) = 1 everywhere,
    # dL/dmask = W (chain rule), and the STE hands dL/dmask to the scores unchanged.
    x = torch.ones(2)
    masked_linear(x, W, mask).sum().backward()
    assert scores.grad is not None
    assert scores.grad.tolist() == W.tolist()


def test_ternarizer_maps_negative_scores_to_minus_one_and_passes_gradient_straight_through() -> None:
    scores = torch.tensor(SCORES, requires_grad=True)
    mask = ternarize(scores)
    assert mask.tolist() == [[1.0, 0.0], [1.0, -1.0]]
    x = torch.tensor([2.0, 3.0])
    masked_linear(x, W, mask).sum().backward()
    # dL/d(masked W)[i, j] = x[j]; times W for the mask; unchanged through the ternarizer
    assert scores.grad is not None
    assert scores.grad.tolist() == [[2.0, 6.0], [6.0, -12.0]]


def test_a_score_exactly_at_the_threshold_masks_the_weight() -> None:
    assert binarize(torch.tensor([5e-3, 5.0001e-3])).tolist() == [0.0, 1.0]


def test_score_init_is_the_papers_1e_2_or_uniform_within_scale() -> None:
    w = torch.empty(100, 10)
    assert torch.all(init_scores(w) == 1e-2)
    u = init_scores(w, "uniform", 0.5)
    assert u.min() >= -0.5 and u.max() <= 0.5 and u.std() > 0.1
    with pytest.raises(ValueError, match="'1s' or 'uniform'"):
        init_scores(w, "gaussian")  # type: ignore[arg-type]


def test_masked_modules_equal_their_functional_forms() -> None:
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    lin = nn.Linear(6, 5)
    mconv, mlin = MaskedConv2d.from_conv(conv, key="c.weight"), MaskedLinear.from_linear(lin, key="l.weight")
    attach_scores(nn.ModuleList([mconv, mlin]), init="uniform", scale=0.02)
    x = torch.randn(2, 3, 8, 8, generator=g)
    mask = binarize(mconv.scores)  # type: ignore[arg-type]
    expected = masked_conv2d(x, conv.weight, mask, conv.bias, stride=2, padding=1)
    assert torch.equal(mconv(x), expected)
    h = torch.randn(2, 6, generator=g)
    assert torch.equal(mlin(h), masked_linear(h, lin.weight, binarize(mlin.scores), lin.bias))  # type: ignore[arg-type]
    assert mconv.weight is conv.weight  # shared, not copied


def test_masked_attention_matches_torch_multihead_attention_with_the_masked_weight() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    reference = copy.deepcopy(mha)
    masked = MaskedMultiheadAttention.from_mha(mha, key="attn.in_proj_weight")
    masked.out_proj = MaskedLinear.from_linear(masked.out_proj, key="attn.out_proj.weight")
    attach_scores(masked, init="uniform")
    with torch.no_grad():
        reference.in_proj_weight.mul_(binarize(masked.in_proj_scores))  # type: ignore[arg-type]
        reference.out_proj.weight.mul_(binarize(masked.out_proj.scores))  # type: ignore[arg-type]
    x = torch.randn(3, 7, 16)
    expected, _ = reference(x, x, x, need_weights=False)
    got, _ = masked(x, x, x, need_weights=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError):
        masked(x, x, x, need_weights=True)


def test_convert_to_masked_shares_every_weight_and_lists_every_conv_and_linear() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))
    weights = [model[0].weight, model[3].weight]
    masked = convert_to_masked(model)
    assert [m.key for m in masked] == ["0.weight", "3.weight"]
    assert all(m.weight is w for m, w in zip(masked, weights, strict=True))
    assert isinstance(model[0], MaskedConv2d) and isinstance(model[3], MaskedLinear)


def test_training_scores_and_head_leaves_backbone_weights_bit_identical() -> None:
    backbone = load_backbone("resnet18", weights="random", seed=3)
    model = backbone.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = attach_scores(model)
    head = nn.Linear(backbone.feature_dim, 3)
    optimizer = torch.optim.Adam([*scores, *head.parameters()], lr=1e-2)
    model.eval()  # BatchNorm frozen, as in the paper's default recipe
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)
        loss = nn.functional.cross_entropy(head(model(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    assert any(not torch.all(s == 1e-2) for s in scores), "scores must have trained"
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(not p.requires_grad for n, p in model.named_parameters() if "scores" not in n)


@pytest.mark.parametrize("stride,bias", [(1, False), (2, True)])
def test_a_mixed_batch_through_unfold_and_matmul_equals_a_convolution_per_task(stride: int, bias: bool) -> None:
    from piggyback_core.masking import UNFOLD_MAX_OUTPUT, MaskedConv2d, use_plan

    torch.manual_seed(0)
    conv = MaskedConv2d.from_conv(nn.Conv2d(16, 8, 3, stride=stride, padding=1, bias=bias), key="c.weight")
    masks = [(torch.rand_like(conv.weight) < 0.7).float() for _ in range(3)]
    x = torch.randn(5, 16, 7, 7).contiguous(memory_format=torch.channels_last)
    assert 7 * 7 <= UNFOLD_MAX_OUTPUT and conv._unfold_pays(x)

    class Plan:
        bounds = [(0, 2), (2, 3), (3, 5)]
        stack = 0

        def weight(self, segment: int, key: str, weight: torch.Tensor) -> torch.Tensor:
            return weight * masks[segment]

        def norm(self, segment: int, name: str) -> None:
            return None

    with torch.inference_mode(), use_plan(Plan()):
        got = conv(x)
    expected = torch.cat([conv._conv(x[a:b], conv.weight * masks[i]) for i, (a, b) in enumerate(Plan.bounds)])
    assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
