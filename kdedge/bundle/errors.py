"""The errors of the bundle layer: reading, verifying and writing bundles."""

from __future__ import annotations

from typing import Any

__all__ = ["BundleError", "BundleVersionError", "ChecksumError", "ExportError"]


class BundleError(ValueError):
    """A bundle that cannot be used: missing, malformed, tampered with, or of another format."""


class BundleVersionError(BundleError):
    """A bundle written with a newer manifest schema than this kdedge reads."""


class ChecksumError(BundleError):
    """A bundle file whose content differs from the sha256 recorded in the manifest."""


class ExportError(ValueError):
    """An export (or ``kdedge build``) that cannot be done or did not pass its checks, including a
    bundle that cannot be written where asked.

    The first line of the message says what is wrong and how to fix it; a failed verification
    or INT8 gate appends its report as a table. ``report`` holds the report dict when there is one.
    """

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report

    @property
    def summary(self) -> str:
        """The first line of the message (for one-line CLI errors)."""
        return str(self).splitlines()[0] if str(self) else ""
