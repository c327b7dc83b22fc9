"""The bundle contract, in one place and without torch: what export writes, ``kdedge build`` adds
to, and the device reads (docs/bundle.md).

- :mod:`~kdedge.bundle.names`: format constants, the binding grammar, graph tensor names;
- :mod:`~kdedge.bundle.combine`: the combine rules (one implementation: export's metrics and
  verification, the runner and the exit policies use it);
- :mod:`~kdedge.bundle.inputs`: the input spec and the one ``preprocess``;
- :mod:`~kdedge.bundle.manifest` / :mod:`~kdedge.bundle.validate`: reading and verifying a
  manifest and its files (``open_bundle``);
- :mod:`~kdedge.bundle.writer`: writing a bundle atomically (export and ``kdedge build``);
- :mod:`~kdedge.bundle.chain`: running stage graphs in order, feeding outputs to later inputs;
- :mod:`~kdedge.bundle.profile`: the latency/energy profile files kept beside a bundle.

numpy, jsonschema and the standard library only.

Example:
    >>> from kdedge.bundle import open_bundle, preprocess
    >>> b = open_bundle("model.kdedge")
    >>> x = preprocess(image, b.input_info)
"""

from __future__ import annotations

from kdedge.bundle.combine import COMBINE_RULES, Running  # combine() itself: kdedge.bundle.combine.combine
from kdedge.bundle.errors import BundleError, BundleVersionError, ChecksumError, ExportError
from kdedge.bundle.inputs import InputError, InputSpec, preprocess
from kdedge.bundle.manifest import Bundle, FileEntry, StageEntry, TensorEntry, open_bundle, read_manifest
from kdedge.bundle.names import INPUT, MANIFEST, SCHEMA_VERSION, output_tensor_name, tensor_name

__all__ = [
    "Bundle", "BundleError", "BundleVersionError", "COMBINE_RULES", "ChecksumError", "ExportError", "FileEntry", "INPUT",
    "InputError", "InputSpec", "MANIFEST", "Running", "SCHEMA_VERSION", "StageEntry", "TensorEntry", "open_bundle",
    "output_tensor_name", "preprocess", "read_manifest", "tensor_name",
]
