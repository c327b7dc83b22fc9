"""``kdedge run``: run a bundle on inputs (or a dataset split) under a deadline, confidence or fixed budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from kdedge.cli.common import (CpuLatencyOpt, CpusOpt, MlockOpt, RealtimeOpt, RtPolicyOpt, RtPriorityOpt,
                               err, handle_errors, out, print_json, realtime_options)

HELP = """Run a bundle's stages one by one on this device and stop when the budget says so:
a deadline per request (--deadline-ms, needs a latency profile from kdedge profile), a
confidence threshold (--confidence), or a fixed number of stages (--stages, through the fused
prefix graph when the bundle has one). With --deadline-ms --fused, the deepest fused prefix
whose profiled latency fits the deadline runs instead (budget mode). --energy-mj keeps each
request within an energy budget (the profile's mean energy per stage, from kdedge profile
--meter; combinable with --deadline-ms and --confidence). Prints each prediction
with the stage it came from and the time spent. Each batch of --batch inputs is one request.

Examples:

  kdedge run hne.kdedge --input digit.png

  kdedge run hne.kdedge --input images/ --deadline-ms 2 --json

  kdedge run hne.kdedge --input images/ --deadline-ms 2 --fused

  kdedge run hne.kdedge --input batch.npy --confidence 0.9 --batch 32

  kdedge run hne.kdedge --input batch.npy --stages 2

  kdedge run hne.kdedge --data mnist5k --deadline-ms 0.5

  kdedge run hne.kdedge --input images/ --energy-mj 3      # needs kdedge profile --meter

  kdedge run hne.kdedge --target torch --device cuda --cuda-graphs --input batch.npy --deadline-ms 1

  kdedge run hne.kdedge --data mnist5k --deadline-ms 2 --realtime --cpus 1   # needs kdedge profile --realtime
