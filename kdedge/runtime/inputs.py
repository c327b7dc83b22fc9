"""Inputs for the runner: image files, directories of images and ``.npy`` batches, preprocessed
by the bundle's own rule and checked.

The rule (``manifest.preprocessing``, the same as ``kdedge.train.data.preprocess``): a raw image
(uint8, channels in ``channel_order``) is resized (shorter side to ``resize``, bilinear, then a
center crop to ``input_size``) when ``resize`` is set, then ``x = (raw * scale - mean) / std``
per channel, as float32 NCHW.

What :func:`load_inputs` accepts:

- an image file (PNG, JPEG, BMP, GIF, TIFF, WebP, PGM/PPM), read with Pillow;
- a directory: every image file in it (sorted by name; other files are ignored);
- a ``.npy`` file: ``uint8`` raw images (HW, HWC, NHW or NHWC) preprocessed like images, or a
  ``float32`` model input already preprocessed ([N, C, H, W] or [C, H, W]).

Every failure is an :class:`InputError` (a ValueError) naming the file, what is wrong and what
the bundle expects. numpy and the standard library only; Pillow is imported to read images.

Example:
    >>> batch = load_inputs("digits/", bundle)
    >>> batch.x.shape, batch.names[:2]
    ((12, 1, 8, 8), ['0.png', '1.png'])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "InputError", "Inputs", "check_batch", "load_inputs", "preprocess", "read_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm")


class InputError(ValueError):
    """An input the bundle cannot take; the message names the problem and what is expected."""


@dataclass(frozen=True)
class Inputs:
    """A preprocessed batch and where each sample came from.

    Attributes:
        x: float32 [N, C, H, W], ready for :meth:`Runner.run`.
        names: one name per sample (file name, or ``file.npy[i]``).
    """

    x: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def check_batch(x: Any, input_shape: Sequence[int], where: str = "the input") -> np.ndarray:
    """Check a model-input batch and return it as C-contiguous float32.

    Args:
        x: the batch, [N, C, H, W].
        input_shape: (C, H, W) the bundle expects.
        where: what to call the batch in messages (a file name).

    Raises:
        InputError: not an array, wrong dtype (float32 is expected), wrong shape, empty, or
            NaN/inf values.
    """
    if not isinstance(x, np.ndarray):
        raise InputError(f"{where} must be a numpy array, got {type(x).__name__}")
    c, h, w = (int(v) for v in input_shape)
    if x.dtype != np.float32:
        raise InputError(f"{where} has dtype {x.dtype}, the bundle expects float32 (preprocessed) input; "
                         "convert with x.astype(np.float32), or pass raw uint8 images to be preprocessed")
    if x.ndim != 4 or x.shape[0] < 1:
        raise InputError(f"{where} has shape {list(x.shape)}, the bundle expects [N, {c}, {h}, {w}] with N >= 1")
    if x.shape[1] != c:
        raise InputError(f"{where} has {x.shape[1]} channel(s) (shape {list(x.shape)}), the bundle expects {c} "
                         f"(shape [N, {c}, {h}, {w}], channels first)")
    if tuple(x.shape[2:]) != (h, w):
        raise InputError(f"{where} has images of size {x.shape[2]}x{x.shape[3]}, the bundle expects {h}x{w} "
                         f"(shape [N, {c}, {h}, {w}]); resize them first")
    # one float64 reduction: NaN and inf propagate through a sum, and float32 values cannot
    # overflow a float64 sum, so this is exact and cheaper than isfinite().all() on small batches
    if not math.isfinite(float(x.sum(dtype=np.float64))):
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise InputError(f"{where} contains NaN or infinite values (in {bad} of {len(x)} samples); the bundle "
                         "expects finite numbers")
    return np.ascontiguousarray(x)


def _prep(bundle_or_manifest: Any) -> tuple[dict[str, Any], tuple[int, int, int]]:
    manifest = getattr(bundle_or_manifest, "manifest", bundle_or_manifest)
    prep = dict(manifest["preprocessing"])
    shape = manifest["input"]["shape"]
    return prep, (int(shape[1]), int(shape[2]), int(shape[3]))


def _resize_center_crop(image: np.ndarray, resize: int, size: tuple[int, int]) -> np.ndarray:
    """torchvision's Resize(resize) + CenterCrop(size) on a PIL image (bilinear, antialiased)."""
    from PIL import Image

    h, w, c = image.shape
    new_h, new_w = (int(resize * h / w), resize) if w <= h else (resize, int(resize * w / h))
    if (new_h, new_w) != (h, w):
        pil = Image.fromarray(image[:, :, 0] if c == 1 else image, mode="L" if c == 1 else "RGB")
        image = np.asarray(pil.resize((new_w, new_h), resample=Image.BILINEAR)).reshape(new_h, new_w, c)
    ch, cw = size
    if ch > new_h or cw > new_w:
        raise InputError(f"center crop {ch}x{cw} does not fit in the resized image {new_h}x{new_w}")
    top, left = int(round((new_h - ch) / 2.0)), int(round((new_w - cw) / 2.0))
    return image[top: top + ch, left: left + cw]


