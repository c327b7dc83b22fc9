"""The ``kdedge`` command line: one thin typer module per command."""
