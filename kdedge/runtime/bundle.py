"""Old home of bundle reading; it lives in :mod:`kdedge.bundle`. Kept as a re-export for one release."""

from __future__ import annotations

from kdedge.bundle.combine import combine, softmax
from kdedge.bundle.errors import BundleError, BundleVersionError, ChecksumError
from kdedge.bundle.files import package_files, path_bytes, sha256_path
from kdedge.bundle.inputs import InputSpec as InputInfo
from kdedge.bundle.manifest import Bundle, FileEntry, StageEntry, TensorEntry, read_manifest
from kdedge.bundle.names import (
                                 COMBINE_RULES,
                                 FORMAT,
                                 INPUT,
                                 MANIFEST,
                                 PRECISIONS,
                                 SCHEMA_VERSION,
                                 output_tensor_name,
                                 safe_name,
                                 tensor_name,
)
from kdedge.bundle.validate import check_entry, check_version, validate_manifest, verify_files
from kdedge.targets import missing_target_message, open_bundle

__all__ = ["Bundle", "BundleError", "BundleVersionError", "COMBINE_RULES", "ChecksumError", "FORMAT", "FileEntry",
           "INPUT", "InputInfo", "MANIFEST", "PRECISIONS", "SCHEMA_VERSION", "StageEntry", "TensorEntry", "check_entry",
           "check_version", "combine", "missing_target_message", "open_bundle", "output_tensor_name", "package_files",
           "path_bytes", "read_manifest", "safe_name", "sha256_path", "softmax", "tensor_name", "validate_manifest",
           "verify_files"]
