"""What the GPU check reads and compares: this machine's packages and versions, the declared torch
range, pytest's JUnit report, and the agreement of a target's probabilities with onnxruntime's."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdedge.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[2]  # the working tree (kdedge/gpu_check/probes.py)
# import name -> pip name, for the message when one is missing
REQUIRED = {"numpy": "numpy", "torch": "torch", "torchvision": "torchvision", "onnx": "onnx",
            "onnxscript": "onnxscript", "onnxruntime": "onnxruntime", "safetensors": "safetensors",
            "sklearn": "scikit-learn", "typer": "typer", "rich": "rich", "yaml": "pyyaml",
            "jsonschema": "jsonschema", "PIL": "pillow", "pytest": "pytest"}

def missing_modules() -> list[str]:
    """The pip names of the required packages that do not import here."""
    missing = []
    for mod, pip in REQUIRED.items():
        try:
            importlib.import_module(mod)
        except Exception:  # a broken install raises more than ImportError
            missing.append(pip)
    return missing


def environment(device: str) -> dict[str, Any]:
    """What this machine has: versions, the GPU, where kdedge is imported from."""
    import kdedge

    facts: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                             "platform": platform.platform(), "kdedge": kdedge.__version__,
                             "kdedge_path": str(Path(kdedge.__file__).resolve().parent), "versions": {}}
    from importlib import metadata

    for mod, pip in REQUIRED.items():
        try:
            facts["versions"][mod] = metadata.version(pip)
        except metadata.PackageNotFoundError:
            facts["versions"][mod] = None
    try:
        import torch

        facts["torch_cuda_build"] = torch.version.cuda
        facts["cuda_available"] = bool(torch.cuda.is_available())
        if device == "cuda" and torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            facts["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                            "memory_gib": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
                            "bf16": bool(torch.cuda.is_bf16_supported())}
    except ImportError:
        facts["cuda_available"] = False
    try:
        import onnxruntime as ort

        facts["onnxruntime_providers"] = list(ort.get_available_providers())
    except ImportError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            r = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"], check=False,
                               capture_output=True, text=True, timeout=10)
            facts["nvidia_smi"] = r.stdout.strip()
    return facts


def declared_torch(pyproject: Path = ROOT / "pyproject.toml") -> str | None:
    """The lowest torch kdedge declares (its ``torch`` extra), e.g. ``"2.11"``; None if unread."""
    try:
        m = re.search(r'^torch = \["torch>=([0-9][0-9.]*)"', pyproject.read_text(encoding="utf-8"),
                      re.MULTILINE)
    except OSError:
        return None
    return m.group(1) if m else None


def _release(version: str) -> tuple[int, ...]:
    """``"2.11.0+cu130"`` -> (2, 11, 0)."""
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


# a line that marks a test or a module ``cuda`` (not the words inside a string, such as a test
# that writes a test file of its own)
_CUDA_MARK = re.compile(r"^[ \t]*(?:@pytest\.mark\.cuda\b|pytestmark\s*=.*\bpytest\.mark\.cuda\b)", re.MULTILINE)


def cuda_test_files(tests: Path) -> list[Path]:
    """Test files that hold a test marked ``cuda`` (a decorator or a module's ``pytestmark``)."""
    return sorted(p for p in tests.glob("test_*.py") if _CUDA_MARK.search(p.read_text(encoding="utf-8")))


def read_junit(path: Path) -> dict[str, Any]:
    """Counts and the skipped / failed tests (with reasons) of a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    skipped: list[dict[str, str]] = []
    failed: list[dict[str, str]] = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {c.tag: c for c in case}
        if "skipped" in kinds:
            counts["skipped"] += 1
            skipped.append({"test": name, "reason": kinds["skipped"].get("message", "")})
        elif "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            counts["failed" if tag == "failure" else "error"] += 1
            failed.append({"test": name, "reason": (kinds[tag].get("message") or "")[:300]})
        else:
            counts["passed"] += 1
    return {**counts, "skipped_tests": skipped, "failed_tests": failed}


def cuda_skips(skipped: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The skipped tests whose name says ``cuda``: on a GPU machine such a skip means the test
    did not see the GPU, a failure rather than a pass (TensorRT and CoreML cases may skip)."""
    return [t for t in skipped if "cuda" in t["test"].lower()]


def agreement(bundle: str | Path, x_path: str | Path, *, device: str, cuda_graphs: bool, atol: float,
              rtol: float) -> dict[str, Any]:
    """Compare the torch target's probabilities with onnxruntime's on the CPU, at every depth.

    Each depth ``k`` runs ``Fixed(k)`` chained (stage by stage) and, where the bundle has fused
    prefixes, fused, on the whole batch and on a batch of one, twice (a CUDA graph is captured on
    the first call of a batch size and replayed on the second).

    Args:
        bundle: a bundle with torch files.
        x_path: a ``.npy`` batch the bundle takes.
        device: where the torch sessions run.
        cuda_graphs: replay CUDA graphs (CUDA only).
        atol, rtol: ``|torch - onnxruntime| <= atol + rtol * |onnxruntime|`` per probability.

    Returns:
        ``{"passed", "max_abs", "worst_ratio", "top1_agreement", "cases": [...]}``; ``worst_ratio``
        is the largest ``|a - b| / (atol + rtol |b|)`` (<= 1 passes).

    Example:
        >>> agreement("hne.kdedge", "x.npy", device="cuda", cuda_graphs=True, atol=1e-4, rtol=1e-3)["passed"]
        True
    """
    import numpy as np

    from kdedge.runtime import Fixed, Runner, load_inputs

    cases: list[dict[str, Any]] = []
    with Runner(bundle, target="onnx", device="cpu", threads=1) as ref, \
            Runner(bundle, target="torch", device=device, cuda_graphs=cuda_graphs) as got:
        x = np.ascontiguousarray(load_inputs(x_path, ref.bundle).x)
        fused_options = (False, True) if ref.bundle.prefixes else (False,)
        for k in range(1, ref.num_stages + 1):
            for fused in fused_options:
                for batch in (x, x[:1]):
                    for call in (1, 2):
                        a = got.run(batch, Fixed(k, fused=fused))
                        b = ref.run(batch, Fixed(k, fused=fused))
                        cases.append({"stages": k, "fused": fused, "batch": int(batch.shape[0]), "call": call,
                                      **compare_probs(a.probs, b.probs, atol=atol, rtol=rtol),
                                      "same_stage": bool(np.array_equal(a.stage, b.stage))})
    def worst(key: str) -> float | None:
        return max((c[key] for c in cases if c[key] is not None), default=None)

    return {"passed": all(c["passed"] and c["same_stage"] for c in cases), "atol": atol, "rtol": rtol,
            "device": device, "cuda_graphs": cuda_graphs, "max_abs": worst("max_abs"),
            "worst_ratio": worst("worst_ratio"),
            "top1_agreement": min(c["top1_agreement"] for c in cases), "cases": cases}


def compare_probs(got: Any, ref: Any, *, atol: float, rtol: float) -> dict[str, Any]:
    """How far ``got`` is from ``ref`` (two [N, classes] probability arrays) in the tolerance's units.

    Returns:
        ``{"passed", "max_abs", "worst_ratio", "top1_agreement"}``, where ``worst_ratio`` is the
        largest ``|got - ref| / (atol + rtol |ref|)``: at most 1 passes. A shape mismatch or a
        non-finite value fails.

    Example:
        >>> compare_probs(np.array([[0.5, 0.5]]), np.array([[0.50001, 0.49999]]), atol=1e-4, rtol=1e-3)["passed"]
        True
    """
    import numpy as np

    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape or got.size == 0 or not (np.isfinite(got).all() and np.isfinite(ref).all()):
        return {"passed": False, "max_abs": None, "worst_ratio": None, "top1_agreement": 0.0,
                "why": f"shapes {got.shape} vs {ref.shape}, or a non-finite value"}
    diff = np.abs(got - ref)
    ratio = float((diff / (atol + rtol * np.abs(ref))).max())
    return {"passed": ratio <= 1.0, "max_abs": float(diff.max()), "worst_ratio": ratio,
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}


def _agreement_main(argv: Sequence[str]) -> None:
    """``python -c 'from kdedge.gpu_check import _agreement_main; ...' BUNDLE X DEVICE GRAPHS ATOL RTOL OUT``"""
    bundle, x, device, graphs, atol, rtol, out = argv
    atomic_write_json(out, agreement(bundle, x, device=device, cuda_graphs=graphs == "1", atol=float(atol),
                                     rtol=float(rtol)))


def write_inputs(path: Path, n: int = 16) -> Path:
    """The last ``n`` of scikit-learn's digits as a raw uint8 [n, 8, 8] batch."""
    import numpy as np
    from sklearn.datasets import load_digits

    images = np.asarray(load_digits().images[-n:], dtype=np.uint8)
    np.save(path, images)
    return path


