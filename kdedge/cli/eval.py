"""``kdedge eval``: accuracy of a trained run (torch) or of a bundle (its runtime), per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from kdedge.cli.common import err, handle_errors, out, print_json

HELP = """Evaluate a run directory (torch) or a bundle (onnxruntime) on a dataset split.

Prints accuracy of the deployed prediction and, for anytime models, after every stage;
writes a PNG of accuracy vs FLOPs next to the run when the method reports curves.

Examples:

  kdedge eval runs/hne-demo --data mnist5k

  kdedge eval runs/hne-demo --split val --json
"""


def _is_bundle(path: Path) -> bool:
    return (path / "manifest.json").is_file()


@handle_errors
def command(
    path: Path = typer.Argument(..., help="A run directory (from kdedge train) or a bundle (from kdedge export)."),
    data: Optional[str] = typer.Option(None, help="Dataset name (default: the one the model was trained on)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Directory of cifar10/cifar100/imagefolder data."),
    split: str = typer.Option("test", help="test or val."),
    plot: Optional[Path] = typer.Option(None, help="Where to write the accuracy-vs-FLOPs PNG (default: RUN/eval-SPLIT.png)."),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    if split not in ("test", "val"):
        raise ValueError(f"--split must be test or val, got {split!r}")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if plot is not None:
        _check_plot_path(plot)
    if _is_bundle(path):
        result = _eval_bundle(path, data, data_root, split)
    else:
        result = _eval_run(path, data, data_root, split, plot)
    if json_out:
        print_json(result)
    else:
        _print(result)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_plot_path(plot: Path) -> None:
    """Before any work: ``--plot`` names a new file or an earlier plot (a PNG) in an existing
    directory; anything else already there (the run's weights, a user's file) is never replaced."""
    if plot.is_dir():
        raise ValueError(f"--plot {plot} is a directory; give the PNG file's path")
    if not plot.parent.is_dir():
        raise ValueError(f"--plot {plot}: the directory {plot.parent} does not exist")
    if plot.is_symlink() or (plot.exists() and not _is_png(plot)):
        raise ValueError(f"--plot {plot} exists and is not a PNG plot; it is left as it is: give a new path")


def _is_png(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with path.open("rb") as f:
            return f.read(8) == PNG_MAGIC
    except OSError:
        return False


def _split_dataset(cfg_data: Any, seed: int, data: Optional[str], data_root: Optional[str], split: str) -> Any:
    import dataclasses

    from kdedge.train.data import load_data

    dcfg = dataclasses.replace(cfg_data, **({"name": data} if data else {}), **({"root": data_root} if data_root else {}))
    splits = load_data(dcfg, seed)
    return splits, getattr(splits, split)


def _check_compatible(info: Any, trained: Any) -> None:
    from kdedge.bundle.inputs import class_mismatch

    if (info.num_classes, info.in_channels, tuple(info.input_size)) != (trained.num_classes, trained.in_channels, tuple(trained.input_size)):
        raise ValueError(f"dataset {info.name} ({info.num_classes} classes, {info.in_channels}x{tuple(info.input_size)}) does not fit "
                         f"the model trained on {trained.name} ({trained.num_classes} classes, {trained.in_channels}x{tuple(trained.input_size)})")
    why = class_mismatch(info.class_names, trained.class_names)
    if why is not None:
        raise ValueError(f"dataset {info.name} does not fit the model trained on {trained.name}: {why}; its accuracy "
                         f"would be scored against the wrong labels")


def _eval_run(path: Path, data: Optional[str], data_root: Optional[str], split: str, plot: Optional[Path]) -> dict[str, Any]:
    import torch

    from kdedge.train.data import make_loader
    from kdedge.train.run import load_trained
    from kdedge.train.task import get_task_class

    run = load_trained(path, data_root=data_root)
    splits, ds = _split_dataset(run.config.data, run.config.seed, data, None, split)
    _check_compatible(splits.info, run.info)
    bs = run.config.data.eval_batch_size
    loader = make_loader(ds, bs, train=False)
    task = get_task_class(run.config.method)(run.config.loss, num_classes=run.info.num_classes,
                                             epochs=run.config.train.epochs, steps_per_epoch=1)
    from kdedge.cli.progress import make_progress

    with make_progress() as prog:
        tid = prog.add_task(f"eval {split}", total=len(loader), info="")
        loader = _Counting(loader, lambda: prog.update(tid, advance=1))
        if split == "test":  # prediction modes fitted on val, scored on test
            metrics = task.evaluate_final(run.model, make_loader(splits.val, bs, train=False), loader, torch.device("cpu"))
        else:
            metrics = task.evaluate(run.model, loader, torch.device("cpu"))
    result: dict[str, Any] = {"run_dir": str(path), "method": run.config.method, "model": run.config.model.name,
                              "data": splits.info.name, "split": split, **metrics}
    if metrics.get("curves"):
        from kdedge.train.plots import plot_curves

        png = plot or path / f"eval-{split}.png"
        plot_curves(metrics["curves"], png, title=f"{run.config.method} on {splits.info.name} ({split})")
        result["plot"] = str(png)
    return result


class _Counting:
    """Wrap a loader to tick a progress bar per batch."""

    def __init__(self, loader: Any, tick: Any) -> None:
        self.loader, self.tick = loader, tick

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        for batch in self.loader:
            yield batch
            self.tick()


def _eval_bundle(path: Path, data: Optional[str], data_root: Optional[str], split: str) -> dict[str, Any]:
    try:
        from kdedge.export.evaluate import evaluate_bundle_on_data
    except ImportError:
        from kdedge.cli.common import NotYetAvailable

        raise NotYetAvailable("evaluating a bundle is not available yet in this version of kdedge") from None
    return evaluate_bundle_on_data(path, data=data, data_root=data_root, split=split)


def _print(result: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    head = escape(f"{result.get('method', result.get('family', ''))} on {result.get('data')} [{result.get('split')}]")
    out.print(f"[bold]{head}[/]: accuracy {100 * result['accuracy']:.2f}% (n={result.get('n', '?')})", highlight=False)
    stages = result.get("stages")
    if stages:
        keys = [k for k in stages[0] if k.startswith("accuracy")]
        t = Table(title="per stage")
        for col in ["stage", "members", *keys, *(["macs"] if "macs" in stages[0] else [])]:
            t.add_column(col, justify="right")
        for s in stages:
            t.add_row(str(s["stage"]), str(s.get("members", "")), *[f"{100 * s[k]:.2f}%" for k in keys],
                      *([f"{s['macs'] / 1e6:.2f} M"] if "macs" in s else []))
        out.print(t)
    for key, value in result.items():
        if key in ("stages", "curves", "accuracy", "n", "method", "data", "split", "run_dir", "model", "plot"):
            continue
        if isinstance(value, (int, float, str)):
            out.print(f"{key}: {value}", highlight=False)
        elif isinstance(value, (list, dict)) and len(str(value)) < 200:
            out.print(f"{key}: {value}", highlight=False)
    if "plot" in result:
        err.print(f"plot: {result['plot']}", highlight=False)
