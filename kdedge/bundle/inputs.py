"""The input rule of a bundle: :class:`InputSpec` (what a model needs to know about its input) and
the one :func:`preprocess` that applies it, for training, export, calibration and the device.

A raw image (uint8, in the dataset's native value range: 0..255, or 0..16 for ``digits``)
becomes the model input by ``x = (raw * scale - mean) / std`` per channel, after, when ``resize``
is set, a bilinear (antialiased) resize of the shorter side to ``resize`` and a center crop to
``input_size``: torchvision's ``Resize`` + ``CenterCrop`` on a PIL image. The eval transform of
every dataset in ``kdedge.train.data`` produces the same numbers (tests compare them).

numpy and the standard library only (Pillow when a resize is needed): a device runs it without
torch. Inputs are bounded before anything is decoded or allocated (:data:`MAX_IMAGE_PIXELS`,
:data:`MAX_INPUT_BYTES`); every failure is an :class:`InputError` naming what is wrong and what
is expected.

Example:
    >>> spec = open_bundle("model.kdedge").input_info
    >>> preprocess(np.zeros((28, 28), np.uint8), spec).shape
    (1, 1, 28, 28)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Sequence

import numpy as np

__all__ = ["InputError", "InputSpec", "MAX_IMAGE_PIXELS", "MAX_IMAGE_SIZE", "MAX_INPUT_BYTES", "as_spec", "check_raw",
           "preprocess", "raw_layout", "resize_center_crop", "resized_size"]

# Bounds on untrusted input, far above what a request needs; the messages name them.
MAX_IMAGE_PIXELS = 64 << 20   # pixels of one image (a 67-megapixel photo); Pillow's own bomb limit is 89M
MAX_INPUT_BYTES = 4 << 30     # a batch built in memory (float32 after preprocessing, or raw uint8 read)
MAX_IMAGE_SIZE = 4096         # the largest input side or resize a spec may declare


class InputError(ValueError):
    """An input the model cannot take; the message names the problem and what is expected."""


@dataclass(frozen=True)
class InputSpec:
    """What a model needs to know about its input; travels into the bundle manifest
    (``preprocessing``, ``classes``) and back (:attr:`kdedge.bundle.Bundle.input_info`).

    Args:
        name: dataset name.
        num_classes: number of classes.
        in_channels: 1 (grey) or 3 (RGB).
        input_size: (H, W) of the model input.
        mean, std: per channel, in the scaled range (``raw * scale``).
        scale: maps raw values to [0, 1] (1/255, or 1/16 for ``digits``).
        channel_order: ``"L"`` or ``"RGB"``.
        class_names: one name per class index.
        resize: shorter-side size before the center crop; None = raw images are already
            ``input_size``.
    """

    # the error an invalid spec raises (the training side's DatasetInfo raises its DataError)
    error: ClassVar[type[Exception]] = InputError

    name: str
    num_classes: int
    in_channels: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float
    channel_order: str
    class_names: tuple[str, ...]
    resize: int | None = None

    def __post_init__(self) -> None:
        kind, bad = type(self).__name__, self.error
        if self.channel_order not in ("L", "RGB"):
            raise bad(f"{kind}.channel_order must be 'L' or 'RGB', got {self.channel_order!r}")
        if self.in_channels != len(self.channel_order) or len(self.mean) != self.in_channels \
                or len(self.std) != self.in_channels:
            raise bad(f"{kind}: in_channels={self.in_channels}, channel_order={self.channel_order!r}, "
                      f"{len(self.mean)} means and {len(self.std)} stds must agree")
        if len(self.class_names) != self.num_classes:
            raise bad(f"{kind}: {len(self.class_names)} class names for {self.num_classes} classes")
        if not all(math.isfinite(s) and s > 0 for s in self.std) or not (math.isfinite(self.scale) and self.scale > 0):
            raise bad(f"{kind}: std {self.std} and scale {self.scale} must be finite and positive")
        if not all(math.isfinite(m) for m in self.mean):
            raise bad(f"{kind}: mean {self.mean} must be finite")
        if self.resize is not None and not 1 <= self.resize <= MAX_IMAGE_SIZE:
            raise bad(f"{kind}: resize must be in [1, {MAX_IMAGE_SIZE}], got {self.resize}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        for key in ("input_size", "mean", "std", "class_names"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_dict`; a missing, unknown or mistyped key raises :attr:`error`."""
        if not isinstance(d, dict):
            raise cls.error(f"dataset info must be a mapping, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise cls.error(f"dataset info has unknown keys {unknown}; expected {names}")
        missing = [n for n in names if n not in d and n != "resize"]
        if missing:
            raise cls.error(f"dataset info lacks keys {missing}")
        try:
            size = tuple(int(v) for v in d["input_size"])
            if len(size) != 2:
                raise cls.error(f"dataset info input_size must be [H, W], got {d['input_size']!r}")
            return cls(name=str(d["name"]), num_classes=int(d["num_classes"]), in_channels=int(d["in_channels"]),
                       input_size=(size[0], size[1]), mean=tuple(float(v) for v in d["mean"]),
                       std=tuple(float(v) for v in d["std"]), scale=float(d["scale"]),
                       channel_order=str(d["channel_order"]), class_names=tuple(str(v) for v in d["class_names"]),
                       resize=None if d.get("resize") is None else int(d["resize"]))
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, cls.error):
                raise
            raise cls.error(f"dataset info holds a value of the wrong type ({e})") from None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> InputSpec:
        """The spec a (validated) bundle manifest records in ``preprocessing``, ``input`` and ``classes``."""
        p = manifest["preprocessing"]
        classes = manifest.get("classes", ())  # a partial manifest (preprocessing + input) gives the rule only
        return cls(name=str(p["dataset"]), num_classes=len(classes),
                   in_channels=int(manifest["input"]["shape"][1]),
                   input_size=(int(p["input_size"][0]), int(p["input_size"][1])),
                   mean=tuple(float(v) for v in p["mean"]), std=tuple(float(v) for v in p["std"]),
                   scale=float(p["scale"]), channel_order=str(p["channel_order"]),
                   class_names=tuple(str(c) for c in classes), resize=None if p.get("resize") is None else int(p["resize"]))


