"""A finished run directory, read back: the model with its weights, config and data facts.

Layout written by ``fit()``::

    RUN_DIR/config.yaml          the resolved config (the run's identity)
    RUN_DIR/metrics.jsonl        one JSON record per epoch
    RUN_DIR/checkpoints/         checkpoint.json + ckpt-eNNNN.{model,optim}.safetensors
    RUN_DIR/model.safetensors    final weights (present only when the run finished)
    RUN_DIR/run.json             status, dataset info, val and test metrics
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kdedge.config import RunConfig, config_from_dict, read_yaml


class RunError(ValueError):
    """A run directory that cannot be used (missing, unfinished, damaged)."""


@dataclass
class TrainedRun:
    run_dir: Path
    config: RunConfig
    info: Any  # kdedge.train.data.DatasetInfo
    model: nn.Module
    status: dict[str, Any]

    def splits(self) -> Any:
        """The run's data splits (same seed, same split as in training)."""
        from kdedge.train.data import load_data

        return load_data(self.config.data, self.config.seed)


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def load_trained(run_dir: str | Path, data_root: str | None = None) -> TrainedRun:
    """Load a finished run: rebuild the model from its config and load its final weights.

    ``data_root`` replaces the recorded dataset directory (a run moved to another machine).

    Example:
        >>> run = load_trained("runs/hne-demo"); run.model(x)
    """
    from kdedge.models import create_model
    from kdedge.train.checkpoint import load_weights
    from kdedge.train.data import DatasetInfo

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir} is not a kdedge run directory (no config.yaml)")
    status_path = run_dir / "run.json"
    weights = run_dir / "model.safetensors"
    status = json.loads(status_path.read_text()) if status_path.is_file() else {}
    if status.get("status") != "finished" or not weights.is_file():
        raise RunError(f"{run_dir} holds no finished training run (no final weights); "
                       f"finish it with: kdedge train --out {run_dir} --resume")
    raw = read_yaml(run_dir / "config.yaml")
    if data_root is not None:
        raw.setdefault("data", {})["root"] = data_root
    cfg = config_from_dict(raw)
    info = DatasetInfo.from_dict(status["data_info"])
    model = create_model(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_channels,
                         input_size=tuple(info.input_size), **cfg.model.args)
    load_weights(model, weights)
    model.eval()
    return TrainedRun(run_dir=run_dir, config=cfg, info=info, model=model, status=status)
