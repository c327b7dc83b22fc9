"""Calibration data for INT8 engines built from an FP32 bundle (TensorRT 10's entropy calibrator).

A TensorRT engine is built per graph (every stage and every fused prefix), and each graph is
calibrated on its *own* inputs: stage 0 and the prefixes read the bundle input, a later stage
reads the carried tensors that earlier stages computed (docs/bundle.md). So the calibration
images are run through the bundle's ONNX chain with onnxruntime, exactly as the runner chains
the stages, and each graph gets fixed-size batches of the tensors it is fed.

:func:`calibration_set` takes the images (``[N, C, H, W]`` float32, preprocessed by the bundle's
rule), keeps a deterministic, evenly spaced subset of ``count`` images rounded down to whole
batches (no short last batch: TensorRT's calibration profile has one batch size), and returns a
:class:`CalibrationSet`. ``calib.for_graph(name)`` is a re-iterable :class:`GraphBatches` of
``{tensor name: array [batch, ...]}``; the chain runs lazily, batch by batch, when a graph's
batches are iterated, so no carried tensor of the whole set is held in memory.

Digests key the calibration caches: :attr:`CalibrationSet.digest` covers the images used and
the batch size; :attr:`GraphBatches.digest` adds the sha256 of every ONNX graph that computes
the graph's inputs (so a cache is never reused for other data or another chain).

Images come from a path (:func:`images_from_path`: an image, a directory of images or a
``.npy``, through :func:`kdedge.runtime.inputs.load_inputs`; numpy only) or from a dataset of
the training data layer (:func:`images_from_dataset`; needs torch, imported only there).

numpy and onnxruntime only (no torch, no GPU).

Example:
    >>> x = images_from_path("calib/", bundle)[0]
    >>> calib = calibration_set(bundle, x, count=256, batch_size=32)
    >>> for feeds in calib.for_graph("stage1"):   # {"stage0__f0": float32 [32, 8, 8, 8]}
    ...     ...
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from kdedge.bundle.chain import chain, producers
from kdedge.bundle.errors import BundleError
from kdedge.targets.base import TargetError

__all__ = ["DEFAULT_BATCH", "DEFAULT_COUNT", "DEFAULT_SPLIT", "CalibrationError", "CalibrationSet", "GraphBatches",
           "calibration_set", "images_from_path", "subset"]

# The same defaults as the ONNX INT8 export (kdedge export --precision int8 --calib-size 256):
# 256 training images, preprocessed by the evaluation rule (no augmentation).
DEFAULT_COUNT = 256
DEFAULT_SPLIT = "train"
DEFAULT_BATCH = 32
_DIGEST_VERSION = b"kdedge-calibration-1\0"


class CalibrationError(TargetError):
    """Calibration images that cannot calibrate this bundle (one line: what and the fix)."""


def subset(n: int, count: int, batch_size: int) -> np.ndarray:
    """Indices of the images to calibrate on: ``min(count, n)`` rounded down to whole batches,
    evenly spaced over ``0..n-1`` (deterministic; a source sorted by class is still covered).

    Raises:
        CalibrationError: bad count or batch size, or fewer images than one batch.
    """
    for what, v in (("count", count), ("batch size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise CalibrationError(f"calibration {what} must be a positive integer, got {v!r}")
    used = (min(int(count), int(n)) // int(batch_size)) * int(batch_size)
    if used == 0:
        raise CalibrationError(f"calibration needs at least one full batch of {batch_size} images, the source has "
                               f"{n}{f' (count {count})' if count < n else ''}; lower --calib-batch or add images")
    return spread_indices(n, used)


def spread_indices(n: int, k: int) -> np.ndarray:
    """``min(k, n)`` distinct indices evenly spaced over ``0..n-1`` (deterministic).

    ``floor(i * n / k)`` is strictly increasing for ``k <= n``, so the indices are distinct.
    """
    k = min(int(k), int(n))
    return (np.arange(k, dtype=np.int64) * int(n)) // max(k, 1)


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256(_DIGEST_VERSION)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def _producers(entry: Any, stages: Sequence[Any]) -> int:
    """How many stages (0..m-1) must run to compute ``entry``'s inputs (0: it reads only the input)."""
    try:
        return producers([i.binding for i in entry.inputs], [s.name for s in stages], where=entry.name)
    except BundleError as e:
        raise CalibrationError(str(e)) from None


