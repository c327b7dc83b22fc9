"""``kdedge doctor``: what this machine can train on and run."""

from __future__ import annotations

import importlib
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import typer

from kdedge.cli.common import handle_errors, out, print_json

HELP = """Report Python, torch/CUDA, onnxruntime providers, coremltools, TensorRT, Jetson facts,
whether `kdedge serve` can run (and what decodes PNG bodies), and which export targets can
compile and run here.

Example:

  kdedge doctor --json
"""


def _version(module: str) -> tuple[Any, str | None]:
    """(module, version) or (None, why not). Imported quietly: coremltools, for one, prints a
    dozen lines about untested torch/scikit-learn versions and missing macOS libraries."""
    from kdedge.targets.coreml import _quiet

    try:
        with _quiet():
            mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return None, f"not installed ({e.__class__.__name__})"
    return mod, getattr(mod, "__version__", "?")


def collect() -> dict[str, Any]:
    """Facts about this machine, JSON-able; imports each library only to read its version."""
    facts: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                             "machine": platform.machine()}
    import kdedge

    facts["kdedge"] = kdedge.__version__
    from kdedge.cpu import int8_dot

    facts["int8_dot"] = int8_dot()
    torch, v = _version("torch")
    facts["torch"] = {"version": v}
    if torch is not None:
        cuda = torch.cuda.is_available()
        facts["torch"].update({"cuda_build": torch.version.cuda, "cuda_available": cuda,
                               "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []})
    ort, v = _version("onnxruntime")
    facts["onnxruntime"] = {"version": v, "providers": ort.get_available_providers() if ort is not None else []}
    _, facts["onnx"] = _version("onnx")
    ct, v = _version("coremltools")
    facts["coremltools"] = {"version": v, "can_predict": ct is not None and sys.platform == "darwin"}
    trt, v = _version("tensorrt")
    facts["tensorrt"] = {"version": v}
    facts["serve"] = _serve()
    tegra = Path("/etc/nv_tegra_release")
    model = Path("/proc/device-tree/model")
    facts["jetson"] = {
        "is_jetson": tegra.is_file(),
        "l4t": tegra.read_text().splitlines()[0].strip() if tegra.is_file() else None,
        "board": model.read_text().strip("\x00\n ") if model.is_file() else None,
        "nvpmodel": shutil.which("nvpmodel"),
        "tegrastats": shutil.which("tegrastats"),
    }
    facts["targets"] = _targets(facts)
    return facts


def _serve() -> dict[str, Any]:
    """Whether ``kdedge serve`` can run here (the ``serve`` extra) and what decodes PNG bodies."""
    from importlib import metadata

    libs: dict[str, str] = {}
    for name in ("starlette", "uvicorn", "prometheus_client", "orjson"):
        try:  # the distribution's version: prometheus_client has no __version__
            libs[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            libs[name] = "not installed"
    ready = "not installed" not in libs.values()
    if ready:  # installed is not enough: a broken install fails at import, as `kdedge serve` would
        import importlib

        for name in libs:
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 - any failure to import is the answer
                libs[name] += f", cannot be imported ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                ready = False
    decoder = None
    if ready:
        from kdedge.serve.decode import opencv

        decoder = "opencv" if opencv() is not None else "pillow"
    return {"ready": ready, "libraries": libs, "png_decoder": decoder, "opencv": _version("cv2")[1]}


def _targets(facts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    try:
        from kdedge.targets import target_table  # the target interface, when present
    except ImportError:
        has_torch = facts["torch"]["version"] and "not installed" not in str(facts["torch"]["version"])
        ort = facts["onnxruntime"]["providers"]
        return {
            "onnx": {"compile": bool(has_torch), "run": bool(ort)},
            "tensorrt": {"compile": facts["tensorrt"]["version"] is not None and "not" not in str(facts["tensorrt"]["version"]),
                         "run": facts["tensorrt"]["version"] is not None and "not" not in str(facts["tensorrt"]["version"])},
            "coreml": {"compile": "not" not in str(facts["coremltools"]["version"]), "run": facts["coremltools"]["can_predict"]},
        }
    return target_table()


@handle_errors
def command(json_out: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    facts = collect()
    if json_out:
        print_json(facts)
        return
    from rich.table import Table

    t = Table(title="kdedge doctor", show_header=True)
    t.add_column("component")
    t.add_column("status")
    t.add_row("python", f"{facts['python']} on {facts['platform']}")
    t.add_row("kdedge", facts["kdedge"])
    t.add_row("INT8 on this CPU", {"vnni": "VNNI: every INT8 scheme computes exactly",
                                   "pairwise-int16": "no VNNI: 8-bit-weight schemes (u8s8, s8s8) saturate; "
                                                     "the 7-bit default (u8s7) is exact",
                                   "arm": "ARM: every INT8 scheme computes exactly"}.get(facts["int8_dot"], "unknown"))
    tf = facts["torch"]
    t.add_row("torch", f"{tf['version']}" + (f", CUDA {tf.get('cuda_build')}, available: {tf.get('cuda_available')}"
                                             + (f" {tf['devices']}" if tf.get("devices") else "") if "cuda_build" in tf else ""))
    t.add_row("onnxruntime", f"{facts['onnxruntime']['version']}, providers: {', '.join(facts['onnxruntime']['providers']) or '-'}")
    t.add_row("onnx", str(facts["onnx"]))
    t.add_row("coremltools", f"{facts['coremltools']['version']}, can predict: {facts['coremltools']['can_predict']} (macOS only)")
    t.add_row("tensorrt", str(facts["tensorrt"]["version"]))
    sv = facts["serve"]
    broken = [f"{k} {v}" for k, v in sv["libraries"].items() if "not installed" in v or "cannot" in v]
    t.add_row("kdedge serve", (f"yes, PNG bodies decoded by {sv['png_decoder']}" if sv["ready"] else
                               f"no ({'; '.join(broken)}): pip install 'kdedge[serve]'") + f" (opencv: {sv['opencv']})")
    j = facts["jetson"]
    t.add_row("jetson", f"{j['board']} ({j['l4t']}), nvpmodel: {j['nvpmodel'] or '-'}" if j["is_jetson"] else "not a Jetson")
    for name, tgt in facts["targets"].items():
        t.add_row(f"target {name}", ", ".join(f"{k}: {'yes' if v is True else 'no' if v is False else v}" for k, v in tgt.items()))
    out.print(t)
