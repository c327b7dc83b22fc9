"""Inputs for the runner: image files, directories of images and ``.npy`` batches, preprocessed
by the bundle's own rule and checked.

The rule (``manifest.preprocessing``, the same as ``kdedge.train.data.preprocess``): a raw image
(uint8, channels in ``channel_order``) is resized (shorter side to ``resize``, bilinear, then a
center crop to ``input_size``) when ``resize`` is set, then ``x = (raw * scale - mean) / std``
per channel, as float32 NCHW.

What :func:`load_inputs` accepts:

- an image file (PNG, JPEG, BMP, GIF, TIFF, WebP, PGM/PPM), read with Pillow;
- a directory: every image file in it (sorted by name; files of other types and
  subdirectories are ignored, an image name that is not a regular file is refused);
- a ``.npy`` file: ``uint8`` raw images (HW, HWC, NHW or NHWC) preprocessed like images, or a
  ``float32`` model input already preprocessed ([N, C, H, W] or [C, H, W]).

Untrusted input is bounded before anything large is allocated or decoded: only regular files
are opened, and never in a way that blocks (:func:`kdedge.bundle.files.open_regular`: a FIFO
or ``/dev/zero`` is refused); a ``.npy`` header is read first and its shape and dtype checked
against the bundle and against the file's size (a truncated file, or one whose header claims
10^8 images, fails before its data is read; a float32 batch is memory-mapped, not loaded); an
image's size is read from its header and bounded (:data:`MAX_IMAGE_PIXELS`) before it is
decoded; a directory holds at most :data:`MAX_INPUT_FILES` images and a batch made in memory at
most :data:`MAX_INPUT_BYTES`.

Every failure is an :class:`InputError` (a ValueError) naming the file, what is wrong and what
the bundle expects. numpy and the standard library only; Pillow is imported to read images.

Example:
    >>> batch = load_inputs("digits/", bundle)
    >>> batch.x.shape, batch.names[:2]
    ((12, 1, 8, 8), ['0.png', '1.png'])
"""

from __future__ import annotations

import math
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np

from kdedge.bundle.files import NotRegularFile, describe_path, file_kind, open_regular
from kdedge.bundle.inputs import (
    MAX_IMAGE_PIXELS,
    MAX_INPUT_BYTES,
    InputError,
    as_spec,
    check_raw,
    gib,
    pixels,
    preprocess,
    raw_layout,
)

__all__ = ["IMAGE_SUFFIXES", "InputError", "Inputs", "LOSSY_FORMATS", "LOSSY_GREY_TOLERANCE", "MAX_IMAGE_PIXELS",
           "MAX_INPUT_BYTES", "MAX_INPUT_FILES", "check_batch", "grey_of", "list_images", "load_inputs", "preprocess",
           "read_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm")

MAX_INPUT_FILES = 100_000     # image files read from one directory (the other bounds: kdedge.bundle.inputs)


@dataclass(frozen=True)
class Inputs:
    """A preprocessed batch and where each sample came from.

    Attributes:
        x: float32 [N, C, H, W], ready for :meth:`Runner.run` (a copy-on-write memory map for a
            float32 ``.npy``).
        names: one name per sample (file name, or ``file.npy[i]``).
    """

    x: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def _check_batch_shape(shape: Sequence[int], dtype: np.dtype, input_shape: Sequence[int], where: str) -> None:
    """The checks of :func:`check_batch` that need only the shape and dtype (a ``.npy`` header)."""
    c, h, w = (int(v) for v in input_shape)
    if dtype != np.float32:
        raise InputError(f"{where} has dtype {dtype}, the bundle expects float32 (preprocessed) input; "
                         "convert with x.astype(np.float32), or pass raw uint8 images to be preprocessed")
    if len(shape) != 4 or shape[0] < 1:
        raise InputError(f"{where} has shape {list(shape)}, the bundle expects [N, {c}, {h}, {w}] with N >= 1")
    if shape[1] != c:
        raise InputError(f"{where} has {shape[1]} channel(s) (shape {list(shape)}), the bundle expects {c} "
                         f"(shape [N, {c}, {h}, {w}], channels first)")
    if tuple(shape[2:]) != (h, w):
        raise InputError(f"{where} has images of size {shape[2]}x{shape[3]}, the bundle expects {h}x{w} "
                         f"(shape [N, {c}, {h}, {w}]); resize them first")


