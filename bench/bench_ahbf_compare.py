"""AHBF-OKD vs its baselines on mnist5k in the low-data setting, the Fig. 3(d) ablation, and the detach switch.

Gong et al. (AAAI 2023) compare the target network trained by AHBF-OKD with the same network trained
alone (vanilla) and by the online-distillation methods ONE and CL (and DML); Fig. 3(d) ablates the
assistant losses (λ1 = λ2 = 0, only L_TAKL, only L_BTKL, both). Here on the data we ship: mnist5k
with ``--per-class`` labelled images per class (default 100), the demo's narrow ResNet-8 (width 8)
as the target, M = 3 branches. Every variant trains the same target network; what is scored is the
target branch's test accuracy (the deployed ``student()``).

Groups (model and loss settings on top of ``configs/ahbf_mnist_demo.yaml``):

- ``vanilla``: the target alone (``branches: 1``), cross-entropy.
- ``one``, ``cl``, ``dml``: M identical branches (``aux: 0``, their papers' setting), ONE's gated
  ensemble / CL's mean-of-the-others / DML's pairwise teachers, ``kd_weight`` 1.
- ``ahbf``: hierarchical branches (``aux: 1``), λ1 = 4, λ2 = 2 (the paper's best; also the
  "both" bar of Fig. 3(d)), teacher side detached (the default).
- ``abl_none`` (λ1 = λ2 = 0), ``abl_takl`` (λ1 = 4, λ2 = 0), ``abl_btkl`` (λ1 = 0, λ2 = 2): Fig. 3(d).
- ``nodetach``: ``ahbf`` with ``loss.detach_teacher: false`` (the authors' code).

All share τ = 3, the ramp-up ω of Eq. 13 with E = the run's epochs, SGD Nesterov (momentum 0.9,
wd 5e-4), lr 0.1 divided by 10 at 60 % and 80 % of the run, pad-crop augmentation, batch
``--batch-size``. Every run has the same number of optimisation steps (``--steps``, rounded to whole
epochs). A seed fixes the labelled subset, the validation split and the initial weights, so the
groups of one seed are paired; the test split is the same 1,000 images for every run.

Runs are trained one at a time in this process (one torch thread); each run's result JSON is
written to ``<out-dir>/per_run/`` (not ``runs/``, which .gitignore excludes) as soon as it ends,
and a rerun skips runs whose JSON holds the same settings. Defaults: 5 seeds for the main
comparison, 3 for the ablations, the detach switch and DML (~1 minute per run here). Order:
the main comparison (vanilla, ONE, CL, AHBF; seed-major) first, then the ablations and the
detach switch, then DML. ``--budget-min`` stops starting runs when the next one would not finish
in time; the tables then say PARTIAL. After every run the tables are printed and
written into ``--doc`` between markers (text outside them is kept), with ``<out-dir>/summary.json``;
``<out-dir>/compare.png`` plots every run's target accuracy per group.

Usage:
    nohup .venv/bin/python bench/bench_ahbf_compare.py > runs/bench_ahbf_compare.log 2>&1 &
    .venv/bin/python bench/bench_ahbf_compare.py --report-only       # tables from the JSONs so far
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread before torch is imported

import _sweep as sweep
import numpy as np

ROOT = sweep.ROOT
RECIPE = "configs/ahbf_mnist_demo.yaml"
DEFAULT_OUT = "docs/results/ahbf"
DEFAULT_DOC = "docs/ahbf_results.md"
DEFAULT_RUNS = "runs/bench_ahbf_compare"
BACKBONE = {"backbone": "resnet8", "width": 8, "branches": 3}

# group -> (label, loss overrides, model args). Order of the dict = order of the tables.
GROUPS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "vanilla": ("vanilla (target alone)", {"variant": "vanilla"},
                {"backbone": "resnet8", "width": 8, "branches": 1, "fusion": "none"}),
    "one": ("ONE (aux 0)", {"variant": "one"}, {**BACKBONE, "aux": 0, "fusion": "one"}),
    "cl": ("CL (aux 0)", {"variant": "cl"}, {**BACKBONE, "aux": 0, "fusion": "none"}),
    "dml": ("DML (aux 0)", {"variant": "dml"}, {**BACKBONE, "aux": 0, "fusion": "none"}),
    "ahbf": ("AHBF-OKD (λ1=4, λ2=2)", {"variant": "ahbf", "lambda1": 4.0, "lambda2": 2.0},
             {**BACKBONE, "aux": 1, "fusion": "ahbf"}),
    "abl_none": ("AHBF, no TA losses (λ1=λ2=0)", {"variant": "ahbf", "lambda1": 0.0, "lambda2": 0.0},
                 {**BACKBONE, "aux": 1, "fusion": "ahbf"}),
    "abl_takl": ("AHBF, only TAKL (λ1=4, λ2=0)", {"variant": "ahbf", "lambda1": 4.0, "lambda2": 0.0},
                 {**BACKBONE, "aux": 1, "fusion": "ahbf"}),
    "abl_btkl": ("AHBF, only BTKL (λ1=0, λ2=2)", {"variant": "ahbf", "lambda1": 0.0, "lambda2": 2.0},
                 {**BACKBONE, "aux": 1, "fusion": "ahbf"}),
    "nodetach": ("AHBF, teacher not detached", {"variant": "ahbf", "lambda1": 4.0, "lambda2": 2.0,
                                                "detach_teacher": False},
                 {**BACKBONE, "aux": 1, "fusion": "ahbf"}),
}
MAIN = ("vanilla", "one", "cl", "ahbf")
ABLATION = ("abl_none", "abl_takl", "abl_btkl", "nodetach")
LATE = ("dml",)
FIG3D = (("abl_none", 0, 0), ("abl_takl", 4, 0), ("abl_btkl", 0, 2), ("ahbf", 4, 2))


# -- one run ---------------------------------------------------------------------------------------
def run_spec(group: str, seed: int, *, per_class: int, steps: int, batch_size: int, lr: float,
             tau: float) -> dict[str, Any]:
    """The settings of one training run (what its result JSON must match to be reused).

    Args:
        group: a key of :data:`GROUPS`.
        seed: labelled subset, validation split and initial weights.
        per_class: labelled training images per class.
        steps: optimisation steps (rounded to whole epochs).
        batch_size: training batch size.
        lr: initial learning rate (÷10 at 60 % and 80 % of the run).
        tau: temperature of every distillation term.
    """
    if group not in GROUPS:
        raise ValueError(f"group must be one of {', '.join(GROUPS)}, got {group!r}")
    _, loss, model = GROUPS[group]
    return {"name": f"{group}-pc{per_class}-s{seed}", "group": group, "seed": seed, "per_class": per_class,
            "steps": steps, "batch_size": batch_size, "lr": lr, "tau": tau, "loss": loss, "model": model,
            "recipe": RECIPE}


def overrides_for(spec: dict[str, Any], epochs: int) -> list[str]:
    """``--set`` overrides on the demo recipe that give this run with ``epochs`` epochs."""
    milestones = sorted({max(1, round(0.6 * epochs)), max(1, round(0.8 * epochs))})
    loss = {"variant": "ahbf", "lambda1": 4.0, "lambda2": 2.0, "detach_teacher": True, **spec["loss"]}
    out = [f"seed={spec['seed']}", f"data.per_class={spec['per_class']}", "data.unlabelled=false",
           f"data.batch_size={spec['batch_size']}", f"model.args={json.dumps(spec['model'])}",
           f"optim.lr={spec['lr']}", "optim.schedule=step", f"optim.milestones={json.dumps(milestones)}",
           f"loss.tau={spec['tau']}", "loss.rampup_epochs=null",
           "train.threads=1", "train.device=cpu", f"train.epochs={epochs}", f"train.eval_every={epochs}",
           f"train.checkpoint_every={epochs}"]
    out += [f"loss.{k}={json.dumps(v)}" for k, v in loss.items()]
    return out


def steps_per_epoch_of(spec: dict[str, Any]) -> tuple[int, int]:
    """(training images, steps per epoch) of ``spec`` (the loader drops the last partial batch)."""
    from kdedge.config import load_config
    from kdedge.train.data import load_data

    cfg = load_config(ROOT / RECIPE, overrides_for(spec, 1))
    n_train = len(load_data(cfg.data, cfg.seed).train_set(cfg.data))
    return n_train, n_train // spec["batch_size"]


def train_one(spec: dict[str, Any], run_root: Path, result_path: Path) -> dict[str, Any]:
    """Train one run in this process and write its result JSON atomically; returns the record."""
    import torch

    from kdedge.config import load_config
    from kdedge.io import atomic_write_json
    from kdedge.train.engine import fit

    torch.set_num_threads(1)
    n_train, spe = steps_per_epoch_of(spec)
    epochs = max(1, round(spec["steps"] / spe))
    overrides = overrides_for(spec, epochs)
    cfg = load_config(ROOT / RECIPE, overrides)
    run_dir = run_root / spec["name"]
    if run_dir.exists():  # an interrupted attempt: runs are short, start it again
        shutil.rmtree(run_dir)
    load_start = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    result = fit(cfg, run_dir)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    epoch_s = [r["seconds"] for r in log]
    record = {
        "spec": spec, "key": sweep.spec_key(spec), "overrides": overrides, "n_train": n_train,
        "steps_per_epoch": spe, "epochs": epochs, "steps": epochs * spe,
        "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
        "step_seconds": round(statistics.median(epoch_s) / spe, 4),  # wall, median epoch, data loading included
        "loadavg": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "test": result["test"], "val": result["val"],
        "train_last_epoch": log[-1]["train"] if log else {},
        "finished": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_json(result_path, record)
    return record


def load_result(out_dir: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result of ``spec``, or None if missing or trained with other settings."""
    return sweep.load_record(out_dir / "per_run", spec)


