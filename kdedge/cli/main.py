"""The ``kdedge`` entry point. Each command lives in its own module and imports heavy
libraries (torch, onnxruntime) only when it runs, so ``kdedge --help`` is instant."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="kdedge",
    help="Train distilled anytime networks, export them sliced into stages, and run them on the "
    "device under latency, power or energy budgets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# command name -> (module, short help). Modules define `command` and `HELP`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("kdedge.cli.train", "Train a model (baseline, hne, ahbf, multiexit)."),
    "eval": ("kdedge.cli.eval", "Accuracy per stage of a run or a bundle."),
    "export": ("kdedge.cli.export", "Slice a trained run into stages and write a verified bundle."),
    "run": ("kdedge.cli.run", "Run a bundle on inputs under a deadline / confidence budget."),
    "profile": ("kdedge.cli.profile", "Measure latency (and energy) per stage of a bundle on this device."),
    "inspect": ("kdedge.cli.inspect", "Show a bundle's manifest: stages, members, FLOPs, accuracy, files."),
    "build": ("kdedge.cli.build", "Compile a bundle's ONNX stages for a device target (TensorRT) and add them."),
    "doctor": ("kdedge.cli.doctor", "What this machine can train on and run."),
    "serve": ("kdedge.cli.serve", "Serve a bundle over HTTP: batched, each request as deep as its deadline allows."),
}


def reflow(text: str) -> str:
    """``text`` with each prose paragraph on one line, so that the terminal wraps it.

    The help renderer keeps the single line breaks of every paragraph after the first, then
    wraps those lines again at the terminal's width: source lines of 96 characters came out
    at 80 columns as a full line and a stub of two words. Paragraphs that are laid out by hand
    (a line that starts with a space, or columns aligned with runs of spaces: examples,
    tables) keep their lines.
    """
    paragraphs = text.strip("\n").split("\n\n")
    out = []
    for par in paragraphs:
        lines = par.split("\n")
        laid_out = any(ln.startswith((" ", "\t")) or "   " in ln.strip() for ln in lines)
        out.append(par if laid_out else " ".join(ln.strip() for ln in lines))
    return "\n\n".join(out)


def _register() -> None:
    for name, (module_name, short) in COMMANDS.items():
        module = importlib.import_module(module_name)
        app.command(name, help=reflow(getattr(module, "HELP", short)), short_help=short)(module.command)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
