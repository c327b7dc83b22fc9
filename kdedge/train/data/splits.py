"""Deterministic, stratified splits of a named dataset: ``load_data(cfg, seed) -> Splits``.

Order of carving, per class (so every split is stratified):
1. test: the official test split, or ``test_fraction`` of the dataset. A carved test split uses a
   fixed seed (``TEST_SPLIT_SEED``), like an official one, so runs with different seeds are
   tested on the same images.
2. val: ``val_fraction`` of what is left (the training pool), from ``seed``.
3. with ``per_class``: exactly ``per_class`` labelled training images per class, from ``seed``;
   the rest of the training pool is the unlabelled pool.
A class's share is ``floor(fraction * count + 0.5)``. The four index sets are disjoint.

Normalisation constants are computed from the training pool (labelled + unlabelled images; no
labels are used) for mnist5k, digits and synthetic, and are standard constants for CIFAR and
imagefolder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from kdedge.bundle.inputs import resize_center_crop
from kdedge.registry import resolve
from kdedge.train.data.config import DATASETS, DataConfig, DataError, DatasetInfo
from kdedge.train.data.datasets import ImageDataset, build_transforms
from kdedge.train.data.sources import RawData, TensorSource

TEST_SPLIT_SEED = 0


@dataclass
class Splits:
    """The splits of a dataset and its :class:`DatasetInfo`.

    ``train`` and ``unlabelled`` use the train transform, ``val`` and ``test`` the eval transform.
    ``unlabelled`` (None without ``per_class``) keeps its true labels for analysis; use
    :meth:`train_set` to train on it with the labels hidden.
    """

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    unlabelled: ImageDataset | None
    info: DatasetInfo

    def train_set(self, cfg: DataConfig) -> Dataset:
        """What to train on: ``train``, plus the unlabelled pool with label -100 when ``cfg.unlabelled``."""
        if not cfg.unlabelled:
            return self.train
        if self.unlabelled is None:
            raise DataError("data.unlabelled needs data.per_class (no unlabelled pool was split off)")
        return self.train + self.unlabelled.hide_labels()


def stratified_take(
    labels: np.ndarray, indices: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (taken, rest), taking ``floor(fraction * n_c + 0.5)`` of each class c at random.

    Both outputs are sorted.
    """
    taken, rest = [], []
    sub = labels[indices]
    for c in np.unique(sub):
        members = rng.permutation(indices[sub == c])
        k = int(np.floor(fraction * len(members) + 0.5))
        taken.append(members[:k])
        rest.append(members[k:])
    if not taken:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.sort(np.concatenate(taken)), np.sort(np.concatenate(rest))


def take_per_class(
    labels: np.ndarray, indices: np.ndarray, per_class: int, rng: np.random.Generator, class_names: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (exactly ``per_class`` of every class, rest), at random; both sorted."""
    taken, rest = [], []
    sub = labels[indices]
    for c, name in enumerate(class_names):
        members = rng.permutation(indices[sub == c])
        if len(members) < per_class:
            raise DataError(f"data.per_class={per_class} but class {name!r} has only {len(members)} training images "
                            "after the val/test split; lower per_class (or val_fraction/test_fraction)")
        taken.append(members[:per_class])
        rest.append(members[per_class:])
    return np.sort(np.concatenate(taken)), np.sort(np.concatenate(rest))


def get_reader(name: str) -> Callable[[DataConfig, int], RawData]:
    """The reader function of a registered dataset name, its module imported now.

    Raises:
        DataError: ``name`` is not in ``DATASETS`` (the message suggests the closest names).
    """
    return resolve(DATASETS, name, what="dataset", error=DataError)


def _resize_source(source: TensorSource, size: int) -> TensorSource:
    """Every image resized (bilinear, Pillow) to size x size once, with preprocess's own function."""
    hwc = source.images.permute(0, 2, 3, 1).numpy()
    out = np.stack([resize_center_crop(img, size, (size, size)) for img in hwc])
    return TensorSource(torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2))))


def _stats(source: TensorSource, indices: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = source.images[torch.from_numpy(indices)].to(torch.float64) * scale
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def load_data(cfg: DataConfig, seed: int) -> Splits:
    """Read a named dataset and split it, deterministically from ``seed``.

    Args:
        cfg: the data configuration (validated again here).
        seed: non-negative integer; the same seed gives the same splits (and synthetic data).

    Returns:
        :class:`Splits` (train / val / test / unlabelled datasets and the :class:`DatasetInfo`).

    Raises:
        DataError: unknown name, missing or malformed directory, per_class larger than a class.

    Example:
        >>> splits = load_data(DataConfig(name="digits"), seed=0)
        >>> x, y = splits.train[0]          # float32 [1, 8, 8], int64 scalar
    """
    cfg.validate()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"the data seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    raw = get_reader(cfg.name)(cfg, seed)
    labels = raw.train_labels
    names = raw.class_names

    if raw.test is None:
        test_idx, pool = stratified_take(labels, np.arange(len(labels)), cfg.test_fraction,
                                         np.random.default_rng(TEST_SPLIT_SEED))
        test_source, test_labels = raw.train, labels
    else:
        assert raw.test_labels is not None
        pool, test_idx = np.arange(len(labels)), np.arange(len(raw.test_labels))
        test_source, test_labels = raw.test, raw.test_labels

    rng = np.random.default_rng(seed)
    val_idx, train_idx = stratified_take(labels, pool, cfg.val_fraction, rng)
    counts = np.bincount(labels[train_idx], minlength=len(names))
    empty = [names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"classes {empty} have no training images after the val/test split; "
                        "lower val_fraction/test_fraction or add images")
    pool_idx = train_idx  # every training image, labelled or not: the normalisation statistics use them all
    unl_idx: np.ndarray | None = None
    if cfg.per_class is not None:
        train_idx, unl_idx = take_per_class(labels, train_idx, cfg.per_class, rng, names)

    train_source = raw.train
    if train_source.kind == "file":
        assert cfg.image_size is not None
        size, resize = cfg.image_size, int(round(cfg.image_size / 0.875))  # 224 -> 256, the usual ratio
    else:
        assert isinstance(train_source, TensorSource) and isinstance(test_source, TensorSource)
        size, resize = int(train_source.images.shape[-1]), None
        if cfg.image_size is not None and cfg.image_size != size:
            size = resize = cfg.image_size
            same = test_source is train_source
            train_source = _resize_source(train_source, size)
            test_source = train_source if same else _resize_source(test_source, size)

    if raw.mean is not None and raw.std is not None:
        mean, std = raw.mean, raw.std
    else:
        assert isinstance(train_source, TensorSource)
        mean, std = _stats(train_source, pool_idx, raw.scale)
    info = DatasetInfo(
        name=cfg.name,
        num_classes=len(names),
        in_channels=len(raw.channel_order),
        input_size=(size, size),
        mean=mean,
        std=std,
        scale=raw.scale,
        channel_order=raw.channel_order,
        class_names=names,
        resize=resize,
    )
    train_tf, eval_tf = build_transforms(train_source.kind, size, scale=raw.scale, mean=mean, std=std,
                                         natural=raw.natural, augment=cfg.augment, resize=resize)
    return Splits(
        train=ImageDataset(train_source, train_idx, labels[train_idx], train_tf),
        val=ImageDataset(train_source, val_idx, labels[val_idx], eval_tf),
        test=ImageDataset(test_source, test_idx, test_labels[test_idx], eval_tf),
        unlabelled=None if unl_idx is None else ImageDataset(train_source, unl_idx, labels[unl_idx], train_tf),
        info=info,
    )