# -- statistics and tables ---------------------------------------------------------------------------
def stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, std (ddof=1; 0 for one run), min, max, n."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def cell(values: Sequence[float], minmax: bool = True) -> str:
    if not values:
        return "–"
    st = stats(values)
    s = f"{100 * st['mean']:.1f} ± {100 * st['std']:.1f}"
    return s + (f" [{100 * st['min']:.1f}, {100 * st['max']:.1f}]" if minmax else "")


def acc(rec: dict[str, Any], key: str = "accuracy", split: str = "test") -> float:
    return float(rec[split].get(key, float("nan")))


def last_ta_key(rec: dict[str, Any]) -> str | None:
    tas = sorted(k for k in rec["test"] if k.startswith("accuracy_ta"))
    return tas[-1] if tas else None


def deepest_key(rec: dict[str, Any]) -> str:
    return sorted(k for k in rec["test"] if k.startswith("accuracy_branch") and k[-1].isdigit())[-1]


def teacher_key(rec: dict[str, Any]) -> str | None:
    """The strongest teacher a method builds: AHBF's last TA, ONE's ensemble, CL/DML's branch mean."""
    if "accuracy_ensemble" in rec["test"]:
        return "accuracy_ensemble"
    return last_ta_key(rec) or ("accuracy_branch_mean" if "accuracy_branch_mean" in rec["test"] else None)


