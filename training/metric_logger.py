"""Where a run's metrics go: one interface in front of a JSON-lines file, wandb, TensorBoard and the console.

The trainer calls log / log_table / close (torchtune's metric-logger shape) whatever is behind
them. Metric names are "namespace/key" ("train/loss", "eval/accuracy"): the JSON-lines file keeps
one namespace, the console shows "train" on the progress bar and prints the others as lines.
Rank 0 holds the loggers; the other ranks, and debug runs apart from the console, hold none.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from storage import checkpoints as ckpt

WANDB_ID_FILE = "wandb_run_id"  # in save_path/name: a resumed run logs to the same wandb run
TENSORBOARD_DIR = "tensorboard"  # in save_path/name: the TensorBoard event files


class MetricLogger(Protocol):
    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Scalars named "namespace/key" at an optimizer step."""

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Rows of equal keys (the columns), e.g. sample generations of an evaluation."""

    def close(self) -> None: ...


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, none if it is missing; a line a kill cut short is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def json_line(record: Mapping[str, Any]) -> str:
    """One JSON line; a non-finite number is written as null (JSON has no NaN or Infinity)."""
    return (
        json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in record.items()}) + "\n"
    )


class JsonlLogger:
    """One line per log call of one namespace, {"step": S, key: value ...} with the namespace cut off.

    Lines after `resume_step` are dropped when it opens: a resumed run re-runs those steps and logs
    them again, so each step keeps one line (what the resumed checkpoint's trainer_state.json `step` holds).
    """

    def __init__(self, path: Path, namespace: str, resume_step: int) -> None:
        self.path, self.prefix = path, namespace + "/"
        kept = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= resume_step]
        ckpt.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(path, "a")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        line = {k.removeprefix(self.prefix): v for k, v in metrics.items() if k.startswith(self.prefix)}
        if not line:
            return
        # Appended, not rewritten through atomic.py (a whole-file rename per step would copy the log each
        # time): a kill cuts at most this line short, read_jsonl skips it, and a resumed run rewrites the
        # file whole when it opens it. Flushed per line: a reader (the plots) sees every step.
        try:
            self.file.write(json_line({"step": step, **line}))
            self.file.flush()
        except OSError as e:
            raise ckpt.CheckpointError(f"could not write {self.path}: {e.strerror or e}") from None

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        pass  # sample generations are in save_path/name/predictions/ already

    def close(self) -> None:
        self.file.close()


# progress-bar postfix: metric -> (label, format)
POSTFIX = {
    "train/loss": ("loss", ".4f"),
    "train/lr": ("lr", ".2e"),
    "train/grad_norm": ("grad_norm", ".3g"),
    "train/tokens_per_s": ("tok/s", ".0f"),
}


class ConsoleLogger:
    """Training metrics on the run's progress bar; every other namespace as one "[eval] key=value ..."
    line; a table's first rows, one line each."""

    def __init__(self, rows: int = 3) -> None:
        self.bar: tqdm | None = None  # the run's progress bar, once training has opened it
        self.rows = rows

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        shown = {label: format(metrics[key], spec) for key, (label, spec) in POSTFIX.items() if key in metrics}
        if shown and self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)  # drawn with the bar's next update
        lines: dict[str, list[str]] = {}
        for key, value in metrics.items():
            namespace, _, name = key.rpartition("/")
            if namespace != "train":
                lines.setdefault(namespace, []).append(
                    f"{name}={value:.4f}" if isinstance(value, float) else f"{name}={value}"
                )
        for namespace, parts in lines.items():
            tqdm.write(f"[{namespace}] " + " ".join(parts))

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        for row in rows[: self.rows]:
            tqdm.write("  " + "  ".join(f"{k}: {v!r}" for k, v in row.items()))

    def close(self) -> None:
        pass


class WandbLogger:
    """A wandb run under save_dir (save_dir/wandb/), resumed by the id kept in save_dir/wandb_run_id.

    wandb is imported here only: it is an optional dependency, slow to import.
    """

    def __init__(self, save_dir: Path, mode: str, project: str, name: str, config: Mapping[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        save_dir.mkdir(parents=True, exist_ok=True)
        id_file = save_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not run_id:
            run_id = secrets.token_hex(8)  # wandb's own id helper moved between its versions
            ckpt.write_atomic(id_file, run_id + "\n")
        self.run = wandb.init(
            project=project, name=name, config=dict(config), mode=mode, dir=str(save_dir), id=run_id, resume="allow"
        )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        # A resumed run re-runs the steps after its checkpoint; wandb already holds them (same values
        # when resumed exactly) and would refuse each with a warning: skip them here.
        if step < self.run.step:
            return
        self.run.log(dict(metrics), step=step)

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        columns = list(rows[0]) if rows else []
        self.log({name: self.wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])}, step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardLogger:
    """Event files in save_dir/tensorboard/ (`tensorboard --logdir SAVE_DIR/tensorboard`): every numeric
    metric as a scalar under its "namespace/key" name, tables as Markdown text.

    A resumed run re-runs the steps after its checkpoint: purge_step makes TensorBoard drop the events
    the interrupted launch wrote past it. The tensorboard package is imported here only (optional).
    """

    def __init__(self, save_dir: Path, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step else None
        self.writer = SummaryWriter(log_dir=str(save_dir / TENSORBOARD_DIR), purge_step=purge)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, step)

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        if rows:
            columns = list(rows[0])
            lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            lines += ["| " + " | ".join(str(row[c]).replace("|", "\\|") for c in columns) + " |" for row in rows]
            self.writer.add_text(name, "\n".join(lines), step)
        self.writer.flush()  # an evaluation's scalars and table reach the file as it ends

    def close(self) -> None:
        self.writer.close()


def file_sinks(sinks: Sequence[str], save_dir: Path, resume_step: int) -> list[MetricLogger]:
    """The loggers of config.metrics_sinks that write under save_dir (wandb has its own switch, wandb_mode)."""
    return [TensorBoardLogger(save_dir, resume_step)] if "tensorboard" in sinks else []


class MultiLogger:
    """Every call to each of its loggers, in order."""

    def __init__(self, loggers: Iterable[MetricLogger]) -> None:
        self.loggers = list(loggers)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        for logger in self.loggers:
            logger.log_table(name, rows, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
