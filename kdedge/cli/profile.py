"""``kdedge profile``: measure the latency of every stage and fused prefix of a bundle on this device."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from kdedge.cli.common import (CpuLatencyOpt, CpusOpt, MlockOpt, RealtimeOpt, RtPolicyOpt, RtPriorityOpt,
                               err, handle_errors, out, print_json, realtime_options)

HELP = """Measure the latency of every stage and fused prefix of a bundle on this device, after
warm-up: min, mean, median, p90, p95, p99 and max at each batch size. The profile is written
atomically into the bundle as profiles/<device>-<setting>[-<target>-<device>].json (the setting
includes the thread count; targets other than onnxruntime on the CPU add the run key, e.g.
torch-cuda-cudagraphs), with a CSV of the numbers and PNGs of accuracy against latency (and energy, with
--meter) per stage; the deadline policy of kdedge run
uses the profile that matches the device and setting it runs under.

Measuring other batch sizes adds them to the stored profile of the same device, setting,
target, threads and bundle files (re-measured batches are replaced, the others kept); a stored
profile of other stage files (the bundle changed) is replaced, and the command says so.

Examples:

  kdedge profile hne.kdedge

  kdedge profile hne.kdedge --batch 1,32 --runs 500 --threads 2

  kdedge profile hne.kdedge --threads 1,2          # one profile per setting, for kdedge run --threads auto

  kdedge profile hne.kdedge --realtime --cpus 1    # SCHED_FIFO; kdedge run --realtime plans with it

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
    """``"1,32"`` -> [1, 32]; a clear error otherwise (also above ``MAX_BATCH``)."""
    from kdedge.profile.latency import MAX_BATCH

    parts = text.replace(" ", "").split(",")  # an empty item ("1,,2", "1,") is a typo: refused
    # digits only: int() would also take "+3", "1_000" and "٣"
    values = [int(v) for v in parts if v.isascii() and v.isdigit() and len(v) <= 9]
    if not values or len(values) != len(parts) or any(not 1 <= v <= MAX_BATCH for v in values):
        raise ValueError(f"--batch takes comma-separated integers from 1 to {MAX_BATCH} such as 1,32; got {text!r}")
    return sorted(set(values))


def check_arguments(batch: str, runs: int, warmup: int, threads: Optional[int],
                    meter_period_ms: Optional[float]) -> list[int]:
    """The batch sizes, after checking every numeric option against its bounds, before anything
    is opened or measured (one line naming the option)."""
    import math

    from kdedge.profile.latency import MAX_RUNS
    from kdedge.profile.meters.base import MAX_PERIOD_S
    from kdedge.targets.threads import check_threads

    batches = parse_batches(batch)
    if not 1 <= runs <= MAX_RUNS:
        raise ValueError(f"--runs must be from 1 to {MAX_RUNS}, got {runs}")
    if not 0 <= warmup <= MAX_RUNS:
        raise ValueError(f"--warmup must be from 0 to {MAX_RUNS}, got {warmup}")
    try:
        check_threads(threads)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    if meter_period_ms is not None and not (math.isfinite(meter_period_ms)
                                            and 0 < meter_period_ms <= MAX_PERIOD_S * 1e3):
        raise ValueError(f"--meter-period-ms must be a number of ms in (0, {MAX_PERIOD_S * 1e3:g}], "
                         f"got {meter_period_ms}")
    return batches


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
    shared_pool: bool = typer.Option(False, "--shared-pool", help="onnxruntime: one intra-op pool of --threads threads for every stage session instead of one pool per session (consecutive stages then do not spin against each other; docs/runtime.md, Threads); part of the profile's key."),
    batch: str = typer.Option("1", "--batch", help="Batch sizes, comma-separated (e.g. 1,32)."),
    runs: int = typer.Option(200, help="Timed rounds per batch size (each runs the chain and every prefix "
                             "once); 1 to 100000."),
    warmup: int = typer.Option(20, help="Untimed rounds first; 0 to 100000."),
    idle_ms: float = typer.Option(0.0, "--idle-ms", help="Idle this long before every timed call, to measure "
                                  "requests as they arrive at a steady rate (33 at 30 fps: caches go cold between "
                                  "frames); 0 to 10000. Default 0: back to back."),
    threads: Optional[str] = typer.Option(None, help="CPU threads per session, or several comma-separated (1,2: "
                                          "one profile each, for kdedge run --threads auto); default 1 (docs/"
                                          "runtime.md, Threads); at most 4 x the CPUs."),
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
    realtime: RealtimeOpt = False,
    rt_priority: RtPriorityOpt = None,
    rt_policy: RtPolicyOpt = None,
    cpus: CpusOpt = None,
    mlock: MlockOpt = None,
    cpu_latency: CpuLatencyOpt = None,
    json_out: bool = typer.Option(False, "--json", help="Print the profile as JSON."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    thread_counts = parse_threads(threads)
    for t in thread_counts:
        batches = check_arguments(batch, runs, warmup, t, meter_period_ms)
    rt = realtime_options(realtime, rt_priority, rt_policy, cpus, mlock, cpu_latency)
    from kdedge.profile.latency import check_idle_ms

    idle_ms = check_idle_ms(idle_ms)
    if len(thread_counts) > 1 and power_mode is not None:
        raise ValueError("measure several --threads settings or several --power-mode modes, not both at once")
    power_meter = None
    if meter is not None:
        import inspect

        from kdedge.profile.meters import METERS, create_meter

        takes_period = meter == "auto" or (meter in METERS
                                           and "period_s" in inspect.signature(METERS[meter].__init__).parameters)
        kwargs = {"period_s": meter_period_ms / 1e3} if meter_period_ms is not None and takes_period else {}
        power_meter = create_meter(meter, **kwargs)
    modes = None
    if power_mode is not None:
        modes = [m for m in power_mode.replace(" ", "").split(",") if m]
        if not modes:
            raise ValueError(f"--power-mode takes comma-separated nvpmodel mode names such as 15W,25W; got {power_mode!r}")
    if shared_pool and len(thread_counts) > 1:
        raise ValueError("--shared-pool keeps one onnxruntime pool per process: measure one --threads count per "
                         "command (run kdedge profile once per count)")
    try:
        if modes is None:  # one profile per thread count (the count is part of its key)
            results = [_measure(bundle, target, batches, runs, warmup, t, optimization, plot, json_out or quiet,
                                power_meter, device=device, cuda_graphs=cuda_graphs, realtime=rt,
                                shared_pool=shared_pool, idle_ms=idle_ms)
                       for t in thread_counts]
        else:
            from kdedge.profile.modes import Nvpmodel

            nv = Nvpmodel(conf=nvpmodel_conf, nvpmodel=nvpmodel_exe, jetson_clocks=jetson_clocks_exe or None)
            results = _measure(bundle, target, batches, runs, warmup, thread_counts[0], optimization, plot,
                               json_out or quiet, power_meter, modes=modes, nvpmodel=nv, lock_clocks=lock_clocks,
                               device=device, cuda_graphs=cuda_graphs, realtime=rt, shared_pool=shared_pool,
                               idle_ms=idle_ms)
    finally:
        if power_meter is not None:
            power_meter.close()
    if json_out and (modes is not None or len(thread_counts) > 1):
        print_json([{**prof.data, "path": str(path), "plot": None if png is None else str(png)}
                    for prof, path, png in results])
        return
    for prof, path, png in results:
        _report(prof, path, png, plot, json_out)


def parse_threads(text: Optional[str]) -> list[Optional[int]]:
    """``--threads``: None (the default), one count, or comma-separated counts such as 1,2."""
    if text is None:
        return [None]
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"--threads takes a thread count or comma-separated counts such as 1,2; got {text!r}")
    return sorted({int(p) for p in parts})