def paired(groups: dict[str, list[dict[str, Any]]], base: str, other: str) -> np.ndarray | None:
    """Per-seed target accuracy of ``other`` minus ``base`` on the seeds both have; None if none."""
    return sweep.paired(groups, base, other, acc)


def gain_cell(d: np.ndarray) -> str:
    v = 100 * d
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():+.1f} ± {std:.1f} (ahead {int((v > 0).sum())}, level {int((v == 0).sum())}, behind " \
           f"{int((v < 0).sum())} of {len(v)})"


def word(d: np.ndarray) -> str:
    """How a paired difference reads: a consistent gain, a gain within the seed spread, no gain."""
    v = 100 * d
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    if v.mean() > 0 and (v > 0).all() and v.mean() > std:
        return "ahead in every seed, by more than the spread"
    if v.mean() > 0:
        return "ahead on average, within the seed-to-seed spread (not a clear win)"
    if v.mean() < 0 and (v < 0).all() and -v.mean() > std:
        return "behind in every seed"
    return "behind on average, within the spread" if v.mean() < 0 else "level"


def main_table(groups: dict[str, list[dict[str, Any]]], names: Sequence[str]) -> str:
    rows = ["| method | runs | **target (deployed) test acc.** | strongest teacher acc. | deepest branch acc. | "
            "val acc. (target) | training model MMACs / k params | wall s / step |",
            "|---|---|---|---|---|---|---|---|"]
    for g in names:
        runs = groups.get(g, [])
        if not runs:
            continue
        tk = teacher_key(runs[0])
        tname = {"accuracy_ensemble": "ensemble", "accuracy_branch_mean": "branch mean"}.get(tk or "", (tk or "")[9:])
        teacher = f"{cell([acc(r, tk) for r in runs], False)} ({tname})" if tk else "–"
        deep = cell([acc(r, deepest_key(r)) for r in runs], False) if len(runs[0]["spec"]["model"]) and \
            runs[0]["spec"]["model"].get("branches", 1) > 1 else "–"
        rows.append(f"| {GROUPS[g][0]} | {len(runs)} | **{cell([acc(r) for r in runs])}** | {teacher} | {deep} | "
                    f"{cell([acc(r, split='val') for r in runs], False)} | "
                    f"{runs[0]['test']['train_macs'] / 1e6:.2f} / {runs[0]['test']['train_params'] / 1e3:.1f} | "
                    f"{statistics.median(r['step_seconds'] for r in runs):.3f} |")
    return "\n".join(rows) + "\n"


