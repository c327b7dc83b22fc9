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
(``kdedge/schemas/profile.schema.json`` plus :mod:`kdedge.profile.validate`) when it is built
or read, and measuring a batch size merges it into the profile stored for the same key
(:mod:`kdedge.profile.merge`, :func:`store_profile`).

Example:
    >>> prof, path, png = profile_bundle("hne.kdedge", batches=(1, 32), threads=2)
    >>> prof.stat("stage1", 1, "p99")
    0.41
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import math
import os
import platform
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from kdedge.io import JSONError, atomic_write, atomic_write_json, read_json_strict
from kdedge.profile.merge import merge_profiles
from kdedge.profile.spec import (CHAIN, FORMAT, STATS, VERSION, ForeignProfileError, InvalidProfileError,
                                 MissingProfileError, NewerProfileError, ProfileError, StaleProfileError)
from kdedge.profile.validate import check_coverage, validate_profile
from kdedge.runtime.sessions import check_threads, max_threads

__all__ = [
    "CHAIN", "FORMAT", "ForeignProfileError", "InvalidProfileError", "LatencyProfile", "MAX_BATCH", "MAX_RUNS",
    "MissingProfileError", "NewerProfileError", "ProfileError", "STATS", "StaleProfileError", "VERSION",
    "bundle_fingerprint", "check_measure_args", "check_profile", "current_key", "format_table", "max_threads",
    "measure_profile", "open_target_bundle", "plot_accuracy_energy", "plot_accuracy_latency", "profile_bundle",
    "profile_csv", "profile_filename", "profile_power_modes", "resolve_profile", "store_profile", "summarize",
    "timer_resolution_ms", "write_profile", "write_reports",
]

# Bounds on what a measurement may ask for: far above any useful profile, low enough that a typo
# (--runs 2000000000, --batch 10000000) fails at once instead of running for days or exhausting
# memory. Threads: 4x the CPUs is already heavy oversubscription; the runtime's OrtOptions
# refuses more in the same way.
MAX_RUNS = 100_000
MAX_BATCH = 65_536
MAX_INPUT_BYTES = 4 << 30


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


def bundle_fingerprint(bundle: Any, target: str) -> str:
    """sha256 over the names and recorded sha256 of the bundle's stage and prefix files for ``target``.

    The manifest's checksums are verified against the files when the bundle is opened, so this
    changes exactly when a stage file does (a re-export, another precision).
    """
    h = hashlib.sha256()
    for e in (*bundle.stages, *bundle.prefixes):
        f = e.files.get(target)
        h.update(f"{e.name}\0{target}\0{f.sha256 if f else '-'}\n".encode())
    return h.hexdigest()


def profile_filename(device: str, setting: str, key: str = "") -> str:
    """``<device>-<setting>.json``, or ``<device>-<setting>-<key>.json`` for a non-empty run key.

    Raises:
        ProfileError: a part that would leave ``profiles/`` or hide the file (a power-mode name
            such as ``../x`` read from a device).
    """
    for part in (device, setting, key):
        if any(c in part for c in "/\\\0") or part.startswith("."):
            raise ProfileError(f"{part!r} cannot be part of a profile file name (no path separators, no leading dot)")
    return f"{device}-{setting}" + (f"-{key}" if key else "") + ".json"


@lru_cache(maxsize=1)
def _device_id() -> str:
    from kdedge.profile.modes import device_id

    return device_id()


def current_key(threads: int, nvpmodel: Any | None = None) -> tuple[str, str, dict[str, Any]]:
    """(device id, setting name, setting details) of this machine for ``threads`` CPU threads
    (``nvpmodel``: the :class:`kdedge.profile.modes.Nvpmodel` to read the power mode from;
    default: the system's, when it has one)."""
    from kdedge.profile.modes import current_setting

    setting = current_setting(threads=threads, nvpmodel=nvpmodel)
    return _device_id(), setting.name, setting.to_dict()