def preprocess(raw: np.ndarray, bundle: Any, where: str = "the input") -> np.ndarray:
    """Raw uint8 image(s) to the normalised float32 NCHW batch, by the bundle's rule.

    Args:
        raw: HW (grey), HWC, NHW (grey) or NHWC uint8, channels in the bundle's channel order.
        bundle: a :class:`~kdedge.runtime.bundle.Bundle` or its manifest dict.
        where: name for messages.

    Raises:
        InputError: wrong dtype, channel count or size.
    """
    prep, (c, h, w) = _prep(bundle)
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        raise InputError(f"{where}: raw images must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        if arr.shape[-1] == c and c in (1, 3):
            arr = arr[None]                      # one HWC image
        elif c == 1 and arr.shape[-1] not in (3, 4):
            arr = arr[..., None]                 # a grey batch, NHW
        else:
            raise InputError(f"{where} has shape {list(arr.shape)} (read as HWC: {arr.shape[-1]} channels), the "
                             f"bundle expects {c} channel(s) ({prep['channel_order']})")
    elif arr.ndim != 4:
        raise InputError(f"{where} has shape {list(arr.shape)}; raw images must be HW, HWC, NHW or NHWC")
    if arr.shape[-1] != c:
        raise InputError(f"{where} has {arr.shape[-1]} channel(s) (shape {list(arr.shape)}, channels last), the "
                         f"bundle expects {c} ({prep['channel_order']})")
    if arr.shape[0] < 1:
        raise InputError(f"{where} holds no images")
    if prep.get("resize") is not None:
        arr = np.stack([_resize_center_crop(img, int(prep["resize"]), (h, w)) for img in arr])
    elif tuple(arr.shape[1:3]) != (h, w):
        raise InputError(f"{where} has images of size {arr.shape[1]}x{arr.shape[2]}, the bundle expects {h}x{w}; "
                         "resize them first")
    mean = np.asarray(prep["mean"], dtype=np.float32)
    std = np.asarray(prep["std"], dtype=np.float32)
    x = arr.astype(np.float32) * np.float32(prep["scale"])
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def read_image(path: str | Path, channel_order: str) -> np.ndarray:
    """An image file as a uint8 HWC array in ``channel_order`` (``L`` or ``RGB``).

    A grey image is expanded to RGB and an RGBA/palette image converted for an RGB model; a grey
    picture stored as RGB is accepted by a grey model, a colour one is refused (converting
    colour to grey is the user's choice, not the runtime's).

    Raises:
        InputError: unreadable or not an image, or colour given to a grey model.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:  # pragma: no cover - Pillow is a base dependency
        raise ImportError("reading images needs Pillow: pip install pillow") from e
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I", "F") or mode.startswith("I;"):
                raise InputError(f"{path} is a {mode} (16/32-bit) image; the bundle expects 8-bit "
                                 f"{'greyscale' if channel_order == 'L' else 'RGB'} images")
            if channel_order == "L":
                if mode in ("L", "1", "LA"):
                    arr = np.asarray(im.convert("L"))[:, :, None]
                else:
                    rgb = np.asarray(im.convert("RGB"))
                    if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
                        raise InputError(f"{path} is a colour image ({mode}, 3 channels), the bundle expects "
                                         "greyscale (1 channel, L); convert it, e.g. PIL.Image.open(p).convert('L')")
                    arr = rgb[:, :, :1]  # a grey picture stored as colour
            else:
                arr = np.asarray(im.convert("RGB"))
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                         "is it a valid image file?") from None
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _load_npy(path: Path, bundle: Any) -> Inputs:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    if magic != b"\x93NUMPY":
        raise InputError(f"cannot read {path}: not a valid .npy file (save arrays with numpy.save)")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError:
        raise InputError(f"cannot read {path}: it holds Python objects; object arrays are refused (they would need "
                         "unpickling); save a uint8 or float32 array") from None
    except (OSError, EOFError) as e:
        raise InputError(f"cannot read {path}: not a valid .npy file ({e})") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path} is not a single .npy array")
    _, (c, h, w) = _prep(bundle)
    if arr.dtype == np.uint8:
        x = preprocess(arr, bundle, where=str(path))
    elif arr.dtype == np.float32:
        x = arr[None] if arr.ndim == 3 else arr
        if x.ndim != 4:
            raise InputError(f"{path} has shape {list(arr.shape)}; a float32 .npy must be the preprocessed model "
                             f"input [N, {c}, {h}, {w}] (or [{c}, {h}, {w}])")
    else:
        raise InputError(f"{path} has dtype {arr.dtype}; the bundle takes uint8 raw images (HW, HWC, NHW, NHWC) or "
                         f"float32 preprocessed input [N, {c}, {h}, {w}]; convert with .astype(np.float32) or "
                         ".astype(np.uint8)")
    x = check_batch(x, (c, h, w), where=str(path))
    return Inputs(x, tuple(f"{path.name}[{i}]" for i in range(len(x))))


def load_inputs(path: str | Path, bundle: Any) -> Inputs:
    """Read an image file, a directory of images or a ``.npy`` file as a checked model batch.

    Args:
        path: the file or directory.
        bundle: the :class:`~kdedge.runtime.bundle.Bundle` (or its manifest dict) whose
            preprocessing and input shape apply.

    Raises:
        InputError: missing path, unknown file type, unreadable image, empty directory, wrong
            dtype/shape/channels/size, NaN/inf.
    """
    path = Path(path)
    prep, (c, h, w) = _prep(bundle)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"directory {path} holds no image files ({', '.join(IMAGE_SUFFIXES[:5])}, …)")
        x = np.concatenate([preprocess(read_image(f, prep["channel_order"]), bundle, where=str(f)) for f in files])
        return Inputs(check_batch(x, (c, h, w), where=str(path)), tuple(f.name for f in files))
    if path.suffix.lower() == ".npy":
        return _load_npy(path, bundle)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        x = preprocess(read_image(path, prep["channel_order"]), bundle, where=str(path))
        return Inputs(check_batch(x, (c, h, w), where=str(path)), (path.name,))
    raise InputError(f"{path}: unknown input type {path.suffix or '(no suffix)'}; give an image file, a directory "
                     "of images or a .npy array")