def class_mismatch(data_names: Sequence[str], model_names: Sequence[str]) -> str | None:
    """Why a dataset's classes do not label what a model predicts (None: they do): same count,
    but other names, or the same names in another order (a folder renamed or added changes the
    sorted order, so every label would be scored against another class)."""
    data_names, model_names = [str(n) for n in data_names], [str(n) for n in model_names]
    if data_names == model_names:
        return None
    if sorted(data_names) == sorted(model_names):
        i = next(k for k, (a, b) in enumerate(zip(data_names, model_names)) if a != b)
        return (f"its classes are the model's in another order (label {i} is {data_names[i]!r} in the data, "
                f"{model_names[i]!r} in the model)")
    extra = [n for n in data_names if n not in model_names][:3]
    if not extra:
        return f"its class names {data_names[:5]} are not the model's {model_names[:5]}"
    return f"its classes are not the model's (the data has {', '.join(map(repr, extra))}, which the model does not)"


def as_spec(obj: Any) -> InputSpec:
    """``obj`` as an :class:`InputSpec`: a spec, a :class:`~kdedge.bundle.Bundle` or a manifest dict."""
    if isinstance(obj, InputSpec):
        return obj
    if isinstance(obj, dict):
        return InputSpec.from_manifest(obj)
    info = getattr(obj, "input_info", None)
    if isinstance(info, InputSpec):
        return info
    raise TypeError(f"expected an InputSpec, a Bundle or a manifest dict, got {type(obj).__name__}")


def pixels(n: int) -> str:
    """A pixel count for messages: ``67 MP``, ``600 pixels``."""
    return f"{n / 1e6:.0f} MP" if n >= 1_000_000 else f"{n:,} pixels"


