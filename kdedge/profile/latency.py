"""Latency profiles: measure every stage and fused prefix of a bundle on this device, store the
statistics in the bundle, and hand the matching profile to the deadline policy.

A profile is ``BUNDLE/profiles/<device>-<setting>[-<run key>].json`` (written atomically),
keyed by :func:`kdedge.profile.modes.device_id`, the setting name of
:func:`kdedge.profile.modes.current_setting` (``cpu-2t-performance``; the nvpmodel mode on a
Jetson) and the runner's *run key*: which target's files ran where
(:meth:`kdedge.targets.base.Target.run_key`: ``torch-cuda``, ``torch-cuda-cudagraphs``,
``tensorrt-cuda``; empty for onnxruntime on the CPU, so the key of a CPU profile is the
device and setting only). A CPU profile is therefore never used for a CUDA run, nor a
profile without CUDA graphs for a run with them. Profiles are not among the bundle's checksummed files, so adding one never breaks
``open_bundle``'s verification; instead each profile records a *fingerprint* of the stage files
it measured (their sha256 from the manifest), and a profile whose fingerprint differs from the
bundle's is refused as stale.

Statistics per graph and batch size, as trtexec reports them, after warm-up: ``min``, ``mean``,
``median``, ``p90``, ``p95``, ``p99``, ``max`` (percentiles by the nearest-rank rule, so a p99
is a latency that was actually observed), plus ``n``. Stages are timed inside the runner's
own stage loop (what the deadline policy will see), fused prefixes alone, and ``chain`` is the
end-to-end time of a full runner call. Rounds interleave the graphs so that drift hits all alike.

Profile JSON (version 1)::

    {"format": "kdedge-profile", "version": 1, "device": "...", "setting": "cpu-2t",
     "setting_detail": {...}, "target": "onnx", "run_key": "", "threads": 2, "options": {...},
     "bundle": {"fingerprint": "...", "family": "hne", "path": "..."},
     "created": "...", "versions": {...}, "runs": 200, "warmup": 20, "batches": [1, 32],
     "measured": {"1": {"created": "...", "runs": 200, "warmup": 20}, "32": {...}},
     "graphs": {"stage0": {"1": {"latency_ms": {"min": ..., ..., "n": 200}}, "32": {...}}, ...}}

A graph/batch entry may hold other metrics next to ``latency_ms`` (the power work adds
``energy_mj``); :meth:`LatencyProfile.stat` reads any of them. Every profile is validated
(``kdedge/schemas/profile.schema.json`` plus :mod:`kdedge.bundle.profile.validate`) when it is built
or read, and measuring a batch size merges it into the profile stored for the same key
(:mod:`kdedge.bundle.profile.merge`, :func:`store_profile`).

Example:
    >>> prof, path, png = profile_bundle("hne.kdedge", batches=(1, 32), threads=2)
    >>> prof.stat("stage1", 1, "p99")
    0.41
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kdedge.bundle.profile.spec import (
    CHAIN,
    FORMAT,
    STATS,
    VERSION,
    ForeignProfileError,
    InvalidProfileError,
    MissingProfileError,
    NewerProfileError,
    ProfileError,
    StaleProfileError,
)
from kdedge.bundle.profile.store import (LatencyProfile, bundle_fingerprint, check_profile, current_key, demo_deadlines,
                                        profile_filename, resolve_profile, store_profile, thread_choice, write_profile)
from kdedge.io import atomic_write
from kdedge.targets.threads import check_threads, max_threads

__all__ = [
    "CHAIN", "FORMAT", "ForeignProfileError", "InvalidProfileError", "LatencyProfile", "MAX_BATCH", "MAX_RUNS",
    "MissingProfileError", "NewerProfileError", "ProfileError", "STATS", "StaleProfileError", "VERSION",
    "bundle_fingerprint", "check_measure_args", "check_profile", "current_key", "format_table", "max_threads",
    "measure_profile", "open_target_bundle", "plot_accuracy_energy", "plot_accuracy_latency", "profile_bundle",
    "demo_deadlines", "profile_csv", "profile_filename", "profile_power_modes", "resolve_profile", "store_profile",
    "summarize", "thread_choice",
    "timer_resolution_ms", "write_profile", "write_reports",
]

# Bounds on what a measurement may ask for: far above any useful profile, low enough that a typo
# (--runs 2000000000, --batch 10000000) fails at once instead of running for days or exhausting
# memory. Threads: 4x the CPUs is already heavy oversubscription; the runtime's OrtOptions
# refuses more in the same way.
MAX_RUNS = 100_000
MAX_BATCH = 65_536
MAX_INPUT_BYTES = 4 << 30


MAX_IDLE_MS = 10_000.0


def check_idle_ms(idle_ms: Any) -> float:
    """``--idle-ms``: a finite number of milliseconds from 0 to 10000."""
    if isinstance(idle_ms, bool) or not isinstance(idle_ms, (int, float, np.integer, np.floating)) or \
            not 0 <= float(idle_ms) <= MAX_IDLE_MS:
        raise ValueError(f"the idle time before each measured call must be a number of ms from 0 to {MAX_IDLE_MS:g}, "
                         f"got {idle_ms!r}")
    return float(idle_ms)


def check_measure_args(batches: Sequence[int], runs: int, warmup: int, threads: int | None) -> list[int]:
    """The sorted, distinct batch sizes, after checking every measurement argument.

    Raises:
        ValueError: one line naming the argument, its bounds and the value.
    """
    def count(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not batches or not all(count(b) and 1 <= b <= MAX_BATCH for b in batches):
        raise ValueError(f"batch sizes must be integers from 1 to {MAX_BATCH}, got {list(batches)}")
    if not (count(runs) and 1 <= runs <= MAX_RUNS):
        raise ValueError(f"need runs >= 1 and <= {MAX_RUNS} (an integer), got {runs!r}")
    if not (count(warmup) and 0 <= warmup <= MAX_RUNS):
        raise ValueError(f"need warmup >= 0 and <= {MAX_RUNS} (an integer), got {warmup!r}")
    check_threads(threads)
    return sorted({int(b) for b in batches})


@lru_cache(maxsize=1)
def timer_resolution_ms() -> float:
    """The resolution of ``time.perf_counter`` (the runner's clock) in ms, at least 1 ns.

    A stage timed below it (0.0 ms) is recorded as this resolution: a real stage takes time, and
    every latency statistic of a profile is > 0 (docs/runtime.md, "Profile format").
    """
    return max(time.get_clock_info("perf_counter").resolution * 1e3, 1e-6)


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """min, mean, median, p90, p95, p99, max and n of latency samples (ms).

    Percentiles are nearest-rank: the p-th percentile is the ⌈p·n/100⌉-th smallest sample (numpy
    ``method="inverted_cdf"``), a latency that was actually observed.

    Raises:
        ValueError: no samples, or a sample that is not a finite number >= 0 (a broken clock).
    """
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples to summarise")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        bad = a[~np.isfinite(a) | (a < 0)][0]
        raise ValueError(f"a latency sample of {bad!r} ms: the clock gave a non-finite or negative time")
    out = {"min": float(a.min()), "mean": float(a.mean()), "median": float(np.median(a))}
    for p in (90, 95, 99):
        out[f"p{p}"] = float(np.percentile(a, p, method="inverted_cdf"))
    out["max"] = float(a.max())
    out["n"] = int(a.size)
    return out


def _versions() -> dict[str, Any]:
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    for pkg in ("kdedge", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


Progress = Callable[[int, int, str], None]


def measure_profile(bundle: Any, *, target: str = "onnx", batches: Sequence[int] = (1,), runs: int = 200,
                    warmup: int = 20, threads: int | None = None, optimization: str = "all",
                    providers: Sequence[str] | None = None, progress: Progress | None = None,
                    seed: int = 0, meter: Any | None = None, nvpmodel: Any | None = None,
                    device: str | None = None, cuda_graphs: bool = False,
                    clock: Callable[[], float] | None = None, realtime: Any = None,
                    shared_pool: bool = False, idle_ms: float = 0.0) -> LatencyProfile:
    """Measure every stage (inside the runner's stage loop), every fused prefix and the full chain.

    Args:
        bundle: a bundle path or an opened Bundle.
        target: the target to measure.
        batches: batch sizes.
        runs: timed rounds per batch size (each round runs the chain once and every prefix once).
        warmup: untimed rounds first.
        threads: CPU threads per session (default: :func:`kdedge.targets.threads.default_threads`, one).
        optimization, providers: onnxruntime session settings.
        progress: called as ``progress(done, total, message)`` after each round.
        seed: seed of the random input batch (the latency of these graphs does not depend on
            the values).
        meter: a power meter (:mod:`kdedge.profile.meters`): after the latency rounds, each
            graph's energy per inference is measured over windows of ``runs`` runs
            (:func:`kdedge.profile.energy.measure_energy`) and stored as ``energy_mj``; the
            ``none`` meter records that energy is not measured. None: no energy section.
        nvpmodel: where the setting (power mode) is read from (default: the system's).
        device, cuda_graphs: where the target's sessions run (:class:`~kdedge.runtime.Runner`);
            part of the profile's key.
        clock: the runner's clock in seconds (default ``time.perf_counter``; tests pass a coarse
            one). Times below :func:`timer_resolution_ms` are recorded as that resolution.
        realtime: measure in real time (:class:`kdedge.runtime.realtime.Realtime`); part of the
            profile's key, so that a real-time run plans with a real-time profile.
        idle_ms: sleep this long before every timed call (each chain and each prefix), so that
            each is measured as a request that arrives after the device idled, as frames from a
            camera do (33 ms at 30 fps). Back to back (0, the default), caches stay warm and a
            small model measures faster than it runs at a steady rate (docs/runtime.md,
            "Requests after idle time"). Recorded per batch in ``measured``; not part of the key.

    Returns:
        the :class:`LatencyProfile` (not yet written; see :func:`store_profile`).

    Raises:
        ValueError: an argument out of bounds (:func:`check_measure_args`), or a batch whose
            input would not fit in ``MAX_INPUT_BYTES``.
    """
    from kdedge.runtime.policies import Fixed, Full
    from kdedge.runtime.runner import Runner

    batches = check_measure_args(list(batches), runs, warmup, threads)
    idle_ms = check_idle_ms(idle_ms)
    idle_s = idle_ms / 1e3
    rng = np.random.default_rng(seed)
    floor = timer_resolution_ms()
    with Runner(bundle, target=target, threads=threads, optimization=optimization, providers=providers,
                profile=None, watchdog=False, device=device, cuda_graphs=cuda_graphs, realtime=realtime,
                shared_pool=shared_pool, **({} if clock is None else {"clock": clock})) as runner:
        b = runner.bundle
        _check_input_bytes(batches[-1], runner.input_shape)
        target = runner.target  # "auto" resolved
        device, setting, detail = current_key(runner.threads, nvpmodel)
        full = Full()
        fixed = [Fixed(j + 1, fused=True) for j in range(runner.num_prefixes)]
        samples: dict[str, dict[int, list[float]]] = {}
        total = len(batches) * (runs + warmup)
        done = 0
        for n in batches:
            x = rng.standard_normal((n, *runner.input_shape)).astype(np.float32)
            for r in range(warmup + runs):
                timed = r >= warmup
                if timed and idle_s:
                    time.sleep(idle_s)
                res = runner.run(x, full)
                if timed:
                    for g, ms in zip(res.graphs, res.stage_ms):
                        samples.setdefault(g, {}).setdefault(n, []).append(_at_least(ms, floor))
                    samples.setdefault(CHAIN, {}).setdefault(n, []).append(_at_least(float(res.total_ms[0]), floor))
                for pol in fixed:
                    if timed and idle_s:
                        time.sleep(idle_s)
                    res = runner.run(x, pol)
                    if timed:
                        ms = _at_least(res.stage_ms[0], floor)
                        samples.setdefault(res.graphs[0], {}).setdefault(n, []).append(ms)
                done += 1
                if r == warmup - 1:
                    runner.settle()
                if progress is not None:
                    progress(done, total, f"batch {n}")
        graphs = {g: {str(n): {"latency_ms": summarize(v)} for n, v in per.items()} for g, per in samples.items()}
        energy: dict[str, Any] | None = None
        if meter is not None:
            from kdedge.profile.energy import measure_energy

            for n in batches:
                x = rng.standard_normal((n, *runner.input_shape)).astype(np.float32)
                info, per_graph = measure_energy(runner, x, runs, meter)
                clamped = [f"{g}@{n}" for g in info["clamped"]]  # graph@batch
                energy = {**info, "clamped": clamped} if energy is None else {**energy,
                                                                              "clamped": energy["clamped"] + clamped}
                for g, e in per_graph.items():
                    graphs.setdefault(g, {}).setdefault(str(n), {})["energy_mj"] = e
        opts = runner.options
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        data = {
            "format": FORMAT,
            "version": VERSION,
            "device": device,
            "setting": setting,
            "setting_detail": detail,
            "target": target,
            "run_key": runner.run_key,
            "threads": runner.threads,
            "realtime": runner.realtime.to_dict() if runner.realtime is not None else None,
            "options": _options_record(opts),
            "bundle": {"fingerprint": bundle_fingerprint(b, target), "family": b.family, "path": str(b.path)},
            "created": created,
            "host": platform.platform(),
            "versions": _versions(),
            "runs": int(runs),
            "warmup": int(warmup),
            "batches": batches,
            "measured": {str(n): {"created": created, "runs": int(runs), "warmup": int(warmup),
                                  **({"idle_ms": idle_ms} if idle_ms else {})} for n in batches},
            "graphs": graphs,
        }
        if energy is not None:
            data["energy"] = energy
    return LatencyProfile(data)


def _at_least(ms: float, floor: float) -> float:
    """A measured time, raised to the timer's resolution when it read below it (0.0 ms): the
    stage ran, the clock could not see it. Negative or NaN times are left for :func:`summarize`
    to refuse: they mean a broken clock, not a fast stage."""
    return floor if 0 <= ms < floor else ms


def _check_input_bytes(batch: int, input_shape: Sequence[int]) -> None:
    """Refuse a batch whose random input alone would take more than ``MAX_INPUT_BYTES``."""
    nbytes = 4 * batch * int(np.prod(input_shape))
    if nbytes > MAX_INPUT_BYTES:
        raise ValueError(f"batch {batch} of inputs {list(input_shape)} needs {nbytes / 2**30:.1f} GiB of float32 "
                         f"input, more than the {MAX_INPUT_BYTES >> 30} GiB a profile measures with; use a smaller "
                         "--batch")


def _options_record(opts: Any) -> dict[str, Any]:
    """The session options a profile was measured with, as JSON."""
    if isinstance(opts, dict):
        return {k: v for k, v in opts.items() if isinstance(v, (str, int, float, bool)) or v is None}
    return {"optimization": getattr(opts, "optimization", None),
            "providers": list(getattr(opts, "providers", None) or ["CPUExecutionProvider"])}


def format_table(profile: LatencyProfile) -> list[dict[str, Any]]:
    """One row per graph and batch: ``graph``, ``batch`` and the statistics in ms."""
    rows = []
    order = {g: i for i, g in enumerate(sorted(profile.graphs, key=lambda g: (g == CHAIN, g.startswith("prefix"),
                                                                               int("".join(c for c in g if c.isdigit()) or 0))))}
    for g in sorted(profile.graphs, key=order.__getitem__):
        for n in sorted(profile.data["graphs"][g], key=int):
            s = profile.data["graphs"][g][n]["latency_ms"]
            rows.append({"graph": g, "batch": int(n), **{k: s[k] for k in STATS}, "n": s["n"]})
    return rows


def plot_accuracy_latency(bundle: Any, profile: LatencyProfile, path: str | Path, batch: int | None = None,
                          stat: str = "median") -> Path | None:
    """A PNG of accuracy (manifest, default rule) against latency per stage and fused prefix.

    The stage curve puts stage k at the sum of stages 0..k's ``stat`` latency; each fused prefix
    is a separate point. Returns None (and writes nothing) when matplotlib is not installed.
    """
    return _plot_accuracy(bundle, profile, path, batch, stat, "latency_ms", "latency, {stat} at batch {n} (ms)")


def plot_accuracy_energy(bundle: Any, profile: LatencyProfile, path: str | Path,
                         batch: int | None = None) -> Path | None:
    """A PNG of accuracy against energy per inference (mean, mJ) per stage and fused prefix.

    The stage curve puts stage k at the sum of stages 0..k's mean energy. Returns None when
    matplotlib is not installed.

    Raises:
        ProfileError: the profile has no energy.
    """
    return _plot_accuracy(bundle, profile, path, batch, "mean", "energy_mj",
                          "energy per inference, mean at batch {n} (mJ)")


def _plot_accuracy(bundle: Any, profile: LatencyProfile, path: str | Path, batch: int | None, stat: str,
                   metric: str, xlabel: str) -> Path | None:
    n = batch if batch is not None else profile.batches[0]
    rule = bundle.combine_default
    xs, ys = [], []
    acc_total = 0.0
    for e in bundle.stages:
        acc_total += profile.stat(e.name, n, stat, metric)
        xs.append(acc_total)
        ys.append(100 * e.accuracy.get(rule, math.nan))
    px = [profile.stat(p.name, n, stat, metric) for p in bundle.prefixes]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(xs, ys, "o-", label=f"stages one by one ({rule})")
    for k, (a, b_) in enumerate(zip(xs, ys)):
        ax.annotate(f"{k}: {bundle.stages[k].members_total}m", (a, b_), textcoords="offset points", xytext=(4, -10),
                    fontsize=7)
    if bundle.prefixes:
        py = [100 * p.accuracy.get(rule, math.nan) for p in bundle.prefixes]
        ax.plot(px, py, "s--", label="fused prefixes (budget mode)", alpha=0.8)
    ax.set_xlabel(xlabel.format(stat=stat, n=n))
    ax.set_ylabel(f"accuracy on {bundle.manifest['evaluation']['split']} (%)")
    ax.set_title(f"{bundle.family}: {profile.device} {profile.setting}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)

    def save(tmp: Path) -> None:
        fig.savefig(tmp, format="png")

    try:
        atomic_write(out, save)
    finally:
        plt.close(fig)
    return out


CSV_COLUMNS = ("device", "setting", "graph", "batch", *[f"latency_ms_{k}" for k in STATS], "latency_n",
               "energy_mj_mean", "energy_n", "energy_source", "energy_period_s")


def profile_csv(profile: LatencyProfile) -> str:
    """The profile as CSV: one row per graph and batch, latency statistics and mean energy
    (energy columns empty when not measured; ``energy_source`` says ``none`` then)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    e = profile.energy or {}
    for row in format_table(profile):
        mj = profile.data["graphs"][row["graph"]][str(row["batch"])].get("energy_mj")
        w.writerow([profile.device, profile.setting, row["graph"], row["batch"], *[repr(row[k]) for k in STATS],
                    row["n"], "" if mj is None else repr(mj["mean"]), "" if mj is None else mj["n"],
                    e.get("source", ""), "" if e.get("period_s") is None else repr(e["period_s"])])
    return buf.getvalue()


def write_reports(bundle: Any, profile: LatencyProfile, path: str | Path, plot: bool = True) -> dict[str, Path]:
    """Write the CSV (``<profile>.csv``) and, with ``plot``, the accuracy-vs-latency PNG
    (``<profile>.png``) and, when the profile has energy, accuracy-vs-energy (``<profile>-energy.png``).

    Returns:
        the files written by kind: ``csv``, ``latency_png``, ``energy_png``.
    """
    path = Path(path)
    out: dict[str, Path] = {}
    text = profile_csv(profile)
    csv_path = path.with_suffix(".csv")
    atomic_write(csv_path, lambda p: p.write_text(text, encoding="utf-8"))
    out["csv"] = csv_path
    if plot:
        png = plot_accuracy_latency(bundle, profile, path.with_suffix(".png"))
        if png is not None:
            out["latency_png"] = png
        if profile.has_energy:
            png = plot_accuracy_energy(bundle, profile, path.with_name(path.stem + "-energy.png"))
            if png is not None:
                out["energy_png"] = png
    return out


def open_target_bundle(bundle: str | Path | Any, target: str) -> tuple[Any, str]:
    """(the opened bundle, checked for ``target``'s files; the target, ``auto`` resolved to the
    one the runner would pick)."""
    from kdedge.bundle.manifest import read_manifest
    from kdedge.targets import open_bundle, pick_target

    if target == "auto":
        target = pick_target(bundle.targets if hasattr(bundle, "manifest") else read_manifest(bundle)["targets"])
    if hasattr(bundle, "manifest"):
        return bundle, target
    return open_bundle(bundle, targets=[target]), target


def profile_bundle(bundle: str | Path | Any, *, target: str = "onnx", batches: Sequence[int] = (1,), runs: int = 200,
                   warmup: int = 20, threads: int | None = None, optimization: str = "all",
                   providers: Sequence[str] | None = None, plot: bool = True,
                   progress: Progress | None = None, meter: Any | None = None, nvpmodel: Any | None = None,
                   device: str | None = None, cuda_graphs: bool = False,
                   report: Callable[[str], None] | None = None, realtime: Any = None,
                   shared_pool: bool = False, idle_ms: float = 0.0) -> tuple[LatencyProfile, Path, Path | None]:
    """Measure a bundle on this device and store the profile in the bundle, with its CSV and PNGs
    (:func:`write_reports`: ``<profile>.csv``, ``<profile>.png``, ``<profile>-energy.png``).

    The batches measured are merged into the profile already stored for the same key
    (:func:`store_profile`); ``report`` is told what happened to it. The returned profile is the
    stored one: every batch it holds.

    Returns:
        (profile, profile path, PNG path or None).

    Example:
        >>> prof, path, png = profile_bundle("hne.kdedge", batches=(1, 32))
    """
    b, target = open_target_bundle(bundle, target)
    prof = measure_profile(b, target=target, batches=batches, runs=runs, warmup=warmup, threads=threads,
                           optimization=optimization, providers=providers, progress=progress, meter=meter,
                           nvpmodel=nvpmodel, device=device, cuda_graphs=cuda_graphs, realtime=realtime,
                           shared_pool=shared_pool, idle_ms=idle_ms)
    prof = store_profile(b, prof, report=report)
    path = prof.path
    assert path is not None
    reports = write_reports(b, prof, path, plot=plot)
    return prof, path, reports.get("latency_png")


def profile_power_modes(bundle: str | Path | Any, modes: Sequence[str], *, nvpmodel: Any | None = None,
                        lock_clocks: bool = False, progress: Progress | None = None,
                        **kwargs: Any) -> list[tuple[LatencyProfile, Path, Path | None]]:
    """Profile the bundle in each nvpmodel power mode; one profile per mode
    (``profiles/<device>-<mode>.json``). The user's mode (and clocks) are restored afterwards,
    also on an error or Ctrl-C (:meth:`kdedge.profile.modes.Nvpmodel.sweep`).

    Args:
        bundle: a bundle path or an opened Bundle.
        modes: mode names (or ids) of the board's nvpmodel.conf; all are checked before any
            switch.
        nvpmodel: the :class:`kdedge.profile.modes.Nvpmodel` (default: the system's).
        lock_clocks: run ``jetson_clocks`` in each mode (stable clocks while measuring).
        progress: called as ``progress(done, total, message)`` over all modes.
        kwargs: passed to :func:`profile_bundle` (target, batches, runs, warmup, threads, meter...).

    Returns:
        (profile, path, PNG path or None) per mode, in the order given.

    Example:
        >>> profile_power_modes("hne.kdedge", ["15W", "25W"], meter=auto_meter())
    """
    from kdedge.device import slug
    from kdedge.profile.modes import Nvpmodel

    nv = nvpmodel if nvpmodel is not None else Nvpmodel()
    b, kwargs["target"] = open_target_bundle(bundle, kwargs.get("target", "onnx"))
    out: list[tuple[LatencyProfile, Path, Path | None]] = []
    with nv.sweep(list(modes), lock_clocks=lock_clocks) as visit:
        for i, mode in enumerate(visit):
            def tick(done: int, total: int, message: str, i: int = i, name: str = mode.name) -> None:
                if progress is not None:
                    progress(i * total + done, len(modes) * total, f"{name} {message}")

            prof, path, png = profile_bundle(b, progress=tick, nvpmodel=nv, **kwargs)
            if prof.setting != slug(mode.name, lower=False):  # the switch did not take: do not mislabel
                raise ProfileError(f"asked for power mode {mode.name} but the device reports {prof.setting}; "
                                   f"the profile {path} was measured under {prof.setting}")
            out.append((prof, path, png))
    return out
