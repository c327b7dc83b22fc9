"""``kdedge build``: compile a bundle's ONNX stages for an add-on target on the device."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer

from kdedge.cli.common import err, handle_errors, print_json

MAX_VERIFY_N = 4096  # verification inputs: a handful is the point; more only allocates

HELP = """Compile a bundle's stage (and fused prefix) ONNX files for a target that is built on the
device, such as TensorRT (engines are tied to the GPU and TensorRT version), verify the result
against onnxruntime on a few inputs where both run, and add the files to the bundle
(atomically: an interrupted build leaves the bundle as it was).

INT8: a bundle exported with --precision int8 (QDQ) needs no calibration. An FP32 bundle is
calibrated on the device (TensorRT 10's entropy calibrator; TensorRT 11 refuses it: export with
--precision int8) with images from --calib PATH (an image, a directory of images or a .npy) or
--calib-data NAME (a dataset of the training data layer; needs torch). Each stage is calibrated
on its own inputs, computed by the bundle's ONNX chain. By default 256 images of the train
split, as `kdedge export --precision int8` calibrates; the build is then verified on
calibration images instead of random ones.

Examples:

  kdedge build hne.kdedge --target tensorrt --precision fp16 --max-batch 32

  kdedge build hne-int8.kdedge --target tensorrt --precision int8

  kdedge build hne.kdedge --target tensorrt --precision int8 --calib calib-images/

  kdedge build hne.kdedge --target tensorrt --precision int8 --calib-data cifar10 --calib-root ~/data/cifar

