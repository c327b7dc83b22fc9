"""The ``data:`` section of a recipe (:class:`DataConfig`) and what a model carries about its
input (:class:`DatasetInfo`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from kdedge.bundle.inputs import MAX_IMAGE_SIZE, InputError, InputSpec
from kdedge.registry import unknown
from kdedge.train.fields import check_ranges, number


class DataError(InputError):
    """Bad data configuration or a dataset on disk that cannot be read; the message names the fix."""


# name -> "module:reader". A reader turns (cfg, seed) into a RawData (sources.py); its module is
# imported only when that dataset is asked for, so validating a config imports nothing heavy.
DATASETS: dict[str, str] = {
    "mnist5k": "kdedge.train.data.sources:read_mnist5k",
    "digits": "kdedge.train.data.sources:read_digits",
    "synthetic": "kdedge.train.data.sources:read_synthetic",
    "cifar10": "kdedge.train.data.cifar:read_cifar10",
    "cifar100": "kdedge.train.data.cifar:read_cifar100",
    "imagefolder": "kdedge.train.data.imagefolder:read_imagefolder",
}
NEEDS_ROOT = ("cifar10", "cifar100", "imagefolder")


# Upper bounds that keep a typo from becoming a fork bomb or a memory blow-up; each is far beyond
# what a real run uses.
MAX_WORKERS = 256
MAX_BATCH = 1 << 20  # beyond sys.maxsize a DataLoader fails with an islice error that names no key
MAX_SYNTHETIC_BYTES = 1 << 30  # the synthetic dataset is for tests and demos
_FRACTION = "a fraction in [0, 1)"


@dataclass
class DataConfig:
    """The ``data:`` section of a recipe. Every field has a default; ``validate()`` runs on creation.

    Args:
        name: ``mnist5k`` | ``digits`` | ``cifar10`` | ``cifar100`` | ``imagefolder`` | ``synthetic``.
        root: directory for cifar10 / cifar100 / imagefolder; kdedge never downloads.
        val_fraction: share of the training pool (everything but the test split) held out for
            validation, stratified by class.
        test_fraction: share held out for testing where a dataset has no official test split
            (mnist5k, digits, synthetic), stratified. This split is the same for every seed.
        per_class: low-data setting: keep this many labelled training images per class; the rest
            of the training pool becomes the unlabelled pool.
        unlabelled: train on the labelled images plus the unlabelled pool (label -100).
        labelled_per_batch: with ``unlabelled``: every training batch holds exactly this many
            labelled images plus ``batch_size - labelled_per_batch`` unlabelled ones, and an
            epoch is one pass over the unlabelled pool (the labelled images are cycled, reshuffled
            each pass). None = labelled and unlabelled images shuffled together, so the number of
            labelled images in a batch varies.
        batch_size: training batch size (per process under DDP).
        eval_batch_size: batch size for validation and test.
        augment: train-time augmentation (pad-crop, plus a horizontal flip for natural images;
            RandomResizedCrop + flip for imagefolder).
        num_workers: DataLoader worker processes.
        image_size: imagefolder: the square input size (required). Other datasets: resize their
            images to this size once at load time (omit to keep the native size).
        synthetic_classes, synthetic_size, synthetic_channels, synthetic_samples: shape of the
            ``synthetic`` dataset (class-dependent patterns plus noise, generated from the seed).

    Example:
        >>> DataConfig(name="digits", per_class=20, unlabelled=True)
    """

    name: str = "mnist5k"
    root: str | None = None
    val_fraction: float = number(0.1, ge=0, lt=1, what=_FRACTION)
    test_fraction: float = number(0.2, ge=0, lt=1, what=_FRACTION)
    per_class: int | None = number(None, ge=1)
    unlabelled: bool = False
    labelled_per_batch: int | None = number(None, ge=1)
    batch_size: int = number(128, ge=1, le=MAX_BATCH)
    eval_batch_size: int = number(256, ge=1, le=MAX_BATCH)
    augment: bool = True
    num_workers: int = number(0, ge=0, le=MAX_WORKERS)
    image_size: int | None = number(None, ge=4, le=MAX_IMAGE_SIZE)
    synthetic_classes: int = number(4, ge=2, le=1000)
    synthetic_size: int = number(8, ge=4, le=1024)
    synthetic_channels: int = number(1, ge=1, le=3)
    synthetic_samples: int = number(256, ge=8)

    def __post_init__(self) -> None:
        self.validate(need_root=False)  # a recipe may leave root to --data-root

    def validate(self, need_root: bool = True) -> None:
        """Raise :class:`DataError` naming the first bad field and how to fix it.

        ``need_root=False`` accepts a directory dataset without ``root`` (a recipe that leaves
        it to ``--data-root``); ``load_data`` checks with ``need_root=True``."""
        if not isinstance(self.name, str) or self.name not in DATASETS:
            raise unknown(self.name, DATASETS, what="dataset", error=DataError)
        check_ranges(self, "data", DataError)
        if self.unlabelled and self.per_class is None:
            raise DataError("data.unlabelled needs data.per_class: the unlabelled pool is the training pool beyond "
                            "per_class labelled images per class")
        if self.labelled_per_batch is not None:
            if not self.unlabelled:
                raise DataError("data.labelled_per_batch needs data.unlabelled: true (it sets how many labelled images "
                                "each batch of labelled + unlabelled images holds)")
            if self.labelled_per_batch >= self.batch_size:
                raise DataError(f"data.labelled_per_batch={self.labelled_per_batch} must be smaller than "
                                f"data.batch_size={self.batch_size}: each batch needs room for unlabelled images")
        if self.root is not None and not isinstance(self.root, (str, os.PathLike)):
            raise DataError(f"data.root must be a directory path, got {self.root!r}")
        if need_root and self.name in NEEDS_ROOT and not self.root:
            raise DataError(f"dataset {self.name!r} needs its directory: --data-root DIR (or data.root; "
                            "kdedge never downloads)")
        if self.name == "imagefolder" and self.image_size is None:
            raise DataError("dataset 'imagefolder' needs data.image_size (the square input size, e.g. 224)")
        if self.name == "synthetic":
            self._validate_synthetic()

    def _validate_synthetic(self) -> None:
        if self.synthetic_channels not in (1, 3):
            raise DataError(f"data.synthetic_channels must be 1 or 3, got {self.synthetic_channels!r}")
        if self.synthetic_samples < 4 * self.synthetic_classes:
            raise DataError(f"data.synthetic_samples must be an integer >= {4 * self.synthetic_classes} "
                            f"(4 per class), got {self.synthetic_samples!r}")
        size = self.synthetic_samples * self.synthetic_channels * self.synthetic_size ** 2 * 4  # float32
        if size > MAX_SYNTHETIC_BYTES:
            raise DataError(f"data.synthetic_samples x synthetic_channels x synthetic_size^2 describe "
                            f"{size >> 20} MiB of images; the synthetic dataset is for tests, keep it under "
                            f"{MAX_SYNTHETIC_BYTES >> 20} MiB")


@dataclass(frozen=True)
class DatasetInfo(InputSpec):
    """The input rule of a training dataset: :class:`kdedge.bundle.inputs.InputSpec` (the one type
    for it, read back from a bundle as ``bundle.input_info``), raising :class:`DataError` for an
    invalid value. :func:`kdedge.train.data.preprocess` applies it with numpy."""

    error: ClassVar[type[Exception]] = DataError

