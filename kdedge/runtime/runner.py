"""The anytime runner: run a bundle's stages one by one on the device, stopping when a policy says so.

``Runner(bundle)`` opens the bundle (manifest and checksums verified), creates one session per
stage for the target, and ``run(x, policy)`` runs stage 0, 1, … in order, feeding each the
tensors carried from earlier stages and keeping the running combination of the completed
stages' logits. Before each stage the policy decides whether to go on (for the whole batch or
per sample); the result says, per sample, which stage the answer came from, how many members it
averages, how long each stage took and whether the budget was met.

Threads: ``run`` may be called from several threads at once. The runner's shared state is
read-only after construction (sessions, wiring, the loaded profile) or guarded by a lock (the
lazily opened prefix sessions, the profile cache, the watchdog); every call keeps its own
state (the running combination, carried tensors, abort handles), and the preallocated buffers
of the fast path belong to the calling thread (``threading.local``).

Low overhead: with a target that can bind buffers (onnxruntime's IOBinding), each thread keeps,
per batch size, output buffers for every stage bound once; a call rebinds only the input array
and runs the stages back to back with no allocation besides the combination's.

Example:
    >>> with Runner("hne.kdedge", threads=2) as runner:
    ...     res = runner.run(x, Deadline(5.0))
    ...     res[0].label, res[0].stage, res[0].total_ms, res[0].budget_met
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from kdedge.bundle.combine import Running, check_rule
from kdedge.bundle.manifest import Bundle, StageEntry
from kdedge.bundle.names import INPUT
from kdedge.bundle.input_files import check_batch
from kdedge.runtime.policies import Context, Full, Policy
from kdedge.runtime.results import OutputError, Result, Results, _finite, _logits_error
from kdedge.runtime.realtime import (
    MAX_PRIORITY,
    CpuLatencyHold,
    GcGuard,
    Realtime,
    RealtimeError,
    ThreadAdopter,
    describe_threads,
    lock_memory,
    realtime_key,
    set_thread,
    unlock_memory,
)
from kdedge.runtime.realtime import supported as rt_supported
from kdedge.runtime.watchdog import Watchdog
from kdedge.targets import get_target, open_bundle
from kdedge.targets.session import AbortHandle, Session, StageAborted, numpy_dtype
from kdedge.targets.threads import check_threads

__all__ = ["OutputError", "Result", "Results", "Runner"]

_PLANS_PER_THREAD = 8  # batch sizes whose bound buffers a thread keeps (least recently used dropped)


class _Plan:
    """One thread's preallocated buffers for one batch size, bound to the sessions once."""

    __slots__ = ("buffers", "calls", "input_calls")

    def __init__(self, sessions: Sequence[Session], entries: Sequence[StageEntry], n: int, input_shape: tuple[int, ...]) -> None:
        self.buffers: dict[str, np.ndarray] = {INPUT: np.zeros((n, *input_shape), np.float32)}
        for e in entries:
            for o in e.outputs:
                self.buffers[o.tensor] = np.empty((n, *o.shape[1:]), numpy_dtype(o.dtype))
        self.calls = [s.bind(self.buffers) for s in sessions]
        self.input_calls = [c for c, e in zip(self.calls, entries) if any(i.tensor == INPUT for i in e.inputs)]


def _session_options(bundle: Bundle, target: str, options: Any, device: str | None, cuda_graphs: bool,
                     threads: int | None, optimization: str, providers: Sequence[str] | None,
                     shared_pool: bool = False) -> tuple[Any, str, Any]:
    """(session options, profile run key, the run spec or None) for ``target``'s sessions on this device: the target
    turns the one run-option type (:class:`~kdedge.targets.base.RunSpec`) into its own and refuses
    what it cannot honour (:class:`~kdedge.targets.base.TargetError`). Options given explicitly
    are used as they are; the run key is then read from them."""
    from kdedge.targets import RunSpec

    t = get_target(target)
    if options is not None:
        return options, t.options_key(options, bundle), None
    run = RunSpec(device=device, cuda_graphs=cuda_graphs, threads=threads, optimization=optimization,
                  providers=None if providers is None else tuple(providers), shared_pool=shared_pool)
    return t.session_options(run, bundle), t.run_key(run, bundle), run


