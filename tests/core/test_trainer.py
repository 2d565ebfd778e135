import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from piggyback_core import DatasetError, Engine, TaskFile, load_backbone
from piggyback_core.trainer import TrainConfig, TrainResult, train
from server.cli import build_parser

# Small, fast settings that reliably learn the colour dataset from a random backbone.
FAST: dict[str, Any] = {
    "backbone": "resnet18", "weights": "random", "epochs": 4, "batch_size": 8, "lr_mask": 1e-3,
    "lr_head": 1e-2, "lr": 1e-2, "resize_size": 36, "crop_size": 32, "workers": 0, "progress": False,
    "dtype": "float32",  # the same numerics on every machine; bfloat16 is forced where it is tested
}  # fmt: skip


def run(data: Path, **overrides: Any) -> TrainResult:
    return train(TrainConfig(data=data, task="colours", **{**FAST, **overrides}), log=lambda _: None)


def test_defaults_are_the_papers_recipe() -> None:
    cfg = TrainConfig(data=Path("."), task="t")
    assert (cfg.backbone, cfg.method, cfg.mask_kind, cfg.train_bn) == (
        "resnet50",
        "piggyback",
        "binary",
        False,
    )
    assert (cfg.epochs, cfg.batch_size, cfg.lr_mask, cfg.lr_head) == (30, 32, 1e-4, 1e-4)
    assert (cfg.lr_decay_every, cfg.lr_decay_factor, cfg.weight_decay) == (15, 0.1, 0.0)
    assert (cfg.score_init, cfg.score_scale, cfg.threshold) == ("1s", 1e-2, 5e-3)
    assert (cfg.lr, cfg.momentum) == (1e-3, 0.9)  # the baselines' SGD


def test_every_default_is_a_flag_with_the_same_value() -> None:
    args = build_parser().parse_args(["train", "--data", "d", "--task", "t", "--out", "x"])
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("data", "task", "workdir", "progress", "workers"):
            continue
        assert getattr(args, f.name) == f.default, f.name


def test_piggyback_learns_a_separable_dataset_and_its_task_file_gives_the_trainers_predictions(
    colours: Path, tmp_path: Path
) -> None:
    result = run(colours, workdir=tmp_path)
    assert result.best_val_top1 >= 0.9  # chance is 1/3
    task = result.task
    assert task is not None and task.labels == ("blue", "green", "red")
    assert task.provenance["val_top1"] == pytest.approx(result.best_val_top1, abs=1e-6)
    assert task.provenance["selection"] == "best epoch on val/" and task.provenance["method"] == "piggyback"
    assert 0.0 < 1 - task.density < 0.5 and task.preprocessing == result.preprocessing
    # the engine, from the file alone, reproduces the trained network's logits
    engine = Engine(load_backbone("resnet18", weights="random"))
    engine.add_task(TaskFile.load(tmp_path / "best.safetensors"))
    x = torch.randn(4, 3, 32, 32)
    assert result.net is not None
    with torch.no_grad():
        expected = result.net(x)
    torch.testing.assert_close(engine.run("colours", x), expected, rtol=1e-4, atol=1e-4)
    log = (tmp_path / "log.json").read_text()
    assert '"val_top1"' in log and '"masked_out"' in log


def test_resume_after_an_interruption_continues_to_the_same_result(colours: Path, tmp_path: Path) -> None:
    straight = run(colours, epochs=3)
    run(colours, epochs=2, workdir=tmp_path)  # "interrupted" after epoch 2
    resumed = run(colours, epochs=3, workdir=tmp_path, resume=True)
    assert [h.epoch for h in resumed.history] == [1, 2, 3]
    assert straight.task is not None and resumed.task is not None
    for key, packed in straight.task.masks.items():
        assert torch.equal(resumed.task.masks[key], packed), key
    torch.testing.assert_close(resumed.task.head_weight, straight.task.head_weight, rtol=0, atol=1e-6)
    assert [h.val_top1 for h in resumed.history] == [h.val_top1 for h in straight.history]