def gain_table(groups: dict[str, list[dict[str, Any]]], pairs: Sequence[tuple[str, str]]) -> str:
    rows = ["| difference of target test accuracy (points) | paired seeds: mean ± std (ahead / level / behind) |",
            "|---|---|"]
    for base, other in pairs:
        d = paired(groups, base, other)
        if d is not None:
            rows.append(f"| {GROUPS[other][0]} − {GROUPS[base][0]} | {gain_cell(d)} |")
    return "\n".join(rows) + "\n" if len(rows) > 2 else "_no paired seeds yet_\n"


def ablation_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    rows = ["| λ1 (TAKL) | λ2 (BTKL) | runs | **target test acc.** | TA 3 acc. | branch 3 acc. | "
            "target − (λ1=λ2=0), paired |",
            "|---|---|---|---|---|---|---|"]
    for g, l1, l2 in FIG3D:
        runs = groups.get(g, [])
        if not runs:
            continue
        d = paired(groups, "abl_none", g) if g != "abl_none" else None
        rows.append(f"| {l1} | {l2} | {len(runs)} | **{cell([acc(r) for r in runs])}** | "
                    f"{cell([acc(r, 'accuracy_ta3') for r in runs], False)} | "
                    f"{cell([acc(r, 'accuracy_branch3') for r in runs], False)} | "
                    f"{gain_cell(d) if d is not None and len(d) else '–'} |")
    return "\n".join(rows) + "\n"


def detach_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    rows = ["| teacher side | runs | **target test acc.** | TA 2 | TA 3 | branch 2 | branch 3 | "
            "fusion weight on branch m, s^m_1 (m = 2, 3; last epoch) |", "|---|---|---|---|---|---|---|---|"]
    for g, name in (("ahbf", "detached (default)"), ("nodetach", "not detached (authors' code)")):
        runs = groups.get(g, [])
        if not runs:
            continue
        s2 = [r["train_last_epoch"].get("s_branch2", float("nan")) for r in runs]
        s3 = [r["train_last_epoch"].get("s_branch3", float("nan")) for r in runs]
        rows.append(f"| {name} | {len(runs)} | **{cell([acc(r) for r in runs])}** | "
                    + " | ".join(cell([acc(r, k) for r in runs], False) for k in
                                 ("accuracy_ta2", "accuracy_ta3", "accuracy_branch2", "accuracy_branch3"))
                    + f" | {np.mean(s2):.2f}, {np.mean(s3):.2f} |")
    d = paired(groups, "ahbf", "nodetach")
    if d is not None:
        rows.append(f"\nNot detached − detached, target, paired seeds: {gain_cell(d)}.")
    return "\n".join(rows) + "\n"


