"""Two-process DDP training on CPU (gloo) under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.ddp
def test_torchrun_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "kdedge.cli.main", "train", "--out", str(out), "--quiet",
           "--set", "data.name=synthetic", "--set", "data.batch_size=16", "--set", "model.name=small_cnn",
           "--set", "model.args.width=4", "--set", "train.epochs=2", "--set", "train.device=cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "finished"
    assert status["world_size"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]  # rank 0 alone logs: one record per epoch


@pytest.mark.ddp
def test_a_refusal_on_rank_0_ends_every_rank(tmp_path: Path) -> None:
    """Rank 0 alone takes the run directory; when it cannot (here: another kdedge train holds its
    lock), the other ranks must hear of it and stop instead of waiting at a barrier forever."""
    from kdedge.train.rundir import RunDirLock

    out = tmp_path / "busy"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")  # a failed start: every rank's read-only check passes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "kdedge.cli.main", "train", "--out", str(out), "--quiet",
           "--set", "data.name=synthetic", "--set", "data.batch_size=16", "--set", "model.args.width=4",
           "--set", "train.epochs=1", "--set", "train.device=cpu"]
    lock = RunDirLock(out)
    lock.acquire()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    assert proc.returncode != 0
    assert "in use by another kdedge train" in proc.stderr
    assert "rank 0 could not take the run directory" in proc.stderr
    assert (out / "config.yaml").read_text() == "seed: 0\n"
