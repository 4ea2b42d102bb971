"""The training run: the stage curriculum's epochs, each trained, saved and evaluated (the original's run.py main()).

Its parts: training/setup.py builds the model (modeling/assembly.py) and the data, training/checkpointer.py
finds, saves and restores checkpoints, training/evaluator.py evaluates, training/reporter.py tells.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from coconut import Outputs
from dataset import IGNORE_INDEX, Batch, get_cot_latent_dataset
from storage import checkpoints as ckpt
from storage.resume_check import eval_only_stage
from storage.run_lock import run_lock
from training.checkpointer import Checkpointer, find_resume, write_config
from training.distributed import (
    DistInfo,
    all_reduce_host,
    all_reduce_sum,
    check_optimizer_params,
    init_distributed,
    release_gathered,
    shutdown,
)
from training.evaluator import Evaluator
from training.guard import NonFiniteGuard
from training.preemption import Preempted, StopRequests, ignore_stop_signals
from training.reporter import Reporter, quiet_transformers
from training.schedule import Schedule, steps_per_epoch
from training.setup import DEBUG_TRAIN_SIZE, DEBUG_VAL_SIZE, build_model, load_split
from utils import Config, set_seed


def train(config: Config, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train (or evaluate) as the config says; returns the per-epoch metrics. overrides: the command
    line's KEY=VALUE texts that made the config, for the start summary.

    A stop signal ends it with Preempted (SystemExit, status 75) after a checkpoint, its one line printed.
    """
    info = init_distributed(config.dist_timeout_s)
    quiet_transformers()
    if (note := eval_only_stage(config)) and info.is_main:
        print(note, flush=True)
    stop = StopRequests()
    trainer = None
    try:
        writes = not (config.debug or config.only_eval)
        with contextlib.ExitStack() as stack:
            if writes:  # one run per run directory; stop signals only where a checkpoint can be written
                say = print if info.is_main else lambda line: None
                stack.enter_context(run_lock(Path(config.save_path) / config.name, info.is_main, say))
                stack.enter_context(stop)
            trainer = Trainer(config, info, stop, overrides)
            with contextlib.closing(
                trainer.reporter
            ):  # also when an error unwinds: its message starts on a line of its own
                return trainer.train()
    except Preempted as stopped:
        if info.is_main:
            print(stopped.message, file=sys.stderr, flush=True)
        if info.distributed:  # torchrun's agent stops the ranks still exiting when the first one has: let them finish
            ignore_stop_signals(info.rank)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        shutdown()


