"""``kdedge build``: compile a bundle's ONNX stages for an add-on target on the device."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kdedge.cli.common import err, handle_errors, print_json

HELP = """Compile a bundle's stage (and fused prefix) ONNX files for a target that is built on the
device, such as TensorRT (engines are tied to the GPU and TensorRT version), verify the result
against onnxruntime on a few seeded random inputs where both run, and add the files to the
bundle (atomically: an interrupted build leaves the bundle as it was).

Examples:

  kdedge build hne.kdedge --target tensorrt --precision fp16 --max-batch 32

  kdedge build hne-int8.kdedge --target tensorrt --precision int8

Targets built from the stage modules (torch, coreml) are added with
`kdedge export RUN_DIR --target NAME` instead.
"""


@handle_errors
def command(
    bundle: Path = typer.Argument(..., help="The bundle directory (from kdedge export)."),
    target: str = typer.Option(..., help="Target to add (built from the bundle's ONNX: tensorrt)."),
    precision: str = typer.Option("fp32", help="fp32, fp16 or int8 (int8 from a --precision int8 bundle)."),
    device: Optional[str] = typer.Option(None, help="Device the files are for (default: the target's first)."),
    min_batch: int = typer.Option(1, help="Smallest batch of the optimisation profile."),
    opt_batch: int = typer.Option(1, help="Batch the engine is tuned for."),
    max_batch: int = typer.Option(64, help="Largest batch of the optimisation profile."),
    verify_n: int = typer.Option(4, help="Random inputs to verify on against onnxruntime (0: no check)."),
    json_out: bool = typer.Option(False, "--json", help="Print the verification report as JSON."),
) -> None:
    from kdedge.targets import CompileSpec
    from kdedge.targets.build import build_bundle

    def progress(msg: str) -> None:
        if not json_out:
            err.print(f"[dim]{msg}[/]", highlight=False)

    spec = CompileSpec(precision=precision, device=device, min_batch=min_batch, opt_batch=opt_batch,
                       max_batch=max_batch)
    report = build_bundle(bundle, target, spec, progress=progress, verify_n=verify_n)
    if json_out:
        print_json(report)
        return
    err.print(f"added {target} files to {bundle} (checked: {report['verified']})", highlight=False)
