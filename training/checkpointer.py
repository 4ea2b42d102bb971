"""A run's checkpoints: which one to resume from and whether it fits, saving (epoch and step), restoring, pruning.

The files and their format are storage/checkpoints.py's; this is what the trainer does with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from modeling.assembly import Assembly
from storage import atomic
from storage import checkpoints as ckpt
from storage.resume_check import check_resume, data_order
from storage.saved_run import SavedRun, write_saved_run
from training.distributed import DistInfo, barrier, check_optimizer_params, release_gathered
from training.evaluation import PREDICTIONS_DIR
from training.guard import NonFiniteGuard
from utils import Config

CONFIG_FILE = "config.yaml"


@dataclasses.dataclass(frozen=True)
class Resume:
    """The checkpoint a run resumes from, and the state it saved."""

    path: Path
    state: ckpt.TrainState

    @property
    def mid_epoch(self) -> bool:
        return ckpt.is_step_checkpoint(self.path)


def find_resume(
    config: Config, info: DistInfo, save_dir: Path, writes: bool, say: Callable[[str], None]
) -> Resume | None:
    """As the original: an existing checkpoint in save_dir means a preempted run; resume from it (a debug
    run too, writing nothing).

    The newest progress wins, epoch or step checkpoint. Its state and the keys that define its data
    order are checked against this config before anything is written, so a bad checkpoint changes
    nothing on disk.
    """
    if writes and info.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        for directory in (save_dir, save_dir / PREDICTIONS_DIR):
            atomic.remove_leftovers(directory, everyone=True)  # this run's own: nobody else writes there
    barrier()
    found = ckpt.newest_checkpoint(save_dir)
    if found is None:
        return None
    resume = Resume(*found)
    _check_resumable(resume, config, info)
    notes = check_resume(resume.path, ckpt.model_dir_of(resume.path), resume.mid_epoch, config, info.world_size)
    state = resume.state
    where = (
        f"epoch {state.epoch}" if not state.ranks else f"in epoch {state.epoch + 1} after {state.batch} micro-batches"
    )
    say(f"resuming from {resume.path} ({where}); the `resume` key is ignored")
    for note in notes:
        say(note)
    return resume


def write_config(config: Config, info: DistInfo, save_dir: Path) -> None:
    """save_dir/config.yaml: the resolved config of the latest launch."""
    if info.is_main:
        ckpt.write_atomic(save_dir / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))


def _check_resumable(resume: Resume, config: Config, info: DistInfo) -> None:
    path, state = resume.path, resume.state
    if state.epoch > config.num_epochs:
        raise ckpt.CheckpointError(
            f"{path / ckpt.STATE_FILE}: key 'epoch': {state.epoch} is past num_epochs "
            f"({config.num_epochs}); raise num_epochs or use another save_path/name"
        )
    if state.ranks and state.ranks != info.world_size:
        raise ckpt.CheckpointError(
            f"{path}: a mid-epoch checkpoint of {state.ranks} ranks: resume it with "
            f"{state.ranks} processes, or remove {path.name} to resume from the one before"
        )


class Checkpointer:
    """Saves the run's model (and optimizer) as epoch and step checkpoints, and restores a resumed one."""

    def __init__(
        self,
        config: Config,
        info: DistInfo,
        save_dir: Path,
        writes: bool,
        parts: Assembly,
        state: ckpt.TrainState,
        resume: Resume | None,
        guard: NonFiniteGuard,
        say: Callable[[str], None],
    ) -> None:
        self.config, self.info, self.save_dir, self.writes = config, info, save_dir, writes
        self.parts, self.state, self.resume, self.say = parts, state, resume, say
        self.guard = guard  # no checkpoint ever holds the weights of a diverged step
        self.pending = resume is not None  # the first epoch of this launch has yet to take the checkpoint's state
        # epoch, batch and path of the newest checkpoint
        self.newest: tuple[int, int, Path] | None = None if resume is None else (state.epoch, state.batch, resume.path)

    def holds(self, epoch: int, done: int) -> Path | None:
        """The newest checkpoint if it holds this point (epoch, micro-batches done) already."""
        return self.newest[2] if self.newest is not None and self.newest[:2] == (epoch, done) else None

    # --- saving ---------------------------------------------------------------------------------
    def save(
        self, optimizer: torch.optim.Optimizer | None, accuracy: float | None = None, announce: bool = True
    ) -> Path:
        """checkpoint_{epoch} at an epoch boundary. With reset_optimizer it holds no optimizer state:
        the next epoch starts a fresh AdamW anyway, and AdamW's state is twice the fp32 weights."""
        keep_optimizer = optimizer is not None and not self.config.reset_optimizer
        state = dataclasses.replace(self.state, batch=0, ranks=0, optimizer_saved=keep_optimizer, accuracy=accuracy)
        name = f"{ckpt.PREFIX}{state.epoch}"
        stage = self.config.stage(state.epoch - 1)
        return self._write(name, state, optimizer if keep_optimizer else None, None, stage, announce)

    def save_step(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        epoch: int,
        done: int,
        loss_sum: torch.Tensor,
        announce: bool = True,
    ) -> Path:
        """step_{S} mid-epoch: also every rank's RNG states, running loss sums and loss scaler."""
        state = dataclasses.replace(
            self.state, epoch=epoch, batch=done, ranks=self.info.world_size, optimizer_saved=True, accuracy=None
        )
        part = {"rng": ckpt.rng_state(self.info.device), "loss_sum": loss_sum.cpu(), "scaler": scaler.state_dict()}
        name = f"{ckpt.STEP_PREFIX}{state.step}"
        return self._write(name, state, optimizer, part, self.config.stage(epoch), announce)

    def _write(
        self,
        name: str,
        state: ckpt.TrainState,
        optimizer: torch.optim.Optimizer | None,
        rank_part: dict[str, Any] | None,
        stage: int,
        announce: bool,
    ) -> Path:
        """Gather full weights and optimizer state (every rank takes part); write atomically; prune."""
        config, info, parts = self.config, self.info, self.parts
        if not self.writes:
            return self.save_dir / name
        self.guard.check()
        options = self._options()
        release_gathered(parts.model)
        model_state = get_model_state_dict(parts.model, options=options)
        model_state = {k.removeprefix(ckpt.WRAPPER_PREFIX): v for k, v in model_state.items()}
        optim_state = None
        if optimizer is not None:
            check_optimizer_params(parts.model, optimizer)
            optim_state = get_optimizer_state_dict(parts.model, optimizer, options=options)
        ids = dataclasses.asdict(parts.ids)
        run = SavedRun(config, state.epoch, stage, ids, data_order(config, info.world_size))

        def write_main(directory: Path) -> None:
            model_dir = directory / ckpt.MODEL_DIR
            ckpt.save_model(parts.base, model_dir, model_state)
            parts.processor.save_pretrained(model_dir)
            write_saved_run(model_dir, run)
            if optim_state is not None:
                torch.save(optim_state, directory / ckpt.OPTIMIZER_FILE)

        path = ckpt.write_checkpoint(self.save_dir, name, info.rank, state, write_main, rank_part)
        self.newest = (state.epoch, state.batch, path)
        if info.is_main:
            ckpt.prune(self.save_dir, path, config.save_total_limit)
            if announce:
                self.say(f"saved {path}")
        return path

    # --- restoring ------------------------------------------------------------------------------
    def resumes_mid_epoch(self) -> bool:
        """Whether the epoch about to start is the rest of one a step checkpoint saved."""
        return self.pending and self.resume.mid_epoch

    def resumed(self) -> None:
        """The resumed checkpoint's state is taken (its first epoch has begun): later epochs start afresh."""
        self.pending = False

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The resumed checkpoint's optimizer state, where it has one and this epoch takes it."""
        if not self.pending:
            return
        path, state = self.resume.path, self.state
        if self.config.reset_optimizer and not self.resume.mid_epoch:
            return  # the epoch starts with a fresh AdamW, as every epoch of such a run does
        if not state.optimizer_saved:  # saved by a reset_optimizer run, resumed without it
            self.say(
                f"note: {path} holds no optimizer state (its run reset the optimizer every epoch): "
                "a fresh AdamW starts here"
            )
            return
        saved = ckpt.read_optimizer_state(path) if self.info.is_main else {}
        set_optimizer_state_dict(self.parts.model, optimizer, saved, options=self._options(load=True))

    def resume_batch(self, n_batches: int) -> int:
        """Micro-batches of this epoch that the resumed step checkpoint has trained already."""
        done, accum = self.state.batch, self.config.gradient_accumulation_steps
        if done > n_batches or (done % accum and done != n_batches):
            raise ckpt.CheckpointError(
                f"{self.resume.path / ckpt.STATE_FILE}: key 'batch': {done} is not a step "
                f"boundary of this epoch ({n_batches} micro-batches, accumulation {accum})"
            )
        return done

    def restore_rank_part(self, loss_sum: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
        """This rank's RNG states, running loss sums and loss scaler, as the step checkpoint saved them."""
        part = ckpt.read_rank_part(self.resume.path, self.info.rank)
        ckpt.set_rng_state(part["rng"], self.info.device)
        loss_sum.copy_(part["loss_sum"])
        scaler.load_state_dict(part["scaler"])

    def _options(self, load: bool = False) -> StateDictOptions:
        return StateDictOptions(
            full_state_dict=True, cpu_offload=True, broadcast_from_rank0=load and self.info.distributed
        )
