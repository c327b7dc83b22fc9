"""Old home of the bundle writer; it lives in :mod:`kdedge.bundle.writer` (shared by export and
``kdedge build``). Kept as a re-export for one release."""

from __future__ import annotations

from kdedge.bundle.writer import (
                                  BundleDir,
                                  base_manifest,
                                  check_destination,
                                  file_entry,
                                  is_bundle_dir,
                                  package_version,
                                  provenance,
                                  recover,
)

__all__ = ["BundleDir", "base_manifest", "check_destination", "file_entry", "is_bundle_dir", "package_version",
           "provenance", "recover"]
