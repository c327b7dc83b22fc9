"""The paper's Table 2 experiment on mnist5k: exit-wise vs distillation vs semi-supervised distillation.

Phuong & Lampert (ICCV 2019), Table 2 / Figs. 3 and 5, on the data we ship: an MSDNet trained
with the exit-wise loss (Eq. 7), with distillation from the last exit and temperature annealing
(Eq. 1, §3.4), and with semi-supervised distillation (Eq. 6: the rest of the training pool as
unlabelled images; ``semi`` shuffles labelled and unlabelled images together, ``semi_fixed`` puts
exactly ``--labelled-per-batch`` labelled images in every batch, ``data.labelled_per_batch``),
at two low-data sizes (``--sizes``, labelled images per class), for several
seeds (a seed fixes the labelled subset, the validation split and the initial weights, so the
three methods of one seed are paired). Reported on the fixed mnist5k test split: accuracy of
every exit, of every anytime ensemble (mean of the probabilities of exits 1..k) and budget mode
(for "exits 1..k affordable", the exit with the best validation accuracy), mean ± std over the
seeds with min/max, and the paired per-seed gain over the exit-wise baseline.

Every run has the same number of optimisation steps (``--steps``, batch ``--batch-size``), so a
semi-supervised run, whose epochs also cover the unlabelled pool, gets the same compute as the
supervised ones: epochs = round(steps / steps per epoch), learning-rate drops (×0.1) at 50 % and
75 % of the steps (the paper's 150/225 of 300 epochs). Steps per epoch is the length of the
training loader the engine builds (training images // batch; for ``semi_fixed`` unlabelled images
// (batch - k), an epoch being one pass over the unlabelled pool), and each run counts its steps.

Each run goes to a fresh process (``--jobs`` at a time, one torch thread each); its result JSON is
written to ``<out-dir>/runs/`` as soon as it ends, and a rerun skips runs whose JSON holds the
same settings, so an interrupted sweep resumes where it stopped. The tables are printed and
written into ``--doc`` between markers (the rest of the file is kept); a PNG of accuracy vs
cumulative MACs (mean ± std band per method) goes to ``<out-dir>/table2.png``.

Usage:
    nohup .venv/bin/python bench/bench_multiexit_table2.py > runs/bench_multiexit_table2.log 2>&1 &
    .venv/bin/python bench/bench_multiexit_table2.py --report-only     # tables from the JSONs so far
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # inherited by the spawned run processes

import _sweep as sweep
import numpy as np

ROOT = sweep.ROOT
RECIPE = "configs/multiexit_mnist_demo.yaml"
DEFAULT_OUT = "docs/results/multiexit"
DEFAULT_DOC = "docs/multiexit_results.md"
DEFAULT_RUNS = "runs/bench_multiexit"
DOC_TITLE = "Multi-exit benchmarks"  # of --doc when the file does not exist yet
# The `small` preset with half the channels: the same 3 scales x 5 exits, 3.5x fewer MACs; on a
# shared 2-core machine a step costs ~0.3-0.5 s instead of ~0.7 s (many small ops).
DEFAULT_MODEL = {"config": "small", "scale_channels": [2, 4, 8]}
METHODS = {"exitwise": "exit-wise (Eq. 7)", "distill": "distillation", "semi": "distillation semi-sup. (Eq. 6)",
           "semi_fixed": "distillation semi-sup., fixed k/batch"}
SEMI = ("semi", "semi_fixed")  # the methods trained on the unlabelled pool too
# k labelled images per batch of semi_fixed: the largest k <= batch/2 whose whole-epoch schedule lands
# within 5 % of the 300 steps at both sizes. Half the batch (16 of 32) would give 2 x 193 = 386
# steps at 50/class and 2 x 131 = 262 at 150/class; 12 gives 2 x 155 = 310 and 3 x 105 = 315.
DEFAULT_LABELLED_PER_BATCH = 12


# -- one run ---------------------------------------------------------------------------------------
def run_spec(method: str, per_class: int, seed: int, *, steps: int, batch_size: int, model: dict[str, Any],
             temperature: float | None = None, lr: float = 0.1,
             labelled_per_batch: int | None = None) -> dict[str, Any]:
    """The settings of one training run (what its result JSON must match to be reused).

    Args:
        method: a key of :data:`METHODS`.
        per_class: labelled images per class.
        seed: data subset, validation split and initial weights.
        steps: optimisation steps (rounded to whole epochs).
        batch_size: training batch size.
        model: MSDNet ``model.args``.
        temperature: None = annealed from 1 (§3.4); a number = that constant temperature.
        lr: initial learning rate (drops x0.1 at 50 % and 75 % of the epochs).
        labelled_per_batch: ``semi_fixed`` only (required there): labelled images per batch. Other
            methods leave it out of the spec, so their keys, hence their saved results, are those
            of the runs made before the option existed.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if (method == "semi_fixed") != (labelled_per_batch is not None):
        raise ValueError("labelled_per_batch is required by semi_fixed and used by no other method")
    tag = "" if temperature is None else f"-T{temperature:g}"
    spec = {"name": f"{method}-pc{per_class}{tag}-s{seed}", "method": method, "per_class": per_class, "seed": seed,
            "steps": steps, "batch_size": batch_size, "model": model, "temperature": temperature, "lr": lr,
            "recipe": RECIPE}
    if labelled_per_batch is not None:
        spec.update(name=f"{method}-k{labelled_per_batch}-pc{per_class}{tag}-s{seed}",
                    labelled_per_batch=labelled_per_batch)
    return spec