@dataclass(eq=False)
class GraphBatches:
    """The calibration batches of one graph: a re-iterable of ``{tensor name: array}`` holding
    exactly the graph's inputs, each ``[batch_size, ...]``, computed through the ONNX chain.

    Attributes:
        name: the graph (``stageK`` / ``prefixK``).
        inputs: its input tensor names, in the graph's order.
        shapes: per input, the shape without the batch dimension.
        dtypes: per input, the numpy dtype name.
        batch_size: images per batch (every batch; no short last batch).
        digest: sha256 of the calibration images, batch size and the ONNX graphs that compute
            the inputs (the calibration cache key, with the graph's own ONNX and TensorRT version).
    """

    name: str
    inputs: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    batch_size: int
    digest: str
    _owner: CalibrationSet = field(repr=False)
    _chain: int = 0  # stages 0.._chain-1 run before this graph

    def __len__(self) -> int:
        return self._owner.batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._owner._feeds(self)


@dataclass(eq=False)
class CalibrationSet:
    """Calibration images for one bundle, and the batches of each of its graphs.

    Build it with :func:`calibration_set`. ``spec.options["calibration"]`` of a TensorRT build
    carries it; the build makes one calibrator per graph from :meth:`for_graph`.

    Attributes:
        images: the images used, float32 [count, C, H, W] (count a multiple of batch_size).
        batch_size: images per batch.
        source: where the images came from (JSON-able: ``kind`` ``path`` or ``dataset``, …).
        digest: sha256 of the images (shape, dtype, bytes) and the batch size.
        bundle: the opened bundle whose ONNX chain computes the carried inputs.
        threads: onnxruntime intra-op threads of the chain (None: its default).
    """

    images: np.ndarray
    batch_size: int
    source: dict[str, Any]
    digest: str
    bundle: Any = field(repr=False)
    threads: int | None = None
    _graphs: dict[str, GraphBatches] = field(default_factory=dict, repr=False)
    _sessions: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def count(self) -> int:
        """Images used (a multiple of the batch size)."""
        return int(self.images.shape[0])

    @property
    def batches(self) -> int:
        """Batches per graph."""
        return self.count // self.batch_size

    @property
    def graph_names(self) -> tuple[str, ...]:
        return tuple(self._graphs)

    def for_graph(self, name: str) -> GraphBatches:
        """The batches of graph ``name`` (a stage or a fused prefix).

        Raises:
            CalibrationError: the bundle has no such graph.
        """
        try:
            return self._graphs[name]
        except KeyError:
            raise CalibrationError(f"the calibration set has no graph {name!r} (it was made for bundle "
                                   f"{self.bundle.path}, graphs {', '.join(self._graphs)})") from None

    def record(self) -> dict[str, Any]:
        """What calibrated a build, for the manifest and the build report (JSON-able)."""
        return {**self.source, "count": self.count, "batch_size": self.batch_size, "digest": self.digest}

    def check_bundle(self, bundle: Any) -> None:
        """Refuse a set made from another bundle (other graphs or other ONNX files)."""
        mine = {e.name: e.files["onnx"].sha256 for e in (*self.bundle.stages, *self.bundle.prefixes)}
        theirs = {e.name: e.files["onnx"].sha256 for e in (*bundle.stages, *bundle.prefixes)}
        if mine != theirs:
            raise CalibrationError(f"the calibration set was computed with the ONNX files of {self.bundle.path}, which "
                                   f"differ from those of {bundle.path}; make it from the bundle being built")

    # -- the chain ------------------------------------------------------------------------------
    def _session(self, entry: Any) -> Any:
        s = self._sessions.get(entry.name)
        if s is None:
            from kdedge.targets import get_target

            s = get_target("onnx").open_entry(self.bundle, entry, {"threads": self.threads})
            self._sessions[entry.name] = s
        return s

    def _feeds(self, g: GraphBatches) -> Iterator[dict[str, np.ndarray]]:
        stages = self.bundle.stages[: g._chain]
        b = self.batch_size
        wanted = [[t.tensor for t in e.inputs] for e in stages]
        for i in range(self.batches):
            x = self.images[i * b: (i + 1) * b]
            values: dict[str, Any] = {"input": x}
            for out in chain(wanted, lambda k, feeds: self._session(stages[k]).run(feeds), x):
                values.update(out)
            yield {t: np.ascontiguousarray(values[t], dtype=dt) for t, dt in zip(g.inputs, g.dtypes)}

    def close(self) -> None:
        """Close the onnxruntime sessions (iterating again reopens them)."""
        for s in self._sessions.values():
            s.close()
        self._sessions.clear()


