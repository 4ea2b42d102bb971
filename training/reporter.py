"""What a run tells: the console and its progress bar, train_log.jsonl, metrics.jsonl, wandb, the curves,
and the start and end summaries."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import huggingface_hub.utils
import torch
import transformers
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from coconut import Outputs
from dataset import Batch
from storage import checkpoints as ckpt
from training.distributed import DistInfo, all_reduce_sum, barrier
from training.evaluation import PREDICTIONS_DIR
from training.metric_logger import (
    ConsoleLogger,
    JsonlLogger,
    MetricLogger,
    MultiLogger,
    WandbLogger,
    file_sinks,
    json_line,
    read_jsonl,
)
from training.plots import CURVES_FILE, Curves
from training.summary import end_lines, media_line, parameter_counts, start_lines
from utils import Config

METRICS_FILE = "metrics.jsonl"
TRAIN_LOG_FILE = "train_log.jsonl"  # one line per logged optimizer step


class Reporter:
    """A run's output. Rank 0 prints and writes; every rank keeps the metrics (the run's result)."""

    def __init__(
        self, config: Config, info: DistInfo, save_dir: Path, writes: bool, overrides: Sequence[str] = ()
    ) -> None:
        self.config, self.info, self.save_dir, self.writes = config, info, save_dir, writes
        self.overrides = tuple(overrides)  # the command line's, that applied: said in the start summary
        self.metrics: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.logger: MetricLogger = MultiLogger([])
        self.console: ConsoleLogger | None = None
        self.bar: tqdm | None = None  # the whole run's progress in optimizer steps (its ETA: the whole run's)
        self.throughput = Throughput()
        self.curves = Curves(save_dir, METRICS_FILE, TRAIN_LOG_FILE, self.print)

    def print(self, text: str) -> None:
        if self.info.is_main:
            tqdm.write(text)

    def restore_metrics(self, epoch: int) -> bool:
        """Keep metrics.jsonl's lines up to the resumed epoch: later epochs are re-run and re-reported.
        Returns whether that epoch has no line yet.

        A kill can cut the last line short, and lands between a checkpoint's save and its epoch's
        evaluation (the original's order) often enough that the resumed run evaluates that epoch
        first, so no epoch goes without its line.
        """
        path = self.save_dir / METRICS_FILE
        self.metrics = [r for r in read_metrics(path) if r["epoch"] <= epoch]
        barrier()  # every rank has read the file before rank 0 replaces it
        if self.writes and self.info.is_main:  # a debug run resumes too, and writes nothing
            ckpt.write_atomic(path, "".join(json_line(r) for r in self.metrics))
        return epoch > 0 and all(r["epoch"] != epoch for r in self.metrics)

    def start(
        self,
        model: nn.Module,
        records: dict[str, tuple[int, int]],
        media: dict[str, list[dict[str, Any]]],
        steps_per_epoch: int,
        state: ckpt.TrainState,
    ) -> None:
        """The start summary (what will run, on what), then the loggers and the progress bar over the
        whole run, whose ETA is that of the whole run: tqdm without smoothing takes the mean rate since
        this launch began, evaluations and saves included.

        records: per split, (records in the file, samples kept); media: per split, its records (their images
        and videos are counted).
        """
        config, info = self.config, self.info
        device = str(info.device)
        if info.device.type == "cuda":
            device += f" ({torch.cuda.get_device_name(info.device)})"
        lines = start_lines(
            config,
            world_size=info.world_size,
            device=device,
            weights_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            parameters=parameter_counts(model),
            records=records,
            steps_per_epoch=steps_per_epoch,
            first_epoch=state.first_epoch,
            steps_done=state.step,
            save_dir=self.save_dir,
            writes=self.writes,
            overrides=self.overrides,
        )
        self.print("\n".join(lines))
        self.print(media_line(config, media))
        if info.is_main:  # the console, train_log.jsonl (unless debug or eval-only), wandb (unless debug or disabled)
            self.console = ConsoleLogger()
            loggers: list[MetricLogger] = [self.console]
            if self.writes:
                loggers.append(JsonlLogger(self.save_dir / TRAIN_LOG_FILE, "train", state.step))
                loggers += file_sinks(config.metrics_sinks, self.save_dir, state.step)
            wandb = _init_wandb(config, info, self.save_dir)
            if wandb is not None:
                loggers.append(wandb)
            self.logger = MultiLogger(loggers)
        total = 0 if config.only_eval else steps_per_epoch * (config.num_epochs - state.first_epoch)
        self.bar = tqdm(
            total=total,
            initial=state.step,
            unit="step",
            smoothing=0,
            dynamic_ncols=True,
            disable=not info.is_main or config.only_eval,
        )
        if self.console is not None:
            self.console.bar = self.bar

    def start_epoch(self, epoch: int, stage: int) -> None:
        self.throughput = Throughput()
        self.bar.set_description(f"epoch {epoch + 1}/{self.config.num_epochs} stage {stage}")

    def log_step(
        self, out: Outputs, ce: torch.Tensor, n_labels: float, grad_norm: torch.Tensor, lr: float, at: dict[str, Any]
    ) -> float:
        """The optimizer step's global token-mean loss, grad norm, throughput over every rank since the last
        log, and thought vs token-embedding norms (rank 0's last micro-batch). A collective: every rank logs.

        at: step, epoch (epochs done, fractional: 3.25 is a quarter into the fourth epoch) and stage.
        Under FSDP2 the grad norm is a DTensor: the norm of the full gradients, gathered on every rank alike.
        Returns the logged loss.
        """
        tokens, samples, elapsed = self.throughput.take()
        norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        values = [
            all_reduce_sum(torch.cat([ce.view(1), ce.new_tensor([tokens, samples])])),
            norm.double().view(1),
            out.token_norm.double().view(1),
        ]
        if out.thought_norm is not None:
            values.append(out.thought_norm.double().view(1))
        ce_sum, tokens, samples, grad_norm, token_norm, *thought_norm = torch.cat(values).tolist()  # one sync
        entry = {
            "train/epoch": at["epoch"],
            "train/stage": at["stage"],
            "train/loss": ce_sum / max(n_labels, 1.0),
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": tokens / elapsed,
            "train/samples_per_s": samples / elapsed,
            "train/token_embedding_norm": token_norm,
        }
        if thought_norm:
            entry["train/thought_norm"] = thought_norm[0]
        self.logger.log(entry, step=at["step"])
        return entry["train/loss"]

    def report(self, record: dict[str, Any], examples: list[dict[str, Any]], step: int) -> None:
        """An evaluation's metrics line, its sample generations (console: the first few; wandb: a table),
        metrics.jsonl and the curves."""
        self.metrics.append(record)
        if not self.info.is_main:
            return
        if self.writes:
            path = self.save_dir / METRICS_FILE
            try:  # appended, not rewritten through atomic.py: a kill cuts at most this line short, which
                # read_metrics skips and resuming rewrites (restore_metrics), and earlier lines are never at risk
                with open(path, "a") as f:
                    f.write(json_line(record))
            except OSError as e:
                raise ckpt.CheckpointError(f"could not write {path}: {e.strerror or e}") from None
        self.logger.log_table("eval/generations", examples, step=step)
        self.logger.log({f"eval/{k}": v for k, v in record.items()}, step=step)
        if self.writes:
            self.curves.update()

    def end_summary(self) -> None:
        """Best epoch and accuracy, this launch's wall time, where checkpoints and result files are."""
        if not self.info.is_main:
            return
        self.bar.close()  # before the last lines: the bar's final state stays above them
        checkpoints = [path.name for _, path in ckpt.complete_checkpoints(self.save_dir)] if self.writes else []
        files = [
            name
            for name in (METRICS_FILE, TRAIN_LOG_FILE, CURVES_FILE, PREDICTIONS_DIR + "/")
            if (self.save_dir / name).exists()
        ]
        self.print(
            "\n".join(end_lines(self.metrics, time.perf_counter() - self.started, self.save_dir, checkpoints, files))
        )

    def close(self) -> None:
        """Also when an error unwinds: its message then starts on a line of its own."""
        if self.bar is not None:
            self.bar.close()
        self.logger.close()


class Throughput:
    """Tokens and samples since the last logged step, counted on the host copies of the batches."""

    def __init__(self) -> None:
        self.start, self.tokens, self.samples = time.perf_counter(), 0, 0

    def add(self, batch: Batch) -> None:
        self.tokens += int(batch.attention_mask.sum())
        self.samples += batch.input_ids.shape[0]

    def take(self) -> tuple[int, int, float]:
        """(tokens, samples, seconds) of this rank since the last call."""
        now = time.perf_counter()
        taken = self.tokens, self.samples, max(now - self.start, 1e-9)
        self.start, self.tokens, self.samples = now, 0, 0
        return taken


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete records of a metrics.jsonl (none if it is missing); a line a kill cut short is skipped."""
    return [r for r in read_jsonl(path) if isinstance(r.get("epoch"), int)]


def _init_wandb(config: Config, info: DistInfo, save_dir: Path) -> WandbLogger | None:
    """wandb on rank 0 unless debug or disabled (config key wandb_mode, else WANDB_MODE, else online)."""
    mode = config.wandb_mode or os.environ.get("WANDB_MODE", "online")
    if not info.is_main or config.debug or mode == "disabled" or "wandb" not in config.metrics_sinks:
        return None
    return WandbLogger(save_dir, mode, config.project, config.name, config.to_dict())


def quiet_transformers() -> None:
    """Silence transformers' own progress bars ("Loading weights", "Writing model shards" at every
    checkpoint); huggingface_hub's download bars, which its switch turns off too, stay as they were."""
    downloads_shown = not huggingface_hub.utils.are_progress_bars_disabled()
    transformers.utils.logging.disable_progress_bar()
    if downloads_shown:
        huggingface_hub.utils.enable_progress_bars()