def _measure(bundle: Path, target: str, batches: list[int], runs: int, warmup: int, threads: Optional[int],
             optimization: str, plot: bool, silent: bool, meter: object, modes: Optional[list[str]] = None,
             nvpmodel: object = None, lock_clocks: bool = False, device: Optional[str] = None,
             cuda_graphs: bool = False, realtime: Any = None, shared_pool: bool = False, idle_ms: float = 0.0) -> Any:
    """One (profile, path, png) without ``modes``; a list of them, one per mode, with."""
    from kdedge.profile.latency import open_target_bundle, profile_bundle, profile_power_modes
    from kdedge.targets import RunSpec, get_target

    # a bundle without the target's files, or a request the target refuses, fails before the bar
    opened, target = open_target_bundle(bundle, target)
    get_target(target).session_options(RunSpec(device=device, cuda_graphs=cuda_graphs, shared_pool=shared_pool), opened)
    bundle = opened
    kw: dict[str, Any] = dict(target=target, batches=batches, runs=runs, warmup=warmup, threads=threads,
                              optimization=optimization, plot=plot, meter=meter, device=device,
                              cuda_graphs=cuda_graphs, report=_note, realtime=realtime, shared_pool=shared_pool,
                              idle_ms=idle_ms)

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


def _note(message: str) -> None:
    """What happened to the profile already stored (merged, replaced): stderr, so that --json
    output stays one document."""
    err.print(f"profile: {message}", highlight=False, soft_wrap=True)


def _runs_title(data: dict[str, Any]) -> str:
    """``200 runs after 20 warm-up``, or, for a profile merged from measurements with other run
    counts, where to read them."""
    measured = data.get("measured") or {}
    pairs = {(m.get("runs"), m.get("warmup")) for m in measured.values()} or {(data.get("runs"), data.get("warmup"))}
    if len(pairs) == 1:
        runs, warmup = next(iter(pairs))
        return f"{runs} runs after {warmup} warm-up"
    return "runs per batch in column n"


def _report(prof: Any, path: Path, png: Optional[Path], plot: bool, json_out: bool) -> None:
    from kdedge.profile.latency import STATS, format_table

    if json_out:
        print_json({**prof.data, "path": str(path), "plot": None if png is None else str(png)})
        return
    from rich import box
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=f"latency (ms) on {prof.device}, setting {prof.setting}, "
                    f"{prof.threads} thread(s), {_runs_title(prof.data)}")
    for col in ("graph", "batch", *STATS, "n"):
        t.add_column(col, justify="left" if col == "graph" else "right", no_wrap=True)
    for row in format_table(prof):
        t.add_row(row["graph"], str(row["batch"]), *[_ms(row[k]) for k in STATS], str(row["n"]))
    out.print(t)
    energy = prof.energy
    if energy is not None and energy.get("measured"):
        e = Table(box=box.SIMPLE_HEAD, pad_edge=False,
                  title=f"energy (mJ per inference, mean over windows of {energy.get('runs_per_window', '?')} "
                        f"runs), meter {energy.get('source', '?')}")
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
