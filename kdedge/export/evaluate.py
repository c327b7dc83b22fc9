"""Accuracy of a bundle run through onnxruntime, stage by stage (``kdedge eval BUNDLE``).

The result has the shape of :func:`kdedge.train.evaluate.evaluate_model` for an anytime
model, so the two can be compared number for number: ``accuracy`` (all stages, the chosen
rule), ``combine``, ``stages`` (``stage``, ``members`` after it, ``accuracy_<rule>`` per rule)
and ``n``; plus the cumulative MACs per stage, the fused prefixes' accuracies and which
bundle, target and precisions were run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from kdedge.bundle.errors import BundleError
from kdedge.bundle.inputs import class_mismatch
from kdedge.bundle.manifest import Bundle
from kdedge.export.data import Batches
from kdedge.export.metrics import chain_accuracy
from kdedge.export.ortrun import OrtChain, RunGraph
from kdedge.targets import open_bundle
from kdedge.targets.calibration import DEFAULT_BATCH, DEFAULT_COUNT, DEFAULT_SPLIT, CalibrationError, subset


def _rules(bundle: Bundle, rule: str | None) -> list[str]:
    if rule is None:
        return list(bundle.combine_supported)
    if rule not in bundle.combine_supported:
        raise BundleError(f"bundle {bundle.path} does not support combine rule {rule!r}; it supports "
                          f"{', '.join(bundle.combine_supported)}")
    return [rule]


def _counting(batches: Batches, progress: Callable[[int], None] | None) -> Any:
    if progress is None:
        return batches

    class _Counted:
        def __iter__(self) -> Any:
            for x, y in batches:
                yield x, y
                progress(len(y))

    return _Counted()


def evaluate_bundle(path: str | Path, x: Any, y: Any = None, rule: str | None = None, *, target: str = "onnx",
                    batch_size: int = 256, threads: int | None = None, prefixes: bool = True,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per-stage accuracy of a bundle on labelled images, run with onnxruntime.

    Args:
        path: the bundle directory (manifest and checksums are verified).
        x: model-input images [N, C, H, W] (normalised, as the training data layer yields them),
            or a Dataset / DataLoader of ``(x, y)`` (then ``y`` is None).
        y: labels [N] (``-100`` = unlabelled, skipped).
        rule: one combine rule (None: every rule the bundle supports; ``accuracy`` uses the default).
        target: which stage files to run (``onnx``).
        batch_size: batch size for arrays and datasets.
        threads: onnxruntime intra-op threads (None: its default).
        prefixes: also evaluate the fused prefix graphs.
        progress: called with the number of images after each batch.

    Returns:
        ``{"accuracy", "combine", "stages": [{"stage", "members", "macs", "accuracy_<rule>"...}],
        "prefixes": [{"prefix", "members", "macs", "accuracy"}], "n", "bundle", "family", "target",
        "precision"}``.

    Example:
        >>> r = evaluate_bundle("model.kdedge", x_test, y_test)
        >>> [s["accuracy_mean_logits"] for s in r["stages"]]
    """
    if target != "onnx":
        raise BundleError(f"evaluate_bundle runs ONNX stage files only, not {target!r}; "
                          "use kdedge.runtime for other targets")
    bundle = open_bundle(path, targets=[target])
    rules = _rules(bundle, rule)
    batches = Batches(x if y is None else (x, y), batch_size)
    first = batches.first(1)
    want = tuple(bundle.input_shape[1:])
    if tuple(first.shape[1:]) != want:
        raise BundleError(f"images are {tuple(first.shape[1:])} (C, H, W), bundle {bundle.path} expects {want}")
    stages = OrtChain([RunGraph.from_entry(bundle, s, target) for s in bundle.stages], threads)
    pchain = None
    if prefixes and bundle.prefixes:
        pchain = OrtChain([RunGraph.from_entry(bundle, p, target) for p in bundle.prefixes], threads)
    acc, pacc, n = chain_accuracy(stages, _counting(batches, progress), rules, prefixes=pchain)
    macs = 0
    rows = []
    for k, s in enumerate(bundle.stages):
        macs += s.macs
        rows.append({"stage": k, "members": s.members_total, "macs": macs,
                     **{f"accuracy_{r}": acc[k][r] for r in rules}})
    main = rule or bundle.combine_default
    return {
        "accuracy": acc[-1][main],
        "combine": main,
        "stages": rows,
        "prefixes": [{"prefix": k, "members": p.members, "macs": p.macs, "accuracy": pacc[k]}
                     for k, p in enumerate(bundle.prefixes)] if pchain is not None else [],
        "n": n,
        "bundle": str(bundle.path),
        "family": bundle.family,
        "target": target,
        "precision": sorted({s.files[target].precision for s in (*bundle.stages, *bundle.prefixes)}),
    }


