"""curves.png beside metrics.jsonl: loss, accuracy and thought vs token-embedding norm, by epoch.

Drawn from the files the run writes (metrics.jsonl per evaluation, train_log.jsonl per optimizer
step), so a resumed run draws its whole history. matplotlib is optional: without it, one note and
no picture. The figure is drawn on matplotlib's Agg canvas directly: no pyplot state, no GUI backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from storage import atomic
from training.metric_logger import read_jsonl

CURVES_FILE = "curves.png"


def stage_boundaries(metrics: Sequence[dict[str, Any]], steps: Sequence[dict[str, Any]]) -> list[tuple[float, int]]:
    """(epochs done, stage starting there) at the start of each stage seen: epoch E (1-based) of
    metrics.jsonl spans [E-1, E]; a train_log line at fractional epoch x lies in epoch ceil(x)."""
    stage_of: dict[int, int] = {}
    for line in steps:
        stage_of[max(1, math.ceil(line["epoch"]))] = line["stage"]
    for record in metrics:
        stage_of[record["epoch"]] = record["stage"]
    boundaries, previous = [], None
    for epoch in sorted(stage_of):
        if stage_of[epoch] != previous:
            boundaries.append((float(epoch - 1), stage_of[epoch]))
            previous = stage_of[epoch]
    return boundaries


def draw(figure: Any, metrics: Sequence[dict[str, Any]], steps: Sequence[dict[str, Any]]) -> None:
    """Three panels on `figure`: train loss per step with per-epoch train and val loss; accuracy per
    epoch; thought and token-embedding norms per step. Stage starts are dotted lines on each."""
    loss, accuracy, norms = figure.subplots(1, 3)
    if steps:
        loss.plot(
            [s["epoch"] for s in steps],
            [s["loss"] for s in steps],
            lw=0.8,
            alpha=0.5,
            color="tab:blue",
            label="train (step)",
        )
    # an epoch's train loss is its mean: drawn mid-epoch; validation runs at the epoch's end
    for key, shift, color, label in (
        ("train_loss", 0.5, "tab:blue", "train (epoch mean)"),
        ("val_loss", 0.0, "tab:orange", "validation"),
    ):
        points = [(m["epoch"] - shift, m[key]) for m in metrics if m.get(key) is not None]
        if points:
            loss.plot(*zip(*points), "o-", color=color, ms=4, label=label)
    loss.set(title="loss", xlabel="epoch")
    if metrics:
        accuracy.plot(
            [m["epoch"] for m in metrics],
            [m["accuracy"] for m in metrics],
            "o-",
            color="tab:green",
            ms=4,
            label="accuracy",
        )
    accuracy.set(title="validation accuracy", xlabel="epoch", ylim=(-0.02, 1.02))
    for key, color in (("token_embedding_norm", "tab:gray"), ("thought_norm", "tab:red")):
        points = [(s["epoch"], s[key]) for s in steps if s.get(key) is not None]
        if points:
            norms.plot(*zip(*points), lw=0.8, color=color, label=key.replace("_", " "))
    norms.set(title="mean L2 norm of input embeddings", xlabel="epoch")
    boundaries = stage_boundaries(metrics, steps)
    for axes in (loss, accuracy, norms):
        for i, (at, stage) in enumerate(boundaries):
            if i:  # the first stage starts where the curves do
                axes.axvline(at, color="black", ls=":", lw=0.8)
            axes.annotate(
                f"stage {stage}",
                (at, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -10),
                textcoords="offset points",
                fontsize=7,
            )
        if axes.get_legend_handles_labels()[0]:  # some curve drawn (a stage line has no label)
            axes.legend(fontsize=7)
        if boundaries:  # every panel from the first epoch's start, where the first stage's label sits
            axes.set_xlim(left=boundaries[0][0] - 0.1)
        axes.grid(alpha=0.3)
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.12, top=0.92, wspace=0.15)


class Curves:
    """Redraws save_dir/curves.png after each evaluation; without matplotlib it says so once."""

    def __init__(self, save_dir: Path, metrics_file: str, train_log_file: str, note: Callable[[str], None]) -> None:
        self.save_dir, self.metrics_file, self.train_log_file, self.note = save_dir, metrics_file, train_log_file, note
        self.available = True

    def update(self) -> Path | None:
        """Write the picture atomically (a reader sees the previous one or the new one); its path, or None."""
        if not self.available:
            return None
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            self.available = False
            self.note(f"note: matplotlib is not installed: no {CURVES_FILE} (pip install matplotlib)")
            return None
        figure = Figure(figsize=(15, 4.2), dpi=100)
        draw(figure, read_jsonl(self.save_dir / self.metrics_file), read_jsonl(self.save_dir / self.train_log_file))
        path = self.save_dir / CURVES_FILE
        with atomic.atomic_file(path) as tmp:
            FigureCanvasAgg(figure).print_png(str(tmp))
        return path
