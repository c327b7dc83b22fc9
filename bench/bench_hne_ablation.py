"""The HNE paper's Table 1 ablation on mnist5k: L_I vs L_S vs L_D vs L_HD, and semi-supervised L_HD.

Ruiz & Verbeek (AAAI 2021), Table 1: one HNE trained with each objective, evaluated as the
anytime ensembles of 1, 2, 4 … N members (mean of the first 2^b members' logits). Here on the
data we ship, in a low-data setting (``--sizes`` labelled images per class): L_I (Eq. 3), L_S
(Eq. 4), (1-α)·L_I + α·L_D (Eq. 5) and (1-α)·L_I + α·L_HD (Eq. 6), α = 0.5, T = 2, plus the
semi-supervised L_HD (``data.unlabelled: true``: the rest of the training pool, labels hidden,
enters the distillation term only), with labelled and unlabelled images shuffled together
(``hd_semi``) or with exactly ``--labelled-per-batch`` labelled images in every batch
(``hd_semi_fixed``, ``data.labelled_per_batch``). A seed fixes the labelled subset, the
validation split and the initial weights, so the objectives of one seed are paired; the test
split is the same 1,000 images for every run. Reported: test accuracy per ensemble size, mean ± std [min, max] over the
seeds, the paired per-seed difference to L_I, the mean accuracy of a single member and the
diversity of the full ensemble (std of member logits, the paper's measure).

Every run has the same number of optimisation steps (``--steps``, batch ``--batch-size``) rather
than the same number of epochs, so the two labelled sizes and the semi-supervised runs (whose
epochs also cover the unlabelled pool) get the same compute: epochs = round(steps / steps per
epoch), cosine learning rate over the run. Steps per epoch is the length of the training loader
the engine builds (training images // batch; for ``hd_semi_fixed`` unlabelled images // (batch -
k), an epoch being one pass over the unlabelled pool), and each run counts the steps it takes.

Each run goes to a fresh process (``--jobs`` at a time, one torch thread each); its result JSON is
written to ``<out-dir>/runs/`` as soon as it ends, and a rerun skips runs whose JSON holds the
same settings, so an interrupted sweep resumes where it stopped. The tables are printed and
written into ``--doc`` between markers (text outside them is kept); ``<out-dir>/ablation.png``
plots accuracy vs cumulative MACs per objective (mean, ± std band, min–max bars) and
``<out-dir>/summary.json`` holds the aggregated numbers.

Usage:
    nohup .venv/bin/python bench/bench_hne_ablation.py > runs/bench_hne_ablation.log 2>&1 &
    .venv/bin/python bench/bench_hne_ablation.py --report-only      # tables from the JSONs so far
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
RECIPE = "configs/hne_mnist_demo.yaml"
DEFAULT_OUT = "docs/results/hne"
DEFAULT_DOC = "docs/hne_results.md"
DEFAULT_RUNS = "runs/bench_hne_ablation"
# The demo's `mnist` tree at half width with B = 3 (8 members): one member costs 0.39 M MACs, a
# training step of batch 50 ~60 ms of CPU (~0.2-0.3 s wall on the shared 2-core machine).
DEFAULT_MODEL = {"config": "mnist", "B": 3, "width": 0.5}
VARIANTS = {
    "i": "L_I (Eq. 3)",
    "s": "L_S (Eq. 4)",
    "d": "L_D, α=0.5 (Eq. 5)",
    "hd": "L_HD (Eq. 6)",
    "hd_semi": "L_HD semi-sup.",
    "hd_semi_fixed": "L_HD semi-sup., fixed k/batch",
}
SEMI = ("hd_semi", "hd_semi_fixed")  # the variants trained on the unlabelled pool too
# k labelled images per batch of hd_semi_fixed: the largest k <= batch/2 whose whole-epoch schedule
# lands within 5 % of the 600 steps at both sizes (25 of 50: 5 x 124 = 620 steps at 50/class,
# 7 x 84 = 588 at 150/class); docs/hne_results.md says why half.
DEFAULT_LABELLED_PER_BATCH = 25


# -- one run ---------------------------------------------------------------------------------------
def run_spec(variant: str, per_class: int, seed: int, *, steps: int, batch_size: int, model: dict[str, Any],
             lr: float, T: float, alpha: float, labelled_per_batch: int | None = None) -> dict[str, Any]:
    """The settings of one training run (what its result JSON must match to be reused).

    Args:
        variant: a key of :data:`VARIANTS`.
        per_class: labelled images per class.
        seed: labelled subset, validation split and initial weights.
        steps: optimisation steps (rounded to whole epochs).
        batch_size: training batch size.
        model: ``hne`` ``model.args``.
        lr: initial learning rate (cosine to zero over the run).
        T: distillation temperature (``d``, ``hd``, ``hd_semi``).
        alpha: weight of the distillation term (``d``, ``hd``, ``hd_semi``).
        labelled_per_batch: ``hd_semi_fixed`` only (required there): labelled images per batch.
            Other variants leave it out of the spec, so their keys, hence their saved results, are
            those of the runs made before the option existed.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if (variant == "hd_semi_fixed") != (labelled_per_batch is not None):
        raise ValueError("labelled_per_batch is required by hd_semi_fixed and used by no other variant")
    spec = {"name": f"{variant}-pc{per_class}-s{seed}", "variant": variant, "per_class": per_class, "seed": seed,
            "steps": steps, "batch_size": batch_size, "model": model, "lr": lr, "T": T, "alpha": alpha,
            "recipe": RECIPE}
    if labelled_per_batch is not None:
        spec.update(name=f"{variant}-k{labelled_per_batch}-pc{per_class}-s{seed}",
                    labelled_per_batch=labelled_per_batch)
    return spec


