"""The offline trainer: Piggyback's recipe, its two baselines, resumable and distributed.

Defaults follow the authors' published code: scores initialised to 1e-2, threshold 5e-3, Adam at
1e-4 for the scores and for the head, both decayed x0.1 every 15 epochs, 30 epochs, batch 32, no
weight decay, BatchNorm frozen in eval mode unless ``train_bn`` (then it trains with the head and
goes into the task file). Like the authors, the rest of the network is in train mode (VGG's dropout
is active). The baselines use SGD with momentum 0.9 at 1e-3, decayed the same way: ``classifier``
trains the head only (its task file carries an all-ones mask) and ``finetune`` trains every weight
and BatchNorm (it produces a full-model state for comparison, not a task file).

The authors picked the best epoch on the test set; this trainer picks it on ``val/``.

Under ``torchrun`` (``WORLD_SIZE > 1``) it runs with DistributedDataParallel, gloo on CPU and NCCL
on CUDA. ``batch_size`` is the global batch: each global batch is split across the processes and
each process scales its summed loss by ``world / global_batch``, so the averaged gradient is the
single-process one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from . import device as _device
from .backbones import Backbone, load_backbone
from .bitpack import MaskKind
from .data import ImageFolderDataset, ShardedBatchSampler, train_transform
from .errors import DatasetError
from .hardware import LAYOUTS, dtype_name, parse_dtype, parse_layout
from .images import RESIZE_MODES, Preprocessing
from .masking import (
    DEFAULT_SCORE_INIT,
    DEFAULT_THRESHOLD,
    MaskedLayer,
    NormParams,
    ScoreInit,
    TaskBatchNorm2d,
    attach_scores,
    iter_masked_params,
)
from .names import validate_task_name
from .taskfile import TaskFile

__all__ = ["EpochLog", "Method", "TrainConfig", "TrainResult", "train"]

Method = Literal["piggyback", "classifier", "finetune"]
METHODS: tuple[Method, ...] = ("piggyback", "classifier", "finetune")


@dataclass
class TrainConfig:
    """Everything a run depends on. Every field is a ``piggyback train`` flag."""

    data: Path
    task: str
    backbone: str = "resnet50"
    weights: str = "IMAGENET1K_V1"
    method: Method = "piggyback"
    mask_kind: MaskKind = "binary"
    train_bn: bool = False
    epochs: int = 30
    batch_size: int = 32
    lr_mask: float = 1e-4
    lr_head: float = 1e-4
    lr: float = 1e-3  # the baselines' SGD learning rate
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_decay_every: int = 15
    lr_decay_factor: float = 0.1
    score_init: ScoreInit = "1s"
    score_scale: float = DEFAULT_SCORE_INIT
    threshold: float = DEFAULT_THRESHOLD
    resize_size: int | None = None  # None: the backbone weights' own preprocessing
    crop_size: int | None = None
    crop_scale_min: float = 0.08  # RandomResizedCrop's smallest area fraction
    resize_mode: str = "shorter"  # or "squash": crop x crop ignoring the aspect ratio, flip only
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    # Compute dtype of the forward and backward passes (autocast; scores, head and optimiser state
    # stay float32): auto = bfloat16 on a CPU that has it natively and on CUDA GPUs that have it,
    # float16 on older GPUs (with a gradient scaler), float32 elsewhere.
    dtype: str = "auto"
    layout: str = "auto"  # activations: channels_last, contiguous, or auto (the backbone's faster one)
    amp: bool | None = None  # the older switch: False means dtype float32
    workdir: Path | None = None  # checkpoints and the JSON log; needed for resume
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        # Everything that can be checked without loading anything is checked here, before a
        # backbone is loaded or a directory created: a bad flag fails at once and leaves nothing.
        validate_task_name(self.task)
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize_mode!r}; expected {' or '.join(RESIZE_MODES)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected {', '.join(LAYOUTS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.mask_kind not in ("binary", "ternary"):
            raise ValueError(f"unknown mask kind {self.mask_kind!r}; expected 'binary' or 'ternary'")
        for name in ("epochs", "batch_size", "lr_decay_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.resume and self.workdir is None:
            raise ValueError("resume needs a workdir holding the interrupted run's checkpoint")


@dataclass
class EpochLog:
    epoch: int
    loss: float
    train_top1: float
    val_top1: float
    val_top5: float
    masked_out: float
    lr: list[float]
    seconds: float


@dataclass
class TrainResult:
    labels: list[str]
    best_epoch: int
    best_val_top1: float
    history: list[EpochLog]
    task: TaskFile | None  # piggyback and classifier
    model_state: dict[str, Tensor] | None = field(default=None, repr=False)  # finetune: backbone + head
    net: nn.Module | None = field(default=None, repr=False)  # the best network, for evaluation
    preprocessing: Preprocessing | None = None


class _Net(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if _device.cuda_available() else "cpu"
    if name == "cuda":
        if not _device.cuda_available():
            raise ValueError("device 'cuda' asked for, but CUDA is not available")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def _distributed(device_name: str) -> Iterator[_Dist]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(device_name, local_rank)
    if world == 1:
        yield _Dist(device=device)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield _Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device)
    finally:
        dist.destroy_process_group()


def train(config: TrainConfig, *, log: Callable[[str], None] = print) -> TrainResult:
    """Run one training job (under torchrun: one process of it). Only rank 0 logs and writes."""
    with _distributed(config.device) as d:
        return _Trainer(config, d, log if d.main else (lambda _: None)).run()


class _Trainer:
    def __init__(self, cfg: TrainConfig, d: _Dist, log: Callable[[str], None]) -> None:
        self.cfg, self.d, self.log = cfg, d, log
        torch.manual_seed(cfg.seed)
        self.backbone: Backbone = load_backbone(cfg.backbone, weights=cfg.weights, seed=cfg.seed)
        base = self.backbone.preprocessing
        resize = cfg.resize_size or base.resize_size
        self.pre = Preprocessing(
            resize_size=resize,
            crop_size=cfg.crop_size or min(base.crop_size, resize),
            mean=base.mean,
            std=base.std,
            interpolation=base.interpolation,
            resize_mode=cfg.resize_mode,
        )
        data = Path(cfg.data)
        augment = train_transform(self.pre, crop_scale_min=cfg.crop_scale_min)
        # The smallest random crop (crop_scale_min of the area) must still have crop_size pixels a side.
        train_min_side = math.ceil(self.pre.crop_size / math.sqrt(cfg.crop_scale_min))
        if cfg.resize_mode == "squash":
            train_min_side = self.pre.crop_size
        self.train_set = ImageFolderDataset(data / "train", augment, seed=cfg.seed, draft_min_side=train_min_side)
        self.labels = self.train_set.classes
        if len(self.labels) < 2:
            raise DatasetError(f"{str(data / 'train')!r} needs at least two class folders")
        self.val_set = ImageFolderDataset(data / "val", self.pre, classes=self.labels)

        model = self.backbone.model
        head = nn.Linear(self.backbone.feature_dim, len(self.labels))
        self.scores: list[nn.Parameter] = []
        self.bn_modules = [m for m in model.modules() if isinstance(m, TaskBatchNorm2d)]
        if cfg.method == "piggyback":
            self.scores = attach_scores(
                model, kind=cfg.mask_kind, init=cfg.score_init, scale=cfg.score_scale, threshold=cfg.threshold
            )
        elif cfg.method == "finetune":
            model.requires_grad_(True)
        self.train_bn = cfg.train_bn or cfg.method == "finetune"
        bn_params = [p for m in self.bn_modules for p in m.parameters()] if cfg.train_bn else []
        for p in bn_params:
            p.requires_grad_(True)
        self.net = _Net(model, head).to(d.device)

        self.optimizers: list[torch.optim.Optimizer] = []
        if cfg.method == "piggyback":
            self.optimizers.append(torch.optim.Adam(self.scores, lr=cfg.lr_mask, weight_decay=cfg.weight_decay))
            self.optimizers.append(
                torch.optim.Adam([*head.parameters(), *bn_params], lr=cfg.lr_head, weight_decay=cfg.weight_decay)
            )
        else:
            params = [p for p in self.net.parameters() if p.requires_grad]
            self.optimizers.append(
                torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            )
        self.schedulers = [
            # The authors' classifier-only baseline keeps a constant learning rate (no decay).
            torch.optim.lr_scheduler.StepLR(
                o, step_size=cfg.lr_decay_every, gamma=1.0 if cfg.method == "classifier" else cfg.lr_decay_factor
            )
            for o in self.optimizers
        ]
        self.ddp: nn.Module = self.net
        if d.world > 1:
            ids = [d.device.index] if d.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.amp_dtype = torch.float32 if cfg.amp is False else parse_dtype(cfg.dtype, d.device)
        if self.amp_dtype == torch.float16 and d.device.type != "cuda":
            raise ValueError("float16 training needs CUDA; on a CPU use bfloat16 or float32")
        self.amp = self.amp_dtype != torch.float32
        self.channels_last = parse_layout(cfg.layout, cfg.backbone)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)

        self.sampler = ShardedBatchSampler(
            len(self.train_set), cfg.batch_size, rank=d.rank, world=d.world, shuffle=True, seed=cfg.seed
        )
        self.history: list[EpochLog] = []
        self.best: dict[str, Any] = {"epoch": 0, "top1": -1.0, "state": None}
        self.start_epoch = 1
        self.workdir = Path(cfg.workdir) if cfg.workdir else None
        if self.workdir and d.main:
            self.workdir.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self._load_checkpoint()

    # --- state ----------------------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, Tensor]:
        keys = {n for n, p in self.net.named_parameters() if p.requires_grad}
        if self.train_bn:
            keys |= {f"backbone.{n}" for n, _ in self.net.backbone.named_buffers() if "running_" in n}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items() if k in keys}

    def _masked_out(self) -> float:
        if not self.scores:
            return 0.0
        thr = self.cfg.threshold
        if self.cfg.mask_kind == "binary":
            out = sum(int((s <= thr).sum()) for s in self.scores)
        else:
            out = sum(int(((s >= 0) & (s <= thr)).sum()) for s in self.scores)
        return out / sum(s.numel() for s in self.scores)

    def _checkpoint_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "last.pt"

    def _save_checkpoint(self, epoch: int) -> None:
        if not (self.workdir and self.d.main):
            return
        payload = {
            "epoch": epoch,
            "fingerprint": self.backbone.fingerprint,
            "method": self.cfg.method,
            "state": self._trainable_state(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "best": self.best,
            "history": [asdict(h) for h in self.history],
            "rng": torch.get_rng_state(),
        }
        tmp = self._checkpoint_path().with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self._checkpoint_path())

    def _load_checkpoint(self) -> None:
        path = self._checkpoint_path()
        if not path.is_file():
            raise DatasetError(f"nothing to resume: {str(path)!r} does not exist")
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck["fingerprint"] != self.backbone.fingerprint or ck["method"] != self.cfg.method:
            raise ValueError(f"{str(path)!r} is from another run (other backbone weights or method)")
        missing = set(self._trainable_state()) - set(ck["state"])
        if missing:
            raise ValueError(f"{str(path)!r} lacks {len(missing)} trained tensors, e.g. {sorted(missing)[0]}")
        self.net.load_state_dict(ck["state"], strict=False)
        for o, s in zip(self.optimizers, ck["optimizers"], strict=True):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, ck["schedulers"], strict=True):
            sch.load_state_dict(s)
        self.best = ck["best"]
        self.history = [EpochLog(**h) for h in ck["history"]]
        torch.set_rng_state(ck["rng"])
        self.start_epoch = int(ck["epoch"]) + 1
        self.log(f"resumed from {path} after epoch {ck['epoch']}")

    # --- loops ----------------------------------------------------------------------------------

    def _set_train_mode(self) -> None:
        self.net.train()
        if not self.train_bn:
            for m in self.bn_modules:
                m.eval()

    def _input(self, x: Tensor) -> Tensor:
        x = x.to(self.d.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.d.device.type, dtype=self.amp_dtype)

    def _loader(self, dataset: Any, **kwargs: Any) -> DataLoader[Any]:
        return DataLoader(
            dataset,
            num_workers=self.cfg.workers,
            pin_memory=self.d.device.type == "cuda",
            persistent_workers=False,
            **kwargs,
        )

    def _progress(self, iterable: Any, total: int, desc: str) -> Any:
        if not (self.cfg.progress and self.d.main):
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        self._set_train_mode()
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        batches = self.sampler.global_batches()
        loader = self._loader(self.train_set, batch_sampler=self.sampler)
        loss_sum = correct = seen = 0.0
        for step, (x, y) in enumerate(self._progress(loader, len(batches), f"epoch {epoch}")):
            x, y = self._input(x), y.to(self.d.device, non_blocking=True)
            global_n = len(batches[step])
            with self._autocast():
                logits = self.ddp(x)
                loss_sum_local = F.cross_entropy(logits.float(), y, reduction="sum")
            loss = loss_sum_local * (self.d.world / global_n)
            for o in self.optimizers:
                o.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            for o in self.optimizers:
                self.scaler.step(o)
            self.scaler.update()
            loss_sum += float(loss_sum_local.detach())
            correct += float((logits.argmax(1) == y).sum())
            seen += len(y)
        loss_sum, correct, seen = self.d.sum([loss_sum, correct, seen])
        return loss_sum / max(seen, 1), correct / max(seen, 1)

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float]:
        self.net.eval()
        n = len(self.val_set)
        shard = range(self.d.rank * n // self.d.world, (self.d.rank + 1) * n // self.d.world)
        loader = self._loader(Subset(self.val_set, list(shard)), batch_size=self.cfg.batch_size)
        top1 = top5 = seen = 0.0
        k = min(5, len(self.labels))
        for x, y in loader:
            x, y = self._input(x), y.to(self.d.device)
            with self._autocast():
                logits = self.net(x).float()
            top = logits.topk(k, dim=1).indices
            top1 += float((top[:, 0] == y).sum())
            top5 += float((top == y[:, None]).any(dim=1).sum())
            seen += len(y)
        top1, top5, seen = self.d.sum([top1, top5, seen])
        return top1 / max(seen, 1), top5 / max(seen, 1)

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.log(
            f"training {cfg.task!r}: {cfg.method}"
            + (f" ({cfg.mask_kind})" if cfg.method == "piggyback" else "")
            + f" on {cfg.backbone} [{self.backbone.weights}], {len(self.labels)} classes, "
            f"{len(self.train_set)} train / {len(self.val_set)} val images, {self.d.world} process(es) on "
            f"{self.d.device} in {dtype_name(self.amp_dtype)}"
            f"{', channels_last' if self.channels_last else ''}, batch {cfg.batch_size}, {cfg.epochs} epochs"
        )
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            start = time.perf_counter()
            loss, train_top1 = self._train_epoch(epoch)
            lrs = [g["lr"] for o in self.optimizers for g in o.param_groups[:1]]
            for s in self.schedulers:
                s.step()
            val_top1, val_top5 = self._evaluate()
            entry = EpochLog(
                epoch,
                loss,
                train_top1,
                val_top1,
                val_top5,
                self._masked_out(),
                lrs,
                time.perf_counter() - start,
            )
            self.history.append(entry)
            improved = val_top1 > self.best["top1"]
            if improved:
                self.best = {"epoch": epoch, "top1": val_top1, "state": self._trainable_state()}
                self._write_best()
            self.log(
                f"epoch {epoch:>3}/{cfg.epochs}  loss {loss:.4f}  train {train_top1:6.2%}  "
                f"val {val_top1:6.2%} (top5 {val_top5:6.2%})  masked out {entry.masked_out:6.2%}  "
                f"lr {' '.join(f'{lr:.2e}' for lr in lrs)}  {entry.seconds:.1f}s" + ("  *best" if improved else "")
            )
            self._save_checkpoint(epoch)
            self._write_log()
        self.net.load_state_dict(self.best["state"], strict=False)
        self.log(f"best epoch on val/: {self.best['epoch']} (val top-1 {self.best['top1']:.2%})")
        task, model_state = self._export()
        return TrainResult(
            labels=self.labels,
            best_epoch=int(self.best["epoch"]),
            best_val_top1=float(self.best["top1"]),
            history=self.history,
            task=task,
            model_state=model_state,
            net=self.net.eval(),
            preprocessing=self.pre,
        )

    # --- output ---------------------------------------------------------------------------------

    def _provenance(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "dataset": str(Path(cfg.data).resolve().name),
            "method": cfg.method,
            "epochs": cfg.epochs,
            "best_epoch": int(self.best["epoch"]),
            "val_top1": round(float(self.best["top1"]), 6),
            "selection": "best epoch on val/",
            "weights": self.backbone.weights,
            "compute_dtype": dtype_name(self.amp_dtype),
            "recipe": {
                "batch_size": cfg.batch_size,
                "lr_mask": cfg.lr_mask,
                "lr_head": cfg.lr_head,
                "lr": cfg.lr,
                "lr_decay_every": cfg.lr_decay_every,
                "lr_decay_factor": cfg.lr_decay_factor,
                "train_bn": cfg.train_bn,
                "score_init": cfg.score_init,
                "seed": cfg.seed,
                "processes": self.d.world,
            },
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def _export(self) -> tuple[TaskFile | None, dict[str, Tensor] | None]:
        cfg = self.cfg
        head = self.net.head
        if cfg.method == "finetune":
            state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
            return None, state
        masks: dict[str, Tensor] = {}
        for module in self.net.backbone.modules():
            if not isinstance(module, MaskedLayer):
                continue
            for mp in module.masked_params():
                if mp.scores is None:  # classifier: the backbone as it is
                    masks[mp.key] = torch.ones(mp.weight.shape, dtype=torch.bool)
                elif cfg.mask_kind == "binary":
                    masks[mp.key] = (mp.scores.detach() > cfg.threshold).cpu()
                else:
                    s = mp.scores.detach()
                    masks[mp.key] = ((s > cfg.threshold).to(torch.int8) - (s < 0).to(torch.int8)).cpu()
        assert set(masks) == {m.key for m in iter_masked_params(self.net.backbone)}
        norms = (
            {
                m.mask_key: NormParams(m.weight, m.bias, m.running_mean, m.running_var)  # type: ignore[arg-type]
                for m in self.bn_modules
            }
            if cfg.train_bn
            else None
        )
        task = TaskFile.create(
            name=cfg.task,
            labels=self.labels,
            backbone=self.backbone,
            masks=masks,
            head_weight=head.weight,
            head_bias=head.bias,
            mask_kind=cfg.mask_kind if cfg.method == "piggyback" else "binary",
            threshold=cfg.threshold,
            norms=norms,
            provenance=self._provenance(),
            preprocessing=self.pre,
        )
        return task, None

    def _write_best(self) -> None:
        """Called right after an improvement: the network holds the best state."""
        if not (self.workdir and self.d.main):
            return
        task, state = self._export()
        if task is not None:
            (self.workdir / "best.safetensors").write_bytes(task.to_bytes())
        elif state is not None:
            from safetensors.torch import save_file

            meta = {"labels": json.dumps(self.labels), "backbone": self.backbone.arch, "method": "finetune"}
            save_file(state, str(self.workdir / "best-finetune.safetensors"), metadata=meta)

    def _write_log(self) -> None:
        if not (self.workdir and self.d.main):
            return
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items()}
        record = {
            "config": cfg,
            "backbone": {
                "arch": self.backbone.arch,
                "weights": self.backbone.weights,
                "fingerprint": self.backbone.fingerprint,
            },
            "labels": self.labels,
            "processes": self.d.world,
            "best_epoch": self.best["epoch"],
            "best_val_top1": self.best["top1"] if self.best["top1"] >= 0 else None,
            "epochs": [asdict(h) for h in self.history],
        }
        (self.workdir / "log.json").write_text(json.dumps(record, indent=2))
