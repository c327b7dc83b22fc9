"""Commands print their answer, not the import noise of the libraries they look at."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_anytime import digits, trained_toy

NOISE = ("Failed to load", "has not been tested", "is not supported", "Traceback", "Warning")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KDEDGE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "kdedge.cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _no_noise(res: subprocess.CompletedProcess) -> None:
    for needle in NOISE:
        assert needle not in res.stderr and needle not in res.stdout, (needle, res.stderr[-2000:])


def test_doctor_prints_no_import_noise() -> None:
    pytest.importorskip("coremltools")
    res = _cli("doctor")
    assert res.returncode == 0, res.stderr
    assert "coremltools" in res.stdout and "INT8 on this CPU" in res.stdout
    _no_noise(res)


@pytest.mark.slow
def test_inspect_of_a_coreml_bundle_prints_no_import_noise(tmp_path: Path) -> None:
    pytest.importorskip("coremltools")
    from kdedge.export import export

    _, _, xv, yv, info = digits()
    path = export(trained_toy(False), tmp_path / "ml.kdedge", info=info, val_data=(xv[:64], yv[:64]), target="coreml")
    for args in (("inspect", str(path)), ("inspect", str(path), "--json")):
        res = _cli(*args)
        assert res.returncode == 0, res.stderr
        _no_noise(res)