def _bindable(sessions: Sequence[Session], entries: Sequence[StageEntry]) -> bool:
    if not all(getattr(s, "can_bind", False) for s in sessions):
        return False
    return all(d is not None for e in entries for t in (*e.inputs, *e.outputs) for d in t.shape[1:])


class Runner:
    """Run a bundle's stages under a policy.

    Args:
        bundle: a bundle directory or an opened :class:`~kdedge.bundle.manifest.Bundle`.
        target: which of the bundle's targets to run (``onnx``, ``torch``, ``coreml``, ``tensorrt``), or
            ``auto``: the first of them that runs here (:data:`kdedge.targets.PREFERENCE`).
        threads: CPU threads per session (default: :func:`~kdedge.targets.threads.default_threads`;
            at most :func:`~kdedge.targets.threads.max_threads`, 4 x the CPUs); part of the
            latency profile's key. ``"auto"``: per graph, the count whose profile (of several
            measured with ``kdedge profile --threads 1,2``) has the lowest p99 at batch 1.
        optimization: onnxruntime graph optimisation level (``all``, ``extended``, …).
        providers: onnxruntime execution providers (default CPU).
        combine: combine rule (default: the bundle's default; must be one it supports).
        policy: the default policy of :meth:`run` (default :class:`~kdedge.runtime.policies.Full`).
        profile: latency profile for policies that need one: ``"auto"`` (the bundle's profile of
            this device and setting, loaded when first needed), a path, a
            :class:`~kdedge.profile.latency.LatencyProfile`, or None.
        session_factory: ``(bundle, entry, options) -> Session`` (default: the target's;
            tests pass fakes).
        session_options: options for the factory (default :class:`OrtOptions` from the
            arguments above).
        clock: time source in seconds (default ``time.perf_counter``).
        watchdog: abort overrunning stages for policies that ask (a thread started on first use).
        check_inputs: validate every batch (shape, dtype, finite values).
        bind: use preallocated, bound buffers where the target supports them.
        mode: a callable returning the current setting name (the nvpmodel power mode, e.g.
            ``"15W"``), read at each request of a policy that needs a profile: when it changes,
            that request and the next use the bundle's profile of the new mode
            (``profiles/<device>-<mode>.json``; profiles are cached per mode). The mode is read
            once per request, so a request keeps its profile to the end (in one thread; requests
            in other threads switch the shared profile when they start).
            None: the setting is read once, when the profile is first needed.
        device: where the target's sessions run (``cpu``, ``cuda``, ``cuda:N`` for torch; CoreML
            compute units); default: the device the files were compiled for. Part of the
            profile's key (:attr:`run_key`).
        cuda_graphs: capture and replay CUDA graphs (torch, TensorRT; needs a CUDA device).
        shared_pool: onnxruntime only: every session of the process on one intra-op pool of
            ``threads`` threads (``OrtOptions(shared_pool=True)``), so that consecutive stages do
            not spin against each other's pools; part of the profile's key (``shared``).
        realtime: run requests in real time (:class:`~kdedge.runtime.realtime.Realtime`, or True
            for its defaults: ``SCHED_FIFO`` 50, memory locked, gc kept out of requests). The
            thread that creates the runner, every thread that calls :meth:`run`, and the
            sessions' intra-op threads get the policy (read back from /proc; the watchdog's
            thread one priority above, so that it can preempt an overrunning stage). Part of
            the profile's key. Refused with :class:`~kdedge.runtime.realtime.RealtimeError`
            (one line saying what to grant) where the OS does not allow it; never a silent
            fallback. :meth:`close` gives the creating thread its old policy back.

    Raises:
        BundleError: the bundle is missing, malformed, tampered with or too new.
        ValueError: a bad argument (unknown rule, provider, …).
    """

    def __init__(self, bundle: str | Path | Bundle, *, target: str = "onnx", threads: int | None = None,
                 optimization: str = "all", providers: Sequence[str] | None = None, combine: str | None = None,
                 policy: Policy | None = None, profile: Any = "auto",
                 session_factory: Callable[[Bundle, StageEntry, Any], Session] | None = None,
                 session_options: Any = None, clock: Callable[[], float] = time.perf_counter,
                 watchdog: bool = True, check_inputs: bool = True, bind: bool = True,
                 mode: Callable[[], str] | None = None, device: str | None = None,
                 cuda_graphs: bool = False, realtime: Realtime | bool | None = None,
                 shared_pool: bool = False) -> None:
        auto_threads = threads == "auto"
        threads = None if auto_threads else check_threads(threads)  # --threads 100000 fails before anything opens
        self.realtime: Realtime | None = Realtime() if realtime is True else (realtime or None)
        if self.realtime is not None and not isinstance(self.realtime, Realtime):
            raise ValueError(f"realtime= takes a Realtime, True or None, got {type(realtime).__name__}")
        if target == "auto":  # the first of the bundle's targets that runs on this device
            from kdedge.bundle.manifest import read_manifest
            from kdedge.targets import pick_target

            target = pick_target(bundle.targets if isinstance(bundle, Bundle) else read_manifest(bundle)["targets"])
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle, targets=[target])
        if target not in self.bundle.targets:
            from kdedge.bundle.errors import BundleError
            from kdedge.targets import missing_target_message

            get_target(target)  # unknown: say so, with the known ones
            raise BundleError(missing_target_message(self.bundle.path, self.bundle.manifest, target))
        self.target = target
        self.combine = check_rule(combine or self.bundle.combine_default)
        if self.combine not in self.bundle.combine_supported:
            raise ValueError(f"bundle {self.bundle.path.name} does not support combine rule {self.combine!r}; it "
                             f"supports {', '.join(self.bundle.combine_supported)}")
        session_options, base_key, self._run_spec = _session_options(
            self.bundle, target, session_options, device, cuda_graphs, threads, optimization, providers, shared_pool)
        self.run_key = realtime_key(base_key, self.realtime)
        self.options = session_options
        self.threads = int(get_target(target).options_threads(session_options) or threads or 1)
        self.threads_per_graph: dict[str, int] | None = None
        self._profile: Any = None
        if auto_threads:
            self._auto_threads(target, profile, mode)
        self.policy: Policy = policy if policy is not None else Full()
        self._factory = session_factory or get_target(target).open_entry  # every target opens its own sessions
        self._clock = clock
        self._check_inputs = check_inputs
        self._bind = bind
        self.entries = self.bundle.stages
        self.input_shape = tuple(int(v) for v in self.bundle.input_shape[1:])  # (C, H, W)
        self.classes = tuple(self.bundle.classes)
        self.sessions: list[Session] = []
        self._gc = GcGuard()
        self._rt_restore: tuple[int, int, Any, Any] | None = None
        self._rt_locked = False
        self._rt_latency: CpuLatencyHold | None = None
        self._rt_threads: list[int] = []
        self._local = threading.local()
        try:
            if self.realtime is not None:
                self._enter_realtime()
            with self._adopting():
                if session_factory is None:  # the target opens the chain (it may link the stages)
                    self.sessions = list(get_target(target).open_stages(self.bundle, self.entries, self._options_for))
                else:
                    for e in self.entries:
                        self.sessions.append(self._factory(self.bundle, e, self._options_for(e.name)))
        except BaseException:
            self.close()
            raise
        self._prefix_sessions: dict[int, Session] = {}
        self._prefix_bindable: dict[int, bool] = {}
        self._logits = [e.logits_tensor for e in self.entries]
        self._names = [e.name for e in self.entries]
        self._P = len(self.bundle.prefixes)
        self._members = [e.members for e in self.entries]
        self._K = len(self.classes)
        # before stage k: the tensors that exist (the input, outputs of stages < k) and that stages
        # >= k still read; what is kept, for the remaining samples, when some leave the batch
        self._live_before = []
        for k in range(len(self.entries)):
            exist = {INPUT} | {o.tensor for e in self.entries[:k] for o in e.outputs}
            self._live_before.append(exist & {i.tensor for e in self.entries[k:] for i in e.inputs})
        self._stages_bindable = bind and _bindable(self.sessions, self.entries)
        self._lock = threading.Lock()
        self._profile_arg = profile
        self._cost_cache: dict[tuple[str, int, str, str], float] = {}
        self._mode_fn = mode
        self._mode_name: str | None = None
        self._mode_profiles: dict[str, Any] = {}
        self._watchdog_enabled = watchdog
        self._watchdog: Watchdog | None = None

    # -- facts -----------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.entries)

    @property
    def num_prefixes(self) -> int:
        return len(self.bundle.prefixes)

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the sessions and stop the watchdog."""
        # also called when __init__ fails half-way (a session that would not open)
        for s in [*getattr(self, "sessions", ()), *getattr(self, "_prefix_sessions", {}).values()]:
            s.close()
        self.sessions = []
        self._prefix_sessions = {}
        if getattr(self, "_watchdog", None) is not None:
            self._watchdog.close()  # type: ignore[union-attr]
            self._watchdog = None
        self._leave_realtime()

    # -- threads per graph ---------------------------------------------------------------------
    def _auto_threads(self, target: str, profile: Any, mode: Any) -> None:
        """``threads="auto"``: each graph gets the thread count whose profile has the lowest p99
        at batch 1 (:func:`kdedge.profile.latency.thread_choice`); the deadline policy plans
        with those statistics."""
        from kdedge.bundle.profile.store import thread_choice

        if not get_target(target).caps.threads_per_session or self._run_spec is None:
            raise ValueError("--threads auto chooses a thread count per session; it applies to targets whose sessions "
                             "each have their own (onnx) and to options the runner makes itself")
        if mode is not None or profile != "auto":
            raise ValueError("--threads auto plans with the profiles it chose from; it cannot be combined with "
                             "--profile or --follow-power-mode")
        choice, prof = thread_choice(self.bundle, target, self.run_key)
        self.threads_per_graph = choice
        self.threads = max(choice.values())
        self._profile = prof

    def _options_for(self, graph: str) -> Any:
        if self.threads_per_graph is None or self._run_spec is None:
            return self.options
        from dataclasses import replace

        run = replace(self._run_spec, threads=self.threads_per_graph.get(graph, self.threads))
        return get_target(self.target).session_options(run, self.bundle)

    # -- real time -------------------------------------------------------------------------------
    def _enter_realtime(self) -> None:
        """The creating thread takes the real-time policy before any session exists (their
        intra-op threads then inherit it); memory is locked."""
        import os

        cfg = self.realtime
        assert cfg is not None
        why = rt_supported()
        if why:
            raise RealtimeError(f"--realtime: {why}")
        tid = threading.get_native_id()
        self._rt_restore = (tid, os.sched_getscheduler(0), os.sched_getparam(0), os.sched_getaffinity(0))
        set_thread(0, cfg)
        self._local.realtime = True
        self._rt_threads.append(tid)
        if cfg.lock_memory:
            lock_memory()
            self._rt_locked = True
        if cfg.cpu_latency_us is not None:
            self._rt_latency = CpuLatencyHold(cfg.cpu_latency_us)

    def _leave_realtime(self) -> None:
        import os

        restore = getattr(self, "_rt_restore", None)
        if restore is not None:
            tid, policy, param, cpus = restore
            try:
                os.sched_setscheduler(tid, policy, param)
                os.sched_setaffinity(tid, cpus)
            except OSError:  # the thread has ended, or lowering was refused: nothing to restore
                pass
            self._rt_restore = None
        if getattr(self, "_rt_locked", False):
            unlock_memory()
            self._rt_locked = False
        hold = getattr(self, "_rt_latency", None)
        if hold is not None:
            hold.close()
            self._rt_latency = None

    @contextlib.contextmanager
    def _adopting(self) -> Iterator[None]:
        """Every thread that appears inside (onnxruntime's intra-op pools) gets the policy."""
        if self.realtime is None:
            yield
            return
        adopter = ThreadAdopter(self.realtime)
        yield
        adopter.adopt()
        adopter.check(adopter.adopted)
        self._rt_threads.extend(adopter.adopted)

    def _realtime_caller(self) -> None:
        """A thread calling :meth:`run` for the first time takes the policy."""
        if not getattr(self._local, "realtime", False):
            assert self.realtime is not None
            set_thread(0, self.realtime)
            self._local.realtime = True
            with self._lock:
                self._rt_threads.append(threading.get_native_id())

    @property
    def realtime_threads(self) -> list[tuple[int, str, int, list[int]]]:
        """(thread id, policy, priority, CPUs) of the threads given real-time scheduling, read
        from /proc now (empty without ``realtime``)."""
        return list(describe_threads(self._rt_threads))

    # -- profile ---------------------------------------------------------------------------------
    @property
    def profile(self) -> Any:
        """The latency profile matching this device and setting (loaded and checked on first use).

        Raises:
            ProfileError: none, stale (the bundle changed since) or foreign (another device or
                setting); the message says what to run.
        """
        if self._profile is None:
            if self._mode_fn is not None:
                self._follow_mode()
                return self._profile
            from kdedge.bundle.profile.store import resolve_profile, session_optimization

            with self._lock:
                if self._profile is None:
                    self._profile = resolve_profile(self.bundle, self._profile_arg, target=self.target,
                                                    threads=self.threads, key=self.run_key,
                                                    optimization=session_optimization(self.options))
        return self._profile

    @property
    def mode(self) -> str | None:
        """The setting (power mode) whose profile is in use, when the runner follows the mode."""
        return self._mode_name

    def _follow_mode(self) -> None:
        """Read the mode; on a change, switch to (and cache) that mode's profile."""
        name = str(self._mode_fn())  # type: ignore[misc]
        if name == self._mode_name and self._profile is not None:
            return
        from kdedge.bundle.profile.store import resolve_profile, session_optimization

        with self._lock:
            prof = self._mode_profiles.get(name)
            if prof is None:
                prof = resolve_profile(self.bundle, self._profile_arg, target=self.target, threads=self.threads,
                                       setting=name, key=self.run_key, optimization=session_optimization(self.options))
                self._mode_profiles[name] = prof
            self._profile = prof
            self._cost_cache = {}
            self._mode_name = name

    def reload_profile(self) -> None:
        """Forget the loaded profile (e.g. after the power mode changed); the next use reloads it.
        With ``threads="auto"`` the profile chosen at construction stays (its graphs' sessions
        were opened with the thread counts it holds)."""
        if self.threads_per_graph is not None:
            return
        with self._lock:
            self._profile = None
            self._cost_cache = {}
            self._mode_profiles = {}
            self._mode_name = None

    def _cost(self, graph: str, batch: int, stat: str, metric: str) -> float:
        key = (graph, batch, stat, metric)
        v = self._cost_cache.get(key)
        if v is None:
            v = self.profile.stat(graph, batch, stat=stat, metric=metric)
            self._cost_cache[key] = v
        return v

    # -- sessions and plans ------------------------------------------------------------------------
    def _prefix_session(self, j: int) -> Session:
        s = self._prefix_sessions.get(j)
        if s is None:
            if not 0 <= j < self.num_prefixes:
                raise ValueError(f"bundle {self.bundle.path.name} has {self.num_prefixes} fused prefixes; "
                                 f"prefix{j} does not exist")
            with self._lock:
                s = self._prefix_sessions.get(j)
                if s is None:
                    with self._adopting():
                        s = self._factory(self.bundle, self.bundle.prefixes[j], self._options_for(f"prefix{j}"))
                    self._prefix_sessions[j] = s
        return s

    def _plan(self, key: tuple[Any, ...], sessions: Sequence[Session], entries: Sequence[StageEntry], n: int) -> _Plan:
        plans: OrderedDict[tuple[Any, ...], _Plan] | None = getattr(self._local, "plans", None)
        if plans is None:
            plans = self._local.plans = OrderedDict()
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = _Plan(sessions, entries, n, self.input_shape)
            if len(plans) > _PLANS_PER_THREAD:
                plans.popitem(last=False)
        else:
            plans.move_to_end(key)
        return plan

    def _arm(self, session: Session, t0: float, abort_after_ms: float | None) -> tuple[AbortHandle | None, Any]:
        if abort_after_ms is None or not getattr(session, "can_abort", False):
            return None, None
        handle = session.abort_handle()
        handle.deadline = t0 + abort_after_ms / 1e3
        token = None
        if self._watchdog_enabled:
            if self._watchdog is None:
                with self._lock:
                    if self._watchdog is None:
                        self._watchdog = Watchdog(self._clock, thread_setup=self._watchdog_setup())
            token = self._watchdog.arm(handle.deadline, handle)  # type: ignore[union-attr]
        return handle, token

    def _watchdog_setup(self) -> Callable[[], None] | None:
        """With ``realtime``, the watchdog's thread runs one priority above the request threads:
        at the same priority, a FIFO request thread overrunning on the only free CPU would keep
        the watchdog from ever running."""
        cfg = self.realtime
        if cfg is None:
            return None
        from dataclasses import replace

        above = replace(cfg, priority=min(cfg.priority + 1, MAX_PRIORITY))

        def setup() -> None:
            set_thread(0, above)
            with self._lock:
                self._rt_threads.append(threading.get_native_id())

        return setup

    # -- running ---------------------------------------------------------------------------------
    def warmup(self, batches: Sequence[int] = (1,), runs: int = 3, prefixes: bool = True) -> None:
        """Run every stage (and fused prefix) ``runs`` times on zeros at each batch size, so that the
        first real request does not pay for first-run allocations (several milliseconds)."""
        from kdedge.runtime.policies import Fixed

        for n in batches:
            x = np.zeros((int(n), *self.input_shape), np.float32)
            for _ in range(runs):
                self.run(x, Full())
                for j in range(self.num_prefixes if prefixes else 0):
                    self.run(x, Fixed(j + 1, fused=True))
        self.settle()

    def settle(self) -> None:
        """Call once after warm-up: one full garbage collection now, between requests. With torch
        and a bundle's programs loaded, the collector's oldest generation is often due by then,
        and a full collection takes a few hundred milliseconds (225 ms for 411,000 objects on
        this project's CPU machine), which would otherwise land in an early request (see
        docs/targets.md, "GPU check", on the first requests measured on an H200). With ``realtime``, every
        object alive then also moves to the permanent generation (``gc.freeze``), so later
        collections stay short."""
        if self.realtime is not None and self.realtime.freeze_gc:
            self._gc.freeze()
        else:
            gc.collect()

    def evaluate(self, x: np.ndarray, labels: np.ndarray | None = None, policy: Policy | None = None,
                 batch: int = 1, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Run ``x`` in batches of ``batch`` requests under ``policy`` and summarise.

        Every batch is one request: deadlines count from its start.

        Returns:
            ``n``, ``accuracy`` (with labels), ``mean_stage``, ``stage_counts`` (samples answered
            at each stage), ``budget_ms``, ``misses`` and ``miss_rate`` (answers over budget),
            ``latency_ms`` (p50, p99, max and mean of per-sample times), ``aborted`` (requests
            whose last stage the watchdog aborted), ``labels`` and ``stages`` (per sample, lists).
        """
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        policy = self.policy if policy is None else policy
        n = len(x)
        pred = np.empty(n, np.int64)
        stage = np.empty(n, np.int64)
        ms = np.empty(n)
        met = np.empty(n, bool)
        aborted = 0
        budget = None
        for i in range(0, n, batch):
            try:
                res = self.run(x[i: i + batch], policy)
            except OutputError as e:
                raise OutputError(f"sample {i + e.sample} of {n}: {e}", i + e.sample) from None
            j = slice(i, i + len(res))
            pred[j], stage[j], ms[j], met[j] = res.labels, res.stage, res.total_ms, res.budget_met
            aborted += res.aborted is not None
            budget = res.budget_ms
            if progress is not None:
                progress(min(i + batch, n), n)
        out: dict[str, Any] = {
            "n": int(n), "policy": str(getattr(policy, "name", type(policy).__name__)), "batch": int(batch),
            "mean_stage": float(stage.mean()),
            "stage_counts": [int(c) for c in np.bincount(stage, minlength=self.num_stages)],
            "budget_ms": budget, "misses": int((~met).sum()), "miss_rate": float((~met).mean()),
            "aborted": int(aborted),
            "latency_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99, method="inverted_cdf")),
                           "max": float(ms.max()), "mean": float(ms.mean())},
            "labels": pred.tolist(), "stages": stage.tolist(),
        }
        if labels is not None:
            y = np.asarray(labels)
            if y.shape != (n,):
                raise ValueError(f"labels must have shape [{n}], got {list(y.shape)}")
            out["accuracy"] = float((pred == y).mean())
        return out

    def run(self, x: np.ndarray, policy: Policy | None = None, *, start: float | None = None) -> Results:
        """Run a batch under a policy.

        Args:
            x: the preprocessed batch, float32 [N, C, H, W] (see :mod:`kdedge.runtime.inputs`).
            policy: the stop policy (default: the runner's).
            start: the request's start on the runner's clock (default: now); deadlines count from it.

        Returns:
            :class:`Results` (``results[i]`` is sample i's :class:`Result`).

        Raises:
            InputError: a batch of the wrong shape or dtype, or with NaN/inf values.
            OutputError: a stage computed NaN or infinite logits (the input is far outside the
                range the model was trained on); no answer with NaN probabilities is returned.
            ProfileError: the policy needs a latency profile and there is no usable one.
        """
        if self.realtime is None:
            return self._run(x, policy, start)
        self._realtime_caller()
        if not self.realtime.freeze_gc:
            return self._run(x, policy, start)
        self._gc.enter()
        try:
            return self._run(x, policy, start)
        finally:
            self._gc.leave()

    def _run(self, x: np.ndarray, policy: Policy | None, start: float | None) -> Results:
        clock = self._clock
        t0 = clock() if start is None else start
        policy = self.policy if policy is None else policy
        if getattr(policy, "needs_profile", False):
            if self._mode_fn is not None:
                self._follow_mode()  # this request uses the profile of the mode the device is in now
            self.profile  # noqa: B018 - load and check it before running anything
        if self._check_inputs:
            x = check_batch(x, self.input_shape)
        n = x.shape[0]
        S = len(self.sessions)
        if S == 0:
            raise RuntimeError("the runner is closed")
        d = policy.decide(Context(0, S, (clock() - t0) * 1e3, n, 0, self._P, None, self._cost))
        if d.fused is not None:
            return self._run_fused(x, int(d.fused), policy, t0)

        observe = getattr(policy, "observe", None)
        running = Running(self.combine)
        # Stages completed but not yet checked and combined: numpy's first call after a session
        # run costs some 20 µs (its code and data are cold again), so the logits of consecutive
        # stages are checked and added together, when a policy first reads the probabilities or
        # at the end; each stage keeps its own logits buffer until then.
        pending: list[tuple[int, np.ndarray]] = []
        members = 0  # members of the completed stages, combined or pending

        def combined() -> Running:
            for j, lg in pending:
                if lg.shape != (len(x), self._K) or not _finite(lg):
                    raise _logits_error(self._names[j], self._logits[j], lg, x, self._K, idx)
                running.add(lg, self._members[j])
            pending.clear()
            return running

        def probs_so_far() -> np.ndarray:
            return combined().probs()

        plan = self._plan(("stages", n), self.sessions, self.entries, n) if self._stages_bindable else None
        feeds: dict[str, np.ndarray] = {}
        if plan is not None:
            for call in plan.input_calls:
                call.set_input(INPUT, x)
        else:
            feeds[INPUT] = x
        idx: np.ndarray | None = None          # original indices of the active samples; None: all
        out_probs = out_stage = out_members = out_ms = None
        graphs: list[str] = []
        stage_ms: list[float] = []
        aborted: str | None = None
        last = -1
        for k in range(S):
            abort_ms = None
            if k > 0:
                ctx = Context(k, S, (clock() - t0) * 1e3, n if idx is None else len(idx), members,
                              self._P, probs_so_far, self._cost)
                d = policy.decide(ctx)
                go = d.go
                if go is False:
                    break
                if go is not True:
                    active = n if idx is None else len(idx)
                    mask = np.asarray(go, dtype=bool)
                    if mask.shape != (active,):
                        raise ValueError(f"policy {policy.name!r} returned a mask of shape {mask.shape} for "
                                         f"{active} active samples")
                    if not mask.any():
                        break
                    if out_probs is None:
                        out_probs = np.empty((n, len(self.classes)))
                        out_stage = np.empty(n, np.int64)
                        out_members = np.empty(n, np.int64)
                        out_ms = np.empty(n)
                    leave = ~mask
                    where = np.flatnonzero(leave) if idx is None else idx[leave]
                    probs_now = ctx.probs
                    assert probs_now is not None
                    out_probs[where] = probs_now[leave]
                    out_stage[where] = last
                    out_members[where] = members
                    out_ms[where] = (clock() - t0) * 1e3
                    running.keep(mask)
                    src = plan.buffers if plan is not None else feeds
                    feeds = {t: (x if t == INPUT else src[t])[mask] for t in self._live_before[k]}
                    x = x[mask]
                    plan = None  # the smaller batch runs unbound
                    idx = np.flatnonzero(mask) if idx is None else idx[mask]
                abort_ms = d.abort_after_ms
            session = self.sessions[k]
            handle, token = self._arm(session, t0, abort_ms)
            ts = clock()
            try:
                if plan is not None:
                    plan.calls[k](handle)
                    logits = plan.buffers[self._logits[k]]
                else:
                    outs = session.run(feeds, handle)
                    feeds.update(outs)
                    logits = outs[self._logits[k]]
            except StageAborted:
                graphs.append(self._names[k])
                ms = (clock() - ts) * 1e3
                stage_ms.append(ms)
                if observe is not None:  # at least this long: an overrun says the device is busy
                    observe(self._names[k], ms, len(x), S, self._cost)
                aborted = self._names[k]
                break
            finally:
                if token is not None:
                    Watchdog.disarm(token)
            ms = (clock() - ts) * 1e3
            stage_ms.append(ms)
            graphs.append(self._names[k])
            if observe is not None:
                observe(self._names[k], ms, len(x), S, self._cost)
            pending.append((k, logits))
            members += self._members[k]
            last = k

        probs = combined().probs()
        now_ms = (clock() - t0) * 1e3
        if out_probs is None:
            out_probs = probs
            out_stage = np.full(n, last, np.int64)
            out_members = np.full(n, members, np.int64)
            out_ms = np.full(n, now_ms)
        else:
            assert idx is not None and out_stage is not None and out_members is not None and out_ms is not None
            out_probs[idx] = probs
            out_stage[idx] = last
            out_members[idx] = members
            out_ms[idx] = now_ms
        return self._results(out_probs, out_stage, out_members, out_ms, graphs, stage_ms, aborted, policy)

    def _run_fused(self, x: np.ndarray, j: int, policy: Policy, t0: float) -> Results:
        clock = self._clock
        n = x.shape[0]
        entry = self.bundle.prefixes[j] if 0 <= j < self.num_prefixes else None
        session = self._prefix_session(j)
        assert entry is not None
        bindable = self._prefix_bindable.get(j)
        if bindable is None:
            bindable = self._prefix_bindable[j] = self._bind and _bindable([session], [entry])
        ts = clock()
        if bindable:
            plan = self._plan(("prefix", j, n), [session], [entry], n)
            plan.calls[0].set_input(INPUT, x)
            plan.calls[0](None)
            logits = plan.buffers[entry.logits_tensor]
        else:
            logits = session.run({INPUT: x})[entry.logits_tensor]
        te = clock()
        observe = getattr(policy, "observe", None)
        if observe is not None:
            observe(entry.name, (te - ts) * 1e3, n, self.num_prefixes, self._cost)
        if logits.shape != (n, self._K) or not _finite(logits):
            raise _logits_error(entry.name, entry.logits_tensor, logits, x, self._K)
        running = Running(self.combine)
        running.set_fused(logits, entry.members_total, entry.last_stage + 1)
        probs = running.probs()
        now_ms = (clock() - t0) * 1e3
        return self._results(probs, np.full(n, entry.last_stage, np.int64), np.full(n, entry.members_total, np.int64),
                             np.full(n, now_ms), [entry.name], [(te - ts) * 1e3], None, policy)

    def _results(self, probs: np.ndarray, stage: np.ndarray, members: np.ndarray, total_ms: np.ndarray,
                 graphs: list[str], stage_ms: list[float], aborted: str | None, policy: Policy) -> Results:
        budget = policy.budget_ms if hasattr(policy, "budget_ms") else None
        met = np.ones(len(total_ms), bool) if budget is None else total_ms <= budget
        return Results(probs=probs, stage=stage, members=members, total_ms=total_ms, budget_met=met,
                       graphs=tuple(graphs), stage_ms=tuple(stage_ms), aborted=aborted,
                       policy=str(getattr(policy, "name", type(policy).__name__)), budget_ms=budget,
                       classes=self.classes)
