"""``kdedge inspect``: a bundle's manifest as a table (or JSON)."""

from __future__ import annotations

from pathlib import Path

import typer

from kdedge.cli.common import handle_errors, print_json

HELP = """Show a bundle: stages, members, FLOPs, accuracy per stage, files, sizes and the
verification result. The manifest and every checksum are verified first.

Examples:

  kdedge inspect hne.kdedge

  kdedge inspect hne.kdedge --json
"""


@handle_errors
def command(
    bundle: Path = typer.Argument(..., help="A bundle directory (from kdedge export)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    from kdedge.export.inspect import format_inspect, inspect_bundle

    info = inspect_bundle(bundle)
    if json_out:
        print_json(info)
    else:
        typer.echo(format_inspect(info))