def overrides_for(spec: dict[str, Any], epochs: int | None = None) -> list[str]:
    """``--set`` overrides on the demo recipe that give this run (``epochs`` None: 1, to size the data)."""
    loss = "exitwise" if spec["method"] == "exitwise" else "distill"
    k = spec.get("labelled_per_batch")
    ov = [f"seed={spec['seed']}", f"data.per_class={spec['per_class']}",
          f"data.unlabelled={'true' if spec['method'] in SEMI else 'false'}",
          f"data.batch_size={spec['batch_size']}", *([f"data.labelled_per_batch={k}"] if k is not None else []),
          f"model.args={json.dumps(spec['model'])}",
          f"loss.loss={loss}", f"optim.lr={spec['lr']}", "train.threads=1", "train.device=cpu"]
    if spec["temperature"] is not None:
        ov += ["loss.anneal=false", f"loss.T={spec['temperature']}"]
    e = epochs or 1
    # whole-epoch milestones satisfy the config check; train_one replaces them by lr_drops(e)
    ov += [f"train.epochs={e}", f"optim.milestones=[{max(1, int(0.5 * e))}]", f"train.eval_every={e}",
           f"train.checkpoint_every={e}"]
    return ov


def lr_drops(epochs: int) -> list[float]:
    """Learning-rate drops at 50 % and 75 % of the steps, in (fractional) epochs.

    The engine compares milestones with the fractional epoch of every step, so fractions work;
    the config file format only takes whole epochs, hence they are set on the loaded config. With
    whole epochs a 3-epoch run would drop twice at epoch 2 (int(1.5 + 0.5) = int(2.25 + 0.5)).
    """
    return [0.5 * epochs, 0.75 * epochs]


