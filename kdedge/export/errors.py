"""The one error type of the export layer."""

from __future__ import annotations

from typing import Any


class ExportError(ValueError):
    """An export that cannot be done or did not pass its checks.

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
