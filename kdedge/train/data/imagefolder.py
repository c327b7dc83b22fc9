"""An ImageNet-style tree: ``root/train/<class>/*.png|jpg`` and ``root/val/<class>/*``.

``val/`` serves as the test split (as ImageNet's labelled val set is used in papers); kdedge's
own validation split is carved from ``train/``. Class indices follow the sorted folder names of
``train/``. Images are read from disk on demand, as RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdedge.train.data.config import DataConfig, DataError
from kdedge.train.data.sources import FileSource, RawData

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _list_split(folder: Path, classes: list[str] | None) -> tuple[list[str], list[Path], np.ndarray]:
    if not folder.is_dir():
        raise DataError(f"imagefolder: expected a folder {folder} with one subfolder of images per class "
                        "(root/train/<class>/*.png|jpg and root/val/<class>/*); kdedge never downloads")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"imagefolder: {folder} has no class subfolders; expected {folder}/<class>/*.png|jpg")
    if classes is None:
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise DataError(f"imagefolder: {folder} has classes {extra} that train/ lacks; "
                            "val/ must use the class folder names of train/")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        if name not in found:
            continue  # a class without val images is allowed; its test accuracy is simply not measured
        files = sorted(p for p in (folder / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"imagefolder: class folder {folder / name} holds no images "
                            f"({', '.join(IMAGE_SUFFIXES)}); remove it or add images")
        paths += files
        labels += [label] * len(files)
    return classes, paths, np.asarray(labels, dtype=np.int64)


def read_imagefolder(cfg: DataConfig, seed: int) -> RawData:
    """List ``root/train`` and ``root/val``; ImageNet's normalisation constants."""
    del seed
    assert cfg.root is not None  # DataConfig.validate guarantees it
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder: data.root {root} is not a directory; expected root/train/<class>/*.png|jpg "
                        "and root/val/<class>/*; kdedge never downloads")
    classes, train_paths, train_labels = _list_split(root / "train", None)
    _, test_paths, test_labels = _list_split(root / "val", classes)
    return RawData(
        train=FileSource(train_paths),
        train_labels=train_labels,
        test=FileSource(test_paths),
        test_labels=test_labels,
        class_names=tuple(classes),
        channel_order="RGB",
        scale=1.0 / 255.0,
        natural=True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
