"""Profile files: the latency/energy statistics a bundle carries per device, setting and run key
(``BUNDLE/profiles/<device>-<setting>[-<run key>].json``), read, keyed, resolved for a runner and
stored, without the measuring code (:mod:`kdedge.profile.latency` measures; the runtime reads
through this module). The format is in :mod:`kdedge.profile.latency`'s docstring and
``kdedge/schemas/profile.schema.json``; numpy, jsonschema and the standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

from kdedge.bundle.profile.merge import merge_profiles
from kdedge.bundle.profile.spec import (CHAIN, STATS, ForeignProfileError, MissingProfileError, NewerProfileError, ProfileError, StaleProfileError)
from kdedge.bundle.profile.validate import check_coverage, validate_profile
from kdedge.bundle.files import file_kind
from kdedge.io import JSONError, atomic_write_json, read_json_strict

__all__ = ["LatencyProfile", "bundle_fingerprint", "check_profile", "current_key", "demo_deadlines", "profile_filename",
           "realtime_key", "resolve_profile", "session_optimization", "split_realtime_key", "store_profile",
           "thread_choice", "write_profile"]


def realtime_key(base: str, part: str | None) -> str:
    """A runner's profile key: the target's run key (``""`` for onnxruntime on the CPU,
    ``torch-cuda-cudagraphs``, …) plus the real-time part (``rtfifo50``) when there is one."""
    if not part:
        return base
    return f"{base}-{part}" if base else part


def split_realtime_key(key: str) -> tuple[str, str | None]:
    """(the target's run key, the real-time part or None): the inverse of :func:`realtime_key`."""
    head, _, last = key.rpartition("-")
    part = last if last.startswith("rt") else None
    if part is None:
        return key, None
    return head, part


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
    from kdedge.device import device_id

    return device_id()


def current_key(threads: int, nvpmodel: Any | None = None) -> tuple[str, str, dict[str, Any]]:
    """(device id, setting name, setting details) of this machine for ``threads`` CPU threads
    (``nvpmodel``: the :class:`kdedge.profile.modes.Nvpmodel` to read the power mode from;
    default: the system's, when it has one)."""
    from kdedge.device import current_setting

    setting = current_setting(threads=threads, nvpmodel=nvpmodel)
    return _device_id(), setting.name, setting.to_dict()


@dataclass(frozen=True)
class LatencyProfile:
    """A loaded, valid profile (``data`` is the JSON dict; ``path`` where it came from, if a file).

    Constructing one validates ``data`` (:func:`kdedge.bundle.profile.validate.validate_profile`), so a
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
        duplicate keys), then the profile format (:mod:`kdedge.bundle.profile.validate`).

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


def session_optimization(options: Any) -> str | None:
    """The graph optimisation level of a runner's session options (onnxruntime's
    :class:`~kdedge.targets.ort_session.OrtOptions`, or a target's dict), None where it has none."""
    level = options.get("optimization") if isinstance(options, dict) else getattr(options, "optimization", None)
    return level if isinstance(level, str) else None


def check_profile(profile: LatencyProfile, bundle: Any, target: str, device: str, setting: str,
                  key: str = "", optimization: str | None = None) -> None:
    """Refuse a profile of another target, run key (run device, CUDA graphs), device or
    setting, of other stage files, or measured at another graph optimisation level than
    ``optimization`` (the runner's; None: not checked).

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
    measured = (profile.data.get("options") or {}).get("optimization")
    if optimization is not None and isinstance(measured, str) and measured != optimization:
        flag = "" if optimization == "all" else f" --optimization {optimization}"
        raise ForeignProfileError(f"{profile.where()} was measured with graph optimisation {measured!r}, the "
                                  f"runner's sessions use {optimization!r} (its stages run at other speeds); "
                                  f"run `kdedge profile {bundle.path} --target {target}{_run_flags(key)}{flag} "
                                  f"--threads <N>` on this device")
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
    key, rt = split_realtime_key(key)
    flags = ""
    if rt is not None:  # rtfifo50 / rtrr10
        policy = "rr" if rt.startswith("rtrr") else "fifo"
        flags = f" --realtime --rt-priority {rt[len('rt') + len(policy):]}" + (" --rt-policy rr" if policy == "rr" else "")
    if key == "shared" or key.endswith("-shared"):  # one onnxruntime pool for the process
        key, flags = key[:-len("shared")].rstrip("-"), " --shared-pool" + flags
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
                    key: str = "", optimization: str | None = None) -> LatencyProfile:
    """The profile a runner uses: ``arg`` is ``"auto"`` (the bundle's profile of this device and
    setting), a path, a :class:`LatencyProfile`, or None (none given).

    Args:
        setting: the setting (power mode) to use instead of reading the current one (a runner
            that follows the power mode passes what its mode callable returned).
        key: the runner's run key (:attr:`kdedge.runtime.Runner.run_key`).
        optimization: the runner's graph optimisation level (:func:`session_optimization`);
            a profile measured at another is foreign.

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
        path = profiles_dir(bundle) / profile_filename(device, setting, key)
        if not os.path.lexists(path):  # a FIFO or a directory there is named by load(), not called missing
            have = sorted(p.stem for p in (Path(bundle.path) / "profiles").glob("*.json"))
            others = f"; it has profiles for: {', '.join(have)}" if have else ""
            runs = f", run as {key}" if key else ""
            raise MissingProfileError(f"bundle {bundle.path} has no latency profile for this device ({device}) and "
                                      f"setting ({setting}){runs}{others}; {how}")
        prof = LatencyProfile.load(path)
    check_profile(prof, bundle, target, device, setting, key, optimization)
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
    from kdedge.device import current_setting

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


def profiles_dir(bundle: Any) -> Path:
    """``BUNDLE/profiles``, where a bundle's own profiles are read and written.

    Raises:
        ProfileError: it is a symbolic link (profiles would be read from, and written to,
            wherever it points, outside the bundle) or not a directory.
    """
    d = Path(bundle.path) / "profiles"
    try:
        mode = os.lstat(d).st_mode
    except FileNotFoundError:
        return d
    except OSError as e:
        raise ProfileError(f"cannot read {d}: {e.strerror or e}") from None
    if stat.S_ISLNK(mode):
        raise ProfileError(f"{d} is a symbolic link (to {os.readlink(d)!r}); kdedge reads and writes a bundle's "
                           "profiles only inside the bundle: replace the link with a directory, or give --profile "
                           "PATH to use a profile kept elsewhere")
    if not stat.S_ISDIR(mode):
        raise ProfileError(f"{d} is {file_kind(mode)}, not a directory; move it away so that profiles can be stored")
    return d


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
    out = Path(path) if path is not None else profiles_dir(bundle) / profile_filename(
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
