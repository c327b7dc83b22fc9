"""Old home of the input rule; it lives in :mod:`kdedge.bundle.inputs` (one implementation for
training, export and the device). Kept as a re-export for one release."""

from __future__ import annotations

from kdedge.bundle.inputs import InputError, preprocess, resize_center_crop, resized_size

__all__ = ["InputError", "preprocess", "resize_center_crop", "resized_size"]
