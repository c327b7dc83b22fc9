"""``kdedge train``: train a model with one of the methods, on one process or under torchrun."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from kdedge.cli.common import err, handle_errors, print_json

HELP = """Train an anytime model (or a plain baseline) on a dataset.

Examples:

  kdedge train --method hne --config configs/hne_mnist_demo.yaml --out runs/hne-demo

  kdedge train --data digits --epochs 3 --out runs/baseline --set optim.lr=0.05

  torchrun --nproc_per_node=2 -m kdedge.cli.main train --config configs/hne_mnist_demo.yaml --out runs/ddp
"""


@handle_errors
def command(
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to create (or to resume with --resume)."),
    method: Optional[str] = typer.Option(None, help="Training method: baseline, hne, ahbf, multiexit (default: the recipe's, else baseline)."),
    data: Optional[str] = typer.Option(None, help="Dataset: mnist5k, digits, cifar10, cifar100, imagefolder, synthetic."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Directory of cifar10/cifar100/imagefolder data (never downloaded)."),
    epochs: Optional[int] = typer.Option(None, help="Number of training epochs."),
    model: Optional[str] = typer.Option(None, help="Model registry name, e.g. small_cnn, resnet20, resnet32, "
                                                   "mobilenetv2, hne, ahbf, msdnet, multiexit (an unknown name lists "
                                                   "them all)."),
    seed: Optional[int] = typer.Option(None, help="Seed of splits, initialisation and data order."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML recipe (see configs/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set optim.lr=0.05 (repeatable)."),
    resume: bool = typer.Option(False, help="Continue the unfinished run in --out from its last checkpoint."),
    json_out: bool = typer.Option(False, "--json", help="Print the final result as JSON on stdout."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    from kdedge.config import apply_override, read_yaml, resolve, set_key
    from kdedge.train.task import get_task_class

    if epochs is not None and epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {epochs}")
    raw: dict[str, Any] = {}
    if config is not None:
        raw = read_yaml(config)
    elif resume and (out / "config.yaml").is_file():
        raw = read_yaml(out / "config.yaml")  # resuming: the run's own recipe
    recipe_model = raw["model"].get("name") if isinstance(raw.get("model"), dict) else None  # else refused below
    if method is not None and config is None and not resume:
        raw["model"] = dict(get_task_class(method).default_model)  # the method's default architecture
    typed = {"method": method, "data.name": data, "data.root": data_root, "train.epochs": epochs,
             "model.name": model, "seed": seed, "train.device": device}
    for key, value in typed.items():
        if value is not None:
            set_key(raw, key, value)
    if model is not None and model != recipe_model:
        raw["model"]["args"] = {}  # a recipe's model args belong to the recipe's model
    for item in set_:
        apply_override(raw, item)
    cfg = resolve(raw)

    from kdedge.train.engine import fit

    main_rank = int(os.environ.get("RANK", "0")) == 0
    if quiet or json_out or not main_rank:
        result = fit(cfg, out, resume=resume, reporter=_MessagesOnly())
    else:
        from kdedge.cli.progress import RichReporter

        with RichReporter() as rep:
            result = fit(cfg, out, resume=resume, reporter=rep)
    if not main_rank:
        return
    if json_out:
        print_json({"run_dir": str(out), **result})
        return
    test = result.get("test", {})
    err.print(f"finished: {out}  test accuracy {100 * test.get('accuracy', float('nan')):.2f}% "
              f"(n={test.get('n', '?')})", highlight=False)


class _MessagesOnly:
    """No progress bar (``--quiet``, ``--json``), but the engine's messages still reach stderr: a
    resume that fell back to an older checkpoint must say so."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, losses: dict[str, float]) -> None: ...
    def epoch_end(self, epoch: int, record: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None:
        from rich.markup import escape

        err.print(f"[dim]{escape(text)}[/]", highlight=False, soft_wrap=True)
