"""Commands whose capability is not built yet: they say so and exit 3, never pretend."""

from __future__ import annotations

from pathlib import Path

import typer

from kdedge.cli.common import NotYetAvailable, handle_errors


def _pending(name: str, what: str):  # type: ignore[no-untyped-def]
    @handle_errors
    def command(bundle: Path = typer.Argument(..., help="Bundle or run directory.")) -> None:
        raise NotYetAvailable(f"'kdedge {name}' ({what}) is not available yet in this version of kdedge")

    return command
