"""Request bodies to model input: an image file (PNG, JPEG, BMP, GIF, TIFF, WebP, PNM) or a
``.npy`` array, held in memory, preprocessed by the bundle's own rule into one float32 sample
``[1, C, H, W]``.

The rules are those of :func:`kdedge.runtime.load_inputs` for files, applied to bytes: a
``.npy`` is recognised by its magic, its header is read and checked (dtype, shape, size against
the body's length) before its data is touched, ``allow_pickle`` never; an image's size comes
from its header and is bounded before it is decoded. A body holds one sample: the server
batches requests itself.

Every problem is a :class:`BodyError` (an :class:`~kdedge.runtime.InputError`) with one line
and the HTTP status it maps to: 400 for a body that is not an image or a ``.npy`` at all, 422
for one that is well formed but not what the bundle takes (shape, channels, size, dtype, NaN).

Example:
    >>> x = decode_body(open("digit.png", "rb").read(), bundle)
    >>> x.shape
    (1, 1, 28, 28)
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np

from kdedge.runtime import InputError, check_batch, preprocess

__all__ = ["BodyError", "MAX_IMAGE_PIXELS", "NPY_MAGIC", "decode_body"]

NPY_MAGIC = b"\x93NUMPY"
MAX_IMAGE_PIXELS = 64 << 20  # the runtime's bound on one image (64 Mi pixels), checked before decoding
_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
# a body whose first bytes name its format is opened by that format's plugin alone (Pillow
# otherwise asks each plugin in turn); anything else, a damaged header included, by all of them
_MAGIC = ((b"\x89PNG\r\n\x1a\n", ("PNG",)), (b"\xff\xd8\xff", ("JPEG",)))


class BodyError(InputError):
    """A request body the bundle cannot take.

    Attributes:
        status: the HTTP status: 400 (not an image or ``.npy``), 422 (not what the bundle takes).
    """

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def _geometry(bundle: Any) -> tuple[dict[str, Any], tuple[int, int, int]]:
    shape = bundle.input_shape
    return dict(bundle.preprocessing), (int(shape[1]), int(shape[2]), int(shape[3]))


def decode_body(body: bytes, bundle: Any) -> np.ndarray:
    """One preprocessed sample from a request body.

    Args:
        body: the bytes of an image file or of a ``.npy`` file (``numpy.save``): uint8 raw
            images (HW, HWC, or a batch of one: NHW / NHWC with N = 1), or a float32 model
            input ``[1, C, H, W]`` / ``[C, H, W]``.
        bundle: the opened :class:`~kdedge.runtime.Bundle`.

    Returns:
        float32 ``[1, C, H, W]``, C-contiguous, finite.

    Raises:
        BodyError: empty, neither an image nor a ``.npy``, damaged, of the wrong dtype, shape,
            channel count or size, more than one sample, or with NaN/inf values.
    """
    if not body:
        raise BodyError("the request body is empty; send an image file (PNG, JPEG, ...) or a .npy array", 400)
    if body[:6] == NPY_MAGIC:
        x = _npy(body, bundle)
    else:
        x = _image(body, bundle)
    try:
        x = check_batch(x, _geometry(bundle)[1], where="the body")
    except BodyError:
        raise
    except InputError as e:
        raise BodyError(str(e)) from None
    if len(x) != 1:
        raise BodyError(f"the body holds {len(x)} samples; send one sample per request (the server batches "
                        "concurrent requests itself)")
    return x


def _npy(body: bytes, bundle: Any) -> np.ndarray:
    from numpy.lib import format as npy

    prep, (c, h, w) = _geometry(bundle)
    fh = io.BytesIO(body)
    try:
        version = npy.read_magic(fh)
    except ValueError:
        raise BodyError("the body starts like a .npy file but is not one; save arrays with numpy.save", 400) from None
    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    if version not in readers:
        raise BodyError(f"the body is a .npy file of format {version[0]}.{version[1]}; send a plain uint8 or "
                        "float32 array (numpy.save)", 400)
    try:
        shape, fortran, dtype = readers[version](fh)
    except Exception as e:  # numpy parses the header as a Python literal: ValueError, SyntaxError, TokenError...
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BodyError(f"the body's .npy header cannot be read ({why})", 400) from None
    shape = tuple(int(d) for d in shape)
    if dtype.hasobject or dtype.fields is not None:
        raise BodyError(f"the body's .npy holds dtype {dtype}; object and structured arrays are refused (they "
                        "would need unpickling); send uint8 or float32")
    need = math.prod(shape) * dtype.itemsize
    data = len(body) - fh.tell()
    if data != need:
        raise BodyError(f"the body's .npy header describes a {dtype} array of shape {list(shape)} ({need:,} bytes "
                        f"of data) but {data:,} bytes follow it; the body is truncated or holds more than one "
                        "array", 400)
    is_u8 = dtype.kind == "u" and dtype.itemsize == 1
    is_f32 = dtype.kind == "f" and dtype.itemsize == 4
    if not (is_u8 or is_f32):
        raise BodyError(f"the body's .npy has dtype {dtype}; send uint8 raw images (HW, HWC) or the float32 "
                        f"preprocessed input [1, {c}, {h}, {w}]")
    if is_f32 and len(shape) not in (3, 4):
        raise BodyError(f"the body's float32 .npy has shape {list(shape)}; the preprocessed input is "
                        f"[1, {c}, {h}, {w}] (or [{c}, {h}, {w}])")
    if is_f32 and len(shape) == 4 and shape[0] != 1:
        raise BodyError(f"the body holds {shape[0]} samples (shape {list(shape)}); send one sample per request "
                        "(the server batches concurrent requests itself)")
    arr = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=fh.tell())
    arr = arr.reshape(shape, order="F" if fortran else "C").astype(dtype.newbyteorder("="), copy=False)
    if is_f32:
        return np.ascontiguousarray(arr.reshape((1, *shape[-3:])))
    # several raw images (NHW, NHWC) are preprocessed, then refused by decode_body: the body's bound
    # (the server's --max-body) bounds that work
    try:
        return preprocess(np.ascontiguousarray(arr), bundle, where="the body's .npy")
    except InputError as e:
        raise BodyError(str(e)) from None


def _image(body: bytes, bundle: Any) -> np.ndarray:
    from PIL import Image

    prep, (c, h, w) = _geometry(bundle)
    order = prep["channel_order"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(body), formats=_formats(body))
        except Exception:  # Pillow raises UnidentifiedImageError, or others on damaged headers
            raise BodyError("the body is neither an image (PNG, JPEG, BMP, GIF, TIFF, WebP, PNM) nor a .npy array "
                            "(numpy.save); send the file's bytes as they are", 400) from None
        with im:
            iw, ih = im.size
            if iw * ih > MAX_IMAGE_PIXELS:
                raise BodyError(f"the image is {iw}x{ih} pixels, more than the {MAX_IMAGE_PIXELS >> 20} Mi pixels "
                                f"the server decodes; the model's input is {h}x{w}, resize it first")
            if prep.get("resize") is None and (ih, iw) != (h, w):
                raise BodyError(f"the image is {ih}x{iw} (height x width), the model expects {h}x{w}; resize it "
                                "first")
            try:
                im.load()
                arr = _convert(im, order)
            except BodyError:
                raise
            except Exception as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise BodyError(f"the image cannot be decoded ({why}); is the file complete?", 400) from None
    try:
        return preprocess(arr, bundle, where="the image")
    except InputError as e:
        raise BodyError(str(e)) from None


def _formats(body: bytes) -> tuple[str, ...]:
    for magic, formats in _MAGIC:
        if body.startswith(magic):
            return formats
    return _FORMATS


def _pixels(im: Any) -> np.ndarray:
    """uint8 HWC of an 8-bit L or RGB image (one copy; ``np.asarray`` takes a slower way there)."""
    w, h = im.size
    return np.frombuffer(im.tobytes(), np.uint8).reshape(h, w, len(im.mode))


def _convert(im: Any, order: str) -> np.ndarray:
    """uint8 HWC in the bundle's channel order: a grey picture stored as RGB is accepted by a grey
    model, a colour one is refused (converting colour to grey is the client's choice)."""
    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        raise BodyError(f"the image is {mode} (16/32-bit); the model takes 8-bit "
                        f"{'greyscale' if order == 'L' else 'RGB'} images")
    if order != "L":
        return _pixels(im if mode == "RGB" else im.convert("RGB"))
    if mode in ("L", "1", "LA"):
        return _pixels(im if mode == "L" else im.convert("L"))
    rgb = _pixels(im.convert("RGB"))
    if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
        raise BodyError("the image is in colour, the model takes greyscale (1 channel); convert it first, e.g. "
                        "PIL.Image.open(p).convert('L')")
    return np.ascontiguousarray(rgb[:, :, :1])