@dataclass(frozen=True)
class LatencyProfile:
    """A loaded, valid profile (``data`` is the JSON dict; ``path`` where it came from, if a file).

    Constructing one validates ``data`` (:func:`kdedge.profile.validate.validate_profile`), so a
    policy never plans with a null, NaN, infinite or negative statistic.

    Raises:
        InvalidProfileError: ``data`` breaks the profile format (the message names the field).
        NewerProfileError: ``data`` is of a newer profile version.
    """

    data: dict[str, Any]
    path: Path | None = None

    def __post_init__(self) -> None:
        validate_profile(self.data, self.where())

    @property
    def device(self) -> str:
        return str(self.data["device"])

    @property
    def setting(self) -> str:
        return str(self.data["setting"])

    @property
    def target(self) -> str:
        return str(self.data["target"])

    @property
    def run_key(self) -> str:
        """Target and run device (``torch-cuda``); empty for onnxruntime on the CPU. Profiles
        written before run keys existed hold none: they were onnxruntime CPU profiles unless
        their target says otherwise (then they match no runner and are refused)."""
        key = self.data.get("run_key")
        if key is None:
            return "" if self.target == "onnx" else f"{self.target}-?"
        return str(key)

    @property
    def threads(self) -> int:
        return int(self.data["threads"])

    @property
    def fingerprint(self) -> str:
        return str(self.data["bundle"]["fingerprint"])

    @property
    def batches(self) -> list[int]:
        return sorted(int(b) for b in self.data["batches"])

    @property
    def graphs(self) -> list[str]:
        return list(self.data["graphs"])

    def where(self) -> str:
        """The file, or (for a profile built in memory) its name; safe on invalid data, because
        validation messages start with it."""
        if self.path is not None:
            return str(self.path)
        d = self.data if isinstance(self.data, dict) else {}
        key = d.get("run_key") if isinstance(d.get("run_key"), str) else ""
        return f"profile {d.get('device', '?')}-{d.get('setting', '?')}" + (f"-{key}" if key else "")

    def _entry(self, graph: str, batch: int, metric: str) -> dict[str, Any] | None:
        """The ``metric`` summary of ``graph`` at ``batch``: the measured batch, else the next
        larger batch that measured ``metric``, else the largest scaled proportionally (None when
        no batch measured it). Per metric, because a merged profile may hold energy for some
        batches only."""
        g = self.data["graphs"].get(graph)
        if g is None:
            raise ProfileError(f"{self.where()} has no measurements of {graph}; it has {', '.join(self.graphs)}")
        measured = sorted(int(b) for b, e in g.items() if metric in e)
        if not measured:
            return None
        above = [b for b in measured if b >= batch]
        if above:  # latency and energy grow with the batch: the next larger measured batch is an upper bound
            return g[str(above[0])][metric]
        top = measured[-1]
        scale = batch / top  # beyond the largest measured batch: scale proportionally (documented)
        return {k: (v * scale if k != "n" else v) for k, v in g[str(top)][metric].items()}

    def stat(self, graph: str, batch: int, stat: str = "p99", metric: str = "latency_ms") -> float:
        """A statistic of ``graph`` at ``batch``: the measured batch, else the next larger measured
        one, else the largest scaled proportionally.

        Raises:
            ProfileError: unknown graph, statistic or metric (e.g. ``energy_mj`` in a profile
                made without a meter).
        """
        if stat not in STATS:
            raise ProfileError(f"unknown statistic {stat!r}; known: {', '.join(STATS)}")
        summary = self._entry(graph, batch, metric)
        if summary is None:
            have = ", ".join(sorted({m for e in self.data["graphs"][graph].values() for m in e}))
            if metric == "energy_mj":
                e = self.energy
                why = ("its meter measured nothing: " + str(e.get("note")) if e is not None
                       else "it was made without --meter")
                raise ProfileError(f"{self.where()} has no energy_mj measurements: no energy per stage ({why}); "
                                   f"run `kdedge profile "
                                   f"{self.data['bundle'].get('path', 'BUNDLE')} --meter auto` on a device with a "
                                   "power meter (see docs/power.md)")
            raise ProfileError(f"{self.where()} has no {metric} measurements (it has {have}); "
                               f"measure them with kdedge profile")
        if stat not in summary:
            have = ", ".join(k for k in summary if k != "n")
            raise ProfileError(f"{self.where()} has no {stat} of {metric} (it has {have}); energy is measured "
                               "over windows of many runs, so only its mean per inference exists")
        return float(summary[stat])

    @property
    def energy(self) -> dict[str, Any] | None:
        """How energy was measured (``measured``, ``source``, ``period_s``, ``note``), or None
        when the profile was made without a meter."""
        e = self.data.get("energy")
        return dict(e) if isinstance(e, dict) else None

    @property
    def has_energy(self) -> bool:
        """Whether the profile holds measured energy per stage."""
        e = self.energy
        return bool(e and e.get("measured"))

    def to_json(self) -> str:
        from kdedge.io import dumps_strict

        return dumps_strict(self.data) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        """Read and check a profile file: strict JSON (bounded size and depth, no NaN, no
        duplicate keys), then the profile format (:mod:`kdedge.profile.validate`).

        Raises:
            MissingProfileError: no such file.
            NewerProfileError: a newer profile version.
            ProfileError: not a regular file, unreadable, not JSON, or not a valid profile (the
                message names the file and the field).
        """
        path = Path(path)
        try:
            data = read_json_strict(path, what="the file")
        except FileNotFoundError:
            raise MissingProfileError(f"latency profile {path} does not exist") from None
        except (OSError, JSONError) as e:
            raise ProfileError(f"cannot read latency profile {path}: {e}") from None
        return cls(data, path)


