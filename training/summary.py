"""The lines a run prints when it starts (what will run, on what) and when it ends (what came of it).

Pure formatting of numbers the trainer hands over; parameter_counts is the one look at the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils import Config


def parameter_counts(model: Any) -> tuple[int, int]:
    """(total, trainable) parameters of a torch module. A DTensor's numel() is its full tensor's, so
    the counts are the whole model's under FSDP2 sharding too; a shared (tied) parameter counts once."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def human(n: float) -> str:
    """1234567 -> "1.23M" (k, M, B; plain below 1000)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def duration(seconds: float) -> str:
    """3725.4 -> "1:02:05"."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def latents_of(config: Config, stage: int) -> int:
    """The most latent tokens a sample gets at a stage (fewer where a record has fewer steps)."""
    return 0 if config.method == "no_cot" else min(stage, config.max_latent_stage) * config.thoughts_per_step


def stage_plan(config: Config, first_epoch: int) -> str:
    """The epochs this run trains (1-based), grouped by stage: "1-4: stage 0 (no latents); 5-8: ..."."""
    groups: list[list[int]] = []  # [first epoch, last epoch, stage]
    for epoch in range(first_epoch, config.num_epochs):
        stage = config.stage(epoch)
        if groups and groups[-1][2] == stage:
            groups[-1][1] = epoch + 1
        else:
            groups.append([epoch + 1, epoch + 1, stage])
    parts = []
    for first, last, stage in groups:
        n = latents_of(config, stage)
        latents = "no latents" if n == 0 else f"up to {n} latent{'s' if n > 1 else ''}"
        epochs = f"{first}-{last}" if last > first else f"{first}"
        parts.append(f"{epochs}: stage {stage} ({latents})")
    return "; ".join(parts)


def precision(config: Config) -> str:
    if config.bf16:
        return "bf16 mixed precision"
    if config.fp16:
        return "fp16 mixed precision with loss scaling"
    return "fp32"


def start_lines(
    config: Config,
    *,
    world_size: int,
    device: str,
    weights_dtype: str,
    parameters: tuple[int, int],
    records: dict[str, tuple[int, int]],
    steps_per_epoch: int,
    first_epoch: int,
    steps_done: int,
    save_dir: Path,
    writes: bool,
    overrides: Sequence[str] = (),
) -> list[str]:
    """The start-up summary. records: split -> (records in the file, kept after dropping overlong ones);
    overrides: the command line's KEY=VALUE texts that applied."""
    total, trainable = parameters
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    lines = [
        f"{config.name}: {config.method}{' (eval only)' if config.only_eval else ''}, {processes} on {device}, "
        f"{precision(config)} (weights {weights_dtype})",
        f"  parameters  {human(total)}, {human(trainable)} trainable ({100 * trainable / max(total, 1):.2f}%)",
    ]
    kept = [
        f"{split} {n}" + (f" ({read - n} dropped as overlong)" if read > n else "")
        for split, (read, n) in records.items()
    ]
    lines.append("  records     " + ", ".join(kept))
    if config.only_eval:
        lines.append(f"  stage       {config.stage(config.resume)} (epoch {config.resume + 1})")
    else:
        batch, accum = config.batch_size_training, config.gradient_accumulation_steps
        lines.append(
            f"  batch       {batch} per rank x {world_size} rank{'s' if world_size > 1 else ''} x "
            f"{accum} accumulation = {batch * world_size * accum} samples per optimizer step"
        )
        total_steps = steps_per_epoch * (config.num_epochs - first_epoch)
        left = f", {total_steps - steps_done} to go" if steps_done else ""
        lines.append(f"  steps       {steps_per_epoch} per epoch, {total_steps} in all{left}")
        lines.append(f"  epochs      {stage_plan(config, first_epoch)}")
    lines.append(
        f"  save dir    {save_dir}"
        if writes
        else f"  save dir    none ({'debug' if config.debug else 'eval-only'} run); predictions in {save_dir}"
    )
    if overrides:
        lines.append(f"  overrides   {' '.join(overrides)}")
    return lines


def media_line(config: Config, records: dict[str, Sequence[dict[str, Any]]]) -> str:
    """How many records of each split carry images, a video, or neither: a data set whose images went
    unread (a misnamed key, multimodal: false) shows here before any training."""
    counts = []
    for split, rows in records.items():
        images = sum(r.get("image") is not None for r in rows)
        videos = sum(r.get("video") is not None for r in rows)
        counts.append(f"{split} {images} with images, {videos} with a video, {len(rows) - images - videos} neither")
    ignored = "" if config.multimodal else " (multimodal: false: images and videos are not read)"
    return "media: " + "; ".join(counts) + ignored


def end_lines(
    metrics: Sequence[dict[str, Any]], wall_s: float, save_dir: Path, checkpoints: Sequence[str], files: Sequence[str]
) -> list[str]:
    """The end-of-run summary: best epoch and its accuracy, this launch's wall time, where the results are.
    checkpoints: names of the checkpoints kept, oldest first; files: result files in save_dir."""
    head = f"done in {duration(wall_s)}"
    if metrics:
        best = max(metrics, key=lambda m: m["accuracy"])  # the first of equals
        last = metrics[-1]
        which = "best accuracy" if len(metrics) > 1 else "accuracy"
        head += f": {which} {best['accuracy']:.4f} at epoch {best['epoch']} (stage {best['stage']})"
        if last is not best:
            head += f"; last epoch {last['epoch']}: {last['accuracy']:.4f}"
    lines = [head]
    if checkpoints:
        names = ", ".join(checkpoints) if len(checkpoints) <= 3 else f"{checkpoints[0]} ... {checkpoints[-1]}"
        lines.append(f"  checkpoints {save_dir}/ ({len(checkpoints)}: {names})")
    if files:
        lines.append(f"  results     {', '.join(files)} in {save_dir}/")
    return lines
