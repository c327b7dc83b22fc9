"""``kdedge profile``: measure the latency of every stage and fused prefix of a bundle on this device."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from kdedge.cli.common import err, handle_errors, out, print_json

HELP = """Measure the latency of every stage and fused prefix of a bundle on this device, after
warm-up: min, mean, median, p90, p95, p99 and max at each batch size. The profile is written
atomically into the bundle as profiles/<device>-<setting>[-<target>-<device>].json (the setting
includes the thread count; targets other than onnxruntime on the CPU add the run key, e.g.
torch-cuda-cudagraphs), with a CSV of the numbers and PNGs of accuracy against latency (and energy, with
--meter) per stage; the deadline policy of kdedge run
uses the profile that matches the device and setting it runs under.

Examples:

  kdedge profile hne.kdedge

  kdedge profile hne.kdedge --batch 1,32 --runs 500 --threads 2

  kdedge profile hne.kdedge --json

  kdedge profile hne.kdedge --target torch --device cuda --cuda-graphs --batch 1,32

  kdedge profile hne.kdedge --meter auto      # also energy per stage (mJ per inference)

  sudo -E kdedge profile hne.kdedge --meter auto --power-mode 15W,25W,MAXN_SUPER

With --meter, each graph's energy per inference is measured after the latency rounds over a
window of --runs runs (energy of the window / runs) and stored as energy_mj, with the meter's
name and sampling period; --meter none records that energy is not measured.

With --power-mode (a Jetson; needs root), the bundle is profiled in each nvpmodel mode in turn
and one profile per mode is stored (profiles/<device>-<mode>.json); your mode and clocks are
restored afterwards, also on an error or Ctrl-C.
"""


def parse_batches(text: str) -> list[int]:
    """``"1,32"`` -> [1, 32]; a clear error otherwise."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--batch takes comma-separated positive integers such as 1,32; got {text!r}")
    return sorted(set(values))


def _ms(v: float) -> str:
    """Milliseconds in at most ~6 characters: 4 decimals below 0.1 ms, else 3."""
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 100 else f"{v:.1f}"


