"""The one error type of the export layer: :class:`kdedge.bundle.errors.ExportError` (its home is
the bundle layer, whose writer ``kdedge build`` shares on the device)."""

from __future__ import annotations

from kdedge.bundle.errors import ExportError

__all__ = ["ExportError"]
