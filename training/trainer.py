"""The training run: model set-up, stage curriculum, optimisation, checkpoints, evaluation, logging."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub.utils
import torch
import transformers
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from coconut import Coconut
from dataset import (
    Batch,
    MyCollator,
    drop_overlong,
    get_cot_latent_dataset,
    get_question_latent_dataset,
    load_records,
    tokenize_records,
)
from modeling.activation_checkpointing import enable_latent_checkpointing
from modeling.assembly import (
    add_latent_tokens,
    check_image_size,
    freeze,
    init_latent_rows,
    latent_rows_trained,
    load_base_model,
    load_processor,
    tokenizer_of,
)
from modeling.lora import apply_lora, has_adapter, load_adapter, merge_adapter
from multimodal.collator_mm import MultimodalCollator
from multimodal.convert import resolve_model
from multimodal.dataset_mm import ImageTokens, MultimodalDataset, tokenize_mm_records
from storage import atomic
from storage import checkpoints as ckpt
from storage.resume_check import check_resume, data_order, eval_only_stage
from storage.run_lock import run_lock
from storage.saved_run import SavedRun, read_saved_run, write_saved_run
from training.distributed import (
    DistInfo,
    all_reduce_host,
    all_reduce_sum,
    barrier,
    check_optimizer_params,
    device_mesh,
    init_distributed,
    mixed_precision_dtype,
    release_gathered,
    shard,
    shutdown,
)
from training.evaluation import PREDICTIONS_DIR, generation_accuracy, validation_loss, write_predictions
from training.guard import NonFiniteGuard
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
from training.preemption import Preempted, StopRequests, ignore_stop_signals
from training.schedule import Schedule, steps_per_epoch
from training.summary import end_lines, media_line, parameter_counts, start_lines
from utils import Config, set_seed

DEBUG_TRAIN_SIZE, DEBUG_VAL_SIZE = 5000, 32  # the original's debug subset sizes
METRICS_FILE = "metrics.jsonl"
TRAIN_LOG_FILE = "train_log.jsonl"  # one line per logged optimizer step
GENERATIONS_TABLE_ROWS = 32  # sample generations logged per evaluation (the first records of the val set)
CONFIG_FILE = "config.yaml"


@dataclasses.dataclass
class Split:
    """One data file, tokenized once; stage datasets are derived from it each epoch."""

    source: str
    records: list[dict[str, Any]]
    base: list[dict[str, Any]]
    media: dict[int, Any]

    def wrap(self, samples: list[dict[str, Any]], config: Config) -> Any:
        """Stage samples as a Dataset: images are decoded on access (in DataLoader workers)."""
        return MultimodalDataset(samples, self.media, config, self.source) if config.multimodal else samples


def run(config: Config) -> dict[str, Any]:
    """Train (or evaluate) as the config says; returns the per-epoch metrics.

    A stop signal ends it with Preempted (SystemExit, status 75) after a checkpoint, its one line printed.
    """
    info = init_distributed(config.dist_timeout_s)
    quiet_transformers()
    if (note := eval_only_stage(config)) and info.is_main:
        print(note, flush=True)
    runner = Run(config, info)
    try:
        return runner.execute()
    except Preempted as stop:
        if info.is_main:
            print(stop.message, file=sys.stderr, flush=True)
        if info.distributed:  # torchrun's agent stops the ranks still exiting when the first one has: let them finish
            ignore_stop_signals(info.rank)
        raise
    finally:
        runner.close()
        shutdown()


class Run:
    """State of one run; methods are the phases of the original run.py's main()."""

    def __init__(self, config: Config, info: DistInfo) -> None:
        self.config, self.info = config, info
        self.save_dir = Path(config.save_path) / config.name
        self.writes = not (config.debug or config.only_eval)
        self.state = ckpt.TrainState(epoch=config.resume, first_epoch=config.resume)
        self.resume_from: Path | None = None
        self.resume_pending = False  # the first epoch of this launch has yet to take the checkpoint's state
        self.newest: tuple[int, int, Path] | None = None  # epoch, batch and path of the newest checkpoint
        self.metrics: list[dict[str, Any]] = []
        self.unevaluated = False  # the resumed checkpoint's epoch has no metrics line yet
        self.stop = StopRequests()
        self.stopping = False  # a stop agreed at an epoch's end: its checkpoint is saved, then the run stops
        self.started = time.perf_counter()
        self.logger: MetricLogger = MultiLogger([])
        self.console: ConsoleLogger | None = None
        self.bar: tqdm | None = None  # the whole run's progress in optimizer steps (its ETA: the whole run's)
        self.grad_norm: torch.Tensor | None = None  # of the last optimizer step, before clipping
        self.curves = Curves(self.save_dir, METRICS_FILE, TRAIN_LOG_FILE, self._print)
        self.guard = NonFiniteGuard(info.device, not config.fp16, self.save_dir if self.writes else None)

    def close(self) -> None:
        """Drop the model (and all else) before the process group goes.

        FSDP's state holds the group's collectives; freed only at interpreter exit, after the group,
        gloo could abort a process whose run was complete ("terminate called without an active
        exception"). A traceback keeps this object alive, so its state is dropped explicitly, whole.
        """
        self.__dict__.clear()
        gc.collect()

    # --- set-up -------------------------------------------------------------------------------
    def _find_resume(self) -> None:
        """As the original: an existing checkpoint in save_dir means a preempted run; resume from it.

        The newest progress wins, epoch or step checkpoint. Its state is checked against this
        config before anything is written, so a bad checkpoint changes nothing on disk.
        """
        if self.config.only_eval:  # a debug run resumes too (as the original's), and writes nothing
            return
        if self.writes and self.info.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            for directory in (self.save_dir, self.save_dir / PREDICTIONS_DIR):
                atomic.remove_leftovers(directory, everyone=True)  # this run's own: nobody else writes there
        barrier()
        found = ckpt.newest_checkpoint(self.save_dir)
        if found is not None:
            path, state = found
            self._check_resumable(path, state)
            step = ckpt.is_step_checkpoint(path)
            notes = check_resume(path, ckpt.model_dir_of(path), step, self.config, self.info.world_size)
            self.resume_from, self.state, self.resume_pending = path, state, True
            self.newest = (state.epoch, state.batch, path)
            where = (
                f"epoch {state.epoch}"
                if not state.ranks
                else (f"in epoch {state.epoch + 1} after {state.batch} micro-batches")
            )
            self._print(f"resuming from {path} ({where}); the `resume` key is ignored")
            for note in notes:
                self._print(note)
            self._restore_metrics()
        if self.writes and self.info.is_main:
            ckpt.write_atomic(self.save_dir / CONFIG_FILE, yaml.safe_dump(self.config.to_dict(), sort_keys=False))

    def _check_resumable(self, path: Path, state: ckpt.TrainState) -> None:
        state_file = path / ckpt.STATE_FILE
        if state.epoch > self.config.num_epochs:
            raise ckpt.CheckpointError(
                f"{state_file}: key 'epoch': {state.epoch} is past num_epochs "
                f"({self.config.num_epochs}); raise num_epochs or use another save_path/name"
            )
        if state.ranks and state.ranks != self.info.world_size:
            raise ckpt.CheckpointError(
                f"{path}: a mid-epoch checkpoint of {state.ranks} ranks: resume it with "
                f"{state.ranks} processes, or remove {path.name} to resume from the one before"
            )

    def _restore_metrics(self) -> None:
        """Keep metrics.jsonl's lines up to the resumed epoch: later epochs are re-run and re-reported.

        A kill can cut the last line short, and lands between a checkpoint's save and its epoch's
        evaluation (the original's order) often enough that `unevaluated` makes the resumed run
        evaluate that epoch first, so no epoch goes without its line.
        """
        path = self.save_dir / METRICS_FILE
        kept = [r for r in read_metrics(path) if r["epoch"] <= self.state.epoch]
        self.metrics = kept
        self.unevaluated = self.state.epoch > 0 and all(r["epoch"] != self.state.epoch for r in kept)
        barrier()  # every rank has read the file before rank 0 replaces it
        if self.writes and self.info.is_main:
            ckpt.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    def _model_dir(self) -> str:
        config = self.config
        if self.resume_from is not None:
            return str(ckpt.model_dir_of(self.resume_from))
        if config.load_model_path and ckpt.model_dir_of(config.load_model_path):
            return str(ckpt.model_dir_of(config.load_model_path))
        # rank 0 converts an original-format checkpoint once; the others then find it cached
        cache = Path(config.model_cache_dir).expanduser()
        if self.info.is_main:
            path = resolve_model(config.model_id, cache, config.trust_remote_code)
        barrier()
        if not self.info.is_main:
            path = resolve_model(config.model_id, cache, config.trust_remote_code)
        return path

    def _build_model(self) -> None:
        config, info = self.config, self.info
        model_dir = self._model_dir()
        if config.multimodal:
            check_image_size(model_dir, config.image_size)
        self.processor = load_processor(model_dir, config.multimodal, config.trust_remote_code)
        self.tokenizer = tokenizer_of(self.processor)
        if self.tokenizer.pad_token_id is None:  # GPT-2-style tokenizers (the original did the same)
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = load_base_model(model_dir, config.multimodal, config.trust_remote_code)
        self.ids = add_latent_tokens(self.tokenizer)  # every run, as the original
        base, rows_trained = self._load_weights(base, Path(model_dir))
        rows = [self.ids.start, self.ids.latent, self.ids.end]
        # Coconut and pause runs give the tokens rows, from "<<", after loading, as the original; rows a
        # coconut or pause run trained (resume, or a checkpoint of such a run) are kept.
        if config.uses_markers and not (rows_trained and max(rows) < base.get_input_embeddings().weight.shape[0]):
            init_latent_rows(base, self.tokenizer, self.ids)
        freeze(base, config)
        if config.uses_lora:
            apply_lora(base, config, self.ids if config.uses_markers else None)
            if self.resume_from is not None:
                load_adapter(base, model_dir)
        decoder_layers = base.get_decoder().layers
        if config.activation_checkpointing:
            enable_latent_checkpointing(decoder_layers)
        self.base, self.decoder_layers = base, decoder_layers
        # Several ranks under FSDP: synced_gpus makes every rank run the same passes and steps.
        model = Coconut(
            base,
            self.ids.latent,
            self.ids.start,
            self.ids.end,
            self.tokenizer.eos_token_id,
            self.tokenizer.pad_token_id,
            feed_thoughts=config.feeds_thoughts,
            synced_gpus=info.distributed,
            compile_latent_passes=config.compile_latent_passes,
            decode_cuda_graph=config.decode_cuda_graph,
        ).to(info.device)
        dtype = mixed_precision_dtype(config.bf16, config.fp16)
        if info.distributed:
            vision = base.model.vision_tower.encoder.layer if config.multimodal else None
            shard(model, decoder_layers, vision, dtype, device_mesh(config.fsdp_shard_size, info.device))
        self.model = model
        # One process has no FSDP mixed-precision policy: autocast gives the same bf16 compute.
        use_autocast = dtype is not None and not info.distributed
        self.autocast: Callable = (
            (lambda: torch.autocast(info.device.type, dtype=dtype)) if use_autocast else contextlib.nullcontext
        )
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=config.fp16)

    def _load_weights(self, base: Any, model_dir: Path) -> tuple[Any, bool]:
        """The model with the weights this run starts from, and whether they trained the latent rows.

        A resumed checkpoint's adapters are restored later, exactly (after apply_lora); those of a LoRA
        checkpoint that starts another run (load_model_path) are merged into its weights now.
        """
        path = self.config.load_model_path
        if self.resume_from is None and path and ckpt.model_dir_of(path) is None:  # a bare state-dict file
            return base, ckpt.load_weights(base, ckpt.load_state_dict_file(path), path, self.ids)
        source = read_saved_run(model_dir)
        if self.resume_from is not None:
            saved = source.config.lora_settings() if source is not None else self.config.lora_settings()
            if (source is not None and source.config.uses_lora or self.config.uses_lora) and (
                saved != self.config.lora_settings()
            ):
                changed = [k for k in saved if saved[k] != getattr(self.config, k)]
                raise ckpt.CheckpointError(
                    f"{model_dir}: saved by a run with other LoRA keys ({', '.join(changed)}); "
                    "resume with the same values, or start a new run from it (load_model_path)"
                )
        elif has_adapter(model_dir):
            base = merge_adapter(base, model_dir)
        return base, latent_rows_trained(source)

    def _load_split(self, path: str, max_size: int | None) -> Split:
        config = self.config
        records = load_records(path)[:max_size]
        if config.multimodal:
            base, media = tokenize_mm_records(
                records, path, self.tokenizer, ImageTokens.from_processor(self.processor), config
            )
        else:
            base, media = tokenize_records(records, self.tokenizer, path), {}
        max_length = config.max_length or self.base.config.get_text_config().max_position_embeddings
        return Split(path, records, drop_overlong(base, config, self.ids, max_length, path), media)

    def _collator(self) -> MyCollator:
        cls = MultimodalCollator if self.config.multimodal else MyCollator
        return cls(self.tokenizer.pad_token_id, self.ids.latent, column_multiple=self.config.latent_column_multiple)

    # --- the run ------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            if self.writes:  # stop signals are handled only where a checkpoint can be written
                stack.enter_context(run_lock(self.save_dir, self.info.is_main, self._print))
                stack.enter_context(self.stop)
            stack.callback(self._close_output)  # also when an error unwinds: its message starts on a line of its own
            self._execute()
        return {"epochs": self.metrics, "save_dir": str(self.save_dir)}

    def _execute(self) -> None:
        config = self.config
        set_seed(config.seed)
        self._find_resume()
        self._build_model()
        debug = config.debug
        self.val = self._load_split(config.val_path, DEBUG_VAL_SIZE if debug else None)
        self.train = (
            None if config.only_eval else self._load_split(config.train_path, DEBUG_TRAIN_SIZE if debug else None)
        )
        self.collate = self._collator()
        self._start_summary()
        self._open_output()
        optimizer = None
        if self.unevaluated:
            done = self.state.epoch
            record = {"epoch": done, "stage": config.stage(done - 1), "train_loss": self.state.train_loss}
            self.state.best_acc = max(self.state.best_acc, self._evaluate(record))
        for epoch in range(self.state.epoch, config.num_epochs):
            stage = config.stage(epoch)
            record: dict[str, Any] = {"epoch": epoch + 1, "stage": stage}
            if not config.only_eval:
                optimizer = self._optimizer_for(optimizer)
                record["train_loss"] = self.state.train_loss = self._train_epoch(epoch, stage, optimizer)
                self.state.epoch, self.state.batch = epoch + 1, 0
                if not config.save_only_improve:
                    path = self._save(optimizer, announce=not self.stopping)
                    if self.stopping:  # agreed at the epoch's end: the rerun starts with this epoch's evaluation
                        raise Preempted(self._stopped(f"saved {path}"))
            accuracy = self._evaluate(record)
            if config.only_eval:
                break
            if config.save_only_improve and accuracy > self.state.best_acc:
                self.state.best_acc = accuracy
                self._save(optimizer, accuracy)
            self.state.best_acc = max(self.state.best_acc, accuracy)
        self._end_summary()

    def _evaluate(self, record: dict[str, Any]) -> float:
        """Validation loss and generation accuracy at the record's stage, reported; returns the accuracy."""
        stage = record["stage"]
        record["val_loss"] = self._val_loss(stage)
        result = self._generate(stage)
        release_gathered(self.model)  # no backward resharded what these forwards gathered
        record.update(
            accuracy=result.accuracy,
            cot_match=result.cot_match,
            written_cot_match=result.written_cot_match,
            correct=result.correct,
            total=result.total,
        )
        if self.info.is_main:  # eval-only and debug runs too
            write_predictions(self.save_dir / PREDICTIONS_DIR / f"epoch_{record['epoch']}.jsonl", result.predictions)
        self._report(record, result.examples(GENERATIONS_TABLE_ROWS))
        return result.accuracy

    def _optimizer_for(self, optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer:
        """One AdamW for the whole run, or with reset_optimizer a fresh one at every epoch.

        The original builds its AdamW inside the epoch loop when reset_optimizer is set (its README
        says "when switching stages"; its code resets every epoch, and the code made the results).
        A resumed run takes the checkpoint's optimizer state where it has one.
        """
        if optimizer is not None and not self.config.reset_optimizer:
            return optimizer
        release_gathered(self.model)  # the sharded parameters, not gathered copies of them
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.info.device.type == "cuda" and not self.info.distributed  # fused kernels: plain tensors only
        optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay, fused=fused)
        check_optimizer_params(self.model, optimizer)
        if self.resume_pending:
            self._load_optimizer(optimizer)
        return optimizer

    def _load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        path, state = self.resume_from, self.state
        mid_epoch = ckpt.is_step_checkpoint(path)
        if self.config.reset_optimizer and not mid_epoch:
            return  # the epoch starts with a fresh AdamW, as every epoch of such a run does
        if not state.optimizer_saved:  # saved by a reset_optimizer run, resumed without it
            self._print(
                f"note: {path} holds no optimizer state (its run reset the optimizer every epoch): "
                "a fresh AdamW starts here"
            )
            return
        saved = ckpt.read_optimizer_state(path) if self.info.is_main else {}
        set_optimizer_state_dict(self.model, optimizer, saved, options=self._state_options(load=True))

    def _state_options(self, load: bool = False) -> StateDictOptions:
        return StateDictOptions(
            full_state_dict=True, cpu_offload=True, broadcast_from_rank0=load and self.info.distributed
        )

    # --- one epoch ----------------------------------------------------------------------------
    def _train_epoch(self, epoch: int, stage: int, optimizer: torch.optim.Optimizer) -> float:
        """Train one epoch (the rest of it when resuming mid-epoch); returns its global token-mean loss.

        Micro-batches are taken one optimizer step's window at a time. A single collective per
        step sums the window's label counts (the loss denominator) and the ranks' stop requests,
        so every rank stops at the same step boundary.
        """
        config, info = self.config, self.info
        torch.manual_seed(config.seed + epoch)  # per-epoch streams: a resumed epoch draws the same numbers
        samples = get_cot_latent_dataset(stage, self.train.base, config, self.ids, random.Random(config.seed + epoch))
        dataset = self.train.wrap(samples, config)
        sampler = DistributedSampler(
            dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config.seed
        )
        sampler.set_epoch(epoch)
        order = list(sampler)  # this rank's samples, in this epoch's order
        size, accum = config.batch_size_training, config.gradient_accumulation_steps
        n_batches = math.ceil(len(order) / size)
        schedule = Schedule(config, self.state.first_epoch, steps_per_epoch(n_batches, accum))
        mid_epoch = self.resume_pending and ckpt.is_step_checkpoint(self.resume_from)
        done = self._resume_batch(n_batches) if mid_epoch else 0
        # a resumed epoch skips what it trained already: those samples are never loaded again
        loader = DataLoader(
            dataset,
            batch_size=size,
            sampler=order[done * size :],
            collate_fn=self.collate,
            num_workers=config.num_workers,
            pin_memory=info.device.type == "cuda",
            worker_init_fn=ignore_stop_signals,
        )
        batches = iter(loader)  # draws the workers' seed: before the RNG states are restored, as in the first run
        loss_sum = torch.zeros(2, dtype=torch.float64, device=info.device)  # this rank's summed CE, label count
        if mid_epoch:
            self._restore_rank_part(loss_sum)
        self.resume_pending = False
        self.model.train()
        throughput = _Throughput()
        self.bar.set_description(f"epoch {epoch + 1}/{config.num_epochs} stage {stage}")
        while True:
            window = list(itertools.islice(batches, min(accum, n_batches - done)))
            labels = sum(int((b.labels[:, 1:] != -100).sum()) for b in window)  # on the host copy: no sync
            n_labels, stops = all_reduce_host([labels, float(self.stop.requested)])
            if stops:
                self._stop_in_epoch(optimizer, epoch, done, n_batches, loss_sum)
                break
            if not window:
                break
            ce, out = self._train_window(window, n_labels, throughput)
            loss_sum[0] += ce
            loss_sum[1] += labels
            if info.distributed:
                release_gathered(self.decoder_layers)
            lr = schedule.lr(schedule.position(epoch, done // accum))
            self._optimizer_step(optimizer, lr)
            self.guard.observe(self.state.step, ce, self.grad_norm)
            done += len(window)
            if self.state.step % config.log_every == 0:
                self._log_step(out, ce, n_labels, lr, epoch + done / n_batches, stage, throughput)
            self.bar.update(1)
            # the step that ends an epoch is saved by its epoch checkpoint, unless that waits for evaluation
            if (
                config.save_every_steps
                and self.state.step % config.save_every_steps == 0
                and (done < n_batches or config.save_only_improve)
            ):
                self._save_step(optimizer, epoch, done, loss_sum)
        self.guard.check()
        all_reduce_sum(loss_sum)
        return float(loss_sum[0] / loss_sum[1].clamp(min=1))

    def _resume_batch(self, n_batches: int) -> int:
        """Micro-batches of this epoch that the resumed step checkpoint has trained already."""
        done, accum = self.state.batch, self.config.gradient_accumulation_steps
        if done > n_batches or (done % accum and done != n_batches):
            raise ckpt.CheckpointError(
                f"{self.resume_from / ckpt.STATE_FILE}: key 'batch': {done} is not a step "
                f"boundary of this epoch ({n_batches} micro-batches, accumulation {accum})"
            )
        return done

    def _restore_rank_part(self, loss_sum: torch.Tensor) -> None:
        part = ckpt.read_rank_part(self.resume_from, self.info.rank)
        ckpt.set_rng_state(part["rng"], self.info.device)
        loss_sum.copy_(part["loss_sum"])
        self.scaler.load_state_dict(part["scaler"])

    def _train_window(self, window: list[Batch], n_labels: float, throughput: _Throughput) -> tuple[torch.Tensor, Any]:
        """Forward and backward of one optimizer step's micro-batches; returns this rank's summed CE.

        Each micro-batch's summed CE is divided by (global label count of the whole window ÷ world
        size): FSDP's gradient average over ranks then equals the gradient of the token mean over
        all ranks and accumulation steps, whatever each micro-batch's token count.
        """
        info = self.info
        denominator = max(n_labels, 1.0) / info.world_size
        ce = torch.zeros((), dtype=torch.float64, device=info.device)
        for j, batch in enumerate(window):
            throughput.add(batch)
            if info.distributed:
                self.model.set_requires_gradient_sync(j == len(window) - 1)
            with self.autocast():
                out = self.model(batch.to(info.device), num_items_in_batch=denominator)
            self.scaler.scale(out.loss).backward()
            ce += out.loss.detach().double() * denominator
        return ce, out

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        """Step with the lr given; the gradients' global norm before clipping is kept for the log.

        Under FSDP2 the gradients are DTensors and so is their norm: the norm of the full gradients,
        whose value the log gathers (full_tensor) on every rank alike.
        """
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

    def _log_step(
        self, out: Any, ce: torch.Tensor, n_labels: float, lr: float, epoch: float, stage: int, throughput: _Throughput
    ) -> None:
        """The optimizer step's global token-mean loss, grad norm, throughput over every rank since the last
        log, and thought vs token-embedding norms (rank 0's last micro-batch). A collective: every rank logs.

        epoch: epochs done, fractional (3.25: a quarter into the fourth epoch).
        """
        tokens, samples, elapsed = throughput.take()
        norm = self.grad_norm.full_tensor() if isinstance(self.grad_norm, DTensor) else self.grad_norm
        values = [
            all_reduce_sum(torch.cat([ce.view(1), ce.new_tensor([tokens, samples])])),
            norm.double().view(1),
            out.token_norm.double().view(1),
        ]
        if out.thought_norm is not None:
            values.append(out.thought_norm.double().view(1))
        ce_sum, tokens, samples, grad_norm, token_norm, *thought_norm = torch.cat(values).tolist()  # one sync
        self.guard.check()
        self.guard.logged(self.state.step, ce_sum / max(n_labels, 1.0))
        entry = {
            "train/epoch": epoch,
            "train/stage": stage,
            "train/loss": ce_sum / max(n_labels, 1.0),
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": tokens / elapsed,
            "train/samples_per_s": samples / elapsed,
            "train/token_embedding_norm": token_norm,
        }
        if thought_norm:
            entry["train/thought_norm"] = thought_norm[0]
        self.logger.log(entry, step=self.state.step)

    # --- stopping -----------------------------------------------------------------------------
    def _stop_in_epoch(
        self, optimizer: torch.optim.Optimizer, epoch: int, done: int, n_batches: int, loss_sum: torch.Tensor
    ) -> None:
        """A stop agreed at a step boundary: save this point as a step checkpoint, then stop."""
        if done == n_batches and not self.config.save_only_improve:
            self.stopping = True  # the epoch checkpoint, saved next, holds this point
            return
        if self.newest is not None and self.newest[:2] == (epoch, done):
            raise Preempted(self._stopped(f"{self.newest[2]} already holds this point"))
        path = self._save_step(optimizer, epoch, done, loss_sum, announce=False)  # the stop's line says it
        raise Preempted(self._stopped(f"saved {path}"))

    def _stopped(self, what: str) -> str:
        by = self.stop.signal_name or "a stop signal to another rank"
        return (
            f"stopped by {by} after optimizer step {self.state.step}: {what}; "
            "run the same command again to resume from it"
        )

    # --- output -------------------------------------------------------------------------------
    def _save(
        self, optimizer: torch.optim.Optimizer | None, accuracy: float | None = None, announce: bool = True
    ) -> Path:
        """checkpoint_{epoch} at an epoch boundary. With reset_optimizer it holds no optimizer state:
        the next epoch starts a fresh AdamW anyway, and AdamW's state is twice the fp32 weights."""
        keep_optimizer = optimizer is not None and not self.config.reset_optimizer
        state = dataclasses.replace(self.state, batch=0, ranks=0, optimizer_saved=keep_optimizer, accuracy=accuracy)
        return self._write(
            f"{ckpt.PREFIX}{state.epoch}",
            state,
            optimizer if keep_optimizer else None,
            None,
            self.config.stage(state.epoch - 1),
            announce,
        )

    def _save_step(
        self, optimizer: torch.optim.Optimizer, epoch: int, done: int, loss_sum: torch.Tensor, announce: bool = True
    ) -> Path:
        """step_{S} mid-epoch: also every rank's RNG states, running loss sums and loss scaler."""
        state = dataclasses.replace(
            self.state, epoch=epoch, batch=done, ranks=self.info.world_size, optimizer_saved=True, accuracy=None
        )
        part = {"rng": ckpt.rng_state(self.info.device), "loss_sum": loss_sum.cpu(), "scaler": self.scaler.state_dict()}
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
        config, info = self.config, self.info
        if not self.writes:
            return self.save_dir / name
        self.guard.check()
        options = self._state_options()
        release_gathered(self.model)
        model_state = get_model_state_dict(self.model, options=options)
        model_state = {k.removeprefix(ckpt.WRAPPER_PREFIX): v for k, v in model_state.items()}
        optim_state = None
        if optimizer is not None:
            check_optimizer_params(self.model, optimizer)
            optim_state = get_optimizer_state_dict(self.model, optimizer, options=options)
        ids = {"start": self.ids.start, "latent": self.ids.latent, "end": self.ids.end}

        def write_main(directory: Path) -> None:
            model_dir = directory / ckpt.MODEL_DIR
            ckpt.save_model(self.base, model_dir, model_state)
            self.processor.save_pretrained(model_dir)
            write_saved_run(model_dir, SavedRun(config, state.epoch, stage, ids, data_order(config, info.world_size)))
            if optim_state is not None:
                torch.save(optim_state, directory / ckpt.OPTIMIZER_FILE)

        path = ckpt.write_checkpoint(self.save_dir, name, info.rank, state, write_main, rank_part)
        self.newest = (state.epoch, state.batch, path)
        if info.is_main:
            ckpt.prune(self.save_dir, path, config.save_total_limit)
            if announce:
                self._print(f"saved {path}")
        return path

    def _val_loss(self, stage: int) -> float:
        config = self.config
        samples = get_cot_latent_dataset(stage, self.val.base, config, self.ids, random.Random(config.seed))
        return validation_loss(
            self.model,
            self.val.wrap(samples, config),
            self.collate,
            self.info,
            config.batch_size_eval,
            config.num_workers,
            self.autocast,
        )

    def _generate(self, stage: int) -> Any:
        config = self.config
        questions = get_question_latent_dataset(stage, self.val.base, config, self.ids)
        return generation_accuracy(
            self.model,
            self.val.wrap(questions, config),
            self.collate,
            self.val.records,
            self.tokenizer,
            self.info,
            config,
            stage,
            self.autocast,
        )

    def _report(self, record: dict[str, Any], examples: list[dict[str, Any]]) -> None:
        """An evaluation's metrics line, its sample generations (console: the first few; wandb: a table),
        metrics.jsonl and the curves."""
        self.metrics.append(record)
        if not self.info.is_main:
            return
        if self.writes:
            path = self.save_dir / METRICS_FILE
            try:  # appended, not rewritten through atomic.py: a kill cuts at most this line short, which
                # read_metrics skips and resuming rewrites (_restore_metrics), and earlier lines are never at risk
                with open(path, "a") as f:
                    f.write(json_line(record))
            except OSError as e:
                raise ckpt.CheckpointError(f"could not write {path}: {e.strerror or e}") from None
        self.logger.log_table("eval/generations", examples, step=self.state.step)
        self.logger.log({f"eval/{k}": v for k, v in record.items()}, step=self.state.step)
        if self.writes:
            self.curves.update()

    # --- what the run says ----------------------------------------------------------------------
    def _start_summary(self) -> None:
        """What will run, on what: printed by rank 0 once the model and the data are loaded."""
        config, info = self.config, self.info
        device = str(info.device)
        if info.device.type == "cuda":
            device += f" ({torch.cuda.get_device_name(info.device)})"
        splits = {"train": self.train, "val": self.val} if self.train is not None else {"val": self.val}
        lines = start_lines(
            config,
            world_size=info.world_size,
            device=device,
            weights_dtype=str(next(self.model.parameters()).dtype).removeprefix("torch."),
            parameters=parameter_counts(self.model),
            records={name: (len(split.records), len(split.base)) for name, split in splits.items()},
            steps_per_epoch=self._steps_per_epoch(),
            first_epoch=self.state.first_epoch,
            steps_done=self.state.step,
            save_dir=self.save_dir,
            writes=self.writes,
        )
        self._print("\n".join(lines))
        self._print(media_line(config, {name: split.records for name, split in splits.items()}))

    def _steps_per_epoch(self) -> int:
        """Optimizer steps of one epoch on every rank (the DistributedSampler pads ranks to equal shares)."""
        if self.train is None:
            return 0
        per_rank = math.ceil(len(self.train.base) / self.info.world_size)
        return steps_per_epoch(
            math.ceil(per_rank / self.config.batch_size_training), self.config.gradient_accumulation_steps
        )

    def _open_output(self) -> None:
        """Rank 0: the console, train_log.jsonl (unless debug or eval-only), wandb (unless debug or
        disabled) and the progress bar over the whole run, whose ETA is that of the whole run: tqdm
        without smoothing takes the mean rate since this launch began, evaluations and saves included."""
        config, info = self.config, self.info
        if info.is_main:
            self.console = ConsoleLogger()
            loggers: list[MetricLogger] = [self.console]
            if self.writes:
                loggers.append(JsonlLogger(self.save_dir / TRAIN_LOG_FILE, "train", self.state.step))
                loggers += file_sinks(config.metrics_sinks, self.save_dir, self.state.step)
            wandb = _init_wandb(config, info, self.save_dir)
            if wandb is not None:
                loggers.append(wandb)
            self.logger = MultiLogger(loggers)
        total = 0 if config.only_eval else self._steps_per_epoch() * (config.num_epochs - self.state.first_epoch)
        self.bar = tqdm(
            total=total,
            initial=self.state.step,
            unit="step",
            smoothing=0,
            dynamic_ncols=True,
            disable=not info.is_main or config.only_eval,
        )
        if self.console is not None:
            self.console.bar = self.bar

    def _close_output(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.logger.close()

    def _end_summary(self) -> None:
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
        self._print(
            "\n".join(end_lines(self.metrics, time.perf_counter() - self.started, self.save_dir, checkpoints, files))
        )

    def _print(self, text: str) -> None:
        if self.info.is_main:
            tqdm.write(text)


class _Throughput:
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
