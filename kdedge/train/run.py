"""A finished run directory, read back: the model with its weights, config and data facts.

Layout written by ``fit()``::

    RUN_DIR/config.yaml          the resolved config (the run's identity)
    RUN_DIR/metrics.jsonl        one JSON record per epoch
    RUN_DIR/checkpoints/         checkpoint.json + ckpt-eNNNN.{json,model.safetensors,optim.safetensors}
    RUN_DIR/model.safetensors    final weights (present only when the run finished)
    RUN_DIR/run.json             status, dataset info, val and test metrics
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kdedge.train.config import RunConfig, config_from_dict, read_yaml


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


def _check_finished(run_dir: Path) -> dict[str, Any]:
    """run.json of a finished run; otherwise a RunError that says what ``run_dir`` is instead."""
    from kdedge.io import read_json_strict
    from kdedge.train.rundir import inspect_run_dir

    state = inspect_run_dir(run_dir)
    if state.kind == "missing":
        raise RunError(f"run directory {run_dir} does not exist")
    if state.kind == "file":
        raise RunError(f"{run_dir} is a file, not a run directory (kdedge train --out writes one)")
    if state.kind in ("empty", "foreign"):
        raise RunError(f"{run_dir} is not a kdedge run directory (no config.yaml)")
    if state.kind == "failed_start":
        raise RunError(f"{run_dir} holds no finished training run: it stopped before its first checkpoint; "
                       f"train it again with: kdedge train --out {run_dir} ...")
    status_path = run_dir / "run.json"
    if status_path.exists():
        try:
            status = read_json_strict(status_path)
        except (ValueError, OSError) as e:
            raise RunError(f"{status_path} is damaged ({e}); rewrite it with: kdedge train --out {run_dir} "
                           f"--resume") from None
    else:
        status = {}
    weights = run_dir / "model.safetensors"
    if not isinstance(status, dict) or status.get("status") != "finished" or not weights.is_file():
        raise RunError(f"{run_dir} holds no finished training run (no final weights); "
                       f"finish it with: kdedge train --out {run_dir} --resume")
    if not isinstance(status.get("data_info"), dict):
        raise RunError(f"{status_path} is damaged (no data_info record)")
    return status


def load_trained(run_dir: str | Path, data_root: str | None = None) -> TrainedRun:
    """Load a finished run: rebuild the model from its config and load its final weights.

    ``data_root`` replaces the recorded dataset directory (a run moved to another machine).

    Raises:
        RunError: ``run_dir`` is not a finished run (missing, a file, a failed or unfinished
            run) or one of its files is damaged; the message names the file.

    Example:
        >>> run = load_trained("runs/hne-demo"); run.model(x)
    """
    from kdedge.io import sha256_file
    from kdedge.models import create_model
    from kdedge.train.checkpoint import CheckpointError, load_weights
    from kdedge.train.data import DataError, DatasetInfo

    run_dir = Path(run_dir)
    status = _check_finished(run_dir)
    raw = read_yaml(run_dir / "config.yaml")
    if data_root is not None:
        if not isinstance(raw.get("data", {}), dict):
            raise RunError(f"{run_dir / 'config.yaml'} is damaged (its data section is not a mapping)")
        raw.setdefault("data", {})["root"] = data_root
    cfg = config_from_dict(raw)
    try:
        info = DatasetInfo.from_dict(status["data_info"])
    except DataError as e:
        raise RunError(f"{run_dir / 'run.json'} is damaged ({e})") from None
    weights = run_dir / "model.safetensors"
    want = status.get("model_sha256")
    if isinstance(want, str) and sha256_file(weights) != want:
        raise RunError(f"{weights} is damaged (its sha256 differs from the one in run.json)")
    model = create_model(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_channels,
                         input_size=tuple(info.input_size), **cfg.model.args)
    try:
        load_weights(model, weights)
    except CheckpointError as e:
        raise RunError(str(e)) from None
    model.eval()
    return TrainedRun(run_dir=run_dir, config=cfg, info=info, model=model, status=status)