def check_profile(profile: LatencyProfile, bundle: Any, target: str, device: str, setting: str,
                  key: str = "") -> None:
    """Refuse a profile of another target, run key (run device, CUDA graphs), device or
    setting, or of other stage files.

    Raises:
        ForeignProfileError, StaleProfileError: with the command that makes a usable one
            (foreign also for a profile of another bundle's graphs).
    """
    redo = f"run `kdedge profile {bundle.path} --target {target}{_run_flags(key)} --threads <N>` on this device"
    if profile.target != target:
        raise ForeignProfileError(f"{profile.where()} was measured for target {profile.target!r}, the runner "
                                  f"runs {target!r}; {redo}")
    if profile.run_key != key:
        raise ForeignProfileError(f"{profile.where()} was measured as {profile.run_key or 'onnx-cpu'!r} (target, "
                                  f"device, CUDA graphs), the runner runs {key or 'onnx-cpu'!r}; {redo}")
    if profile.device != device:
        raise ForeignProfileError(f"{profile.where()} was measured on device {profile.device!r}, this is "
                                  f"{device!r}: another device's latencies would mislead the deadline policy; {redo}")
    if profile.setting != setting:
        raise ForeignProfileError(f"{profile.where()} was measured under setting {profile.setting!r}, this runner "
                                  f"runs under {setting!r} (threads / governor / power mode); run with the "
                                  f"profile's setting, or {redo}")
    check_coverage(profile.data, bundle, profile.where())
    if profile.fingerprint != bundle_fingerprint(bundle, target):
        measured_on = str(profile.data["bundle"].get("path") or "")
        other = (f", or the profile is of the bundle at {measured_on}"
                 if measured_on and measured_on != str(bundle.path) else "")
        raise StaleProfileError(f"{profile.where()} is stale: it was measured on other {target} stage files than "
                                f"this bundle's (the bundle was re-exported since{other}); {redo}")


def _run_flags(key: str) -> str:
    """The ``kdedge profile`` flags that reproduce a run key (``torch-cuda-cudagraphs`` ->
    `` --device cuda --cuda-graphs``)."""
    from kdedge.runtime.realtime import split_realtime_key

    key, rt = split_realtime_key(key)
    flags = ""
    if rt is not None:  # rtfifo50 / rtrr10
        policy = "rr" if rt.startswith("rtrr") else "fifo"
        flags = f" --realtime --rt-priority {rt[len('rt') + len(policy):]}" + (" --rt-policy rr" if policy == "rr" else "")
    if not key:
        return flags
    return _device_flags(key) + flags


def _device_flags(key: str) -> str:
    parts = key.split("-")[1:]
    graphs = parts[-1:] == ["cudagraphs"]
    device = "-".join(parts[:-1] if graphs else parts)
    device = device.replace("cuda", "cuda:", 1) if device[4:].isdigit() and device.startswith("cuda") else device
    return f" --device {device}" + (" --cuda-graphs" if graphs else "")


def resolve_profile(bundle: Any, arg: Any, target: str, threads: int, setting: str | None = None,
                    key: str = "") -> LatencyProfile:
    """The profile a runner uses: ``arg`` is ``"auto"`` (the bundle's profile of this device and
    setting), a path, a :class:`LatencyProfile`, or None (none given).

    Args:
        setting: the setting (power mode) to use instead of reading the current one (a runner
            that follows the power mode passes what its mode callable returned).
        key: the runner's run key (:attr:`kdedge.runtime.Runner.run_key`).

    Raises:
        MissingProfileError, ForeignProfileError, StaleProfileError.
    """
    if setting is None:
        device, setting, _ = current_key(threads)
    else:
        device = _device_id()
    how = f"run `kdedge profile {bundle.path} --target {target}{_run_flags(key)} --threads {threads}` first"
    if arg is None:
        raise MissingProfileError(f"this policy needs a latency profile and the runner has none; {how}")
    if isinstance(arg, LatencyProfile):
        prof = arg
    elif not isinstance(arg, (str, Path)):
        raise ProfileError(f"profile= takes 'auto', a path or a LatencyProfile, got {type(arg).__name__}")
    elif str(arg) != "auto":
        prof = LatencyProfile.load(arg)
    else:
        path = Path(bundle.path) / "profiles" / profile_filename(device, setting, key)
        if not path.is_file():
            have = sorted(p.stem for p in (Path(bundle.path) / "profiles").glob("*.json"))
            others = f"; it has profiles for: {', '.join(have)}" if have else ""
            runs = f", run as {key}" if key else ""
            raise MissingProfileError(f"bundle {bundle.path} has no latency profile for this device ({device}) and "
                                      f"setting ({setting}){runs}{others}; {how}")
        prof = LatencyProfile.load(path)
    check_profile(prof, bundle, target, device, setting, key)
    return prof


