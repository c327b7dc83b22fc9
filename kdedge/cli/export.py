"""``kdedge export``: not built yet."""

from __future__ import annotations

from kdedge.cli.pending import _pending

HELP = "Not available yet in this version of kdedge."
command = _pending("export", "export")