def gib(n: int) -> str:
    """A byte count for messages: ``4.0 GiB``."""
    return f"{n / 2**30:.1f} GiB"


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(H, W) after resizing the shorter side to ``short`` (torchvision's rounding: truncate the long side)."""
    if height < 1 or width < 1:
        raise InputError(f"cannot resize an empty image of {height}x{width} pixels")
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def resize_center_crop(image: np.ndarray, resize: int, size: tuple[int, int], where: str = "the input") -> np.ndarray:
    """Bilinear (antialiased, Pillow) resize of the shorter side, then a center crop.

    Matches torchvision's ``Resize(resize)`` + ``CenterCrop(size)`` on a PIL image.

    Args:
        image: uint8 HWC array, C = 1 or 3.
        resize: shorter side after the resize.
        size: (H, W) of the crop; must fit inside the resized image.

    Returns:
        uint8 array of shape (size[0], size[1], C).
    """
    from PIL import Image

    h, w, c = image.shape
    new_h, new_w = resized_size(h, w, resize)
    if (new_h, new_w) != (h, w):
        pil = Image.fromarray(image[:, :, 0] if c == 1 else image, mode="L" if c == 1 else "RGB")
        image = np.asarray(pil.resize((new_w, new_h), resample=Image.BILINEAR)).reshape(new_h, new_w, c)
    ch, cw = size
    if ch > new_h or cw > new_w:
        raise InputError(f"{where}: the center crop {ch}x{cw} does not fit in the image resized to {new_h}x{new_w} "
                         f"(from {h}x{w})")
    top, left = int(round((new_h - ch) / 2.0)), int(round((new_w - cw) / 2.0))
    return image[top: top + ch, left: left + cw]


def raw_layout(shape: Sequence[int], c: int, order: str, where: str = "the input") -> tuple[int, int, int]:
    """(images, height, width) of raw images of ``shape`` (HW, HWC, NHW or NHWC) for a model
    with ``c`` channels, from the shape alone (a ``.npy`` header is checked before its data is read).

    Raises:
        InputError: an unusable layout, the wrong channel count, no images or empty images.
    """
    if len(shape) == 2:
        n, h, w, ch = 1, shape[0], shape[1], 1
    elif len(shape) == 3:
        if shape[-1] == c and c in (1, 3):
            n, (h, w, ch) = 1, shape                 # one HWC image
        elif c == 1 and shape[-1] not in (3, 4):
            (n, h, w), ch = shape, 1                 # a grey batch, NHW (a last axis of 3/4 is colour)
        else:
            raise InputError(f"{where} has shape {list(shape)} (read as HWC: {shape[-1]} channels), the "
                             f"model expects {c} channel(s) ({order})")
    elif len(shape) == 4:
        n, h, w, ch = shape
    else:
        raise InputError(f"{where} has shape {list(shape)}; raw images must be HW, HWC, NHW or NHWC")
    if ch != c:
        raise InputError(f"{where} has {ch} channel(s) (shape {list(shape)}, channels last), the "
                         f"model expects {c} ({order})")
    if n < 1:
        raise InputError(f"{where} holds no images (shape {list(shape)})")
    if h < 1 or w < 1:
        raise InputError(f"{where} holds empty images of {h}x{w} pixels (shape {list(shape)})")
    return n, h, w


def check_raw(n: int, h: int, w: int, spec: InputSpec, where: str = "the input") -> None:
    """``n`` raw images of ``h`` x ``w`` can be preprocessed within the bounds (before any is decoded).

    Raises:
        InputError: too many pixels, the wrong size without a resize, or too large a batch.
    """
    H, W = spec.input_size
    if h * w > MAX_IMAGE_PIXELS:
        raise InputError(f"{where} has images of {w}x{h} pixels ({pixels(h * w)}), more than the "
                         f"{pixels(MAX_IMAGE_PIXELS)} kdedge decodes; the model's input is {H}x{W}, "
                         "resize them first")
    if spec.resize is None and (h, w) != (H, W):
        raise InputError(f"{where} has images of size {h}x{w}, the model expects {H}x{W}; resize them first")
    need = n * spec.in_channels * H * W * 4
    if need > MAX_INPUT_BYTES:
        raise InputError(f"{where} holds {n} images, {gib(need)} once preprocessed, more than the "
                         f"{gib(MAX_INPUT_BYTES)} kdedge loads at once; split them into smaller inputs")


def preprocess(raw: np.ndarray, spec: Any, where: str = "the input") -> np.ndarray:
    """Raw uint8 image(s) to the normalised float32 NCHW batch the model was trained on.

    Args:
        raw: HW (grey), HWC, NHW (grey) or NHWC uint8, channels in ``spec.channel_order``, in the
            dataset's raw value range.
        spec: an :class:`InputSpec` (``Splits.info`` from training, ``bundle.input_info``), a
            :class:`~kdedge.bundle.Bundle` or its manifest dict.
        where: name of the input for messages.

    Returns:
        float32 array [N, C, H, W] (N = 1 for a single image).

    Raises:
        InputError: wrong dtype, channel count or size, empty images, or beyond the bounds.
    """
    spec = as_spec(spec)
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        raise InputError(f"{where}: raw images must be uint8, got {arr.dtype}")
    c = spec.in_channels
    n, ih, iw = raw_layout(arr.shape, c, spec.channel_order, where)
    check_raw(n, ih, iw, spec, where)
    arr = arr.reshape(n, ih, iw, c)
    if spec.resize is not None:
        arr = np.stack([resize_center_crop(img, spec.resize, spec.input_size, where) for img in arr])
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = arr.astype(np.float32) * np.float32(spec.scale)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
