"""Old home of the regular-file checks; they live in :mod:`kdedge.bundle.files`. Kept as a
re-export for one release."""

from __future__ import annotations

from kdedge.bundle.files import NotRegularFile, describe_path, file_kind, open_regular

__all__ = ["NotRegularFile", "describe_path", "file_kind", "open_regular"]
