"""The harness the training sweeps in bench/ share: resumable per-run results, machine facts, docs sections.

A sweep is a list of *specs* (the settings of one training run, a JSON-able dict whose ``name``
names the run). Each finished run writes a *record* (its result JSON, holding ``key`` =
:func:`spec_key` of its spec) to ``<results>/<name>.json``; a rerun reuses a record only when
the key matches, so an interrupted or extended sweep trains just what is missing. The scripts
render their tables into a marked section of a ``docs/*.md`` file (:func:`write_section`), with a
settings list that names the machine (:func:`machine_line`) and the command (:func:`command_line`).

Imported by the bench scripts as ``import _sweep as sweep`` (``bench/`` is the script's folder,
hence on ``sys.path``); torch and matplotlib are imported only where used.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

Spec = dict[str, Any]  # the settings of one run; ``name`` names its result JSON
Record = dict[str, Any]  # the result JSON of one run; ``key`` is the spec_key of its spec


def log(msg: str) -> None:
    """Print ``msg`` with the time of day, flushed (sweeps run under nohup with a log file)."""
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


# -- resumable results ----------------------------------------------------------------------------
def spec_key(spec: Spec) -> str:
    """A short hash of every setting of ``spec``: a record is reused only under the same key."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def record_path(results: Path, spec: Spec) -> Path:
    """Where the result JSON of ``spec`` lives under the folder ``results``."""
    return results / f"{spec['name']}.json"


def load_record(results: Path, spec: Spec) -> Record | None:
    """The saved record of ``spec`` under ``results``.

    Returns:
        The record, or None when it is missing or was trained with other settings.
    """
    p = record_path(results, spec)
    if not p.is_file():
        return None
    rec = json.loads(p.read_text())
    return rec if rec.get("key") == spec_key(spec) else None


def run_parallel(specs: Sequence[Spec], train: Callable[[Spec, str, str], Record], *, results: Path,
                 run_root: Path, jobs: int, describe: Callable[[Record], str],
                 done: Callable[[Spec], bool] | None = None) -> None:
    """Train every spec that is not done yet, ``jobs`` fresh processes at a time, in order.

    A fresh spawned process per run keeps runs from sharing torch state or thread pools. A run
    that fails is logged and skipped; it is retried on the next call.

    Args:
        specs: the sweep.
        train: ``train(spec, run_root, result_path)`` trains one run, writes its record to
            ``result_path`` and returns it; a module-level function (it is pickled by name).
        results: folder of the records.
        run_root: folder of the scratch run directories.
        jobs: runs at a time.
        describe: one line on a finished run, from its record, for the log.
        done: whether a spec has a usable record (default: :func:`load_record` finds one).
    """
    import multiprocessing as mp

    is_done = done or (lambda s: load_record(results, s) is not None)
    todo = [s for s in specs if not is_done(s)]
    log(f"{len(specs) - len(todo)} of {len(specs)} runs already done; {len(todo)} to train, {jobs} at a time")
    if not todo:
        return
    results.mkdir(parents=True, exist_ok=True)
    run_root.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as ex:
        futs = {ex.submit(train, s, str(run_root), str(record_path(results, s))): s for s in todo}
        for n, fut in enumerate(as_completed(futs), 1):
            s = futs[fut]
            try:
                log(f"[{n}/{len(todo)}] {s['name']}: {describe(fut.result())}")
            except Exception as e:  # keep the sweep going; the run is retried on the next call
                log(f"[{n}/{len(todo)}] {s['name']} FAILED: {type(e).__name__}: {e}")


# -- what a run trains on --------------------------------------------------------------------------
def batch_plan(cfg: Any) -> dict[str, Any]:
    """The training batches the engine draws for ``cfg``, from the loader it builds (indices only).

    The loader is made as in ``kdedge.train.engine.fit`` (same dataset, seed, batch size and
    ``data.labelled_per_batch``), so its length is the run's steps per epoch; the labelled images
    per batch are counted over the batches of epoch 0 without loading any image.

    Args:
        cfg: a loaded ``RunConfig``.

    Returns:
        ``n_train``, ``n_labelled`` and ``n_unlabelled`` (training images), ``steps_per_epoch``,
        and ``labelled_per_batch``: mean, min and max labelled images in a batch of epoch 0.
    """
    from kdedge.train.data import load_data, make_loader, set_loader_epoch

    ds = load_data(cfg.data, cfg.seed).train_set(cfg.data)
    loader = make_loader(ds, cfg.data.batch_size, train=True, seed=cfg.seed,
                         labelled_per_batch=cfg.data.labelled_per_batch)
    set_loader_epoch(loader, 0)
    labelled = np.asarray(ds.targets) >= 0  # IGNORE_INDEX (-100) marks the unlabelled pool
    counts = [int(labelled[np.asarray(b)].sum()) for b in loader.batch_sampler]
    return {"n_train": len(ds), "n_labelled": int(labelled.sum()), "n_unlabelled": int((~labelled).sum()),
            "steps_per_epoch": len(loader),
            "labelled_per_batch": {"mean": round(float(np.mean(counts)), 2), "min": min(counts), "max": max(counts)}}


class StepCounter:
    """A training reporter (``kdedge.train.engine.Reporter``) that counts the optimisation steps a run takes."""

    def __init__(self) -> None:
        self.steps = 0

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(self, losses: dict[str, float]) -> None:
        self.steps += 1

    def epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def check_steps(counted: int, epochs: int, steps_per_epoch: int) -> int:
    """``counted`` when it is ``epochs * steps_per_epoch``, the schedule the sweep sized the run for.

    Raises:
        RuntimeError: the run took another number of steps (its equal-steps accounting is wrong).
    """
    if counted != epochs * steps_per_epoch:
        raise RuntimeError(f"the run took {counted} optimisation steps, not the {epochs} x {steps_per_epoch} "
                           "it was sized for")
    return counted