def train_one(spec: dict[str, Any], run_root: str, result_path: str) -> dict[str, Any]:
    """Train one run in this process and write its result JSON atomically; returns the record."""
    import torch

    from kdedge.config import load_config
    from kdedge.io import atomic_write_json
    from kdedge.train.engine import fit

    torch.set_num_threads(1)
    plan = sweep.batch_plan(load_config(ROOT / RECIPE, overrides_for(spec)))
    n_train = plan["n_train"]
    steps_per_epoch = plan["steps_per_epoch"]  # the engine's loader: drops a last partial batch
    epochs = max(1, round(spec["steps"] / steps_per_epoch))
    overrides = overrides_for(spec, epochs)
    cfg = load_config(ROOT / RECIPE, overrides)
    cfg.optim.milestones = lr_drops(epochs)  # type: ignore[assignment]  # fractional epochs, see lr_drops
    run_dir = Path(run_root) / spec["name"]
    if run_dir.exists():  # an interrupted attempt: runs are short, start it again
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    counter = sweep.StepCounter()
    result = fit(cfg, run_dir, reporter=counter)
    seconds = time.perf_counter() - t0
    epochs_log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    test = result["test"]
    record = {
        "spec": spec, "key": sweep.spec_key(spec), "overrides": overrides, "n_train": n_train,
        "n_labelled": plan["n_labelled"], "labelled_per_batch": plan["labelled_per_batch"],
        "steps_per_epoch": steps_per_epoch, "epochs": epochs,
        "steps": sweep.check_steps(counter.steps, epochs, steps_per_epoch),  # counted in the run
        "milestones_epochs": lr_drops(epochs), "milestones_steps": [m * steps_per_epoch for m in lr_drops(epochs)],
        "seconds": round(seconds, 1),
        "test": {k: test[k] for k in ("per_exit", "anytime", "macs", "n")},
        "budget": [b["accuracy"] for b in test["modes"]["budget"]],
        "budget_exit": [b["exit"] for b in test["modes"]["budget"]],
        "val": {"per_exit": test["modes"]["val_per_exit"], "anytime": result["val"]["anytime"]},
        "temperature": [r.get("temperature") for r in epochs_log],
        "teacher_conf": [r["train"].get("teacher_conf") for r in epochs_log],
        "train_ce": [r["train"].get("ce") for r in epochs_log],
        "finished": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_json(Path(result_path), record)
    return record


def load_result(out_dir: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result of ``spec``, or None if missing or trained with other settings."""
    rec = sweep.load_record(out_dir / "runs", spec)
    if rec is None:
        return None
    drops = rec.get("milestones_epochs")
    if drops is None:  # written before lr_drops: whole-epoch milestones in the overrides
        ms = [o for o in rec["overrides"] if o.startswith("optim.milestones=")]
        drops = json.loads(ms[0].partition("=")[2]) if ms else None
    return rec if drops is not None and [float(d) for d in drops] == lr_drops(rec["epochs"]) else None


def run_sweep(specs: Sequence[dict[str, Any]], out_dir: Path, run_root: Path, jobs: int) -> None:
    """Train every spec without a usable result JSON, ``jobs`` fresh processes at a time."""
    sweep.run_parallel(specs, train_one, results=out_dir / "runs", run_root=run_root, jobs=jobs,
                       done=lambda s: load_result(out_dir, s) is not None, describe=_describe)


def _describe(rec: dict[str, Any]) -> str:
    return (f"{rec['steps']} steps in {rec['seconds']:.0f} s, T={rec['temperature'][-1]}, "
            f"test per exit {sweep.percents(rec['test']['per_exit'])}")


# -- statistics and tables ---------------------------------------------------------------------------
def metric_table(groups: dict[str, list[dict[str, Any]]], metric: str, labels: dict[str, str],
                 row_name: str) -> str:
    """Markdown table: one row per exit, one column per group, mean ± std [min, max]."""
    present = {g: runs for g, runs in groups.items() if runs}
    if not present:
        return "_no finished runs_\n"
    macs = next(iter(present.values()))[0]["test"]["macs"]
    sts = {g: sweep.stats([_metric(r, metric) for r in runs]) for g, runs in present.items()}
    head = f"| {row_name} | MMACs | " + " | ".join(f"{labels[g]} (n={sts[g]['n']})" for g in present) + " |"
    lines = [head, "|" + "---|" * (2 + len(present))]
    for k, m in enumerate(macs):
        lines.append(f"| {k + 1} | {m / 1e6:.2f} | " + " | ".join(sweep.cell(sts[g], k) for g in present) + " |")
    return "\n".join(lines) + "\n"


def gain_table(groups: dict[str, list[dict[str, Any]]], base: str, metric: str, labels: dict[str, str],
               row_name: str) -> str:
    """Paired per-seed gain of each group over ``base``: mean ± std (seeds with a gain / seeds)."""
    others = [g for g in groups if g != base and groups[g]]
    if not groups.get(base) or not others:
        return "_not enough finished runs for paired gains_\n"
    return pairs_table(groups, [(base, g) for g in others], metric, labels, row_name)


def pairs_table(groups: dict[str, list[dict[str, Any]]], pairs: Sequence[tuple[str, str]], metric: str,
                labels: dict[str, str], row_name: str) -> str:
    """Paired per-seed differences ``other − base``, one column per pair of ``pairs`` that shares a seed:
    mean ± std (seeds where ``other`` is ahead / seeds)."""
    found = {(b, o): paired_gains(groups, b, o, metric) for b, o in pairs}
    diffs = {bo: d for bo, d in found.items() if d is not None}
    if not diffs:
        return "_no paired seeds_\n"
    lines = [f"| {row_name} | " + " | ".join(f"{labels[o]} − {labels[b]}" for b, o in diffs) + " |",
             "|" + "---|" * (1 + len(diffs))]
    n = next(iter(diffs.values())).shape[1]
    for k in range(n):
        lines.append(f"| {k + 1} | " + " | ".join(sweep.gain_cell(d, k) for d in diffs.values()) + " |")
    return "\n".join(lines) + "\n"


def paired_gains(groups: dict[str, list[dict[str, Any]]], base: str, other: str, metric: str) -> np.ndarray | None:
    """[seeds, exits] ``metric`` of ``other`` minus ``base`` on the seeds both have; None if none."""
    return sweep.paired(groups, base, other, lambda r: _metric(r, metric))


def _metric(rec: dict[str, Any], metric: str) -> list[float]:
    return rec["budget"] if metric == "budget" else rec["test"][metric]


def labelled_exposure(rec: dict[str, Any]) -> tuple[float, float]:
    """(labelled images in a batch on average, passes over the labelled set) of a run.

    Runs with ``labelled_per_batch`` recorded their batches; the others drew each batch uniformly
    from the training images, so they hold batch × labelled / training images on average.
    """
    spec = rec["spec"]
    # records made before n_labelled was stored: mnist5k has 10 classes
    n_lab = rec.get("n_labelled") or (10 * spec["per_class"] if spec["method"] in SEMI else rec["n_train"])
    lpb = rec.get("labelled_per_batch")
    mean = lpb["mean"] if lpb else spec["batch_size"] * n_lab / rec["n_train"]
    return mean, rec["steps"] * mean / n_lab


def exposure_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: steps, labelled images per batch and passes over the labelled set, per method."""
    lines = ["| method | steps | labelled images per batch | passes over the labelled set | "
             "training CE, last epoch |", "|---|---|---|---|---|"]
    for g, runs in groups.items():
        if not runs:
            continue
        lab, passes = np.mean([labelled_exposure(r) for r in runs], axis=0)
        ce = [r["train_ce"][-1] for r in runs if r["train_ce"] and r["train_ce"][-1] is not None]
        steps = sorted({r["steps"] for r in runs})
        lines.append(f"| {METHODS[g]} | {', '.join(map(str, steps))} | {lab:.1f} | {passes:.1f} | "
                     + (f"{np.mean(ce):.2f} ± {np.std(ce, ddof=1) if len(ce) > 1 else 0.0:.2f}" if ce else "-")
                     + " |")
    return "\n".join(lines) + "\n"


def _word(d: np.ndarray, k: int) -> str:
    """How a paired difference column reads: consistent gain or loss, or within the seed spread."""
    v = 100 * d[:, k]
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    if v.mean() > 0 and (v > 0).all() and v.mean() > std:
        return "ahead in every seed"
    if v.mean() < 0 and (v < 0).all() and -v.mean() > std:
        return "behind in every seed"
    return "within the seed spread"


def semi_verdict(groups: dict[str, list[dict[str, Any]]], per_class: int) -> str:
    """Computed sentences: the semi-supervised runs against supervised distillation and each other, per exit."""
    out = []
    for base, other in (("distill", "semi"), ("distill", "semi_fixed"), ("semi", "semi_fixed")):
        d = paired_gains(groups, base, other, "per_exit")
        if d is None:
            continue
        m, sd = 100 * d.mean(0), 100 * (d.std(0, ddof=1) if len(d) > 1 else np.zeros(d.shape[1]))
        parts = [f"exit {k + 1}: {m[k]:+.1f} ± {sd[k]:.1f} ({_word(d, k)})" for k in range(d.shape[1])]
        out.append(f"- {per_class}/class, {METHODS[other]} − {METHODS[base]} over {len(d)} paired seeds: "
                   + "; ".join(parts) + ".")
    return "\n".join(out) + "\n" if out else "_no paired semi-supervised runs yet_\n"


def verdict(groups: dict[str, list[dict[str, Any]]], per_class: int) -> str:
    """A plain sentence on whether distillation's early-exit gains reproduce at this size (computed)."""
    out = []
    for other in ("distill", *SEMI):
        d = paired_gains(groups, "exitwise", other, "per_exit")
        if d is None or len(d) == 0:
            continue
        m = 100 * d.mean(0)
        std = 100 * d.std(0, ddof=1) if len(d) > 1 else np.zeros_like(m)
        wins = (d > 0).sum(0)
        first, last = m[0], m[-1]
        clear = len(d) >= 2 and first > 0 and first > std[0] and wins[0] == len(d)
        word = ("reproduces" if clear else
                f"does not reproduce (the mean gain is smaller than its seed spread; positive in {wins[0]} of "
                f"{len(d)} seeds)"
                if first > 0 else "does not reproduce")
        out.append(f"{METHODS[other]} vs exit-wise at {per_class}/class: exit 1 {first:+.1f} points "
                   f"(± {std[0]:.1f}, better in {wins[0]}/{len(d)} seeds), last exit {last:+.1f} points; "
                   f"the early-exit gain {word}.")
    return " ".join(out) if out else "no paired runs yet."


# -- plot and settings ---------------------------------------------------------------------------------
def plot_panels(path: Path, panels: list[tuple[str, dict[str, list[dict[str, Any]]], str]],
                labels: dict[str, str], ncols: int = 2) -> None:
    """Accuracy vs cumulative MMACs, one line (mean) and band (± std) per group and panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    colours = ["tab:blue", "tab:green", "tab:red", "tab:orange", "tab:purple", "tab:brown"]
    for ax, (title, groups, metric) in zip(axes.flat, panels):
        for i, (g, runs) in enumerate(groups.items()):
            if not runs:
                continue
            st = sweep.stats([_metric(r, metric) for r in runs])
            x = np.asarray(runs[0]["test"]["macs"]) / 1e6
            mean, std = 100 * np.asarray(st["mean"]), 100 * np.asarray(st["std"])
            ax.plot(x, mean, "o-", color=colours[i % len(colours)], label=f"{labels[g]} (n={st['n']})", ms=4)
            ax.fill_between(x, mean - std, mean + std, color=colours[i % len(colours)], alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("cumulative MMACs per image")
        ax.set_ylabel("test top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    sweep.save_figure(fig, path)


def settings_text(args: argparse.Namespace, records: list[dict[str, Any]], n_expected: int, extra: str = "") -> str:
    steps = sorted({r["steps"] for r in records})
    per = sorted({(r["spec"]["method"], r["spec"]["per_class"], r["epochs"], r["steps_per_epoch"]) for r in records})
    secs = [r["seconds"] for r in records]
    ce = {}
    for r in records:
        if r["train_ce"] and r["train_ce"][-1] is not None:
            ce.setdefault(r["spec"]["method"], []).append(r["train_ce"][-1])
    lines = [
        sweep.status_line(len(records), n_expected),
        f"- command: `{sweep.command_line(drop=('--report-only',))}`"
        + (f" (tables regenerated from `{args.out_dir}/runs/*.json` with `--report-only`)" if args.report_only else ""),
        sweep.machine_line("the machine is shared: timings are not benchmarks"),
        f"- recipe `{RECIPE}` with: model `msdnet` args `{json.dumps(args.model)}`, batch {args.batch_size}, "
        f"SGD Nesterov lr {args.lr} (×0.1 at 50 % and 75 % of the steps), momentum 0.9, wd 1e-4, "
        f"pad-crop augmentation, one torch thread per run, {args.jobs} runs in parallel",
        f"- {args.steps} optimisation steps requested per run, rounded to whole epochs: actual steps "
        f"{', '.join(map(str, steps)) or '-'}; (method, labelled/class, epochs, steps/epoch): "
        + ", ".join(f"({a}, {b}, {c}, {d})" for a, b, c, d in per),
        f"- seeds {', '.join(map(str, args.seeds))} (a seed fixes the labelled subset, the validation split and "
        f"the initial weights; the test split is the same 1,000 images for every run; validation: 400 images)",
        f"- wall time per run: {min(secs):.0f}–{max(secs):.0f} s, {sum(secs) / 60:.0f} process-minutes in all"
        if secs else "- no finished runs",
    ]
    if ce:
        lines.append("- training cross-entropy (mean over exits, last epoch, labelled images), mean over runs: "
                     + ", ".join(f"{m} {np.mean(v):.2f}" for m, v in sorted(ce.items())))
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------------
def common_args(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=steps, help="optimisation steps per run (rounded to whole epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--model", type=json.loads, default=DEFAULT_MODEL, help="MSDNet model.args as JSON")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    sweep.add_output_args(p, out_dir=DEFAULT_OUT, runs_dir=DEFAULT_RUNS, doc=DEFAULT_DOC,
                          out_help="result JSONs (runs/) and PNGs")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 150], help="labelled images per class")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--labelled-per-batch", type=int, default=DEFAULT_LABELLED_PER_BATCH, metavar="K",
                   help="semi_fixed: labelled images in every batch, 1 <= K < batch size")
    common_args(p, steps=300)
    args = p.parse_args(argv)
    if "semi_fixed" in args.methods and not 1 <= args.labelled_per_batch < args.batch_size:
        raise SystemExit(f"error: --labelled-per-batch must be in [1, {args.batch_size}) (the batch needs room for "
                         f"unlabelled images), got {args.labelled_per_batch}")
    os.chdir(ROOT)
    specs = [run_spec(m, pc, s, steps=args.steps, batch_size=args.batch_size, model=args.model, lr=args.lr,
                      labelled_per_batch=args.labelled_per_batch if m == "semi_fixed" else None)
             for pc in args.sizes for s in args.seeds for m in args.methods]
    if not args.report_only:
        sweep.log(f"machine: {sweep.machine()}")
        run_sweep(specs, args.out_dir, args.runs_dir, args.jobs)
    report(args, specs)
    return 0


def report(args: argparse.Namespace, specs: Sequence[dict[str, Any]]) -> None:
    records = [r for r in (load_result(args.out_dir, s) for s in specs) if r is not None]
    body = ["## Table 2 on mnist5k: exit-wise vs distillation vs semi-supervised distillation", "",
            "_Generated by `bench/bench_multiexit_table2.py`; test top-1 accuracy in %, mean ± std over seeds "
            "[min, max]; gains are paired by seed (same labelled subset and initial weights), mean ± std "
            "(seeds with a gain / seeds)._", "",
            settings_text(args, records, len(specs),
                          "- semi-supervised runs: the training pool beyond the labelled images enters with labels "
                          "hidden (distillation term only); `semi` shuffles labelled and unlabelled images together "
                          "(an epoch = one pass over both), `semi_fixed` puts exactly k = "
                          f"{args.labelled_per_batch} labelled images in every batch (`data.labelled_per_batch`; an "
                          "epoch = one pass over the unlabelled pool, labelled images cycled)"
                          if "semi_fixed" in args.methods else "")]
    panels = []
    summary: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "machine": sweep.machine(), "sizes": {}}
    for pc in args.sizes:
        groups = {m: [r for r in records if r["spec"]["method"] == m and r["spec"]["per_class"] == pc]
                  for m in args.methods}
        unl = next((r["n_train"] - 10 * pc for r in records if r["spec"]["per_class"] == pc
                    and r["spec"]["method"] in SEMI), None)
        body += [f"### {pc} labelled images per class ({10 * pc} labelled"
                 + (f", {unl} unlabelled for the semi-supervised runs)" if unl is not None else ")"), "",
                 f"**Verdict (computed from the runs):** {verdict(groups, pc)}", "",
                 "Per exit (the prediction of exit k alone):", "", metric_table(groups, "per_exit", METHODS, "exit"),
                 "Anytime (mean of the probabilities of exits 1..k; the paper's Fig. 5):", "",
                 metric_table(groups, "anytime", METHODS, "exits"),
                 "Budget mode (exits 1..k affordable, the exit with the best validation accuracy; the paper's "
                 "Table 2 layout, MMACs = the budget):", "", metric_table(groups, "budget", METHODS, "budget"),
                 "Paired gain over exit-wise, per exit (points):", "",
                 gain_table(groups, "exitwise", "per_exit", METHODS, "exit"),
                 "Paired gain over exit-wise, anytime (points):", "",
                 gain_table(groups, "exitwise", "anytime", METHODS, "exits")]
        if any(groups.get(m) for m in SEMI):
            semi_pairs = [("distill", "semi"), ("distill", "semi_fixed"), ("semi", "semi_fixed")]
            body += ["Semi-supervised runs against supervised distillation (the same loss without the "
                     "unlabelled pool) and against each other, per exit (points):", "",
                     pairs_table(groups, semi_pairs, "per_exit", METHODS, "exit"),
                     "The same, anytime (points):", "", pairs_table(groups, semi_pairs, "anytime", METHODS, "exits"),
                     "Labelled images per batch (on average, for a random mix of labelled and unlabelled images) "
                     "and passes over the labelled set (steps × labelled per batch / labelled images):", "",
                     exposure_table(groups), "Computed reading:", "", semi_verdict(groups, pc)]
        panels += [(f"{pc}/class: per exit", groups, "per_exit"), (f"{pc}/class: anytime ensemble", groups, "anytime")]
        summary["sizes"][str(pc)] = {m: {metric: sweep.stats([_metric(r, metric) for r in runs]) if runs else None
                                         for metric in ("per_exit", "anytime", "budget")}
                                     for m, runs in groups.items()}
    png = args.out_dir / "table2.png"
    if records:
        plot_panels(png, panels, METHODS)
        body += [f"![accuracy vs cumulative MACs]({os.path.relpath(png, args.doc.parent)})", ""]
    text = "\n".join(body)
    print(text)
    from kdedge.io import atomic_write_json

    atomic_write_json(args.out_dir / "table2_summary.json", {**summary, "runs": [r["spec"]["name"] for r in records]})
    sweep.write_section(args.doc, "table2", text, DOC_TITLE)


if __name__ == "__main__":
    sys.exit(main())