def bundle_splits(bundle: Bundle, data: str | None = None, data_root: str | None = None) -> tuple[Any, int]:
    """The dataset splits a bundle was trained and exported on, and their seed (needs torch).

    Rebuilt from the training config recorded in the bundle's provenance (same seed, same split
    as ``kdedge eval RUN_DIR``); ``data`` / ``data_root`` replace the dataset name / directory.
    A bundle exported without a run needs ``data`` (seed 0).

    Raises:
        BundleError: no config and no ``data``, or a dataset that does not fit the bundle.
    """
    import dataclasses

    from kdedge.train.data import DataConfig, load_data

    config = bundle.manifest["provenance"].get("config")
    if config:
        from kdedge.config import config_from_dict

        cfg = config_from_dict(config)
        dcfg, seed = cfg.data, int(cfg.seed)
    else:
        if data is None:
            raise BundleError(f"bundle {bundle.path} records no training config; name the dataset with --data")
        dcfg, seed = DataConfig(name=data, root=data_root), 0
    dcfg = dataclasses.replace(dcfg, **({"name": data} if data else {}), **({"root": data_root} if data_root else {}))
    splits = load_data(dcfg, seed)
    info = splits.info
    if info.num_classes != bundle.num_classes or [info.in_channels, *info.input_size] != list(bundle.input_shape[1:]):
        raise BundleError(f"dataset {info.name} ({info.num_classes} classes, {info.in_channels}x"
                          f"{tuple(info.input_size)}) does not fit bundle {bundle.path} ({bundle.num_classes} classes, "
                          f"input {list(bundle.input_shape[1:])}); use the dataset it was exported for "
                          f"({bundle.manifest['preprocessing'].get('dataset')})")
    why = class_mismatch(info.class_names, bundle.classes)
    if why is not None:
        raise BundleError(f"dataset {info.name} does not fit bundle {bundle.path}: {why}; its accuracy would be "
                          f"scored against the wrong labels")
    return splits, seed


def evaluate_bundle_on_data(path: str | Path, *, data: str | None = None, data_root: str | None = None,
                            split: str = "test", rule: str | None = None, batch_size: int = 256,
                            threads: int | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """:func:`evaluate_bundle` on a named dataset split (``kdedge eval BUNDLE --data NAME``).

    The split is rebuilt from the training config recorded in the bundle's provenance (same
    seed, same split as ``kdedge eval RUN_DIR``); ``data`` / ``data_root`` replace the dataset
    name / directory. A bundle exported without a run needs ``data``.

    Raises:
        BundleError: the bundle is unusable, or the dataset does not fit it.
    """
    if split not in ("test", "val"):
        raise BundleError(f"split must be test or val, got {split!r}")
    splits, _ = bundle_splits(open_bundle(path, targets=["onnx"]), data, data_root)
    info = splits.info
    result = evaluate_bundle(path, getattr(splits, split), rule=rule, batch_size=batch_size, threads=threads,
                             progress=progress)
    return {**result, "data": info.name, "split": split}


def images_from_dataset(bundle: Any, name: str, *, root: str | None = None, split: str = DEFAULT_SPLIT,
                        count: int = DEFAULT_COUNT, batch_size: int = DEFAULT_BATCH
                        ) -> tuple[np.ndarray, dict[str, Any]]:
    """Calibration images from a dataset of the training data layer (``kdedge.train.data``), read
    raw and preprocessed by the bundle's rule (the evaluation rule: no augmentation).

    The split is rebuilt as ``kdedge eval BUNDLE`` rebuilds it: from the training config in the
    bundle's provenance (its data seed and fractions; ``name`` / ``root`` replace the dataset's),
    else ``DataConfig(name=name, root=root)`` with seed 0. Only the :func:`subset` images are read.

    Args:
        bundle: the opened bundle.
        name: dataset name (``digits``, ``cifar10``, ``imagefolder``, …).
        root: the dataset directory (cifar, imagefolder).
        split: ``train`` (what the ONNX INT8 export calibrates on) or ``val``.
        count, batch_size: as :func:`calibration_set`.

    Returns:
        (float32 [count, C, H, W], the source record ``{"kind": "dataset", "name", "split", "seed", …}``).

    Raises:
        CalibrationError: torch is missing, a bad split, or a dataset that does not fit the bundle.
    """
    from kdedge.bundle.errors import BundleError
    from kdedge.bundle.inputs import InputError, preprocess

    if split not in ("train", "val"):
        raise CalibrationError(f"the calibration split must be 'train' or 'val', got {split!r} (calibrating on the "
                               "test split would leak it into the model)")
    try:
        splits, seed = bundle_splits(bundle, name, root)
    except ImportError as e:
        if getattr(e, "name", None) in ("torch", "torchvision"):
            raise CalibrationError(f"--calib-data reads datasets with kdedge's training data layer, which needs "
                                   f"{e.name} (pip install 'kdedge[train]'); without it, pass images with --calib PATH "
                                   "(a directory of images or a .npy)") from None
        raise
    except (BundleError, ValueError) as e:  # DataError, a dataset that does not fit: already one line
        raise CalibrationError(f"calibration data: {e}") from None
    info = splits.info
    ds = getattr(splits, split)
    if ds is None or len(ds) == 0:
        raise CalibrationError(f"the {split} split of {info.name} is empty; pick the other split with --calib-split")
    idx = subset(len(ds), count, batch_size)
    where = f"dataset {info.name} ({split})"
    try:  # one image at a time: raw images of a directory dataset may differ in size before the resize
        x = np.concatenate([preprocess(ds.raw(int(i)), bundle, where=where) for i in idx])
    except InputError as e:
        raise CalibrationError(str(e)) from None
    return x, {"kind": "dataset", "name": info.name, "split": split, "seed": seed, "root": root,
               "available": len(ds)}
