"""Datasets for training and evaluation: torchvision's ImageFolder layout, decoded by the same
:func:`~piggyback_core.images.open_image` that the server uses.

Training augmentation is seeded per sample (from the run's seed, the epoch and the sample's index),
so a crop does not depend on which process or DataLoader worker draws it. Together with
:class:`ShardedBatchSampler`, which cuts every global batch into one contiguous shard per rank,
a run on N processes sees exactly the batches of a single-process run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .errors import DatasetError, ImageError
from .images import Preprocessing, open_image

__all__ = ["ImageFolderDataset", "ShardedBatchSampler", "train_transform"]


def train_transform(pre: Preprocessing, *, crop_scale_min: float = 0.08) -> Callable[[Image.Image], Tensor]:
    """The paper's training augmentation: resize, random resized crop (area ``crop_scale_min`` to 1
    of the image, torchvision's default 0.08), horizontal flip, normalise. With
    ``pre.resize_mode == "squash"`` (the authors' CUBS/Cars loaders): resize to crop x crop
    ignoring the aspect ratio and flip, no random crop."""
    interpolation = T.InterpolationMode(pre.interpolation)
    if pre.resize_mode == "squash":
        return T.Compose(
            [
                T.Resize((pre.crop_size, pre.crop_size), interpolation=interpolation, antialias=True),
                T.RandomHorizontalFlip(),
                T.PILToTensor(),
                T.ConvertImageDtype(torch.float32),
                T.Normalize(pre.mean, pre.std),
            ]
        )
    return T.Compose(
        [
            T.Resize(pre.resize_size, interpolation=interpolation, antialias=True),
            T.RandomResizedCrop(
                pre.crop_size, scale=(crop_scale_min, 1.0), interpolation=interpolation, antialias=True
            ),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
            T.ConvertImageDtype(torch.float32),
            T.Normalize(pre.mean, pre.std),
        ]
    )


class ImageFolderDataset(Dataset[tuple[Tensor, int]]):
    """``root/<class>/<image>``; labels are the sorted class-folder names (or ``classes``, when the
    caller fixes the label space, e.g. a val/ folder that must use train/'s labels)."""

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Tensor],
        *,
        classes: list[str] | tuple[str, ...] | None = None,
        seed: int | None = None,
        draft_min_side: int | None = None,
    ) -> None:
        self.root = Path(root)
        # JPEGs are decoded at a reduced scale keeping at least this shorter side (images.decode_image);
        # a Preprocessing transform needs its resize size, the same as the server decodes to.
        if draft_min_side is None and isinstance(transform, Preprocessing):
            draft_min_side = transform.decode_min_side
        self.draft_min_side = draft_min_side
        if not self.root.is_dir():
            raise DatasetError(f"{str(self.root)!r} is not a directory of class folders")
        found, _ = find_classes(str(self.root))
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise DatasetError(f"{str(self.root)!r} has class folders that are not labels: {', '.join(unknown[:5])}")
        index = {c: i for i, c in enumerate(self.classes)}
        try:
            self.samples = make_dataset(
                str(self.root), {c: index[c] for c in found}, extensions=IMG_EXTENSIONS, allow_empty=True
            )
        except (FileNotFoundError, OSError) as exc:
            raise DatasetError(f"cannot read {str(self.root)!r}: {exc}") from exc
        if not self.samples:
            raise DatasetError(f"{str(self.root)!r} holds no images")
        self.transform = transform
        self.seed = seed  # None: the transform draws from the global RNG as usual
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            return open_image(path, draft_min_side=self.draft_min_side)
        except (ImageError, OSError) as exc:
            raise DatasetError(f"cannot read training image {path!r}: {exc}") from exc

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, target = self.load(index), self.samples[index][1]
        if self.seed is None:
            return self.transform(image), target
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.transform(image), target


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of ``batch_size`` (shuffled per epoch from ``seed``), each cut into ``world``
    contiguous shards; this sampler yields shard ``rank`` of each. A final global batch smaller
    than ``world`` is dropped when ``world > 1`` (so that no rank gets an empty shard)."""

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world: int = 1, shuffle: bool, seed: int = 0):
        if batch_size < world:
            raise ValueError(f"batch size {batch_size} is smaller than the number of processes {world}")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        batches = [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.world > 1 and len(batches[-1]) < self.world:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            k = len(batch)
            yield batch[self.rank * k // self.world : (self.rank + 1) * k // self.world]

    def __len__(self) -> int:
        return len(self.global_batches())