Targets built from the stage modules (torch, coreml) are added with
`kdedge export RUN_DIR --target NAME` instead.
"""


def _calibration(bundle: Any, calib: Optional[Path], calib_data: Optional[str], calib_root: Optional[str],
                 calib_split: Optional[str], calib_count: Optional[int], batch: int) -> Any:
    """The calibration set of the request (images read and preprocessed by the bundle's rule)."""
    from kdedge.targets.calibration import (
        DEFAULT_COUNT,
        DEFAULT_SPLIT,
        calibration_set,
        images_from_path,
    )

    count = DEFAULT_COUNT if calib_count is None else calib_count
    if calib is not None:
        x, source = images_from_path(calib, bundle, count=count, batch_size=batch)
    else:
        assert calib_data is not None
        from kdedge.export.evaluate import images_from_dataset  # the training data layer: torch

        x, source = images_from_dataset(bundle, calib_data, root=calib_root, split=calib_split or DEFAULT_SPLIT,
                                        count=count, batch_size=batch)
    return calibration_set(bundle, x, count=count, batch_size=batch, source=source)


def _check_options(precision: str, calib: Optional[Path], calib_data: Optional[str], calib_root: Optional[str],
                   calib_split: Optional[str], calib_count: Optional[int], calib_batch: Optional[int]) -> bool:
    """The calibration options are consistent; returns whether calibration was asked for."""
    if calib is not None and calib_data is not None:
        raise ValueError("give calibration images with --calib PATH or --calib-data NAME, not both")
    if calib_data is None:
        for flag, value in (("--calib-root", calib_root), ("--calib-split", calib_split)):
            if value is not None:
                raise ValueError(f"{flag} applies to --calib-data NAME, which was not given")
    given = calib is not None or calib_data is not None
    if not given:
        for flag, value in (("--calib-count", calib_count), ("--calib-batch", calib_batch)):
            if value is not None:
                raise ValueError(f"{flag} applies to calibration images (--calib PATH or --calib-data NAME), which "
                                 "were not given")
    if given and precision != "int8":
        raise ValueError(f"calibration images are used only to build int8 engines, this build is {precision}; "
                         "drop --calib/--calib-data, or build with --precision int8")
    for flag, value in (("--calib-count", calib_count), ("--calib-batch", calib_batch)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    return given


@handle_errors
def command(
    bundle: Path = typer.Argument(..., help="The bundle directory (from kdedge export)."),
    target: str = typer.Option(..., help="Target to add (built from the bundle's ONNX: tensorrt)."),
    precision: str = typer.Option("fp32", help="fp32, fp16 or int8 (int8: from a --precision int8 bundle, or "
                                               "calibrated with --calib/--calib-data)."),
    device: Optional[str] = typer.Option(None, help="Device the files are for (default: the target's first)."),
    min_batch: int = typer.Option(1, help="Smallest batch of the optimisation profile."),
    opt_batch: int = typer.Option(1, help="Batch the engine is tuned for."),
    max_batch: int = typer.Option(64, help="Largest batch of the optimisation profile."),
    calib: Optional[Path] = typer.Option(None, help="INT8 from an FP32 bundle: calibration images (an image, a "
                                                    "directory of images, or a .npy of raw uint8 or preprocessed "
                                                    "float32 images)."),
    calib_data: Optional[str] = typer.Option(None, help="INT8 from an FP32 bundle: calibrate on this dataset "
                                                        "(digits, cifar10, imagefolder, ...; needs torch); the split "
                                                        "is rebuilt from the bundle's training config."),
    calib_root: Optional[str] = typer.Option(None, help="With --calib-data: the dataset directory."),
    calib_split: Optional[str] = typer.Option(None, help="With --calib-data: train (default, as kdedge export "
                                                         "calibrates) or val."),
    calib_count: Optional[int] = typer.Option(None, help="Calibrate on this many images (default 256, as kdedge "
                                                         "export --calib-size), evenly spaced over the source, "
                                                         "rounded down to whole batches."),
    calib_batch: Optional[int] = typer.Option(None, help="Images per calibration batch (default 32, within "
                                                         "--min-batch..--max-batch)."),
    verify_n: int = typer.Option(4, help="Inputs to verify on against onnxruntime (0: no check)."),
    json_out: bool = typer.Option(False, "--json", help="Print the verification report as JSON."),
) -> None:
    from rich.markup import escape

    from kdedge.targets import CompileSpec, open_bundle
    from kdedge.targets.build import build_bundle, preflight
    from kdedge.targets.calibration import DEFAULT_BATCH

    def progress(msg: str) -> None:
        if not json_out:
            err.print(f"[dim]{escape(msg)}[/]", highlight=False)  # messages hold paths: not markup

    if not 0 <= verify_n <= MAX_VERIFY_N:  # each verification input is allocated and run through every graph
        raise ValueError(f"--verify-n must be from 0 to {MAX_VERIFY_N}, got {verify_n}")
    calibrated = _check_options(precision, calib, calib_data, calib_root, calib_split, calib_count, calib_batch)
    spec = CompileSpec(precision=precision, device=device, min_batch=min_batch, opt_batch=opt_batch,
                       max_batch=max_batch)
    cset = None
    source: Any = bundle
    if calibrated:
        # the default batch fits the batch range; an explicit one outside it is refused, not changed
        batch = calib_batch if calib_batch is not None else min(max(DEFAULT_BATCH, min_batch), max_batch)
        source = open_bundle(bundle, targets=["onnx"])  # opened (and verified) once, built from below
        preflight(source, target, spec, batch)  # refuse the request before reading any image
        progress("read the calibration images")
        cset = _calibration(source, calib, calib_data, calib_root, calib_split, calib_count, batch)
        progress(f"calibrate on {cset.count} images in batches of {cset.batch_size} ({cset.digest[:12]})")
        spec = replace(spec, options={"calibration": cset})
    report = build_bundle(source, target, spec, progress=progress, verify_n=verify_n)
    if json_out:
        print_json(report)
        return
    calibrated_by = ""
    if cset is not None:
        calibrated_by = f", calibrated on {cset.count} images ({cset.digest[:12]})"
    err.print(escape(f"added {target} files to {bundle} (checked: {report['verified']}{calibrated_by})"),
              highlight=False)