def _all_finite(x: np.ndarray) -> bool:
    """No NaN or inf in ``x``. A small batch (one request) is checked directly; a large one with a
    single float64 sum (NaN and inf propagate through it, float32 values cannot overflow it), which
    makes no boolean copy of the batch; errstate keeps +inf + -inf from printing a warning."""
    if x.size <= 1 << 16:
        return bool(np.isfinite(x).all())
    with np.errstate(invalid="ignore"):
        return math.isfinite(float(x.sum(dtype=np.float64)))


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
    _check_batch_shape(x.shape, x.dtype, input_shape, where)
    if not _all_finite(x):
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise InputError(f"{where} contains NaN or infinite values (in {bad} of {len(x)} samples); the bundle "
                         "expects finite numbers")
    return np.ascontiguousarray(x)


def _open(path: Path, what: str) -> BinaryIO:
    """:func:`open_regular` with its failures as :class:`InputError`."""
    try:
        return open_regular(path, what)
    except (FileNotFoundError, NotRegularFile) as e:
        raise InputError(str(e)) from None
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_image(path: str | Path, channel_order: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file as a uint8 HWC array in ``channel_order`` (``L`` or ``RGB``).

    A grey image is expanded to RGB and an RGBA/palette image converted for an RGB model; a grey
    picture stored as RGB is accepted by a grey model, a colour one is refused (converting
    colour to grey is the user's choice, not the runtime's). The image's size is read from its
    header and checked before it is decoded: at most :data:`MAX_IMAGE_PIXELS`, and exactly
    ``size`` (H, W) when given (a bundle without a resize step).

    Raises:
        InputError: not a regular file, unreadable or not an image, too large, of another size
            than ``size``, or colour given to a grey model.
    """
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is a base dependency
        raise ImportError("reading images needs Pillow: pip install pillow") from e
    path = Path(path)
    with _open(path, "image") as fh, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a warning would print, not fail
        deep = deep_png(fh.read(26))
        if deep is not None:
            raise InputError(f"{path} is {deep}; the bundle expects 8-bit "
                             f"{'greyscale' if channel_order == 'L' else 'RGB'} images")
        fh.seek(0)
        try:
            with Image.open(fh) as im:
                w, h = im.size
                if size is not None and (h, w) != tuple(size):
                    raise InputError(f"{path} has images of size {h}x{w}, the bundle expects {size[0]}x{size[1]}; "
                                     "resize them first")
                if h * w > MAX_IMAGE_PIXELS:
                    raise InputError(f"image {path} is {w}x{h} pixels ({pixels(h * w)}), more than the "
                                     f"{pixels(MAX_IMAGE_PIXELS)} kdedge decodes; resize it first")
                im.load()
                arr = _convert(im, path, channel_order)
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(f"image {path} is too large to decode safely ({str(e).split(',')[0]}); resize it "
                             "first") from None
        except Image.UnidentifiedImageError:  # its message names Pillow's file object, not the file
            raise InputError(f"cannot read image {path}: it is empty or in no format Pillow knows (PNG, JPEG, BMP, "
                             "GIF, TIFF, WebP, PNM); is it a valid image file?") from None
        except Exception as e:  # Pillow's decoders raise many types on damaged files (OSError, SyntaxError, ...)
            raise InputError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                             "is it a valid image file?") from None
    return np.ascontiguousarray(arr, dtype=np.uint8)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_header(head: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, which the format puts
    first (``head``: at least the file's first 26 bytes); None when it is not a PNG or the chunk
    is not there as it should be."""
    if len(head) < 26 or not head.startswith(PNG_SIGNATURE) or head[8:16] != b"\x00\x00\x00\rIHDR":
        return None
    iw, ih, depth, colour = struct.unpack(">IIBB", head[16:26])
    return iw, ih, depth, colour


def deep_png(head: bytes) -> str | None:
    """The refusal's words for a PNG of 16 bits per channel, or None. Pillow opens an RGB, RGBA or
    grey+alpha PNG of 16 bits as 8-bit RGB / RGBA / LA, keeping only each value's high byte (a
    picture whose values stay below 256 comes out black); a grey one it opens as ``I;16``."""
    info = png_header(head)
    if info is None or info[2] != 16:
        return None
    kind = {0: "greyscale", 2: "RGB", 4: "greyscale+alpha", 6: "RGBA"}.get(info[3], "colour")
    return f"a 16-bit {kind} PNG"


def _convert(im: Any, path: Path, channel_order: str) -> np.ndarray:
    """A decoded PIL image as uint8 HWC in ``channel_order`` (see :func:`read_image`)."""
    mode = im.mode
    if mode in ("I;16", "I", "F") or mode.startswith("I;"):
        raise InputError(f"{path} is a {mode} (16/32-bit) image; the bundle expects 8-bit "
                         f"{'greyscale' if channel_order == 'L' else 'RGB'} images")
    if channel_order != "L":
        return np.asarray(im.convert("RGB"))
    if mode in ("L", "1", "LA"):
        return np.asarray(im.convert("L"))[:, :, None]
    grey = grey_of(np.asarray(im.convert("RGB")), im.format in LOSSY_FORMATS)
    if grey is None:
        raise InputError(f"{path} is a colour image ({mode}, 3 channels), the bundle expects "
                         "greyscale (1 channel, L); convert it, e.g. PIL.Image.open(p).convert('L')")
    return grey  # a grey picture stored as colour


LOSSY_FORMATS = frozenset({"JPEG", "WEBP", "MPO"})
# how far apart a lossy file's channels may be and the picture still count as grey: lossy WebP
# has no grey mode and rounds its subsampled chroma, so a grey picture comes back with R, G and
# B a step or two apart
LOSSY_GREY_TOLERANCE = 4


def grey_of(rgb: np.ndarray, lossy: bool = False) -> np.ndarray | None:
    """The one channel (HW1 uint8) of an HWC RGB picture for a grey model, or None when it is in
    colour. Equal channels are grey; from a lossy format (:data:`LOSSY_FORMATS`), channels within
    :data:`LOSSY_GREY_TOLERANCE` of each other are too, and give their luma as Pillow's
    ``convert("L")`` computes it (ITU-R 601-2, which is the value itself for equal channels)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if (r == g).all() and (g == b).all():
        return np.ascontiguousarray(rgb[:, :, :1])
    if not lossy:
        return None
    wide = rgb.astype(np.int32)
    spread = wide.max(axis=2) - wide.min(axis=2)
    if int(spread.max()) > LOSSY_GREY_TOLERANCE:
        return None
    luma = (wide[..., 0] * 19595 + wide[..., 1] * 38470 + wide[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[:, :, None]


# ---------------------------------------------------------------------------------------------
# .npy files: the header first


def _npy_header(fh: BinaryIO, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from a ``.npy`` header, without reading the data."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(fh)
    except ValueError:
        raise InputError(f"cannot read {path}: not a valid .npy file (save arrays with numpy.save)") from None
    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    if version not in readers:
        raise InputError(f"{path} is a .npy file of format version {version[0]}.{version[1]} (a structured array?); "
                         "save a plain uint8 or float32 array")
    try:
        shape, fortran, dtype = readers[version](fh)
    except (ValueError, SyntaxError, TypeError) as e:
        raise InputError(f"cannot read {path}: not a valid .npy file (its header: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if any(d < 0 for d in shape):
        raise InputError(f"cannot read {path}: its header gives a negative dimension {list(shape)}")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _check_npy_size(fh: BinaryIO, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The file holds exactly the data its header describes: a header claiming 10^8 images on a
    small file is a truncated file, not a reason to allocate."""
    data = os.fstat(fh.fileno()).st_size - fh.tell()
    need = math.prod(shape) * dtype.itemsize
    if data < need:
        raise InputError(f"{path} is truncated: its header describes a {dtype} array of shape {list(shape)} "
                         f"({need:,} bytes of data), the file holds {data:,} bytes after the header")
    if data > need:
        raise InputError(f"{path} holds {data - need:,} bytes after its {dtype} array of shape {list(shape)} "
                         "(several arrays saved into one file?); save one array per .npy file")


def _npy_data(fh: BinaryIO, path: Path, shape: tuple[int, ...], fortran: bool, dtype: np.dtype,
              mmap: bool) -> np.ndarray:
    """The array of a ``.npy`` whose header and size were checked: memory-mapped when ``mmap``
    (native-order, C-order data is then never copied), else read into memory."""
    offset = fh.tell()
    need = math.prod(shape) * dtype.itemsize
    native = dtype.isnative or dtype.itemsize == 1
    if mmap and native and not fortran:  # copy-on-write: writable for targets that want it, never written back
        return np.memmap(fh, dtype=dtype, mode="c", offset=offset, shape=shape, order="C")
    if need > MAX_INPUT_BYTES:
        raise InputError(f"{path} holds {gib(need)} of data to convert (byte order or Fortran order), more than the "
                         f"{gib(MAX_INPUT_BYTES)} kdedge loads at once; save it with numpy.save from a C-order array")
    arr = np.frombuffer(fh.read(need), dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return np.ascontiguousarray(arr.astype(dtype.newbyteorder("="), copy=False))


def _load_npy(path: Path, bundle: Any) -> Inputs:
    spec = as_spec(bundle)
    c, (h, w) = spec.in_channels, spec.input_size
    where = str(path)
    with _open(path, "input") as fh:
        shape, fortran, dtype = _npy_header(fh, path)
        if dtype.hasobject:
            raise InputError(f"{path} holds Python objects (dtype {dtype}); object arrays are refused (they would "
                             "need unpickling); save a uint8 or float32 array")
        if dtype.kind == "u" and dtype.itemsize == 1 and dtype.fields is None:
            n, ih, iw = raw_layout(shape, c, spec.channel_order, where)
            _check_npy_size(fh, path, shape, dtype)
            check_raw(n, ih, iw, spec, where)
            x = preprocess(_npy_data(fh, path, shape, fortran, dtype, mmap=False), spec, where=where)
        elif dtype.kind == "f" and dtype.itemsize == 4 and dtype.fields is None:
            batch = (1, *shape) if len(shape) == 3 else shape
            if len(batch) != 4:
                raise InputError(f"{path} has shape {list(shape)}; a float32 .npy must be the preprocessed model "
                                 f"input [N, {c}, {h}, {w}] (or [{c}, {h}, {w}])")
            _check_batch_shape(batch, np.dtype(np.float32), (c, h, w), where)
            _check_npy_size(fh, path, shape, dtype)
            x = _npy_data(fh, path, shape, fortran, dtype, mmap=True).reshape(batch)
        else:
            raise InputError(f"{path} has dtype {dtype}; the bundle takes uint8 raw images (HW, HWC, NHW, NHWC) or "
                             f"float32 preprocessed input [N, {c}, {h}, {w}]; convert with .astype(np.float32) or "
                             ".astype(np.uint8)")
    x = check_batch(x, (c, h, w), where=where)
    return Inputs(x, tuple(f"{path.name}[{i}]" for i in range(len(x))))


# ---------------------------------------------------------------------------------------------
# directories and the entry point


def list_images(path: str | Path) -> list[Path]:
    """The image files of directory ``path`` (by suffix, :data:`IMAGE_SUFFIXES`), sorted by name.

    Files of other types and subdirectories are ignored; an image name that is not a regular
    file (a FIFO, a device, a broken link) is refused rather than skipped, so that no input is
    silently left out.

    Raises:
        InputError: an image name that is not a regular file, more than :data:`MAX_INPUT_FILES`
            images, or an unreadable directory.
    """
    path = Path(path)
    files: list[Path] = []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if os.path.splitext(entry.name)[1].lower() not in IMAGE_SUFFIXES:
                    continue
                full = Path(entry.path)
                try:
                    mode = os.stat(full).st_mode  # follows links: a link to an image is an image
                except FileNotFoundError:
                    raise InputError(f"input {describe_path(full)}") from None
                if stat.S_ISDIR(mode):
                    continue
                if not stat.S_ISREG(mode):
                    raise InputError(f"input {full} is {file_kind(mode)}, not a regular file; kdedge reads only "
                                     "regular files (remove it from the directory)")
                files.append(full)
                if len(files) > MAX_INPUT_FILES:
                    raise InputError(f"directory {path} holds more than {MAX_INPUT_FILES:,} image files, more than "
                                     "kdedge reads at once; split them into several directories")
    except OSError as e:
        raise InputError(f"cannot read directory {path}: {e.strerror or e}") from None
    return sorted(files, key=lambda f: f.name)


def _load_dir(path: Path, bundle: Any) -> Inputs:
    spec = as_spec(bundle)
    c, (h, w) = spec.in_channels, spec.input_size
    files = list_images(path)
    if not files:
        raise InputError(f"directory {path} holds no image files ({', '.join(IMAGE_SUFFIXES[:5])}, …)")
    need = len(files) * c * h * w * 4
    if need > MAX_INPUT_BYTES:
        raise InputError(f"directory {path} holds {len(files)} images, {gib(need)} once preprocessed, more than "
                         f"the {gib(MAX_INPUT_BYTES)} kdedge loads at once; split them into several directories")
    size = None if spec.resize is not None else (h, w)
    x = np.empty((len(files), c, h, w), np.float32)  # filled in place: no list of arrays, no concatenation copy
    for i, f in enumerate(files):
        x[i] = preprocess(read_image(f, spec.channel_order, size), spec, where=str(f))[0]
    return Inputs(check_batch(x, (c, h, w), where=str(path)), tuple(f.name for f in files))


def load_inputs(path: str | Path, bundle: Any) -> Inputs:
    """Read an image file, a directory of images or a ``.npy`` file as a checked model batch.

    Args:
        path: the file or directory.
        bundle: the :class:`~kdedge.bundle.manifest.Bundle` (or its manifest dict) whose
            preprocessing and input shape apply.

    Raises:
        InputError: missing path, not a regular file or directory, unknown file type,
            unreadable image, empty directory, wrong dtype/shape/channels/size, NaN/inf, or
            beyond the bounds of the module docstring.
    """
    path = Path(path)
    spec = as_spec(bundle)
    c, (h, w) = spec.in_channels, spec.input_size
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(describe_path(path, "input")) from None
    except OSError as e:
        raise InputError(f"cannot read input {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        return _load_dir(path, bundle)
    if not stat.S_ISREG(mode):
        raise InputError(f"input {path} is {file_kind(mode)}, not a regular file or a directory; give an image "
                         "file, a directory of images or a .npy array")
    if path.suffix.lower() == ".npy":
        return _load_npy(path, bundle)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        size = None if spec.resize is not None else (h, w)
        x = preprocess(read_image(path, spec.channel_order, size), spec, where=str(path))
        return Inputs(check_batch(x, (c, h, w), where=str(path)), (path.name,))
    raise InputError(f"{path}: unknown input type {path.suffix or '(no suffix)'}; give an image file, a directory "
                     "of images or a .npy array")
