import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from piggyback_core import (
    Backbone,
    MaskedConv2d,
    MaskedLinear,
    MaskedMultiheadAttention,
    Preprocessing,
    UnknownBackboneError,
    WeightsError,
    fingerprint_state_dict,
    get_backbone_spec,
    list_backbones,
    load_backbone,
)

PAPER_AND_MODERN = [
    "vgg16", "vgg16_bn", "resnet50", "densenet121", "resnet18", "resnet34", "resnet101",
    "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "vit_b_16",
]  # fmt: skip


def test_registry_holds_the_papers_backbones_and_modern_ones() -> None:
    assert set(PAPER_AND_MODERN) <= set(list_backbones())


def test_unknown_backbone_is_a_value_error_naming_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9000'; available: .*resnet50") as info:
        get_backbone_spec("resnet9000")
    assert isinstance(info.value, UnknownBackboneError)


def _tv_resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.resnet18(weights=None).state_dict()


def test_random_weights_are_reproducible_and_fingerprinted_without_the_classifier() -> None:
    a = load_backbone("resnet18", weights="random", seed=0)
    b = load_backbone("resnet18", weights="random", seed=0)
    c = load_backbone("resnet18", weights="random", seed=1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.fingerprint.startswith("sha256:") and len(a.fingerprint) == 7 + 64
    state = {k: v for k, v in _tv_resnet18_state(0).items() if not k.startswith("fc.")}
    assert fingerprint_state_dict(state) == a.fingerprint
    assert a.feature_dim == 512 and a.weights == "random:0"


def test_random_weights_give_the_same_fingerprint_in_another_process(resnet18: Backbone) -> None:
    code = "import piggyback_core as p; print(p.load_backbone('resnet18', weights='random').fingerprint)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == resnet18.fingerprint


def test_fingerprint_changes_with_any_single_weight() -> None:
    state = _tv_resnet18_state(0)
    before = fingerprint_state_dict(state)
    state["layer3.0.conv1.weight"][0, 0, 0, 0] += 1e-7
    assert fingerprint_state_dict(state) != before
    state = _tv_resnet18_state(0)
    state["bn1.num_batches_tracked"] += 5  # a counter, not a weight
    assert fingerprint_state_dict(state) == before


def test_backbone_is_frozen_masked_and_headless(resnet18: Backbone) -> None:
    model = resnet18.model
    assert not any(p.requires_grad for p in model.parameters())
    assert isinstance(model.fc, torch.nn.Identity)
    assert isinstance(model.conv1, MaskedConv2d)
    assert len(resnet18.masked) == 20  # resnet18: 17 convs + 3 downsample convs
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_vit_masks_every_attention_and_mlp_linear() -> None:
    vit = load_backbone("vit_b_16", weights="random")
    keys = set(vit.mask_shapes)
    for i in range(12):
        prefix = f"encoder.layers.encoder_layer_{i}"
        for k in (
            "self_attention.in_proj_weight",
            "self_attention.out_proj.weight",
            "mlp.0.weight",
            "mlp.3.weight",
        ):
            assert f"{prefix}.{k}" in keys
    assert "conv_proj.weight" in keys and "heads.head.weight" not in keys
    attn = vit.model.encoder.layers[0].self_attention
    assert isinstance(attn, MaskedMultiheadAttention) and isinstance(attn.out_proj, MaskedLinear)


@pytest.mark.parametrize("wrapper", ["plain", "state_dict", "ddp"])
def test_weights_from_a_torch_checkpoint_load_with_weights_only(tmp_path: Path, wrapper: str) -> None:
    state = _tv_resnet18_state(7)
    if wrapper == "ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    payload = {"state_dict": state, "epoch": 3} if wrapper == "state_dict" else state
    path = tmp_path / "r18.pth"
    torch.save(payload, path)
    loaded = load_backbone("resnet18", weights=str(path))
    assert loaded.fingerprint == load_backbone("resnet18", weights="random", seed=7).fingerprint
    assert loaded.weights == f"file:{path.resolve()}"


def test_weights_from_safetensors_without_the_classifier(tmp_path: Path) -> None:
    state = {k: v for k, v in _tv_resnet18_state(7).items() if not k.startswith("fc.")}
    path = tmp_path / "r18.safetensors"
    save_file(state, str(path))
    assert load_backbone("resnet18", weights=str(path)).fingerprint == fingerprint_state_dict(state)


def test_weights_of_the_wrong_network_or_not_weights_at_all_are_refused(tmp_path: Path) -> None:
    wrong = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(WeightsError, match="does not fit resnet18"):
        load_backbone("resnet18", weights=str(wrong))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_backbone("resnet18", weights=str(junk))
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    pickled_code = tmp_path / "evil.pt"
    torch.save({"weights": Path("x")}, pickled_code)  # not loadable with weights_only=True
    with pytest.raises(WeightsError):
        load_backbone("resnet18", weights=str(pickled_code))


def test_unknown_torchvision_weights_name_lists_the_known_ones() -> None:
    with pytest.raises(WeightsError, match="unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        load_backbone("resnet18", weights="IMAGENET9K")


def test_torchvision_weights_name_loads_from_the_torch_hub_cache_and_uses_its_transforms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real loading path, offline: torchvision reads $TORCH_HOME/hub/checkpoints/<file> if present.
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = _tv_resnet18_state(11)
    torch.save(state, checkpoints / weights.url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name in ("IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT"):
        loaded = load_backbone("resnet18", weights=name)
        assert loaded.fingerprint == load_backbone("resnet18", weights="random", seed=11).fingerprint
        assert loaded.weights == "ResNet18_Weights.IMAGENET1K_V1"
        assert loaded.preprocessing == Preprocessing.from_torchvision(weights.transforms())


def test_preprocessing_resizes_crops_and_normalises_like_torchvision() -> None:
    image = Image.new("RGB", (500, 375), (255, 128, 0))
    transform = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()
    pre = Preprocessing.from_torchvision(transform)
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == (232, 224, "bilinear")
    x = pre(image)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x, transform(image), atol=1e-5, rtol=0)
