"""``kdedge export``: a trained run → a verified bundle of stage files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kdedge.cli.common import err, handle_errors, print_json


def _help() -> str:
    from kdedge.targets import format_table

    return f"""Slice a finished run into stages (HNE levels, the AHBF student, multi-exit exits),
export each stage, verify every stage and every combined prediction against torch on the
validation split, and write a bundle (manifest.json + stage files) atomically.

Examples:

  kdedge export runs/hne-demo --target onnx --out hne.kdedge

  kdedge export runs/hne-demo --out hne-int8.kdedge --precision int8 --int8-max-drop 1.0

  kdedge export runs/hne-demo --out hne.kdedge --target coreml --precision fp16 --device cpu_ne

Every bundle holds the ONNX stage files (the reference); another --target adds its files
beside them, verified against onnxruntime where they run here. TensorRT engines are built on
the device: kdedge build BUNDLE --target tensorrt.

Targets:

{format_table()}
"""


HELP = _help()


@handle_errors
def command(
    run_dir: Path = typer.Argument(..., help="A finished run directory (from kdedge train)."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Bundle directory to create."),
    target: str = typer.Option("onnx", help="Export target (see the table above)."),
    precision: str = typer.Option("fp32", help="fp32, fp16 (targets other than onnx) or int8 (static QDQ, gated by accuracy)."),
    device: Optional[str] = typer.Option(None, help="Device the target's files are for (torch: cpu/cuda; coreml compute "
                                                    "units: all/cpu/cpu_gpu/cpu_ne)."),
    max_batch: int = typer.Option(64, help="Largest batch the target's files accept."),
    opset: int = typer.Option(18, help="ONNX opset."),
    simplify: bool = typer.Option(False, help="Simplify stage graphs with onnxsim."),
    pad_channels: int = typer.Option(16, help="Zero-pad the channels per group of grouped convolutions to multiples of "
                                              "this (0, 8, 16, 32; 0: off), so that onnxruntime runs them in its "
                                              "blocked layout (docs/performance.md)."),
    split: str = typer.Option("val", help="Split that verifies the export and gives the manifest's accuracies."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where the run's dataset lives now."),
    val_limit: Optional[int] = typer.Option(None, help="Verify on at most this many images."),
    calib_size: int = typer.Option(256, help="INT8: number of training images to calibrate on."),
    int8_max_drop: float = typer.Option(1.0, help="INT8: fail when a stage loses more accuracy points than this."),
    int8_keep_fp32: bool = typer.Option(False, help="INT8: keep FP32 for a stage that fails the gate instead of failing."),
    int8_scheme: str = typer.Option("u8s7", help="INT8: u8s7 (default; 7-bit weights, exact on every CPU), s8s7 "
                                                 "(symmetric activations, for TensorRT), u8s8 / s8s8 (8-bit weights: "
                                                 "only for devices with VNNI, ARM or a GPU; see docs/export.md)."),
    atol: float = typer.Option(1e-4, help="Verification absolute tolerance."),
    rtol: float = typer.Option(1e-3, help="Verification relative tolerance."),
    force: bool = typer.Option(False, help="Replace an existing bundle at --out (atomically)."),
    json_out: bool = typer.Option(False, "--json", help="Print the bundle summary as JSON."),
) -> None:
    from kdedge.export import export_run, format_inspect, format_report, inspect_bundle

    def progress(msg: str) -> None:
        if not json_out:
            err.print(f"[dim]{msg}[/]", highlight=False)

    path = export_run(run_dir, out_path, data_root=data_root, split=split, calib_size=calib_size, val_limit=val_limit,
                      target=target, precision=precision, opset=opset, simplify=simplify, pad_channels=pad_channels,
                      int8_max_drop=int8_max_drop,
                      int8_keep_fp32=int8_keep_fp32, int8_scheme=int8_scheme, device=device, max_batch=max_batch, atol=atol, rtol=rtol, force=force, progress=progress)
    summary = inspect_bundle(path)
    if json_out:
        print_json(summary)
        return
    report_path = Path(path) / "reports" / "verify.json"
    if report_path.is_file():
        import json

        typer.echo(format_report(json.loads(report_path.read_text())))
    typer.echo(format_inspect(summary))
    err.print(f"wrote {path}", highlight=False)
