"""Evaluation over an ImageFolder: top-1, top-5, a per-class table and per-file predictions.

The same decoding (:func:`~piggyback_core.images.open_image`) and preprocessing
(:class:`~piggyback_core.images.Preprocessing`) as the server, so ``piggyback eval`` and
``POST /classify`` give the same predictions for the same file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .data import ImageFolderDataset
from .engine import Engine, LoadedTask
from .images import Preprocessing

__all__ = ["ClassReport", "EvalReport", "Prediction", "evaluate", "evaluate_task", "predictions_from_logits"]


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float


def predictions_from_logits(logits: Tensor, labels: Sequence[str], top_k: int) -> list[Prediction]:
    """The ``top_k`` labels of one row of logits, with softmax scores, best first."""
    probs = torch.softmax(logits.float(), dim=-1)
    values, indices = probs.topk(min(top_k, probs.shape[-1]))
    return [Prediction(labels[i], int(i), float(v)) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]


@dataclass
class ClassReport:
    n: int = 0
    correct: int = 0

    @property
    def top1(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass
class EvalReport:
    top1: float
    top5: float
    n: int
    per_class: dict[str, ClassReport]
    predictions: list[dict[str, Any]] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "n": self.n,
            "per_class": {k: {"n": v.n, "top1": v.top1} for k, v in self.per_class.items()},
            "predictions": self.predictions,
        }


def evaluate(
    predict: Callable[[Tensor], Tensor],
    root: str | Path,
    *,
    labels: Sequence[str],
    preprocessing: Preprocessing,
    batch_size: int = 32,
    workers: int = 0,
) -> EvalReport:
    """Run ``predict`` (images -> logits) over ``root/<class>/<image>``; class folders must be labels."""
    dataset = ImageFolderDataset(root, preprocessing, classes=list(labels))
    loader: DataLoader[Any] = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    k = min(5, len(labels))
    per_class = {c: ClassReport() for c in labels}
    top1 = top5 = 0
    predictions: list[dict[str, Any]] = []
    offset = 0
    for x, y in loader:
        logits = predict(x)
        for row, target in zip(logits, y.tolist(), strict=True):
            preds = predictions_from_logits(row, labels, k)
            label = labels[target]
            per_class[label].n += 1
            hit1 = preds[0].index == target
            per_class[label].correct += hit1
            top1 += hit1
            top5 += any(p.index == target for p in preds)
            path = dataset.samples[offset][0]
            predictions.append(
                {
                    "path": str(Path(path).relative_to(dataset.root)),
                    "label": label,
                    "top": [vars(p) for p in preds],
                }
            )
            offset += 1
    n = len(dataset)
    return EvalReport(top1 / n, top5 / n, n, per_class, predictions)


def evaluate_task(
    engine: Engine, task: str | LoadedTask, root: str | Path, *, batch_size: int = 32, workers: int = 0
) -> EvalReport:
    """Evaluate a task served by ``engine``, preprocessing as the task was trained (or the backbone's)."""
    loaded = engine.get_task(task) if isinstance(task, str) else task
    return evaluate(
        lambda x: engine.run(loaded, x),
        root,
        labels=loaded.labels,
        preprocessing=loaded.preprocessing,
        batch_size=batch_size,
        workers=workers,
    )
