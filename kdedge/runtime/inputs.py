"""Inputs for the runner: image files, directories of images and ``.npy`` batches, preprocessed by
the bundle's rule. They are read by :mod:`kdedge.bundle.input_files` (``kdedge build`` calibrates
from the same files); this module is the runtime's name for them."""

from __future__ import annotations

from kdedge.bundle.input_files import (IMAGE_SUFFIXES, LOSSY_FORMATS, MAX_IMAGE_PIXELS, MAX_INPUT_BYTES, MAX_INPUT_FILES,
                                       PNG_SIGNATURE, InputError, Inputs, check_batch, deep_png, grey_of, list_images,
                                       load_inputs, png_header, preprocess, read_image)

__all__ = ["IMAGE_SUFFIXES", "InputError", "Inputs", "LOSSY_FORMATS", "MAX_IMAGE_PIXELS", "MAX_INPUT_BYTES",
           "MAX_INPUT_FILES", "PNG_SIGNATURE", "check_batch", "deep_png", "grey_of", "list_images", "load_inputs",
           "png_header", "preprocess", "read_image"]
