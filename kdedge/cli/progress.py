"""A rich progress bar (with ETA) for training epochs and evaluation."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdedge.cli.common import err


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err, transient=False,
    )


class RichReporter:
    """Training progress: one bar over all steps of all epochs, with per-epoch summaries."""

    def __init__(self) -> None:
        self.progress = make_progress()
        self.task_id: Any = None
        self.epochs = 0

    def __enter__(self) -> "RichReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        if self.task_id is None:
            self.epochs = epochs
            self.task_id = self.progress.add_task("train", total=(epochs - epoch) * steps, info="")
        self.progress.update(self.task_id, description=f"epoch {epoch + 1}/{epochs}")

    def step(self, losses: dict[str, float]) -> None:
        self.progress.update(self.task_id, advance=1, info=f"loss {losses.get('loss', float('nan')):.4f}")

    def epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        val = record.get("val", {})
        acc = f" val acc {100 * val['accuracy']:.2f}%" if "accuracy" in val else ""
        extra = "".join(f" {k} {v:.3g}" for k, v in record.items() if k in ("temperature", "T"))
        self.progress.console.print(
            f"epoch {epoch + 1}/{self.epochs}: loss {record['train'].get('loss', float('nan')):.4f}{acc}{extra} "
            f"({record['seconds']:.1f}s)", highlight=False)

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)
