"""Request bodies to model input: an image file (PNG, JPEG, BMP, GIF, TIFF, WebP, PNM) or a
``.npy`` array, held in memory, preprocessed by the bundle's own rule into one float32 sample
``[1, C, H, W]``.

The rules are those of :func:`kdedge.runtime.load_inputs` for files, applied to bytes: a
``.npy`` is recognised by its magic, its header is read and checked (dtype, shape, size against
the body's length) before its data is touched, ``allow_pickle`` never; an image's size comes
from its header and is bounded before it is decoded. A body holds one sample: the server
batches requests itself.

Images are decoded by Pillow; an 8-bit PNG by OpenCV instead where it is installed (the
``opencv`` extra; :func:`opencv`), which decodes a small PNG 0.1-0.2 ms sooner per request
and gives the same pixels.

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
import os
import warnings
from typing import Any

import numpy as np

from kdedge.runtime import InputError, check_batch, preprocess
from kdedge.runtime.inputs import LOSSY_FORMATS, MAX_IMAGE_PIXELS, PNG_SIGNATURE, deep_png, grey_of, png_header

__all__ = ["BodyError", "MAX_IMAGE_PIXELS", "NPY_MAGIC", "decode_body", "opencv"]

NPY_MAGIC = b"\x93NUMPY"
_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
# a body whose first bytes name its format is opened by that format's plugin alone (Pillow
# otherwise asks each plugin in turn); anything else, a damaged header included, by all of them
_PNG = PNG_SIGNATURE
_MAGIC = ((_PNG, ("PNG",)), (b"\xff\xd8\xff", ("JPEG",)))
_OPENCV: dict[str, Any] = {}  # {"module": cv2 or None} once looked for


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
    if any(d < 0 for d in shape):
        raise BodyError(f"the body's .npy header gives a negative dimension {list(shape)}", 400)
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
    prep, (c, h, w) = _geometry(bundle)
    order = prep["channel_order"]
    deep = deep_png(body)
    if deep is not None:
        raise BodyError(f"the image is {deep}; the model takes 8-bit {'greyscale' if order == 'L' else 'RGB'} images")
    arr = _png_opencv(body, prep, h, w) if body.startswith(_PNG) else None
    if arr is None:
        arr = _pillow(body, prep, h, w)
    else:
        arr = _convert_array(arr, order)
    try:
        return preprocess(arr, bundle, where="the image")
    except InputError as e:
        raise BodyError(str(e)) from None


def _check_size(iw: int, ih: int, prep: dict[str, Any], h: int, w: int) -> None:
    if iw * ih > MAX_IMAGE_PIXELS:
        raise BodyError(f"the image is {iw}x{ih} pixels, more than the {MAX_IMAGE_PIXELS >> 20} Mi pixels "
                        f"the server decodes; the model's input is {h}x{w}, resize it first")
    if prep.get("resize") is None and (ih, iw) != (h, w):
        raise BodyError(f"the image is {ih}x{iw} (height x width), the model expects {h}x{w}; resize it first")


def _pillow(body: bytes, prep: dict[str, Any], h: int, w: int) -> np.ndarray:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(body), formats=_formats(body))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's own bound, far above ours
            raise BodyError(f"the image has more than the {MAX_IMAGE_PIXELS >> 20} Mi pixels the server decodes; "
                            f"the model's input is {h}x{w}, resize it first") from None
        except Exception:  # Pillow raises UnidentifiedImageError, or others on damaged headers
            raise BodyError("the body is neither an image (PNG, JPEG, BMP, GIF, TIFF, WebP, PNM) nor a .npy array "
                            "(numpy.save); send the file's bytes as they are", 400) from None
        with im:
            _check_size(*im.size, prep, h, w)
            try:
                im.load()
                return _convert(im, prep["channel_order"])
            except BodyError:
                raise
            except Exception as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise BodyError(f"the image cannot be decoded ({why}); is the file complete?", 400) from None


def opencv() -> Any:
    """OpenCV's module when it is installed (``pip install 'kdedge[opencv]'``) and not turned off
    (``KDEDGE_OPENCV=0``), else None. The server then decodes 8-bit PNG bodies with it: one call
    into C where Pillow runs a few dozen Python calls, which, run once per request with the
    caches the model left, cost 0.1-0.2 ms more (docs/serving.md). PNG is lossless,
    so both give the same pixels (tested); every other format, and a PNG OpenCV cannot read,
    goes to Pillow."""
    if "module" not in _OPENCV:
        module = None
        if os.environ.get("KDEDGE_OPENCV", "1").strip().lower() not in ("0", "false", "no", "off"):
            try:
                import cv2

                log = getattr(getattr(cv2, "utils", None), "logging", None)
                if log is not None:  # a damaged body is answered with a 4xx, not logged by OpenCV too
                    log.setLogLevel(log.LOG_LEVEL_ERROR)
                module = cv2
            except Exception:  # not installed, or a build that cannot load here
                module = None
        _OPENCV["module"] = module
    return _OPENCV["module"]


def _png_opencv(body: bytes, prep: dict[str, Any], h: int, w: int) -> np.ndarray | None:
    """An 8-bit grey, grey+alpha, RGB or RGBA PNG decoded by OpenCV (HW or HWC, OpenCV's BGR(A)
    order), its size checked from the header first; None where Pillow is to decode the body (no
    OpenCV, another bit depth or a palette, a header or data OpenCV does not take: Pillow then
    decodes it or says what is wrong)."""
    cv2 = opencv()
    head = png_header(body) if cv2 is not None else None
    if head is None or head[2] != 8 or head[3] not in (0, 2, 4, 6):
        return None
    _check_size(head[0], head[1], prep, h, w)
    try:
        arr = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    except Exception:
        return None
    if arr is None or arr.dtype != np.uint8 or arr.shape[:2] != (head[1], head[0]) or \
            not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        return None
    return arr


def _convert_array(arr: np.ndarray, order: str) -> np.ndarray:
    """:func:`_convert` for OpenCV's HW / HWC BGR(A) array: alpha dropped, as Pillow's ``convert``
    drops it."""
    if arr.ndim == 3:
        rgb = arr[:, :, 2::-1]
        return np.ascontiguousarray(rgb) if order != "L" else _grey(rgb)
    return arr[:, :, None] if order == "L" else np.repeat(arr[:, :, None], 3, axis=2)


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
    return _grey(_pixels(im.convert("RGB")), im.format in LOSSY_FORMATS)


def _grey(rgb: np.ndarray, lossy: bool = False) -> np.ndarray:
    """One channel of an HWC RGB picture for a grey model (:func:`kdedge.runtime.inputs.grey_of`),
    refused when it is in colour."""
    grey = grey_of(rgb, lossy)
    if grey is None:
        raise BodyError("the image is in colour, the model takes greyscale (1 channel); convert it first, e.g. "
                        "PIL.Image.open(p).convert('L')")
    return grey