@handle_errors
def command(
    bundle: Path = typer.Argument(..., help="A bundle directory (from kdedge export)."),
    target: str = typer.Option("onnx", help="Which of the bundle's targets to measure (auto: the fastest that runs here)."),
    device: Optional[str] = typer.Option(None, help="Where the target's sessions run: cpu, cuda, cuda:N (torch), "
                                         "CoreML compute units (default: the device its files were compiled for)."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Capture and replay CUDA graphs (torch, tensorrt)."),
    batch: str = typer.Option("1", "--batch", help="Batch sizes, comma-separated (e.g. 1,32)."),
    runs: int = typer.Option(200, help="Timed rounds per batch size (each runs the chain and every prefix once)."),
    warmup: int = typer.Option(20, help="Untimed rounds first."),
    threads: Optional[int] = typer.Option(None, help="CPU threads per session (default: all usable CPUs)."),
    optimization: str = typer.Option("all", help="onnxruntime graph optimisation: disable, basic, extended, layout, all."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write the accuracy-vs-latency PNG next to the profile."),
    meter: Optional[str] = typer.Option(None, "--meter", help="Power meter for energy per stage: auto, none, "
                                        "jetson-sysfs, tegrastats, jtop, nvml, rapl (default: no energy)."),
    meter_period_ms: Optional[float] = typer.Option(None, "--meter-period-ms",
                                                    help="Sampling period of a sampling meter (its default otherwise)."),
    power_mode: Optional[str] = typer.Option(None, "--power-mode", help="nvpmodel modes to profile in, comma-separated "
                                             "(e.g. 15W,25W); one profile per mode."),
    lock_clocks: bool = typer.Option(False, "--lock-clocks", help="Run jetson_clocks in each --power-mode."),
    nvpmodel_exe: str = typer.Option("nvpmodel", "--nvpmodel-exe", hidden=True, envvar="KDEDGE_NVPMODEL"),
    nvpmodel_conf: str = typer.Option("/etc/nvpmodel.conf", "--nvpmodel-conf", hidden=True,
                                      envvar="KDEDGE_NVPMODEL_CONF"),
    jetson_clocks_exe: str = typer.Option("jetson_clocks", "--jetson-clocks-exe", hidden=True,
                                          envvar="KDEDGE_JETSON_CLOCKS"),
    json_out: bool = typer.Option(False, "--json", help="Print the profile as JSON."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    batches = parse_batches(batch)
    if runs < 1:
        raise ValueError(f"--runs must be at least 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"--warmup must be 0 or more, got {warmup}")
    power_meter = None
    if meter is not None:
        import inspect

        from kdedge.profile.meters import METERS, create_meter

        if meter_period_ms is not None and meter_period_ms <= 0:
            raise ValueError(f"--meter-period-ms must be positive, got {meter_period_ms}")
        takes_period = meter == "auto" or (meter in METERS
                                           and "period_s" in inspect.signature(METERS[meter].__init__).parameters)
        kwargs = {"period_s": meter_period_ms / 1e3} if meter_period_ms is not None and takes_period else {}
        power_meter = create_meter(meter, **kwargs)
    modes = None
    if power_mode is not None:
        modes = [m for m in power_mode.replace(" ", "").split(",") if m]
        if not modes:
            raise ValueError(f"--power-mode takes comma-separated nvpmodel mode names such as 15W,25W; got {power_mode!r}")
    try:
        if modes is None:
            results = [_measure(bundle, target, batches, runs, warmup, threads, optimization, plot,
                                json_out or quiet, power_meter, device=device, cuda_graphs=cuda_graphs)]
        else:
            from kdedge.profile.modes import Nvpmodel

            nv = Nvpmodel(conf=nvpmodel_conf, nvpmodel=nvpmodel_exe, jetson_clocks=jetson_clocks_exe or None)
            results = _measure(bundle, target, batches, runs, warmup, threads, optimization, plot,
                               json_out or quiet, power_meter, modes=modes, nvpmodel=nv, lock_clocks=lock_clocks,
                               device=device, cuda_graphs=cuda_graphs)
    finally:
        if power_meter is not None:
            power_meter.close()
    if json_out and modes is not None:
        print_json([{**prof.data, "path": str(path), "plot": None if png is None else str(png)}
                    for prof, path, png in results])
        return
    for prof, path, png in results:
        _report(prof, path, png, plot, json_out)


def _measure(bundle: Path, target: str, batches: list[int], runs: int, warmup: int, threads: Optional[int],
             optimization: str, plot: bool, silent: bool, meter: object, modes: Optional[list[str]] = None,
             nvpmodel: object = None, lock_clocks: bool = False, device: Optional[str] = None,
             cuda_graphs: bool = False) -> Any:
    """One (profile, path, png) without ``modes``; a list of them, one per mode, with."""
    from kdedge.profile.latency import open_target_bundle, profile_bundle, profile_power_modes
    from kdedge.targets import RunSpec, get_target

    # a bundle without the target's files, or a request the target refuses, fails before the bar
    opened, target = open_target_bundle(bundle, target)
    get_target(target).session_options(RunSpec(device=device, cuda_graphs=cuda_graphs), opened)
    bundle = opened
    kw: dict[str, Any] = dict(target=target, batches=batches, runs=runs, warmup=warmup, threads=threads,
                              optimization=optimization, plot=plot, meter=meter, device=device,
                              cuda_graphs=cuda_graphs)

    def go(progress: Any) -> Any:
        if modes is None:
            return profile_bundle(bundle, progress=progress, **kw)
        return profile_power_modes(bundle, modes, nvpmodel=nvpmodel, lock_clocks=lock_clocks, progress=progress, **kw)

    if silent:
        return go(None)
    from kdedge.cli.progress import make_progress

    with make_progress() as bar:
        task = bar.add_task("profile", total=len(batches) * (runs + warmup) * len(modes or [None]), info="")

        def tick(done: int, total: int, message: str) -> None:
            bar.update(task, completed=done, total=total, info=message)

        return go(tick)


def _report(prof: object, path: Path, png: Optional[Path], plot: bool, json_out: bool) -> None:
    from kdedge.profile.latency import STATS, format_table

    if json_out:
        print_json({**prof.data, "path": str(path), "plot": None if png is None else str(png)})
        return
    from rich import box
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=f"latency (ms) on {prof.device}, setting {prof.setting}, {prof.threads} thread(s), "
                    f"{prof.data['runs']} runs after {prof.data['warmup']} warm-up")
    for col in ("graph", "batch", *STATS):
        t.add_column(col, justify="left" if col == "graph" else "right", no_wrap=True)
    for row in format_table(prof):
        t.add_row(row["graph"], str(row["batch"]), *[_ms(row[k]) for k in STATS])
    out.print(t)
    energy = prof.energy
    if energy is not None and energy.get("measured"):
        e = Table(box=box.SIMPLE_HEAD, pad_edge=False,
                  title=f"energy (mJ per inference, mean over windows of {energy['runs_per_window']} runs), "
                        f"meter {energy['source']}")
        for col in ("graph", "batch", "mJ"):
            e.add_column(col, justify="left" if col == "graph" else "right", no_wrap=True)
        for row in format_table(prof):
            mj = prof.data["graphs"][row["graph"]][str(row["batch"])].get("energy_mj")
            e.add_row(row["graph"], str(row["batch"]), "-" if mj is None else f"{mj['mean']:.4g}")
        out.print(e)
    elif energy is not None:
        err.print(f"energy: {energy.get('note')}", highlight=False, soft_wrap=True)
    err.print(f"profile: {path}", highlight=False, soft_wrap=True)
    err.print(f"csv: {Path(path).with_suffix('.csv')}", highlight=False, soft_wrap=True)
    energy_png = Path(path).with_name(Path(path).stem + "-energy.png")
    if png is not None and prof.has_energy and energy_png.is_file():
        err.print(f"energy plot: {energy_png}", highlight=False, soft_wrap=True)
    if png is not None:
        err.print(f"plot: {png}", highlight=False, soft_wrap=True)
    elif plot:
        err.print("plot: not written (matplotlib is not installed)", highlight=False)