def demo_deadlines(profile: LatencyProfile, batch: int = 1, margin_ms: float = 0.1) -> tuple[float, float]:
    """Two deadlines that show what the runner is for, from a profile just measured: ``tight``,
    between stage 0's p99 and the chain's p99 (the runner must stop part-way; never shorter than
    stage 0 plus the policy's margin, which would only measure misses), and ``loose``, which
    the whole chain fits (twice its p99, at least its p99 + 0.5 ms)."""
    s0 = profile.stat("stage0", batch, "p99")
    chain = profile.stat(CHAIN, batch, "p99")
    tight = max(s0 + margin_ms, (s0 + chain) / 2)
    loose = max(2 * chain, chain + 0.5, tight)
    return round(tight, 3), round(loose, 3)


def thread_choice(bundle: Any, target: str, key: str = "", batch: int = 1,
                  stat: str = "p99") -> tuple[dict[str, int], LatencyProfile]:
    """Per graph, the thread count whose profile has the lowest ``stat`` at ``batch`` (``kdedge
    run --threads auto``), and a profile that holds, for each graph, the statistics of its
    chosen count (what the deadline policy plans with).

    The candidates are the bundle's profiles of this device, target, run key and bundle files
    whose setting is this machine's setting for their own thread count (``kdedge profile
    --threads 1,2`` writes them).

    Raises:
        MissingProfileError: no usable profile, with the command that makes them.
    """
    from kdedge.profile.modes import current_setting

    device = _device_id()
    fingerprint = bundle_fingerprint(bundle, target)
    how = (f"--threads auto picks each stage's thread count from the bundle's profiles of several thread counts; "
           f"run `kdedge profile {bundle.path} --target {target}{_run_flags(key)} --threads 1,2` first")
    candidates: dict[int, LatencyProfile] = {}
    for path in sorted((Path(bundle.path) / "profiles").glob("*.json")):
        try:
            prof = LatencyProfile.load(path)
        except ProfileError:
            continue  # a damaged file is refused when named; here it is just not a candidate
        if (prof.device != device or prof.target != target or prof.run_key != key or prof.fingerprint != fingerprint
                or batch not in prof.batches or prof.setting != current_setting(threads=prof.threads).name):
            continue
        candidates.setdefault(prof.threads, prof)
    if not candidates:
        raise MissingProfileError(f"bundle {bundle.path} has no usable latency profile at batch {batch} for this "
                                  f"device ({device}); {how}")
    choice: dict[str, int] = {}
    for g in sorted({g for p in candidates.values() for g in p.graphs}):
        have = {t: p.stat(g, batch, stat) for t, p in candidates.items() if g in p.graphs}
        choice[g] = min(have, key=lambda t: (have[t], t))  # ties: fewer threads
    per_graph = {g: t for g, t in choice.items() if g != CHAIN}
    counts = list(per_graph.values())
    data = dict(candidates[max(set(counts), key=lambda t: (counts.count(t), -t))].data)
    data.update(graphs={g: {str(batch): candidates[t].data["graphs"][g][str(batch)]} for g, t in choice.items()},
                threads_per_graph=per_graph, batches=[batch])
    data.pop("measured", None)
    data.pop("energy", None)
    return per_graph, LatencyProfile(data)


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
                    clock: Callable[[], float] | None = None, realtime: Any = None) -> LatencyProfile:
    """Measure every stage (inside the runner's stage loop), every fused prefix and the full chain.

    Args:
        bundle: a bundle path or an opened Bundle.
        target: the target to measure.
        batches: batch sizes.
        runs: timed rounds per batch size (each round runs the chain once and every prefix once).
        warmup: untimed rounds first.
        threads: CPU threads per session (default: :func:`kdedge.runtime.sessions.default_threads`, one).
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

    Returns:
        the :class:`LatencyProfile` (not yet written; see :func:`store_profile`).

    Raises:
        ValueError: an argument out of bounds (:func:`check_measure_args`), or a batch whose
            input would not fit in ``MAX_INPUT_BYTES``.
    """
    from kdedge.runtime.policies import Fixed, Full
    from kdedge.runtime.runner import Runner

    batches = check_measure_args(list(batches), runs, warmup, threads)
    rng = np.random.default_rng(seed)
    floor = timer_resolution_ms()
    with Runner(bundle, target=target, threads=threads, optimization=optimization, providers=providers,
                profile=None, watchdog=False, device=device, cuda_graphs=cuda_graphs, realtime=realtime,
                **({} if clock is None else {"clock": clock})) as runner:
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
                res = runner.run(x, full)
                timed = r >= warmup
                if timed:
                    for g, ms in zip(res.graphs, res.stage_ms):
                        samples.setdefault(g, {}).setdefault(n, []).append(_at_least(ms, floor))
                    samples.setdefault(CHAIN, {}).setdefault(n, []).append(_at_least(float(res.total_ms[0]), floor))
                for pol in fixed:
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
            "measured": {str(n): {"created": created, "runs": int(runs), "warmup": int(warmup)} for n in batches},
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


