"""The input rule a model was trained with, in numpy (plus Pillow when a resize is needed).

This module (stdlib + numpy; Pillow for resizes) imports neither torch nor torchvision: the runtime and the bundle apply the same rule
on a device that has numpy only. The eval transform of every dataset in ``kdedge.train.data``
produces the same numbers (tests compare them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from kdedge.train.data.config import DatasetInfo


class InputError(ValueError):
    """An input image/batch that does not fit the model's preprocessing rule."""


def _error(msg: str) -> ValueError:
    return InputError(msg)


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(H, W) after resizing the shorter side to ``short`` (torchvision's rounding: truncate the long side)."""
    if height < 1 or width < 1:
        raise _error(f"cannot resize an empty image of {height}x{width} pixels")
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def resize_center_crop(image: np.ndarray, resize: int, size: tuple[int, int]) -> np.ndarray:
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
        image = np.asarray(pil.resize((new_w, new_h), resample=Image.BILINEAR))
        image = image.reshape(new_h, new_w, c)
    crop_h, crop_w = size
    if crop_h > new_h or crop_w > new_w:
        raise _error(f"center crop {size} does not fit in the resized image {(new_h, new_w)}")
    top = int(round((new_h - crop_h) / 2.0))
    left = int(round((new_w - crop_w) / 2.0))
    return image[top : top + crop_h, left : left + crop_w]


def _as_nhwc(raw: np.ndarray, channels: int) -> np.ndarray:
    arr = np.asarray(raw)
    if arr.ndim == 2:  # one grey image, HW
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        if arr.shape[-1] == channels:  # one image, HWC
            arr = arr[None]
        elif channels == 1 and arr.shape[-1] not in (3, 4):  # a grey batch, NHW (a last axis of 3/4 is colour)
            arr = arr[..., None]
        else:
            raise _error(f"preprocess: the model expects {channels} channel(s), the input has shape {arr.shape} "
                         "(read as HWC); pass HW/HWC images or NHWC batches with the model's channels")
    elif arr.ndim != 4:
        raise _error(f"preprocess: expected an HW/HWC image or an NHWC batch, got shape {arr.shape}")
    if arr.shape[-1] != channels:
        raise _error(f"preprocess: the model expects {channels} channel(s), the input has {arr.shape[-1]} "
                     f"(shape {arr.shape}, channels last)")
    if arr.shape[0] < 1 or arr.shape[1] < 1 or arr.shape[2] < 1:  # a resize would divide by the empty side
        raise _error(f"preprocess: the input holds no pixels (shape {arr.shape}); pass at least one non-empty image")
    return arr


def preprocess(raw: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Raw image(s) to the normalised float32 NCHW batch the model was trained on.

    Args:
        raw: a uint8 image (HW grey, or HWC) or a batch (NHWC; NHW for grey), in the dataset's
            raw value range (0..255; 0..16 for ``digits``). Channels in ``info.channel_order``.
        info: the dataset info of the model (from training or from a bundle manifest).

    Returns:
        float32 array [N, C, H, W] (N = 1 for a single image).

    Example:
        >>> x = preprocess(np.zeros((28, 28), np.uint8), splits.info)   # -> (1, 1, 28, 28)
    """
    arr = _as_nhwc(raw, info.in_channels)
    if info.resize is not None:
        if arr.dtype != np.uint8:
            raise _error(f"preprocess: resizing needs uint8 images, got {arr.dtype}")
        arr = np.stack([resize_center_crop(img, info.resize, info.input_size) for img in arr])
    elif tuple(arr.shape[1:3]) != tuple(info.input_size):
        raise _error(f"preprocess: images are {tuple(arr.shape[1:3])}, the model expects {tuple(info.input_size)} "
                     "(H, W); resize them first")
    mean = np.asarray(info.mean, dtype=np.float32)
    std = np.asarray(info.std, dtype=np.float32)
    x = arr.astype(np.float32) * np.float32(info.scale)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