def per_seed_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    seeds = sorted({r["spec"]["seed"] for runs in groups.values() for r in runs})
    rows = ["| group | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for g, runs in groups.items():
        if not runs:
            continue
        by = {r["spec"]["seed"]: r for r in runs}
        rows.append(f"| {GROUPS[g][0]} | " + " | ".join(f"{100 * acc(by[s]):.1f}" if s in by else "–" for s in seeds)
                    + " |")
    return "\n".join(rows) + "\n"


def verdict(groups: dict[str, list[dict[str, Any]]]) -> str:
    out = []
    for base in ("vanilla", "one", "cl", "dml"):
        d = paired(groups, base, "ahbf")
        if d is None:
            continue
        out.append(f"- AHBF-OKD − {GROUPS[base][0]}: {100 * d.mean():+.1f} points over {len(d)} paired seeds, "
                   f"{word(d)}.")
    if not out:
        return "_no paired runs yet_\n"
    best = max((g for g in ("vanilla", "one", "cl", "dml") if groups.get(g)),
               key=lambda g: np.mean([acc(r) for r in groups[g]]))
    d = paired(groups, best, "ahbf")
    clear = d is not None and word(d).startswith("ahead in every seed")
    out.append(f"- **Does AHBF-OKD beat the baselines here? {'Yes' if clear else 'No, not clearly'}**: the best "
               f"baseline by mean target accuracy is {GROUPS[best][0]}; AHBF-OKD is "
               f"{word(d) if d is not None else 'not paired with it'} against it.")
    return "\n".join(out) + "\n"


# -- plot and settings ---------------------------------------------------------------------------------
def plot(path: Path, groups: dict[str, list[dict[str, Any]]]) -> None:
    """Target test accuracy of every run per group (dots), mean ± std (bar), main groups first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [g for g in (*MAIN, *LATE, *ABLATION) if groups.get(g)]
    fig, ax = plt.subplots(figsize=(1.25 * len(names) + 2, 4.2))
    for i, g in enumerate(names):
        v = 100 * np.asarray([acc(r) for r in groups[g]])
        c = "tab:red" if g == "ahbf" else ("tab:blue" if g in MAIN or g in LATE else "tab:gray")
        ax.scatter(np.full(v.size, i) + np.linspace(-0.12, 0.12, v.size), v, color=c, s=18, zorder=3)
        ax.errorbar(i, v.mean(), yerr=v.std(ddof=1) if v.size > 1 else 0, fmt="_", color="k", ms=20, capsize=4,
                    zorder=4)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([GROUPS[g][0].replace(" (", "\n(").replace(", ", ",\n", 1) for g in names], fontsize=7)
    ax.set_ylabel("target network test accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("mnist5k, 100 labelled/class, ResNet-8 width 8 target: every run (dots), mean ± std", fontsize=9)
    fig.tight_layout()
    sweep.save_figure(fig, path)


def settings_text(args: argparse.Namespace, records: list[dict[str, Any]], n_expected: int,
                  seeds_of: dict[str, list[int]]) -> str:
    secs = [r["seconds"] for r in records]
    cpus = [r["cpu_seconds"] for r in records]
    shapes = sorted({(r["n_train"], r["steps_per_epoch"], r["epochs"], r["steps"]) for r in records})
    cmd = sweep.command_line()
    lines = [
        sweep.status_line(len(records), n_expected),
        f"- command: `{cmd}`" if not args.report_only
        else f"- tables regenerated with `{cmd}` from `{args.out_dir}/per_run/*.json`",
        sweep.machine_line("shared with other jobs: the timings are not benchmarks"),
        f"- recipe `{RECIPE}` with: mnist5k, {args.per_class} labelled images per class, no unlabelled pool, "
        f"batch {args.batch_size}, SGD Nesterov lr {args.lr} ÷10 at 60 % and 80 % of the epochs, momentum 0.9, "
        f"wd 5e-4, pad-crop augmentation, τ = {args.tau}, ramp-up E = the run's epochs, one torch thread, "
        "one run at a time",
        f"- {args.steps} optimisation steps requested per run, rounded to whole epochs; (training images, "
        "steps/epoch, epochs, steps): " + ", ".join(str(s) for s in shapes),
        "- seeds per group: " + "; ".join(f"{g} {seeds}" for g, seeds in seeds_of.items())
        + " (a seed fixes the labelled subset, the validation split and the initial weights; the test split is "
          "the same 1,000 images for every run)",
        f"- time per run: {min(secs):.0f}–{max(secs):.0f} s wall, {min(cpus):.0f}–{max(cpus):.0f} s CPU; "
        f"{sum(secs) / 60:.1f} minutes of training in all" if secs else "- no finished runs",
    ]
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds of the main comparison")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds of the ablations, the detach switch and DML")
    p.add_argument("--groups", nargs="+", default=[*MAIN, *ABLATION, *LATE], choices=list(GROUPS))
    p.add_argument("--per-class", type=int, default=100, help="labelled training images per class")
    p.add_argument("--steps", type=int, default=450, help="optimisation steps per run (rounded to whole epochs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--tau", type=float, default=3.0)
    p.add_argument("--budget-min", type=float, default=None,
                   help="start no run that would end after this many minutes (estimate: the slowest run so far)")
    sweep.add_output_args(p, out_dir=DEFAULT_OUT, runs_dir=DEFAULT_RUNS, doc=DEFAULT_DOC,
                          out_help="result JSONs (per_run/), summary, PNG")
    return p


def make_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Main comparison seed-major first, then ablations + detach seed-major, then DML."""
    abl_seeds = args.ablation_seeds
    kw = dict(per_class=args.per_class, steps=args.steps, batch_size=args.batch_size, lr=args.lr, tau=args.tau)
    specs = [run_spec(g, s, **kw) for s in args.seeds for g in MAIN if g in args.groups]
    specs += [run_spec(g, s, **kw) for s in abl_seeds for g in ABLATION if g in args.groups]
    specs += [run_spec(g, s, **kw) for s in abl_seeds for g in LATE if g in args.groups]
    return specs


def report(args: argparse.Namespace, specs: list[dict[str, Any]], final: bool) -> None:
    from kdedge.io import atomic_write_json

    records = [r for r in (load_result(args.out_dir, s) for s in specs) if r is not None]
    groups = {g: [r for r in records if r["spec"]["group"] == g] for g in GROUPS}
    abl_groups = {**groups, "ahbf": [r for r in groups["ahbf"] if r["spec"]["seed"] in args.ablation_seeds]}
    seeds_of = {g: sorted({s["seed"] for s in specs if s["group"] == g}) for g in GROUPS
                if any(s["group"] == g for s in specs)}
    body = "\n".join([
        "Test accuracy (%) on the same 1,000 test images; mean ± std (ddof 1) [min, max] over seeds. The "
        "*target* is branch 1, the network `student()` extracts and export deploys; it is the same ResNet-8 "
        "(width 8; 2.36 M MACs, 19.8 k parameters per image) in every row. Wall s / step: median epoch time "
        "/ steps, data loading included, on a shared machine (compare ratios only; the controlled cost "
        "measurements are in [ahbf.md](ahbf.md#cost-what-the-auxiliaries-cost-in-training-and-what-is-deployed)).\n",
        "### Main comparison\n", main_table(groups, [*MAIN, *LATE]),
        "\nPaired per-seed differences:\n",
        gain_table(groups, [(b, "ahbf") for b in ("vanilla", "one", "cl", "dml")]
                   + [("vanilla", g) for g in ("one", "cl", "dml")]),
        "\nComputed reading:\n", verdict(groups),
        "\n### Fig. 3(d) ablation: the assistant losses\n",
        f"Seeds {', '.join(map(str, args.ablation_seeds))} (the AHBF-OKD rows below use only these seeds, so "
        "every row of a table is paired).\n",
        "All with hierarchical branches and the AHBF fusion; λ1 = λ2 = 0 still trains the branches and the TAs "
        "with cross-entropy (Eq. 14 without L_FKL). The (4, 2) row is the main AHBF-OKD run.\n",
        ablation_table(abl_groups),
        "\n### Teacher side detached or not (`loss.detach_teacher`)\n", detach_table(abl_groups),
        "\n### Every run: target test accuracy (%) per seed\n", per_seed_table(groups),
    ])
    settings = settings_text(args, records, len(specs), seeds_of)
    print(settings + "\n" + body, flush=True)
    summary = {g: {"seeds": [r["spec"]["seed"] for r in runs], "target": stats([acc(r) for r in runs]),
                   "per_run": [{"seed": r["spec"]["seed"], **{k: v for k, v in r["test"].items()
                                                              if k.startswith("accuracy") or k == "loss"}}
                               for r in runs],
                   "step_seconds_median": statistics.median(r["step_seconds"] for r in runs),
                   "macs": runs[0]["test"]["macs"], "params": runs[0]["test"]["params"],
                   "train_macs": runs[0]["test"]["train_macs"], "train_params": runs[0]["test"]["train_params"]}
               for g, runs in groups.items() if runs}
    atomic_write_json(args.out_dir / "summary.json", {"complete": len(records) == len(specs), "runs": len(records),
                                                      "expected": len(specs), "groups": summary})
    png = args.out_dir / "compare.png"
    if final and records:
        plot(png, groups)
    figure = f"\n![target accuracy of every run per group]({os.path.relpath(png, args.doc.parent)})\n" \
        if png.is_file() else ""
    sweep.write_section(args.doc, "ahbf-compare", "## Settings\n\n" + settings + "\n" + body + figure,
                        "AHBF-OKD results on mnist5k (low-data)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.per_class < 1:
        raise SystemExit("error: --steps, --batch-size and --per-class must be positive")
    os.chdir(ROOT)
    specs = make_specs(args)
    if not args.report_only:
        todo = [s for s in specs if load_result(args.out_dir, s) is None]
        sweep.log(f"AHBF comparison: {len(specs)} runs, {len(specs) - len(todo)} already done, {len(todo)} to train "
                  f"({args.steps} steps each, one at a time)")
        (args.out_dir / "per_run").mkdir(parents=True, exist_ok=True)
        args.runs_dir.mkdir(parents=True, exist_ok=True)
        t_start, slowest = time.perf_counter(), 0.0
        for n, s in enumerate(todo, 1):
            elapsed = time.perf_counter() - t_start
            if args.budget_min is not None and elapsed + slowest > 60 * args.budget_min:
                sweep.log(f"budget of {args.budget_min} min reached: {len(todo) - n + 1} runs not started")
                break
            try:
                rec = train_one(s, args.runs_dir, sweep.record_path(args.out_dir / "per_run", s))
            except Exception as e:  # keep the sweep going; the run is retried on the next call
                sweep.log(f"[{n}/{len(todo)}] {s['name']} FAILED: {type(e).__name__}: {e}")
                traceback.print_exc()
                continue
            slowest = max(slowest, rec["seconds"])
            sweep.log(f"[{n}/{len(todo)}] {s['name']}: {rec['steps']} steps in {rec['seconds']:.0f} s "
                      f"({rec['cpu_seconds']:.0f} s CPU, load {rec['loadavg']}), target test "
                      f"{100 * rec['test']['accuracy']:.1f} %")
            report(args, specs, final=False)
    report(args, specs, final=True)
    sweep.log(f"wrote {args.doc} and {args.out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