def write_profile(bundle: Any, profile: LatencyProfile, path: str | Path | None = None,
                  report: Callable[[str], None] | None = None) -> Path:
    """Store ``profile`` (default ``BUNDLE/profiles/<device>-<setting>[-<run key>].json``), merged
    into the profile already there (:func:`store_profile`); returns the path."""
    return store_profile(bundle, profile, path, report=report).path  # type: ignore[return-value]


def store_profile(bundle: Any, profile: LatencyProfile, path: str | Path | None = None,
                  report: Callable[[str], None] | None = None) -> LatencyProfile:
    """Merge ``profile`` into the one stored at ``path`` and write the result atomically.

    A stored profile with the same key (device, setting, target, run key, threads, fingerprint,
    options) keeps its other batches; one with another key is replaced (stale: the bundle
    changed); one that is not a valid profile is moved aside to ``<name>.invalid`` (never
    deleted) and replaced; one of a newer profile version is left alone and this call fails.
    Read-merge-write holds an exclusive lock on the profiles directory, so two ``kdedge
    profile`` runs at once do not drop each other's batches.

    Args:
        report: called with one line saying what happened to the stored profile (batches added,
            kept, re-measured; why it was replaced).

    Returns:
        the stored profile, with its path.

    Raises:
        NewerProfileError: the stored profile is of a newer version (not overwritten).
    """
    out = Path(path) if path is not None else Path(bundle.path) / "profiles" / profile_filename(
        profile.device, profile.setting, profile.run_key)
    with _locked(out.parent):
        old = _stored(out, report)
        data, message = merge_profiles(None if old is None else old.data, profile.data, str(out))
        merged = LatencyProfile(data, out)  # validated before it replaces anything
        atomic_write_json(out, merged.data)
    if message and report is not None:
        report(message)
    return merged


def _stored(out: Path, report: Callable[[str], None] | None) -> LatencyProfile | None:
    """The profile stored at ``out``, None when there is none (or it was unusable and moved aside)."""
    if not os.path.lexists(out):
        return None
    try:
        return LatencyProfile.load(out)
    except NewerProfileError:
        raise NewerProfileError(f"{out} was written by a newer kdedge (a newer profile version) and was not "
                                "overwritten; move it away to store this measurement, or profile with that "
                                "kdedge") from None
    except ProfileError as e:
        aside = _free_name(out.with_name(out.name + ".invalid"))
        os.replace(out, aside)
        if report is not None:
            report(f"{out} was not a usable profile ({e}); moved it to {aside.name} and wrote a new one")
        return None


def _free_name(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2``... : the first name not taken."""
    candidate, i = path, 0
    while os.path.lexists(candidate):
        i += 1
        candidate = path.with_name(f"{path.name}.{i}")
    return candidate


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``directory`` (flock on its descriptor; no lock file to
    leave behind). Where flock is missing (Windows) or refused (some network file systems) the
    write is still atomic; only concurrent merges could then lose a batch."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


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
    from kdedge.runtime.bundle import open_bundle, read_manifest
    from kdedge.targets import pick_target

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
                   ) -> tuple[LatencyProfile, Path, Path | None]:
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
                           nvpmodel=nvpmodel, device=device, cuda_graphs=cuda_graphs, realtime=realtime)
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
    from kdedge.profile.modes import Nvpmodel, slug

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