def overrides_for(spec: dict[str, Any], epochs: int | None = None) -> list[str]:
    """``--set`` overrides on the demo recipe that give this run (``epochs`` None: 1, to size the data)."""
    semi = spec["variant"] in SEMI
    loss = "hd" if semi else spec["variant"]
    e = epochs or 1
    k = spec.get("labelled_per_batch")
    return [f"seed={spec['seed']}", f"data.per_class={spec['per_class']}",
            f"data.unlabelled={'true' if semi else 'false'}", f"data.batch_size={spec['batch_size']}",
            *([f"data.labelled_per_batch={k}"] if k is not None else []),
            f"model.args={json.dumps(spec['model'])}", f"loss.loss={loss}", f"loss.T={spec['T']}",
            f"loss.alpha={spec['alpha']}", f"optim.lr={spec['lr']}", "optim.schedule=cosine",
            "train.threads=1", "train.device=cpu", f"train.epochs={e}", f"train.eval_every={e}",
            f"train.checkpoint_every={e}"]


def train_one(spec: dict[str, Any], run_root: str, result_path: str) -> dict[str, Any]:
    """Train one run in this process and write its result JSON atomically; returns the record."""
    import torch

    from kdedge.config import load_config
    from kdedge.io import atomic_write_json
    from kdedge.train.engine import fit

    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    plan = sweep.batch_plan(load_config(ROOT / RECIPE, overrides_for(spec)))
    steps_per_epoch = plan["steps_per_epoch"]  # the engine's loader: drops a last partial batch
    epochs = max(1, round(spec["steps"] / steps_per_epoch))
    overrides = overrides_for(spec, epochs)
    cfg = load_config(ROOT / RECIPE, overrides)
    run_dir = Path(run_root) / spec["name"]
    if run_dir.exists():  # an interrupted attempt: runs are short, start it again
        shutil.rmtree(run_dir)
    t0, c0 = time.perf_counter(), time.process_time()
    counter = sweep.StepCounter()
    result = fit(cfg, run_dir, reporter=counter)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    epochs_log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    test = result["test"]
    record = {
        "spec": spec, "key": sweep.spec_key(spec), "overrides": overrides, "n_train": plan["n_train"],
        "n_labelled": plan["n_labelled"], "labelled_per_batch": plan["labelled_per_batch"],
        "steps_per_epoch": steps_per_epoch, "epochs": epochs,
        "steps": sweep.check_steps(counter.steps, epochs, steps_per_epoch),  # counted in the run
        "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
        "loadavg": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "test": {k: test[k] for k in ("ensemble_accuracy", "ensemble_macs", "member_accuracy", "diversity", "n")},
        "val": {"ensemble_accuracy": result["val"]["ensemble_accuracy"], "n": result["val"]["n"]},
        "complexity": test["complexity"],
        "train_last_epoch": epochs_log[-1]["train"] if epochs_log else {},
        "finished": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_json(Path(result_path), record)
    return record


def load_result(out_dir: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result of ``spec``, or None if missing or trained with other settings."""
    return sweep.load_record(out_dir / "runs", spec)


def _describe(rec: dict[str, Any]) -> str:
    return (f"{rec['steps']} steps in {rec['seconds']:.0f} s ({rec['cpu_seconds']:.0f} s CPU), "
            f"test 1..N members {sweep.percents(rec['test']['ensemble_accuracy'])}")


# -- statistics and tables ---------------------------------------------------------------------------
def _acc(rec: dict[str, Any]) -> list[float]:
    return rec["test"]["ensemble_accuracy"]


def paired(groups: dict[str, list[dict[str, Any]]], base: str, other: str) -> np.ndarray | None:
    """[seeds, sizes] accuracy of ``other`` minus ``base`` on the seeds both have; None if none."""
    return sweep.paired(groups, base, other, _acc)


def accuracy_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: one row per objective, one column per ensemble size, mean ± std [min, max] (%)."""
    present = {g: runs for g, runs in groups.items() if runs}
    if not present:
        return "_no finished runs_\n"
    macs = next(iter(present.values()))[0]["test"]["ensemble_macs"]
    sizes = [2 ** b for b in range(len(macs))]
    lines = ["| objective | n | " + " | ".join(f"{s} member{'s' * (s > 1)}" for s in sizes) + " |",
             "|---|---|" + "---|" * len(sizes),
             "| cumulative MMACs | | " + " | ".join(f"{m / 1e6:.2f}" for m in macs) + " |"]
    for g, runs in present.items():
        st = sweep.stats([_acc(r) for r in runs])
        lines.append(f"| {VARIANTS[g]} | {st['n']} | " + " | ".join(sweep.cell(st, k) for k in range(len(sizes)))
                     + " |")
    return "\n".join(lines) + "\n"


def gain_table(groups: dict[str, list[dict[str, Any]]], pairs: Sequence[tuple[str, str]]) -> str:
    """Markdown: paired per-seed differences other − base, mean ± std (seeds where other is ahead / seeds)."""
    rows = []
    n_sizes = 0
    for base, other in pairs:
        d = paired(groups, base, other)
        if d is None:
            continue
        n_sizes = d.shape[1]
        rows.append(f"| {VARIANTS[other]} − {VARIANTS[base]} | "
                    + " | ".join(sweep.gain_cell(d, k) for k in range(n_sizes)) + " |")
    if not rows:
        return "_no paired seeds yet_\n"
    sizes = [2 ** b for b in range(n_sizes)]
    head = ["| difference (points) | " + " | ".join(f"{s} member{'s' * (s > 1)}" for s in sizes) + " |",
            "|---|" + "---|" * n_sizes]
    return "\n".join(head + rows) + "\n"


def labelled_exposure(rec: dict[str, Any]) -> tuple[float, float]:
    """(labelled images in a batch on average, passes over the labelled set) of a run.

    Runs with ``labelled_per_batch`` recorded their batches; the others drew each batch uniformly
    from the training images, so they hold batch × labelled / training images on average.
    """
    lpb = rec.get("labelled_per_batch")
    mean = lpb["mean"] if lpb else rec["spec"]["batch_size"] * rec["n_labelled"] / rec["n_train"]
    return mean, rec["steps"] * mean / rec["n_labelled"]


def extras_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: mean and worst single-member accuracy, full-ensemble diversity, last-epoch label term,
    labelled images per batch and passes over the labelled set."""
    lines = ["| objective | mean member acc. | worst member acc. | diversity of the full ensemble | "
             "last-epoch label term | labelled images per batch | passes over the labelled set |",
             "|---|---|---|---|---|---|---|"]
    for g, runs in groups.items():
        if not runs:
            continue
        mem = sweep.stats([[float(np.mean(r["test"]["member_accuracy"])),
                            float(np.min(r["test"]["member_accuracy"]))] for r in runs])
        div = sweep.stats([[r["test"]["diversity"][-1], r["train_last_epoch"].get("ce", float("nan"))] for r in runs])
        lab, passes = np.mean([labelled_exposure(r) for r in runs], axis=0)
        lines.append(f"| {VARIANTS[g]} | {sweep.cell(mem, 0, False)} | {sweep.cell(mem, 1, False)} | "
                     f"{div['mean'][0]:.2f} ± {div['std'][0]:.2f} | {div['mean'][1]:.3f} ± {div['std'][1]:.3f} | "
                     f"{lab:.1f} | {passes:.1f} |")
    return "\n".join(lines) + "\n"


def _word(d: np.ndarray, k: int) -> str:
    """How a paired difference column reads: consistent gain, gain within the spread, no gain."""
    v = 100 * d[:, k]
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    if v.mean() > 0 and (v > 0).all() and v.mean() > std:
        return "ahead in every seed"
    if v.mean() > 0:
        return "ahead on average, within the seed spread"
    if v.mean() < 0 and (v < 0).all() and -v.mean() > std:
        return "behind in every seed"
    return "not ahead" if v.mean() < 0 else "level"


def verdict(groups: dict[str, list[dict[str, Any]]], per_class: int) -> str:
    """Computed sentences: L_HD vs L_I at small sizes, semi-supervised vs supervised L_HD."""
    out = []
    d = paired(groups, "i", "hd")
    if d is not None:
        m = 100 * d.mean(0)
        parts = [f"{2 ** k} member{'s' * (k > 0)}: {m[k]:+.1f} points, {_word(d, k)}" for k in range(d.shape[1])]
        out.append(f"- {per_class}/class, L_HD − L_I over {len(d)} paired seeds: " + "; ".join(parts) + ".")
    for base, other, what in (("hd", "hd_semi", "semi-supervised L_HD (random mix) − supervised L_HD"),
                              ("hd", "hd_semi_fixed", "semi-supervised L_HD (fixed k/batch) − supervised L_HD"),
                              ("hd_semi", "hd_semi_fixed", "semi-supervised L_HD, fixed k/batch − random mix")):
        d = paired(groups, base, other)
        if d is None:
            continue
        m, sd = 100 * d.mean(0), 100 * (d.std(0, ddof=1) if len(d) > 1 else np.zeros(d.shape[1]))
        parts = [f"{2 ** k}: {m[k]:+.1f} ± {sd[k]:.1f} ({_word(d, k)})" for k in range(d.shape[1])]
        out.append(f"- {per_class}/class, {what} over {len(d)} paired seeds, per ensemble size: "
                   + "; ".join(parts) + ".")
    return "\n".join(out) + "\n" if out else "_no paired runs yet_\n"


# -- plot and settings ---------------------------------------------------------------------------------
def plot(path: Path, panels: list[tuple[str, dict[str, list[dict[str, Any]]]]], ncols: int) -> None:
    """Accuracy vs cumulative MMACs per objective: mean line, ± std band, min–max bars; ``ncols`` panels a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 4.0 * nrows), squeeze=False)
    colours = {"i": "tab:blue", "s": "tab:orange", "d": "tab:green", "hd": "tab:red", "hd_semi": "tab:purple",
               "hd_semi_fixed": "tab:brown"}
    for ax, (title, groups) in zip(axes.flat, panels):
        for j, (g, runs) in enumerate(groups.items()):
            if not runs:
                continue
            st = sweep.stats([_acc(r) for r in runs])
            x = np.asarray(runs[0]["test"]["ensemble_macs"]) / 1e6 * (1 + 0.012 * (j - 1.5))  # dodge the bars
            mean, std = 100 * np.asarray(st["mean"]), 100 * np.asarray(st["std"])
            lo, hi = mean - 100 * np.asarray(st["min"]), 100 * np.asarray(st["max"]) - mean
            c = colours.get(g, "k")
            ax.errorbar(x, mean, yerr=[lo, hi], fmt="o", color=c, ms=4, capsize=3, lw=1.4, elinewidth=0.8,
                        label=f"{VARIANTS[g]} (n={st['n']})", ls="--" if g in SEMI else "-")
            ax.fill_between(x, mean - std, mean + std, color=c, alpha=0.15)
        first = next((r for runs in groups.values() for r in runs), None)
        if first is not None:
            macs = np.asarray(first["test"]["ensemble_macs"]) / 1e6
            ax.set_xscale("log", base=2)
            ax.set_xticks(macs)
            ax.set_xticklabels([f"{2 ** k}\n{m:.2f}" for k, m in enumerate(macs)])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("members / cumulative MMACs per image")
        ax.set_ylabel("test top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("HNE on mnist5k, test accuracy of the first 1, 2, 4, 8 members: mean, ± std band, min–max bars",
                 fontsize=10)
    fig.tight_layout()
    sweep.save_figure(fig, path)