class Trainer:
    """One run: its parts, built in the constructor, and the loop over epochs and optimizer steps."""

    def __init__(self, config: Config, info: DistInfo, stop: StopRequests, overrides: Sequence[str] = ()) -> None:
        self.config, self.info, self.stop = config, info, stop
        self.save_dir = Path(config.save_path) / config.name
        self.writes = not (config.debug or config.only_eval)
        self.reporter = Reporter(config, info, self.save_dir, self.writes, overrides)
        try:
            set_seed(config.seed)
            self.guard = NonFiniteGuard(info.device, not config.fp16, self.save_dir if self.writes else None)
            say = self.reporter.print
            resume = None if config.only_eval else find_resume(config, info, self.save_dir, self.writes, say)
            self.state = resume.state if resume else ckpt.TrainState(epoch=config.resume, first_epoch=config.resume)
            # the resumed checkpoint's epoch has no metrics line yet: it is evaluated first
            self.unevaluated = resume is not None and self.reporter.restore_metrics(self.state.epoch)
            if self.writes:
                write_config(config, info, self.save_dir)
            self.parts = build_model(config, info, resume)
            self.decoder_layers = self.parts.base.get_decoder().layers
            self.scaler = torch.amp.GradScaler(info.device.type, enabled=config.fp16)
            self.val = load_split(config, self.parts, config.val_path, DEBUG_VAL_SIZE if config.debug else None)
            train_size = DEBUG_TRAIN_SIZE if config.debug else None
            self.data = None if config.only_eval else load_split(config, self.parts, config.train_path, train_size)
            self.checkpointer = Checkpointer(
                config,
                info,
                self.save_dir,
                self.writes,
                self.parts,
                self.state,
                resume,
                self.guard,
                self.reporter.print,
            )
            self.evaluator = Evaluator(config, info, self.parts, self.val, self.reporter, self.state, self.save_dir)
            self.grad_norm: torch.Tensor | None = None  # of the last optimizer step, before clipping
            self.stopping = False  # a stop agreed at an epoch's end: its checkpoint is saved, then the run stops
            splits = {"train": self.data, "val": self.val} if self.data is not None else {"val": self.val}
            records = {name: (len(split.records), len(split.base)) for name, split in splits.items()}
            media = {name: split.records for name, split in splits.items()}
            self.reporter.start(self.parts.model, records, media, self.steps_per_epoch(), self.state)
        except BaseException:  # a half-built run goes too, before the process group (see close)
            self.reporter.close()
            self.close()
            raise

    def close(self) -> None:
        """Drop the model (and all else) before the process group goes.

        FSDP's state holds the group's collectives; freed only at interpreter exit, after the group,
        gloo could abort a process whose run was complete ("terminate called without an active
        exception"). A traceback keeps this object alive, so its state is dropped explicitly, whole.
        """
        self.__dict__.clear()
        gc.collect()

    def train(self) -> dict[str, Any]:
        """Each epoch trains at its stage, saves, then evaluates (the original's order)."""
        config, state = self.config, self.state
        optimizer = None
        if self.unevaluated:
            done = state.epoch
            record = {"epoch": done, "stage": config.stage(done - 1), "train_loss": state.train_loss}
            state.best_acc = max(state.best_acc, self.evaluator.evaluate(record))
        for epoch in range(state.epoch, config.num_epochs):
            stage = config.stage(epoch)
            record: dict[str, Any] = {"epoch": epoch + 1, "stage": stage}
            if not config.only_eval:
                optimizer = self.optimizer_for(optimizer)
                record["train_loss"] = state.train_loss = self.train_epoch(epoch, stage, optimizer)
                state.epoch, state.batch = epoch + 1, 0
                if not config.save_only_improve:
                    path = self.checkpointer.save(optimizer, announce=not self.stopping)
                    if self.stopping:  # agreed at the epoch's end: the rerun starts with this epoch's evaluation
                        raise Preempted(self.stopped(f"saved {path}"))
            accuracy = self.evaluator.evaluate(record)
            if config.only_eval:
                break
            if config.save_only_improve and accuracy > state.best_acc:
                state.best_acc = accuracy
                self.checkpointer.save(optimizer, accuracy)
            state.best_acc = max(state.best_acc, accuracy)
        self.reporter.end_summary()
        return {"epochs": self.reporter.metrics, "save_dir": str(self.save_dir)}

    def optimizer_for(self, optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer:
        """One AdamW for the whole run, or with reset_optimizer a fresh one at every epoch.

        The original builds its AdamW inside the epoch loop when reset_optimizer is set (its README
        says "when switching stages"; its code resets every epoch, and the code made the results).
        A resumed run takes the checkpoint's optimizer state where it has one.
        """
        if optimizer is not None and not self.config.reset_optimizer:
            return optimizer
        model = self.parts.model
        release_gathered(model)  # the sharded parameters, not gathered copies of them
        params = [p for p in model.parameters() if p.requires_grad]
        fused = self.info.device.type == "cuda" and not self.info.distributed  # fused kernels: plain tensors only
        optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay, fused=fused)
        check_optimizer_params(model, optimizer)
        self.checkpointer.load_optimizer(optimizer)
        return optimizer

    def steps_per_epoch(self) -> int:
        """Optimizer steps of one epoch on every rank (the DistributedSampler pads ranks to equal shares)."""
        if self.data is None:
            return 0
        per_rank = math.ceil(len(self.data.base) / self.info.world_size)
        return steps_per_epoch(
            math.ceil(per_rank / self.config.batch_size_training), self.config.gradient_accumulation_steps
        )

    # --- one epoch ----------------------------------------------------------------------------
    def train_epoch(self, epoch: int, stage: int, optimizer: torch.optim.Optimizer) -> float:
        """Train one epoch (the rest of it when resuming mid-epoch); returns its global token-mean loss.

        Micro-batches are taken one optimizer step's window at a time. A single collective per
        step sums the window's label counts (the loss denominator) and the ranks' stop requests,
        so every rank stops at the same step boundary.
        """
        config, info = self.config, self.info
        torch.manual_seed(config.seed + epoch)  # per-epoch streams: a resumed epoch draws the same numbers
        ids = self.parts.ids
        samples = get_cot_latent_dataset(stage, self.data.base, config, ids, random.Random(config.seed + epoch))
        dataset = self.data.wrap(samples, config)
        sampler = DistributedSampler(
            dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config.seed
        )
        sampler.set_epoch(epoch)
        order = list(sampler)  # this rank's samples, in this epoch's order
        size, accum = config.batch_size_training, config.gradient_accumulation_steps
        n_batches = math.ceil(len(order) / size)
        schedule = Schedule(config, self.state.first_epoch, steps_per_epoch(n_batches, accum))
        mid_epoch = self.checkpointer.resumes_mid_epoch()
        done = self.checkpointer.resume_batch(n_batches) if mid_epoch else 0
        # a resumed epoch skips what it trained already: those samples are never loaded again
        loader = DataLoader(
            dataset,
            batch_size=size,
            sampler=order[done * size :],
            collate_fn=self.parts.collate,
            num_workers=config.num_workers,
            pin_memory=info.device.type == "cuda",
            worker_init_fn=ignore_stop_signals,
        )
        batches = iter(loader)  # draws the workers' seed: before the RNG states are restored, as in the first run
        loss_sum = torch.zeros(2, dtype=torch.float64, device=info.device)  # this rank's summed CE, label count
        if mid_epoch:
            self.checkpointer.restore_rank_part(loss_sum, self.scaler)
        self.checkpointer.resumed()
        self.parts.model.train()
        self.reporter.start_epoch(epoch, stage)
        while True:
            window = list(itertools.islice(batches, min(accum, n_batches - done)))
            labels = sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in window)  # on the host copy: no sync
            n_labels, stops = all_reduce_host([labels, float(self.stop.requested)])
            if stops:
                self.stop_in_epoch(optimizer, epoch, done, n_batches, loss_sum)
                break
            if not window:
                break
            ce, out = self.train_step(window, n_labels)
            loss_sum[0] += ce
            loss_sum[1] += labels
            if info.distributed:
                release_gathered(self.decoder_layers)
            lr = schedule.lr(schedule.position(epoch, done // accum))
            self.optimizer_step(optimizer, lr)
            self.guard.observe(self.state.step, ce, self.grad_norm)
            done += len(window)
            if self.state.step % config.log_every == 0:
                self.guard.check()  # a diverged step is named, not logged
                at = {"step": self.state.step, "epoch": epoch + done / n_batches, "stage": stage}
                self.guard.logged(self.state.step, self.reporter.log_step(out, ce, n_labels, self.grad_norm, lr, at))
            self.reporter.bar.update(1)
            # the step that ends an epoch is saved by its epoch checkpoint, unless that waits for evaluation
            if (
                config.save_every_steps
                and self.state.step % config.save_every_steps == 0
                and (done < n_batches or config.save_only_improve)
            ):
                self.checkpointer.save_step(optimizer, self.scaler, epoch, done, loss_sum)
        self.guard.check()
        all_reduce_sum(loss_sum)
        return float(loss_sum[0] / loss_sum[1].clamp(min=1))

    def train_step(self, window: list[Batch], n_labels: float) -> tuple[torch.Tensor, Outputs]:
        """Forward and backward of one optimizer step's micro-batches; returns this rank's summed CE.

        Each micro-batch's summed CE is divided by (global label count of the whole window ÷ world
        size): FSDP's gradient average over ranks then equals the gradient of the token mean over
        all ranks and accumulation steps, whatever each micro-batch's token count.
        """
        info, model = self.info, self.parts.model
        denominator = max(n_labels, 1.0) / info.world_size
        ce = torch.zeros((), dtype=torch.float64, device=info.device)
        for j, batch in enumerate(window):
            self.reporter.throughput.add(batch)
            if info.distributed:
                model.set_requires_gradient_sync(j == len(window) - 1)
            with self.parts.autocast():
                out = model(batch.to(info.device), num_items_in_batch=denominator)
            self.scaler.scale(out.loss).backward()
            ce += out.loss.detach().double() * denominator
        return ce, out

    def optimizer_step(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        """Step with the lr given; the gradients' global norm before clipping is kept for the log."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(optimizer)  # a no-op unless fp16's loss scaling is on
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if self.config.max_grad_norm > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        else:  # the norm alone: clip_grad_norm_ with an infinite bound would still rescale (NaN on an inf norm)
            self.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

    # --- stopping -----------------------------------------------------------------------------
    def stop_in_epoch(
        self, optimizer: torch.optim.Optimizer, epoch: int, done: int, n_batches: int, loss_sum: torch.Tensor
    ) -> None:
        """A stop agreed at a step boundary: save this point as a step checkpoint, then stop."""
        if done == n_batches and not self.config.save_only_improve:
            self.stopping = True  # the epoch checkpoint, saved next, holds this point
            return
        held = self.checkpointer.holds(epoch, done)
        if held is not None:
            raise Preempted(self.stopped(f"{held} already holds this point"))
        # the stop's line announces the save
        path = self.checkpointer.save_step(optimizer, self.scaler, epoch, done, loss_sum, announce=False)
        raise Preempted(self.stopped(f"saved {path}"))

    def stopped(self, what: str) -> str:
        by = self.stop.signal_name or "a stop signal to another rank"
        return (
            f"stopped by {by} after optimizer step {self.state.step}: {what}; "
            "run the same command again to resume from it"
        )