# -- statistics over seeds --------------------------------------------------------------------------
def stats(values: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Per position: mean, std (ddof=1; 0 for one run), min, max over runs (rows), and n runs."""
    a = np.asarray(values, dtype=np.float64)
    std = a.std(axis=0, ddof=1) if a.shape[0] > 1 else np.zeros(a.shape[1])
    return {"mean": a.mean(0).tolist(), "std": std.tolist(), "min": a.min(0).tolist(), "max": a.max(0).tolist(),
            "n": int(a.shape[0])}


def cell(st: dict[str, Any], k: int, minmax: bool = True) -> str:
    """Position ``k`` of :func:`stats` in %: ``mean ± std [min, max]``."""
    s = f"{100 * st['mean'][k]:.1f} ± {100 * st['std'][k]:.1f}"
    return s + (f" [{100 * st['min'][k]:.1f}, {100 * st['max'][k]:.1f}]" if minmax else "")


def paired(groups: dict[str, list[Record]], base: str, other: str,
           value: Callable[[Record], Any]) -> np.ndarray | None:
    """``value`` of ``other`` minus that of ``base``, seed by seed, on the seeds both groups have.

    Args:
        groups: records per group name.
        base: the group subtracted.
        other: the group compared with it.
        value: what is compared, from a record (a number or a list of numbers).

    Returns:
        ``[seeds]`` or ``[seeds, positions]`` differences, or None when no seed is in both.
    """
    a = {r["spec"]["seed"]: value(r) for r in groups.get(base, [])}
    b = {r["spec"]["seed"]: value(r) for r in groups.get(other, [])}
    seeds = sorted(set(a) & set(b))
    return np.asarray([np.subtract(b[s], a[s]) for s in seeds]) if seeds else None


def gain_cell(diffs: np.ndarray, k: int) -> str:
    """Column ``k`` of paired differences in points: ``mean ± std (seeds ahead/seeds)``."""
    d = 100 * diffs[:, k]
    std = d.std(ddof=1) if len(d) > 1 else 0.0
    return f"{d.mean():+.1f} ± {std:.1f} ({int((d > 0).sum())}/{len(d)})"


def percents(values: Sequence[float]) -> str:
    """``[81.2, 90.3]`` from fractions, for log lines."""
    return "[" + ", ".join(f"{100 * x:.1f}" for x in values) + "]"


# -- machine and command ----------------------------------------------------------------------------
def machine() -> dict[str, str]:
    """CPU model, core count, Python and torch versions, load average now (all as text)."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        # nproc honours these, and the sweeps set OMP_NUM_THREADS=1 for their runs: ask without them.
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True, env=env).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        nproc = str(os.cpu_count())
    return {"nproc": nproc, "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def commit() -> str:
    """The short hash of the checked-out commit, or ``unknown``."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_line(note: str) -> str:
    """The ``- machine: …`` item of a settings list; ``note`` says how far the timings can be trusted."""
    m = machine()
    return (f"- machine: `nproc` = {m['nproc']}, CPU {m['cpu']}, Python {m['python']}, torch {m['torch']}, "
            f"load average when written {m['loadavg']} ({note}); commit {commit()}")


def status_line(done: int, expected: int) -> str:
    """The ``- status: …`` item: complete, or how many runs are missing, in bold."""
    return f"- status: {'complete' if done == expected else f'**PARTIAL: {done} of {expected} runs finished**'}"


def command_line(drop: Sequence[str] = ()) -> str:
    """The command that ran this script, from the repository root, without the arguments in ``drop``.

    The interpreter is named relative to the repository (``.venv/bin/python``), or ``python``
    when it lives elsewhere; the script by its path in the repository.
    """
    import shlex

    argv = [a for a in sys.argv[1:] if a not in drop]
    # __main__.__file__ is absolute (the scripts chdir to ROOT, so a relative argv[0] may not resolve)
    script = os.path.relpath(Path(getattr(sys.modules["__main__"], "__file__", sys.argv[0])).resolve(), ROOT)
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT) + os.sep) else "python"
    return " ".join(shlex.quote(a) for a in [python, script, *argv])


# -- command-line interface ---------------------------------------------------------------------------
def add_output_args(p: Any, *, out_dir: str, runs_dir: str, doc: str, out_help: str) -> None:
    """The options every sweep shares: where records, scratch runs and the docs go, and ``--report-only``.

    Args:
        p: the script's ``argparse.ArgumentParser``.
        out_dir: default folder of the records (in a subfolder), summary JSON and PNGs.
        runs_dir: default folder of the scratch run directories.
        doc: default Markdown file whose marked section the tables replace.
        out_help: ``--help`` text of ``--out-dir``.
    """
    p.add_argument("--out-dir", type=Path, default=Path(out_dir), help=out_help)
    p.add_argument("--runs-dir", type=Path, default=Path(runs_dir), help="scratch run directories")
    p.add_argument("--doc", type=Path, default=Path(doc))
    p.add_argument("--report-only", action="store_true", help="no training: tables from the result JSONs so far")


# -- outputs ---------------------------------------------------------------------------------------
def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure to ``path`` as PNG (110 dpi) atomically, then close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_section(doc: Path, name: str, body: str, title: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` of ``doc``, atomically.

    The rest of the file is kept. Where the markers are missing the section is appended; where
    the file is missing it is created with ``# title``.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.is_file() else f"# {title}\n\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, doc)
