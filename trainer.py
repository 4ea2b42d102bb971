"""The training run: model set-up, stage curriculum, optimisation, checkpoints, evaluation, logging."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import checkpoint as ckpt
from coconut import Coconut
from dataset import MyCollator, drop_overlong, get_cot_latent_dataset, get_question_latent_dataset, load_records, tokenize_records
from distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    mixed_precision_dtype,
    release_gathered,
    shard,
    shutdown,
)
from evaluation import PREDICTIONS_DIR, generation_accuracy, to_device, validation_loss, write_predictions
from latent_checkpoint import enable_latent_checkpointing
from model_setup import add_latent_tokens, check_image_size, freeze, load_base_model, load_processor, tokenizer_of
from multimodal.collator_mm import MultimodalCollator
from multimodal.convert import resolve_model
from multimodal.dataset_mm import ImageTokens, MultimodalDataset, tokenize_mm_records
from utils import Config, set_seed

DEBUG_TRAIN_SIZE, DEBUG_VAL_SIZE = 5000, 32  # the original's debug subset sizes
METRICS_FILE = "metrics.jsonl"


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
    """Train (or evaluate) as the config says; returns the per-epoch metrics."""
    info = init_distributed(config.dist_timeout_s)
    try:
        return Run(config, info).execute()
    finally:
        shutdown()


class Run:
    """State of one run; methods are the phases of the original run.py's main()."""

    def __init__(self, config: Config, info: DistInfo) -> None:
        self.config, self.info = config, info
        self.save_dir = Path(config.save_path) / config.name
        self.writes = not (config.debug or config.only_eval)
        self.state = ckpt.TrainState(epoch=config.resume)
        self.resume_from: Path | None = None
        self.metrics: list[dict[str, Any]] = []
        self.unevaluated = False  # the resumed checkpoint's epoch has no metrics line yet

    # --- set-up -------------------------------------------------------------------------------
    def _find_resume(self) -> None:
        """As the original: an existing checkpoint in save_dir means a preempted run; resume from it."""
        if not self.writes:
            return
        if self.info.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(self.save_dir)
        barrier()
        self.resume_from = ckpt.latest_checkpoint(self.save_dir)
        if self.resume_from is not None:
            self.state = ckpt.read_state(self.resume_from)
            self._print(f"resuming from {self.resume_from} (epoch {self.state.epoch}); the `resume` key is ignored")
            self._restore_metrics()

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
        if self.info.is_main:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)

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
        self.ids = add_latent_tokens(self.tokenizer, base)
        path = config.load_model_path
        if path and self.resume_from is None and ckpt.model_dir_of(path) is None:
            ckpt.load_weights(base, ckpt.load_state_dict_file(path), path)
        freeze(base, config)
        decoder_layers = base.get_decoder().layers
        if config.activation_checkpointing:
            enable_latent_checkpointing(decoder_layers)
        self.base, self.decoder_layers = base, decoder_layers
        model = Coconut(base, self.ids.latent, self.ids.start, self.ids.end, self.tokenizer.eos_token_id,
                        self.tokenizer.pad_token_id).to(info.device)
        model.compile_latent_passes = config.compile_latent_passes
        model.decode_cuda_graph = config.decode_cuda_graph
        dtype = mixed_precision_dtype(config.bf16, config.fp16)
        if info.distributed:
            vision = base.model.vision_tower.encoder.layer if config.multimodal else None
            shard(model, decoder_layers, vision, dtype)
            model.synced_gpus = True
        self.model = model
        # One process has no FSDP mixed-precision policy: autocast gives the same bf16 compute.
        use_autocast = dtype is not None and not info.distributed
        self.autocast: Callable = (lambda: torch.autocast(info.device.type, dtype=dtype)) if use_autocast else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=config.fp16)

    def _load_split(self, path: str, max_size: int | None) -> Split:
        config = self.config
        records = load_records(path)[:max_size]
        if config.multimodal:
            base, media = tokenize_mm_records(records, path, self.tokenizer, ImageTokens.from_processor(self.processor), config)
        else:
            base, media = tokenize_records(records, self.tokenizer, path), {}
        max_length = config.max_length or self.base.config.get_text_config().max_position_embeddings
        return Split(path, records, drop_overlong(base, config, self.ids, max_length, path), media)

    def _collator(self) -> MyCollator:
        cls = MultimodalCollator if self.config.multimodal else MyCollator
        return cls(self.tokenizer.pad_token_id, self.ids.latent, column_multiple=self.config.latent_column_multiple)

    # --- the run ------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        config = self.config
        set_seed(config.seed)
        self._find_resume()
        self._build_model()
        debug = config.debug
        self.val = self._load_split(config.val_path, DEBUG_VAL_SIZE if debug else None)
        self.train = None if config.only_eval else self._load_split(config.train_path, DEBUG_TRAIN_SIZE if debug else None)
        self.collate = self._collator()
        self.logger = _init_wandb(config, self.info)
        optimizer = None
        if self.unevaluated:
            done = self.state.epoch
            record = {"epoch": done, "stage": config.stage(done - 1), "train_loss": self.state.train_loss}
            self.state.best_acc = max(self.state.best_acc, self._evaluate(record))
        for epoch in range(self.state.epoch, config.num_epochs):
            stage = config.stage(epoch)
            record: dict[str, Any] = {"epoch": epoch + 1, "stage": stage}
            if not config.only_eval:
                optimizer = self._optimizer_for(epoch, optimizer)
                record["train_loss"] = self.state.train_loss = self._train_epoch(epoch, stage, optimizer)
                self.state.epoch = epoch + 1
                if not config.save_only_improve:
                    self._save(optimizer)
            accuracy = self._evaluate(record)
            if config.only_eval:
                break
            if config.save_only_improve and accuracy > self.state.best_acc:
                self.state.best_acc = accuracy
                self._save(optimizer)
            self.state.best_acc = max(self.state.best_acc, accuracy)
        if self.logger is not None:
            self.logger.finish()
        return {"epochs": self.metrics, "save_dir": str(self.save_dir)}

    def _evaluate(self, record: dict[str, Any]) -> float:
        """Validation loss and generation accuracy at the record's stage, reported; returns the accuracy."""
        stage = record["stage"]
        record["val_loss"] = self._val_loss(stage)
        result = self._generate(stage)
        record.update(accuracy=result.accuracy, cot_match=result.cot_match, written_cot_match=result.written_cot_match,
                      correct=result.correct, total=result.total)
        if self.info.is_main:  # eval-only and debug runs too
            write_predictions(self.save_dir / PREDICTIONS_DIR / f"epoch_{record['epoch']}.jsonl", result.predictions)
        self._report(record, result.examples)
        return result.accuracy

    def _optimizer_for(self, epoch: int, optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer:
        """A fresh AdamW at the start, and at each new stage with reset_optimizer; resumed state otherwise."""
        config = self.config
        new_stage = epoch > 0 and config.stage(epoch) != config.stage(epoch - 1)
        if optimizer is not None and not (config.reset_optimizer and new_stage):
            return optimizer
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.info.device.type == "cuda" and not self.info.distributed  # fused kernels: plain tensors only
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
        resuming_here = self.resume_from is not None and epoch == self.state.epoch and not (config.reset_optimizer and new_stage)
        if resuming_here:
            saved = ckpt.read_optimizer_state(self.resume_from) if self.info.is_main else {}
            if saved is not None:
                set_optimizer_state_dict(self.model, optimizer, saved, options=self._state_options(load=True))
        return optimizer

    def _state_options(self, load: bool = False) -> StateDictOptions:
        return StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=load and self.info.distributed)

    def _lr_at(self, step: int, total: int) -> float:
        """Optional linear warmup and cosine decay; a pure function of the global step, so resume needs no state."""
        config = self.config
        warmup = int(config.warmup_ratio * total)
        if step < warmup:
            return config.lr * (step + 1) / warmup
        if config.lr_scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return config.lr

    def _train_epoch(self, epoch: int, stage: int, optimizer: torch.optim.Optimizer) -> float:
        config, info = self.config, self.info
        torch.manual_seed(config.seed + epoch)  # per-epoch streams: a resumed epoch draws the same numbers
        samples = get_cot_latent_dataset(stage, self.train.base, config, self.ids, random.Random(config.seed + epoch))
        dataset = self.train.wrap(samples, config)
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=config.batch_size_training, sampler=sampler, collate_fn=self.collate,
                            num_workers=config.num_workers, pin_memory=info.device.type == "cuda")
        accum = config.gradient_accumulation_steps
        steps_per_epoch = math.ceil(len(loader) / accum)
        total_steps = steps_per_epoch * config.num_epochs
        self.model.train()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=info.device)
        window_start, window_tokens, window_samples = time.perf_counter(), 0, 0
        # closed also when an error unwinds, so that its message starts on a line of its own
        with tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{config.num_epochs} stage {stage}",
                  disable=not info.is_main, dynamic_ncols=True) as bar:
            for i, batch in enumerate(loader):
                # counted on the host copy: no device-to-host sync in the step
                window_tokens += int(batch["attention_mask"].sum())
                window_samples += batch["input_ids"].shape[0]
                n_labels = (batch["labels"][:, 1:] != -100).sum().double().to(info.device)
                batch = to_device(batch, info.device)
                n_global = all_reduce_sum(n_labels.clone())
                last_micro = (i + 1) % accum == 0 or i + 1 == len(loader)
                if info.distributed:
                    self.model.set_requires_gradient_sync(last_micro)
                with self.autocast():
                    # summed CE ÷ (global label count ÷ world): FSDP's gradient average then equals the
                    # gradient of the global token mean, whatever each rank's token count
                    out = self.model(**batch, num_items_in_batch=n_global / info.world_size)
                self.scaler.scale(out.loss / accum).backward()
                step_loss = out.loss.detach().double() * n_global / info.world_size
                loss_sum += torch.stack([step_loss, n_labels])
                if last_micro:
                    if info.distributed:
                        release_gathered(self.decoder_layers)
                    lr = self._optimizer_step(optimizer, total_steps)
                    if self.state.step % config.log_every == 0:
                        self._log_step(out, step_loss, n_global, lr, epoch, window_start, window_tokens, window_samples, bar)
                        window_start, window_tokens, window_samples = time.perf_counter(), 0, 0
                bar.update(1)
        all_reduce_sum(loss_sum)
        return float(loss_sum[0] / loss_sum[1].clamp(min=1))

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, total_steps: int) -> float:
        lr = self._lr_at(self.state.step, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if self.config.max_grad_norm > 0:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], self.config.max_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return lr

    def _log_step(self, out: Any, step_loss: torch.Tensor, n_global: torch.Tensor, lr: float, epoch: int,
                  window_start: float, tokens: int, samples: int, bar: tqdm) -> None:
        """Global mean loss of the last micro-batch, throughput, and thought vs token embedding norms."""
        loss = float(all_reduce_sum(step_loss.clone()) / n_global.clamp(min=1))
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        world = self.info.world_size
        entry = {"train/loss": loss, "train/lr": lr, "train/epoch": epoch + 1, "train/step": self.state.step,
                 "train/tokens_per_s": tokens * world / elapsed, "train/samples_per_s": samples * world / elapsed,
                 "train/token_embedding_norm": float(out.token_norm)}
        if out.thought_norm is not None:
            entry["train/thought_norm"] = float(out.thought_norm)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if self.logger is not None:
            self.logger.log(entry, step=self.state.step)

    def _val_loss(self, stage: int) -> float:
        config = self.config
        samples = get_cot_latent_dataset(stage, self.val.base, config, self.ids, random.Random(config.seed))
        return validation_loss(self.model, self.val.wrap(samples, config), self.collate, self.info,
                               config.batch_size_eval, config.num_workers, self.autocast)

    def _generate(self, stage: int) -> Any:
        config = self.config
        questions = get_question_latent_dataset(stage, self.val.base, config, self.ids)
        return generation_accuracy(self.model, self.val.wrap(questions, config), self.collate, self.val.records,
                                   self.tokenizer, self.info, config, stage, self.autocast)

    # --- output -------------------------------------------------------------------------------
    def _save(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Gather full weights and optimizer state (every rank takes part), rank 0 writes."""
        if not self.writes:
            return
        options = self._state_options()
        model_state = get_model_state_dict(self.model, options=options)
        model_state = {k.removeprefix(ckpt.WRAPPER_PREFIX): v for k, v in model_state.items()}
        optim_state = get_optimizer_state_dict(self.model, optimizer, options=options) if optimizer else None
        if self.info.is_main:
            path = ckpt.save_checkpoint(self.save_dir, self.state.epoch, self.base, model_state, self.processor,
                                        optim_state, self.state)
            self._print(f"saved {path}")
        barrier()

    def _report(self, record: dict[str, Any], examples: list[dict[str, str]]) -> None:
        self.metrics.append(record)
        if not self.info.is_main:
            return
        for ex in examples:
            self._print(f"  Q: {ex['question']!r}\n  gold: {ex['answer']!r}  output: {ex['output']!r}  extracted: {ex['extracted']!r}")
        parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()]
        self._print("[eval] " + " ".join(parts))
        if self.logger is not None:
            self.logger.log({f"eval/{k}": v for k, v in record.items()}, step=self.state.step)
        if self.writes:
            with open(self.save_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _print(self, text: str) -> None:
        if self.info.is_main:
            tqdm.write(text)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete records of a metrics.jsonl (none if it is missing); a line a kill cut short is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def _init_wandb(config: Config, info: DistInfo) -> Any:
    """wandb on rank 0 unless debug or disabled (config key wandb_mode, else WANDB_MODE, else online)."""
    mode = config.wandb_mode or os.environ.get("WANDB_MODE", "online")
    if not info.is_main or config.debug or mode == "disabled":
        return None
    import wandb  # imported only when used: it is slow to import and tests never need it

    return wandb.init(project=config.project, name=config.name, config=config.to_dict(), mode=mode)

