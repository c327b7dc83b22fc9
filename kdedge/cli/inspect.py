"""``kdedge inspect``: a bundle's manifest as a table (or JSON)."""

from __future__ import annotations

from pathlib import Path

import typer

from kdedge.cli.common import USER_ERRORS, fail, handle_errors, one_line, print_json

HELP = """Show a bundle: stages, members, FLOPs, accuracy per stage, files, sizes and the
verification result. The manifest and every checksum are verified first. A damaged bundle (a
file missing, modified or not a regular file) or one whose verification failed is still shown,
then the command exits with status 2, so `kdedge inspect B && deploy B` never ships it; --json
prints the summary with its "status" and "problems" either way (for a path that is not a
readable bundle at all: {"bundle", "status": "unreadable", "problems": [the reason]}).

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

    try:
        info = inspect_bundle(bundle)
    except USER_ERRORS as e:
        if not json_out:
            raise
        print_json({"bundle": str(bundle), "status": "unreadable", "problems": [one_line(e)]})
        fail(one_line(e))
    if json_out:
        print_json(info)
    else:
        typer.echo(format_inspect(info))
    if info["status"] != "ok":
        more = f" (and {len(info['problems']) - 1} more)" if len(info["problems"]) > 1 else ""
        fail(f"{info['problems'][0]}{more} (status: {info['status']})")