"""


def _policy(deadline_ms: Optional[float], confidence: Optional[float], stages: Optional[int], fused: Optional[bool],
            margin_ms: float, stat: str, measure: str, energy_mj: Optional[float] = None, online: bool = False) -> Any:
    from kdedge.runtime.policies import make_policy

    if confidence is not None and not 0.0 <= confidence <= 1.0:
        raise ValueError(f"--confidence is a probability threshold in [0, 1], got {confidence}")
    return make_policy(deadline_ms=deadline_ms, confidence=confidence, stages=stages, fused=fused,
                       margin_ms=margin_ms, stat=stat, measure=measure, energy_mj=energy_mj, online=online)


def _check_unused(ctx: typer.Context, input_path: Optional[Path], deadline_ms: Optional[float],
                  confidence: Optional[float], stages: Optional[int]) -> None:
    """An option given on the command line that would change nothing is an error, not silently
    ignored: the user meant something by it."""
    def given(*names: str) -> list[str]:  # by the enum's name: typer carries its own copy of click
        return [f"--{n.replace('_', '-')}" for n in names
                if getattr(ctx.get_parameter_source(n), "name", "DEFAULT") in ("COMMANDLINE", "ENVIRONMENT")]

    if input_path is not None and (unused := given("data_root", "split", "limit", "seed")):
        raise ValueError(f"{', '.join(unused)} {_apply(unused)} to --data (a dataset split), not to --input; drop "
                         f"{'it' if len(unused) == 1 else 'them'}")
    if deadline_ms is None and (unused := given("margin_ms", "stat", "online")):
        raise ValueError(f"{', '.join(unused)} {_apply(unused)} to --deadline-ms, which is not given")
    if confidence is None and given("measure"):
        raise ValueError("--measure applies to --confidence, which is not given")
    if stages is None and deadline_ms is None and given("fused"):
        raise ValueError("--fused/--no-fused choose how --stages or --deadline-ms run; give one of them")


def _apply(options: list[str]) -> str:
    return "applies" if len(options) == 1 else "apply"


def _mode_follower(exe: str, conf: str, period_s: float = 1.0) -> Any:
    """A mode callable for the runner: the nvpmodel mode's setting name, re-read at most every
    ``period_s`` (``nvpmodel -q`` is a subprocess, too slow to run per request)."""
    import time

    from kdedge.device import slug
    from kdedge.profile.modes import Nvpmodel

    if not Path(conf).is_file():
        raise ValueError(f"--follow-power-mode needs a Jetson's nvpmodel configuration; {conf} does not exist")
    nv = Nvpmodel(conf=conf, nvpmodel=exe, jetson_clocks=None)
    state: dict[str, Any] = {"t": -float("inf"), "name": None}

    def mode() -> str:
        now = time.monotonic()
        if now - state["t"] >= period_s:
            state["name"] = slug(nv.current_mode().name, lower=False)
            state["t"] = now
        return str(state["name"])

    return mode


def _dataset(name: str, data_root: Optional[str], split: str, seed: int, limit: Optional[int], bundle: Any) -> tuple[Any, Any, str]:
    """Raw images of a dataset split, preprocessed by the bundle's rule, and their labels (needs torch)."""
    import numpy as np

    from kdedge.bundle.input_files import preprocess
    from kdedge.train.data import DataConfig, load_data

    if split not in ("val", "test"):
        raise ValueError(f"--split must be 'val' or 'test', got {split!r}")
    splits = load_data(DataConfig(name=name, root=data_root), seed)
    ds = getattr(splits, split)
    info = splits.info
    if info.num_classes != bundle.num_classes:
        raise ValueError(f"dataset {name} has {info.num_classes} classes, the bundle {bundle.path.name} has "
                         f"{bundle.num_classes}; evaluate it on the dataset it was exported for "
                         f"({bundle.preprocessing.get('dataset')})")
    count = len(ds) if limit is None else min(limit, len(ds))
    from kdedge.bundle.input_files import MAX_INPUT_BYTES

    c, h, w = (int(d) for d in bundle.input_shape[1:])
    most = max(1, MAX_INPUT_BYTES // (c * h * w * 4))
    if count > most:  # checked before the raw images are stacked, not after
        raise ValueError(f"dataset {name} ({split}) has {count} images, {count * c * h * w * 4 / 2**30:.1f} GiB once "
                         f"preprocessed, more than the {MAX_INPUT_BYTES / 2**30:.1f} GiB kdedge run loads at once; "
                         f"pass --limit {most} or less")
    raw = np.stack([ds.raw(i) for i in range(count)])
    x = preprocess(raw, bundle, where=f"dataset {name} ({split})")
    y = np.asarray(ds.targets[:count], dtype=np.int64)
    return x, y, info.name


def _print_results(rows: list[dict[str, Any]], budget: Optional[float]) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table()
    for col in ("input", "class", "p", "stage", "members", "time (ms)", *(["met"] if budget is not None else [])):
        t.add_column(col, justify="left" if col in ("input", "class") else "right")
    for r in rows:  # file and class names are data, not rich markup ("[b]x.png", a class "[/]")
        t.add_row(escape(r["input"]), escape(r["class"]), f"{r['confidence']:.3f}", str(r["stage"]), str(r["members"]),
                  f"{r['total_ms']:.3f}", *(["yes" if r["budget_met"] else "[red]MISS[/]"] if budget is not None else []))
    out.print(t)


def _summary(rows: list[dict[str, Any]], budget: Optional[float]) -> dict[str, Any]:
    import numpy as np

    ms = np.asarray([r["total_ms"] for r in rows])
    met = np.asarray([r["budget_met"] for r in rows])
    return {"n": len(rows), "mean_stage": float(np.mean([r["stage"] for r in rows])), "budget_ms": budget,
            "misses": int((~met).sum()), "latency_ms": {"p50": float(np.percentile(ms, 50)),
                                                        "p99": float(np.percentile(ms, 99, method="inverted_cdf")),
                                                        "max": float(ms.max())}}


@handle_errors
def command(
    ctx: typer.Context,
    bundle: Path = typer.Argument(..., help="A bundle directory (from kdedge export)."),
    input_path: Optional[Path] = typer.Option(None, "--input", "-i", help="An image file, a directory of images, or a .npy batch (uint8 raw images or float32 preprocessed [N, C, H, W])."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluate over a dataset split instead (mnist5k, digits, cifar10, ...; needs the train extra)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Directory of cifar10/cifar100/imagefolder data."),
    split: str = typer.Option("test", help="With --data: the split, test or val."),
    limit: Optional[int] = typer.Option(None, help="With --data: use at most this many samples."),
    seed: int = typer.Option(0, help="With --data: the data seed (the test split is the same for every seed)."),
    deadline_ms: Optional[float] = typer.Option(None, "--deadline-ms", help="Latency budget per request in ms (uses the latency profile of this device)."),
    energy_mj: Optional[float] = typer.Option(None, "--energy-mj", help="Energy budget per request in mJ (uses the profile's mean energy per stage, from kdedge profile --meter)."),
    margin_ms: float = typer.Option(0.1, "--margin-ms", help="Deadline safety margin in ms."),
    online: bool = typer.Option(False, "--online/--no-online", help="Deadline: plan with the profile scaled by how "
                                "much slower than profiled the last stages ran (a device that gets busy shortens "
                                "the depth before it misses; docs/runtime.md)."),
    stat: str = typer.Option("p99", help="Profile statistic that predicts a stage's latency (p99, p95, median, max...)."),
    confidence: Optional[float] = typer.Option(None, help="Stop a sample once the combined max probability reaches this."),
    measure: str = typer.Option("max", help="Confidence measure: max (max probability) or margin (top-1 minus top-2)."),
    stages: Optional[int] = typer.Option(None, help="Run exactly the first N stages (budget mode)."),
    fused: Optional[bool] = typer.Option(None, "--fused/--no-fused", help="Budget mode: run one fused prefix graph chosen in advance when the bundle has them (default: on with --stages, off with --deadline-ms)."),
    batch: int = typer.Option(1, help="Inputs per request (per runner call)."),
    threads: Optional[str] = typer.Option(None, help="CPU threads per session, or auto: per stage, the count whose "
                                          "profile (kdedge profile --threads 1,2) has the lowest p99; part of the "
                                          "profile's key (default: see docs/runtime.md)."),
    target: str = typer.Option("onnx", help="Which of the bundle's targets to run (auto: the fastest that runs here)."),
    device: Optional[str] = typer.Option(None, help="Where the target's sessions run: cpu, cuda, cuda:N (torch), "
                                         "CoreML compute units (default: the device its files were compiled for); "
                                         "part of the profile's key."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Capture and replay CUDA graphs (torch, tensorrt "
                                     "on a CUDA device); part of the profile's key."),
    shared_pool: bool = typer.Option(False, "--shared-pool", help="onnxruntime: one intra-op pool of --threads threads for every stage session instead of one pool per session (consecutive stages then do not spin against each other; docs/runtime.md, Threads); part of the profile's key."),
    combine: Optional[str] = typer.Option(None, help="Combine rule (default: the bundle's): mean_logits, mean_probs, last."),
    profile: Optional[Path] = typer.Option(None, help="A latency profile file to use instead of the bundle's own for this device."),
    follow_power_mode: bool = typer.Option(False, "--follow-power-mode", help="On a Jetson: read the nvpmodel mode (at most once a second) and use that mode's profile; a mode change applies from the next request."),
    nvpmodel_exe: str = typer.Option("nvpmodel", "--nvpmodel-exe", hidden=True, envvar="KDEDGE_NVPMODEL"),
    nvpmodel_conf: str = typer.Option("/etc/nvpmodel.conf", "--nvpmodel-conf", hidden=True, envvar="KDEDGE_NVPMODEL_CONF"),
    realtime: RealtimeOpt = False,
    rt_priority: RtPriorityOpt = None,
    rt_policy: RtPolicyOpt = None,
    cpus: CpusOpt = None,
    mlock: MlockOpt = None,
    cpu_latency: CpuLatencyOpt = None,
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
) -> None:
    from kdedge.runtime import Runner
    from kdedge.bundle.input_files import load_inputs
    from kdedge.runtime.runner import OutputError

    if threads is not None and threads != "auto":
        try:
            threads = int(threads)  # type: ignore[assignment]  # bounds: sessions.check_threads
        except ValueError:
            raise ValueError(f"--threads takes a thread count or auto, got {threads!r}") from None
    if (input_path is None) == (data is None):
        raise ValueError("give exactly one of --input PATH (images or a .npy batch) or --data NAME (a dataset split)")
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    _check_unused(ctx, input_path, deadline_ms, confidence, stages)
    policy = _policy(deadline_ms, confidence, stages, fused, margin_ms, stat, measure, energy_mj, online)
    mode = _mode_follower(nvpmodel_exe, nvpmodel_conf) if follow_power_mode else None
    rt = realtime_options(realtime, rt_priority, rt_policy, cpus, mlock, cpu_latency)
    with Runner(bundle, target=target, threads=threads, combine=combine,
                profile=str(profile) if profile is not None else "auto", mode=mode, device=device,
                cuda_graphs=cuda_graphs, realtime=rt, shared_pool=shared_pool) as runner:
        if getattr(policy, "needs_profile", False):
            runner.profile  # noqa: B018 - a missing/stale/foreign profile fails before any work
            if energy_mj is not None:  # a profile without energy fails here too, not mid-run
                runner.profile.stat(runner.bundle.stages[0].name, 1, "mean", "energy_mj")
        if data is not None:
            x, y, name = _dataset(data, data_root, split, seed, limit, runner.bundle)
            runner.warmup(sorted({min(batch, len(x)), len(x) % batch or batch}))
            result = runner.evaluate(x, y, policy, batch=batch)
            result = {"bundle": str(bundle), "data": name, "split": split,
                      "threads": "auto" if runner.threads_per_graph else runner.threads,
                      "threads_per_graph": runner.threads_per_graph,
                      "realtime": rt.to_dict() if rt is not None else None, **result}
            result.pop("labels")
            result.pop("stages")
            if json_out:
                print_json(result)
                return
            from rich.markup import escape

            acc = f"accuracy {100 * result['accuracy']:.2f}%"
            out.print(f"[bold]{escape(runner.bundle.family)}[/] on {name} ({split}) under {result['policy']}: {acc} "
                      f"(n={result['n']}), mean stage reached {result['mean_stage']:.2f}", highlight=False,
                      soft_wrap=True)
            out.print(f"answers per stage: {result['stage_counts']}", highlight=False, soft_wrap=True)
            lat = result["latency_ms"]
            miss = (f"; deadline misses {result['misses']} ({100 * result['miss_rate']:.2f}%)"
                    if result["budget_ms"] is not None else "")
            out.print(f"latency p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms, max {lat['max']:.3f} ms{miss}",
                      highlight=False, soft_wrap=True)
            return
        assert input_path is not None
        inputs = load_inputs(input_path, runner.bundle)
        runner.warmup(sorted({min(batch, len(inputs)), len(inputs) % batch or batch}))
        rows: list[dict[str, Any]] = []
        budget = None
        for i in range(0, len(inputs), batch):
            try:
                res = runner.run(inputs.x[i: i + batch], policy)
            except OutputError as e:  # name the input, not "sample k of the request"
                raise OutputError(f"input {inputs.names[i + e.sample]}: {e}", e.sample) from None
            budget = res.budget_ms
            for name, r in zip(inputs.names[i: i + batch], res):
                rows.append({"input": name, **r.to_dict()})
        summary = _summary(rows, budget)
        if json_out:
            print_json({"bundle": str(bundle), "policy": getattr(policy, "name", str(policy)),
                        "threads": "auto" if runner.threads_per_graph else runner.threads,
                        "threads_per_graph": runner.threads_per_graph,
                        "realtime": rt.to_dict() if rt is not None else None, "results": rows, "summary": summary})
            return
        _print_results(rows, budget)
        lat = summary["latency_ms"]
        miss = f", deadline misses {summary['misses']}/{summary['n']}" if budget is not None else ""
        err.print(f"{summary['n']} input(s) under {getattr(policy, 'name', policy)}: mean stage reached "
                  f"{summary['mean_stage']:.2f}, latency p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms{miss}",
                  highlight=False, soft_wrap=True)