def settings_text(args: argparse.Namespace, records: list[dict[str, Any]], n_expected: int) -> str:
    per = sorted({(r["spec"]["variant"], r["spec"]["per_class"], r["n_train"], r["epochs"], r["steps_per_epoch"],
                   r["steps"]) for r in records}, key=lambda t: (t[1], list(VARIANTS).index(t[0])))
    secs = [r["seconds"] for r in records]
    cpus = [r.get("cpu_seconds", float("nan")) for r in records]
    lines = [
        sweep.status_line(len(records), n_expected),
        f"- command: `{sweep.command_line(drop=('--report-only',))}`"
        + (f" (tables regenerated with `--report-only` from `{args.out_dir}/runs/*.json`)"
           if args.report_only else ""),
        sweep.machine_line("shared with other jobs: timings are not benchmarks"),
        f"- recipe `{RECIPE}` with: model `hne` args `{json.dumps(args.model)}`, batch {args.batch_size}, "
        f"SGD lr {args.lr} cosine to 0 over the run, momentum 0.9, wd 5e-4, pad-crop augmentation, "
        f"T = {args.T}, α = {args.alpha} (L_D and L_HD), one torch thread per run, {args.jobs} runs in parallel",
        f"- semi-supervised runs: the training pool beyond the labelled images enters with labels hidden; "
        f"`hd_semi` shuffles labelled and unlabelled images together (an epoch = one pass over both), "
        f"`hd_semi_fixed` puts exactly k = {args.labelled_per_batch} labelled images in every batch "
        f"(`data.labelled_per_batch`; an epoch = one pass over the unlabelled pool, labelled images cycled); "
        "labelled images per batch and passes over the labelled set are in the last table of each size",
        f"- {args.steps} optimisation steps requested per run, rounded to whole epochs; "
        "(objective, labelled/class, training images, epochs, steps/epoch, steps): "
        + ", ".join(f"({a}, {b}, {c}, {d}, {e}, {f})" for a, b, c, d, e, f in per),
        f"- seeds {', '.join(map(str, args.seeds))} (a seed fixes the labelled subset, the validation split and "
        "the initial weights; the test split is the same 1,000 images for every run)",
        f"- time per run: {min(secs):.0f}–{max(secs):.0f} s wall, {np.nanmin(cpus):.0f}–{np.nanmax(cpus):.0f} s CPU; "
        f"{sum(secs) / 60:.0f} process-minutes in all" if secs else "- no finished runs",
    ]
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 150], help="labelled images per class")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=600, help="optimisation steps per run (rounded to whole epochs)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--labelled-per-batch", type=int, default=DEFAULT_LABELLED_PER_BATCH, metavar="K",
                   help="hd_semi_fixed: labelled images in every batch, 1 <= K < batch size")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--T", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--model", type=json.loads, default=DEFAULT_MODEL, help="hne model.args as JSON")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    sweep.add_output_args(p, out_dir=DEFAULT_OUT, runs_dir=DEFAULT_RUNS, doc=DEFAULT_DOC,
                          out_help="result JSONs (runs/), summary, PNG")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.jobs < 1 or args.steps < 1 or args.batch_size < 1:
        raise SystemExit("error: --jobs, --steps and --batch-size must be positive")
    if "hd_semi_fixed" in args.variants and not 1 <= args.labelled_per_batch < args.batch_size:
        raise SystemExit(f"error: --labelled-per-batch must be in [1, {args.batch_size}) (the batch needs room for "
                         f"unlabelled images), got {args.labelled_per_batch}")
    os.chdir(ROOT)
    # Seed-major order: an interrupted sweep leaves whole seeds (every objective, both sizes) done.
    specs = [run_spec(v, pc, seed, steps=args.steps, batch_size=args.batch_size, model=args.model, lr=args.lr,
                      T=args.T, alpha=args.alpha,
                      labelled_per_batch=args.labelled_per_batch if v == "hd_semi_fixed" else None)
             for seed in args.seeds for pc in args.sizes for v in args.variants]
    if not args.report_only:
        sweep.log(f"HNE ablation: {len(specs)} runs ({len(args.variants)} objectives x {len(args.sizes)} sizes x "
                  f"{len(args.seeds)} seeds), {args.steps} steps each")
        sweep.run_parallel(specs, train_one, results=args.out_dir / "runs", run_root=args.runs_dir, jobs=args.jobs,
                           describe=_describe)

    records = [r for r in (load_result(args.out_dir, s) for s in specs) if r is not None]
    sections = ["Test accuracy (%) of the anytime ensembles of the first 1, 2, 4 … N members; mean ± std "
                "[min, max] over seeds. Paired differences: mean ± std over seeds (seeds where the first "
                "objective is ahead / seeds).\n"]
    panels, semi_panels, summary = [], [], {}
    for pc in args.sizes:
        groups = {v: [r for r in records if r["spec"]["variant"] == v and r["spec"]["per_class"] == pc]
                  for v in args.variants}
        pairs = ([("i", v) for v in ("s", "d", "hd", *SEMI) if v in groups]
                 + [("d", "hd"), ("hd", "hd_semi"), ("hd", "hd_semi_fixed"), ("hd_semi", "hd_semi_fixed")])
        sections += [f"### {pc} labelled images per class\n", accuracy_table(groups),
                     "\nPaired differences (accuracy points):\n", gain_table(groups, pairs),
                     "\nMembers alone, diversity of the 8 members (std of their logits, the paper's measure) and "
                     "the label term of the loss averaged over the last epoch (Σ of the 8 members' CE for L_I, "
                     "L_D and L_HD; Σ of the 4 sub-ensembles' CE for L_S; labelled samples only), with the labelled "
                     "images a batch holds (on average for a random mix of labelled and unlabelled images) and the "
                     "passes over the labelled set in the run (steps × labelled per batch / labelled images):\n",
                     extras_table(groups),
                     "\nComputed reading:\n", verdict(groups, pc)]
        panels.append((f"{pc} labelled images per class: labelled objectives",
                       {v: runs for v, runs in groups.items() if v not in SEMI}))
        semi_panels.append((f"{pc} labelled images per class: + unlabelled pool",
                            {v: runs for v, runs in groups.items() if v in ("i", "hd", *SEMI)}))
        summary[str(pc)] = {v: {"seeds": [r["spec"]["seed"] for r in runs], **sweep.stats([_acc(r) for r in runs]),
                                "macs": runs[0]["test"]["ensemble_macs"]}
                            for v, runs in groups.items() if runs}
    body = "\n".join(sections)
    print(body)
    n = len(specs)
    settings = settings_text(args, records, n)
    print(settings)
    if records:
        plot(args.out_dir / "ablation.png", panels + (semi_panels if set(SEMI) & set(args.variants) else []),
             ncols=len(args.sizes))
        from kdedge.io import atomic_write_json

        atomic_write_json(args.out_dir / "summary.json", {"complete": len(records) == n, "runs": len(records),
                                                          "expected": n, "accuracy": summary})
    png = os.path.relpath(args.out_dir / "ablation.png", args.doc.parent)
    sweep.write_section(args.doc, "hne-ablation", "## Table 1 ablation\n\n" + settings + "\n" + body
                        + f"\n![accuracy vs MACs per objective]({png})\n", "HNE results")
    sweep.log(f"wrote {args.doc} and {args.out_dir}/ ({len(records)} of {n} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
