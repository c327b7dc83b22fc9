"""The Dataset type every split uses, and the train / eval transforms (torchvision.transforms.v2)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from kdedge.train.data.config import DataError
from kdedge.train.data.sources import ImageSource
from kdedge.train.labels import IGNORE_INDEX

# Pad-crop padding by image side: the usual 4 px for 32 px CIFAR, 2 for 28 px MNIST, 1 for 8 px digits.
_PADDING = {8: 1, 28: 2, 32: 4}


def crop_padding(size: int) -> int:
    """Padding of the pad-and-random-crop augmentation for a square image of side ``size``."""
    return _PADDING.get(size, max(1, round(size / 8)))


class Rescale(nn.Module):
    """uint8 -> float32 times ``scale`` (1/255, or 1/16 for digits); the first step of ``preprocess``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(np.float32(scale))  # the float32 value numpy's preprocess multiplies by

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def build_transforms(
    kind: str,
    size: int,
    *,
    scale: float,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    natural: bool,
    augment: bool,
    resize: int | None,
) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    """(train, eval) transforms for a source kind (``"tensor"``: uint8 CHW already ``size``;
    ``"file"``: a PIL image of any size).

    The eval transform computes exactly what ``preprocess`` computes from the raw image.
    """
    tail = [Rescale(scale), v2.Normalize(list(mean), list(std))]
    if kind == "tensor":
        eval_tf = v2.Compose(tail)
        geometric: list[nn.Module] = [v2.RandomCrop(size, padding=crop_padding(size))]
        if natural:
            geometric.append(v2.RandomHorizontalFlip())
        train_tf = v2.Compose(geometric + tail) if augment else eval_tf
    elif kind == "file":
        if resize is None:
            raise DataError("image files need a resize size for the eval transform")
        eval_tf = v2.Compose([v2.Resize(resize), v2.CenterCrop(size), v2.PILToTensor(), *tail])
        train_tf = (
            v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), v2.PILToTensor(), *tail])
            if augment
            else eval_tf
        )
    else:
        raise DataError(f"unknown image source kind {kind!r}")
    return train_tf, eval_tf


class ImageDataset(Dataset):
    """Images ``indices`` of a source with labels ``targets``; yields ``(x float32 [C,H,W], y int64 scalar)``.

    Args:
        source: where the images are (in memory or on disk).
        indices: int64 indices into ``source``.
        targets: int64 labels, one per index (``IGNORE_INDEX`` = unlabelled).
        transform: raw image -> normalised float32 tensor.
    """

    def __init__(
        self, source: ImageSource, indices: np.ndarray, targets: np.ndarray, transform: Callable[[Any], torch.Tensor]
    ) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        if self.indices.shape != self.targets.shape or self.indices.ndim != 1:
            raise DataError(f"ImageDataset: {self.indices.shape} indices and {self.targets.shape} targets differ")
        self.transform = transform

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.transform(self.source.load(int(self.indices[i])))
        return x, torch.tensor(int(self.targets[i]), dtype=torch.int64)

    def raw(self, i: int) -> np.ndarray:
        """Sample ``i`` as the uint8 HWC array ``preprocess`` takes (e.g. for INT8 calibration)."""
        return self.source.raw(int(self.indices[i]))

    def with_transform(self, transform: Callable[[Any], torch.Tensor]) -> ImageDataset:
        """The same samples under another transform (e.g. the eval transform on the train split)."""
        return ImageDataset(self.source, self.indices, self.targets, transform)

    def hide_labels(self) -> ImageDataset:
        """The same samples with every label set to ``IGNORE_INDEX`` (-100)."""
        return ImageDataset(self.source, self.indices, np.full_like(self.targets, IGNORE_INDEX), self.transform)

    def __add__(self, other: Any) -> ImageDataset:  # type: ignore[override]
        """Concatenation of two datasets over the same source, keeping this one's transform."""
        if not isinstance(other, ImageDataset) or other.source is not self.source:
            raise DataError("only ImageDatasets over the same source can be concatenated")
        return ImageDataset(
            self.source,
            np.concatenate([self.indices, other.indices]),
            np.concatenate([self.targets, other.targets]),
            self.transform,
        )

    def class_counts(self, num_classes: int) -> np.ndarray:
        """Number of labelled samples per class."""
        labelled = self.targets[self.targets != IGNORE_INDEX]
        return np.bincount(labelled, minlength=num_classes)