def calibration_set(bundle: Any, images: np.ndarray, *, count: int = DEFAULT_COUNT, batch_size: int = DEFAULT_BATCH,
                    source: Mapping[str, Any] | None = None, threads: int | None = None) -> CalibrationSet:
    """The calibration batches of every graph of ``bundle``, from preprocessed images.

    Args:
        bundle: an opened bundle (:func:`kdedge.bundle.manifest.open_bundle`) with ONNX files.
        images: float32 [N, C, H, W], preprocessed by the bundle's rule.
        count: calibrate on at most this many images, an evenly spaced subset of ``images``,
            rounded down to whole batches (:func:`subset`).
        batch_size: images per calibration batch (TensorRT's calibration profile is this batch).
        source: where the images came from, recorded in the manifest (default ``{"kind": "array"}``).
        threads: onnxruntime intra-op threads for the chain.

    Returns:
        a :class:`CalibrationSet`.

    Raises:
        CalibrationError: images of the wrong dtype/shape or with NaN/inf, fewer than one batch,
            or a graph input the chain does not produce.
    """
    from kdedge.bundle.input_files import InputError, check_batch

    c, h, w = (int(d) for d in bundle.input_shape[1:])
    try:
        x = check_batch(images, (c, h, w), where="the calibration images")
    except InputError as e:
        raise CalibrationError(str(e)) from None
    x = np.ascontiguousarray(x[subset(len(x), count, batch_size)])
    digest = _sha(json.dumps({"shape": list(x.shape), "dtype": str(x.dtype), "batch_size": int(batch_size)}),
                  x.tobytes())
    cs = CalibrationSet(images=x, batch_size=int(batch_size), source=dict(source or {"kind": "array"}), digest=digest,
                        bundle=bundle, threads=threads)
    stages = tuple(bundle.stages)
    for e in (*stages, *bundle.prefixes):
        m = _producers(e, stages)
        produced = {"input"} | {o.tensor for s in stages[:m] for o in s.outputs}
        missing = [i.tensor for i in e.inputs if i.tensor not in produced]
        if missing:
            raise CalibrationError(f"{e.name} reads {', '.join(missing)}, which no earlier stage produces; the bundle's "
                                   "wiring is inconsistent, re-export it")
        chain_sha = [s.files["onnx"].sha256 for s in stages[:m]]
        cs._graphs[e.name] = GraphBatches(
            name=e.name, inputs=tuple(i.tensor for i in e.inputs),
            shapes=tuple(tuple(int(d) for d in i.shape[1:]) for i in e.inputs),
            dtypes=tuple(i.dtype for i in e.inputs), batch_size=int(batch_size),
            digest=_sha(digest, e.name, *[i.tensor for i in e.inputs], *chain_sha), _owner=cs, _chain=m)
    return cs


def images_from_path(path: str | Path, bundle: Any, *, count: int | None = None,
                     batch_size: int = DEFAULT_BATCH) -> tuple[np.ndarray, dict[str, Any]]:
    """Calibration images from an image file, a directory of images or a ``.npy`` file
    (:func:`kdedge.runtime.inputs.load_inputs`: raw images are preprocessed by the bundle's rule).

    Args:
        path: the image, directory or ``.npy``.
        bundle: the opened bundle.
        count: with a directory, read only the :func:`subset` of ``count`` images (in whole
            batches of ``batch_size``) out of its image files sorted by name; None: every file.
        batch_size: see ``count``.

    Returns:
        (float32 [N, C, H, W], the source record ``{"kind": "path", "path", "available"}``).

    Raises:
        CalibrationError: a missing path or unreadable / ill-shaped images (the reason in one line).
    """
    from kdedge.bundle.input_files import IMAGE_SUFFIXES, InputError, list_images, load_inputs

    path = Path(path)
    try:
        if count is not None and path.is_dir():
            # the files load_inputs would read, in its order; only the chosen ones are decoded
            files = list_images(path)
            if not files:
                raise InputError(f"directory {path} holds no image files ({', '.join(IMAGE_SUFFIXES[:5])}, …)")
            x = np.concatenate([load_inputs(files[int(i)], bundle).x for i in subset(len(files), count, batch_size)])
            available = len(files)
        else:
            inputs = load_inputs(path, bundle)
            x, available = inputs.x, len(inputs)
    except InputError as e:
        raise CalibrationError(f"calibration images: {e}") from None
    return x, {"kind": "path", "path": str(path.absolute()), "available": available}