def test_resume_without_a_checkpoint_is_a_clear_error(colours: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nothing to resume"):
        run(colours, workdir=tmp_path, resume=True)


def test_two_process_ddp_run_matches_a_single_process_run(colours: Path, tmp_path: Path) -> None:
    """Stated tolerance: masks bit-identical, head within 1e-5 (only reduction order differs)."""
    args = [
        "train", "--data", str(colours), "--task", "colours", "--backbone", "resnet18", "--weights", "random",
        "--epochs", "2", "--batch-size", "8", "--lr-mask", "1e-3", "--lr-head", "1e-2", "--resize-size", "36",
        "--crop-size", "32", "--workers", "0", "--quiet", "--dtype", "float32", "--layout", "contiguous",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "server.cli", *args, "--out", str(tmp_path / "single.safetensors"),
         "--workdir", str(tmp_path / "single")],
        check=True, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "server.cli", *args, "--out", str(tmp_path / "ddp.safetensors"),
         "--workdir", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert "2 process(es)" in ddp.stdout
    single, multi = (
        TaskFile.load(tmp_path / "single.safetensors"),
        TaskFile.load(tmp_path / "ddp.safetensors"),
    )
    assert multi.provenance["recipe"]["processes"] == 2
    for key, packed in single.masks.items():
        assert torch.equal(multi.masks[key], packed), key
    torch.testing.assert_close(multi.head_weight, single.head_weight, rtol=0, atol=1e-5)
    torch.testing.assert_close(multi.head_bias, single.head_bias, rtol=0, atol=1e-5)
    assert multi.provenance["val_top1"] == single.provenance["val_top1"]


def test_classifier_baseline_trains_the_head_only_with_an_all_ones_mask(colours: Path) -> None:
    result = run(colours, method="classifier", epochs=2)
    assert result.task is not None and result.task.density == 1.0 and result.best_val_top1 >= 0.9
    assert result.task.provenance["method"] == "classifier"


def test_finetune_baseline_changes_the_backbone_and_returns_a_full_model_state(colours: Path) -> None:
    result = run(colours, method="finetune", epochs=2)
    assert result.task is None and result.model_state is not None
    original = load_backbone("resnet18", weights="random").model.state_dict()
    assert not torch.equal(result.model_state["backbone.conv1.weight"], original["conv1.weight"])
    assert result.model_state["head.weight"].shape == (3, 512)


def test_ternary_masks_and_per_task_batchnorm_go_into_the_task_file(colours: Path) -> None:
    result = run(colours, mask_kind="ternary", train_bn=True, epochs=2)
    task = result.task
    assert task is not None and task.mask_kind == "ternary" and task.bits_per_parameter == pytest.approx(2, 1e-3)
    assert set(task.norms) == set(load_backbone("resnet18", weights="random").norm_sizes)
    engine = Engine(load_backbone("resnet18", weights="random"))
    engine.add_task(task)
    x = torch.randn(3, 3, 32, 32)
    assert result.net is not None
    with torch.no_grad():
        torch.testing.assert_close(engine.run("colours", x), result.net(x), rtol=1e-4, atol=1e-4)


def test_datasets_with_mismatched_class_folders_are_refused(colours: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(colours, tmp_path / "d")
    (tmp_path / "d" / "val" / "purple").mkdir()
    shutil.copy(next((colours / "val" / "red").iterdir()), tmp_path / "d" / "val" / "purple" / "x.png")
    with pytest.raises(DatasetError, match="not labels: purple"):
        run(tmp_path / "d", epochs=1)


def test_bf16_training_reaches_the_accuracy_and_density_of_fp32_on_the_same_seed(colours: Path) -> None:
    """Stated margin: the same val top-1 within 5 points, masked-out fraction within 2 points.
    Scores, head and optimiser state stay float32 under bfloat16 autocast."""
    fp32 = run(colours, dtype="float32")
    bf16 = run(colours, dtype="bfloat16", layout="channels_last")
    assert fp32.task is not None and bf16.task is not None
    assert bf16.task.provenance["compute_dtype"] == "bfloat16"
    assert abs(bf16.best_val_top1 - fp32.best_val_top1) <= 0.05
    assert abs(bf16.task.density - fp32.task.density) <= 0.02
    assert bf16.task.head_weight.dtype == torch.float32


def test_the_classifier_baseline_keeps_a_constant_learning_rate_as_the_authors_do(colours: Path) -> None:
    result = run(colours, method="classifier", epochs=3, lr_decay_every=1)
    assert [h.lr for h in result.history] == [[FAST["lr"]]] * 3
    decayed = run(colours, method="piggyback", epochs=2, lr_decay_every=1)
    assert decayed.history[1].lr[0] == pytest.approx(FAST["lr_mask"] * 0.1)


def test_squash_resize_mode_trains_and_is_recorded_for_serving(colours: Path) -> None:
    result = run(colours, epochs=1, resize_mode="squash")
    assert result.task is not None and result.task.preprocessing is not None
    assert result.task.preprocessing.resize_mode == "squash"
    assert TaskFile.from_bytes(result.task.to_bytes()).preprocessing == result.task.preprocessing
