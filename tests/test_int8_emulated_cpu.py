"""INT8 bundles on a CPU this machine is not: x86 without VNNI, emulated by qemu-user.

onnxruntime picks its INT8 kernel from the CPU it runs on, so a bundle that passes the export
gate on a VNNI machine can still clip on an AVX2 device (kdedge.export.quantize). qemu-user
(``apt install qemu-user``) runs the same Python and onnxruntime with a CPU model's cpuid, so
onnxruntime takes the AVX2 path here whatever the host has. The checks: the default scheme
computes the same on the emulated CPU as on this one, and a full-range ``u8s8`` bundle visibly
does not compute there what its graph says (which shows the emulation does reach the saturating
kernel). That reference is the graph run without onnxruntime's optimisations (float
convolutions of the dequantised weights), not this CPU's run: an AVX2 host saturates too.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers_anytime import digits, toy_bundle, trained_toy

QEMU = shutil.which("qemu-x86_64")
CPU_MODEL = "EPYC-Rome"  # AVX2, no AVX-512, no VNNI: the development machines' kind
PROBE = Path(__file__).with_name("int8_probe.py")

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86_64 CPU on an x86_64 host"),
    pytest.mark.skipif(QEMU is None, reason="qemu-user is not installed (apt install qemu-user); the 7-bit weight "
                                            "range that makes the default exact is checked in test_export_int8.py"),
]


def _probe(bundle: Path, data: Path, emulate: bool, exact: bool = False) -> dict:
    cmd = [sys.executable, str(PROBE), str(bundle), str(data), *(["exact"] if exact else [])]
    if emulate:
        cmd = [QEMU, "-cpu", CPU_MODEL, *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def val_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, _, xv, yv, _ = digits()
    path = tmp_path_factory.mktemp("int8emu") / "val.npz"
    np.savez(path, x=xv, y=yv)
    return path


@pytest.mark.slow
def test_default_scheme_computes_the_same_without_vnni(val_file: Path) -> None:
    bundle = toy_bundle("int8")
    here, there = _probe(bundle, val_file, False), _probe(bundle, val_file, True)
    for a, b in zip(here["logits"], there["logits"]):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-3, rtol=1e-3)
    n = len(digits()[3])
    for a, b in zip(here["accuracy"], there["accuracy"]):  # the float parts use other kernels there: at most
        assert abs(a - b) <= 1 / n + 1e-12                   # one borderline image may change its class


@pytest.mark.slow
def test_full_range_weights_saturate_without_vnni(val_file: Path, tmp_path: Path) -> None:
    from kdedge.export import export

    xtr, ytr, xv, yv, info = digits()
    path = export(trained_toy(False), tmp_path / "u8s8.kdedge", info=info, val_data=(xv, yv),
                  calib_data=(xtr[:128], ytr[:128]), precision="int8", int8_scheme="u8s8", int8_max_drop=100)
    exact, there = _probe(path, val_file, False, exact=True), _probe(path, val_file, True)
    worst = max(np.abs(np.array(a) - np.array(b)).max() for a, b in zip(exact["logits"], there["logits"]))
    assert worst > 0.1  # the clipped pair sums change the logits, not just their last bits


@pytest.mark.slow
def test_the_exact_reference_is_what_the_default_scheme_computes(val_file: Path) -> None:
    # the reference the test above compares with: the default 7-bit scheme, which does not
    # saturate, computes it on the emulated CPU up to rounding of the requantised activations
    bundle = toy_bundle("int8")
    exact, there = _probe(bundle, val_file, False, exact=True), _probe(bundle, val_file, True)
    for a, b in zip(exact["logits"], there["logits"]):
        assert np.abs(np.array(a) - np.array(b)).max() < 0.02  # 0.0035 measured; u8s8: 8.7
