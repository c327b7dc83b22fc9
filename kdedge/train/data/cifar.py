"""CIFAR-10 / CIFAR-100 from a directory the user has, in the official "python version" layout
(the one torchvision's ``CIFAR10(download=True)`` leaves). kdedge never downloads.

The batch files are Python pickles. They are read with an unpickler that only builds plain
containers and numpy uint8 arrays; any other object in a file is refused, so a tampered file
cannot run code (torchvision's own reader calls ``pickle.load`` unrestricted).
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdedge.train.data.config import DataConfig, DataError
from kdedge.train.data.sources import RawData, TensorSource

# Standard per-channel constants of the training sets (pixel values scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_LAYOUTS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": "labels",
        "names": "label_names",
        "classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": "fine_labels",
        "names": "fine_label_names",
        "classes": 100,
    },
}

# (module, name) an official or re-saved CIFAR file may reference; numpy 1.x pickles name
# numpy.core, numpy 2.x pickles name numpy._core.
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core"):
            try:  # numpy 2 moved numpy.core to numpy._core
                return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def load_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR batch or meta file as a dict with str keys (only containers and numpy arrays allowed)."""
    try:
        with open(path, "rb") as f:
            # latin1 reads the Python 2 pickles of the official archive (as torchvision does)
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path} is not a CIFAR batch file ({e}); only dicts of lists and numpy arrays are read") \
            from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as e:
        raise DataError(f"{path} cannot be read as a CIFAR batch file: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR batch file: it holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def find_cifar_dir(name: str, root: str | Path) -> Path:
    """The folder holding the batch files: ``root`` itself or ``root/<official folder name>``.

    Raises:
        DataError: naming the files expected and where, when they are missing.
    """
    layout = _LAYOUTS[name]
    root = Path(root).expanduser()
    files = [*layout["train"], *layout["test"], layout["meta"]]
    for candidate in (root, root / layout["folder"]):
        if all((candidate / f).is_file() for f in files):
            return candidate
    hint = (f"kdedge never downloads: extract {layout['archive']} (https://www.cs.toronto.edu/~kriz/cifar.html) "
            f"into {root}")
    expected = f"{', '.join(files)} in {root} or {root / layout['folder']}"
    if not root.is_dir():
        raise DataError(f"{name}: data.root {root} is not a directory; expected {expected}; {hint}")
    # report against the folder that looks most like the dataset
    best = root / layout["folder"] if (root / layout["folder"]).is_dir() else root
    missing = [f for f in files if not (best / f).is_file()]
    raise DataError(f"{name}: {best} lacks {', '.join(missing)}; expected {expected}; {hint}")


def _read_batches(folder: Path, files: list[str], label_key: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for fname in files:
        entry = load_pickle(folder / fname)
        if "data" not in entry or label_key not in entry:
            raise DataError(f"{folder / fname} lacks 'data' or {label_key!r}; is this the right CIFAR variant?")
        data = np.asarray(entry["data"])
        lab = np.asarray(entry[label_key], dtype=np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(lab) != len(data):
            raise DataError(f"{folder / fname}: expected uint8 data of shape (N, 3072) and N labels, "
                            f"got {data.dtype} {data.shape} and {len(lab)} labels")
        if lab.size and (lab.min() < 0 or lab.max() >= classes):
            raise DataError(f"{folder / fname}: labels must lie in 0..{classes - 1}, got {lab.min()}..{lab.max()}")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane, each row-major
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def _read(name: str, cfg: DataConfig) -> RawData:
    layout = _LAYOUTS[name]
    assert cfg.root is not None  # DataConfig.validate guarantees it
    folder = find_cifar_dir(name, cfg.root)
    train_x, train_y = _read_batches(folder, layout["train"], layout["labels"], layout["classes"])
    test_x, test_y = _read_batches(folder, layout["test"], layout["labels"], layout["classes"])
    names = load_pickle(folder / layout["meta"]).get(layout["names"])
    if not isinstance(names, list) or len(names) != layout["classes"]:
        raise DataError(f"{folder / layout['meta']}: expected {layout['classes']} names under {layout['names']!r}")
    cifar10 = name == "cifar10"
    return RawData(
        train=TensorSource(torch.from_numpy(np.ascontiguousarray(train_x))),
        train_labels=train_y,
        test=TensorSource(torch.from_numpy(np.ascontiguousarray(test_x))),
        test_labels=test_y,
        class_names=tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names),
        channel_order="RGB",
        scale=1.0 / 255.0,
        natural=True,
        mean=CIFAR10_MEAN if cifar10 else CIFAR100_MEAN,
        std=CIFAR10_STD if cifar10 else CIFAR100_STD,
    )


def read_cifar10(cfg: DataConfig, seed: int) -> RawData:
    """CIFAR-10 (50,000 train + 10,000 test, 32x32 RGB) from ``cfg.root``."""
    del seed
    return _read("cifar10", cfg)


def read_cifar100(cfg: DataConfig, seed: int) -> RawData:
    """CIFAR-100 with its 100 fine labels from ``cfg.root``."""
    del seed
    return _read("cifar100", cfg)
