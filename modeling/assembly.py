"""The one model assembly: tokenizer or processor, model (weights, latent rows, LoRA), Coconut and collator.

Training, inference, export and the benchmark build their model here, so a model option is added once.
The config is a run's own (training) or the one a checkpoint recorded (inference, export).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coconut import Coconut
from dataset import LatentIds, MyCollator
from modeling.activation_checkpointing import enable_latent_checkpointing
from modeling.loading import (
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
from storage import checkpoints as ckpt
from storage.saved_run import SAVED_RUN_FILE, read_saved_run
from training.distributed import mixed_precision_dtype
from utils import Config


@dataclasses.dataclass
class Assembly:
    """A model ready to train or answer: what every user of it needs, built together."""

    processor: Any  # InternVL's processor (tiling + tokenizer), or the tokenizer of a text-only model
    tokenizer: Any
    ids: LatentIds
    base: nn.Module  # the HF model inside `model` (LoRA applied), on the device
    model: Coconut
    collate: MyCollator
    autocast: Callable[[], AbstractContextManager]  # the compute precision where no FSDP policy gives it


def assemble(
    config: Config,
    model_dir: str | Path,
    device: torch.device,
    *,
    restore: bool = False,
    training: bool = False,
    distributed: bool = False,
    weights_file: str | None = None,
) -> Assembly:
    """Build the model of `config` from model_dir, on device.

    restore: model_dir's LoRA adapters are loaded as they are (a resumed run, inference) and its
    recorded latent token ids must match the tokenizer; otherwise a new run starts from its weights,
    adapters merged in (a run from a checkpoint, export). training: the run's training switches
    (freeze, activation checkpointing, compiled latent passes, CUDA-graph decoding, latent column
    multiple); without, plain eager inference. distributed: ranks synced, FSDP's policy gives the
    precision (the caller shards). weights_file: a bare state-dict file to load into the weights.
    """
    if config.multimodal:
        check_image_size(model_dir, config.image_size)
    processor = load_processor(model_dir, config.multimodal, config.trust_remote_code)
    tokenizer = tokenizer_of(processor)
    if tokenizer.pad_token_id is None:  # GPT-2-style tokenizers (the original did the same)
        tokenizer.pad_token = tokenizer.eos_token
    base = load_base_model(model_dir, config.multimodal, config.trust_remote_code)
    ids = add_latent_tokens(tokenizer)  # every run, as the original
    base, rows_trained = _load_weights(base, Path(model_dir), config, ids, restore, weights_file)
    rows = [ids.start, ids.latent, ids.end]
    # Coconut and pause runs give the tokens rows, from "<<", after loading, as the original; rows a
    # coconut or pause run trained (resume, or a checkpoint of such a run) are kept.
    if config.uses_markers and not (rows_trained and max(rows) < base.get_input_embeddings().weight.shape[0]):
        init_latent_rows(base, tokenizer, ids)
    if training:
        freeze(base, config)
    if config.uses_lora:
        apply_lora(base, config, ids if config.uses_markers else None)
        if restore:  # the adapters as training left them: not merged
            load_adapter(base, model_dir)
    if training and config.activation_checkpointing:
        enable_latent_checkpointing(base.get_decoder().layers)
    model = coconut_of(
        base,
        ids,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        feed_thoughts=config.feeds_thoughts,
        synced_gpus=distributed,  # several ranks under FSDP: every rank runs the same passes and steps
        compile_latent_passes=config.compile_latent_passes if training else None,
        decode_cuda_graph=training and config.decode_cuda_graph,
    ).to(device)
    dtype = mixed_precision_dtype(config.bf16, config.fp16)
    # One process has no FSDP mixed-precision policy: autocast gives the same bf16 compute.
    use_autocast = dtype is not None and not distributed
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if use_autocast else contextlib.nullcontext
    collator = MultimodalCollator if config.multimodal else MyCollator
    collate = collator(
        tokenizer.pad_token_id, ids.latent, column_multiple=config.latent_column_multiple if training else 1
    )
    return Assembly(processor, tokenizer, ids, base, model, collate, autocast)


def coconut_of(base: nn.Module, ids: LatentIds, eos_token_id: int, pad_token_id: int | None, **options: Any) -> Coconut:
    """The latent loop around a loaded HF model; options are Coconut's (feed_thoughts, synced_gpus, ...)."""
    return Coconut(base, ids.latent, ids.start, ids.end, eos_token_id, pad_token_id, **options)


def _load_weights(
    base: nn.Module, model_dir: Path, config: Config, ids: LatentIds, restore: bool, weights_file: str | None
) -> tuple[nn.Module, bool]:
    """The model with the weights it starts from, and whether they trained the latent rows.

    Restored adapters are loaded later, exactly (after apply_lora); those of a LoRA checkpoint that
    starts another run are merged into its weights now.
    """
    if weights_file is not None:
        return base, ckpt.load_weights(base, ckpt.load_state_dict_file(weights_file), weights_file, ids)
    source = read_saved_run(model_dir)
    if restore:
        saved = source.config.lora_settings() if source is not None else config.lora_settings()
        if (source is not None and source.config.uses_lora or config.uses_lora) and saved != config.lora_settings():
            changed = [k for k in saved if saved[k] != getattr(config, k)]
            raise ckpt.CheckpointError(
                f"{model_dir}: saved by a run with other LoRA keys ({', '.join(changed)}); "
                "resume with the same values, or start a new run from it (load_model_path)"
            )
        recorded = source.latent_token_ids if source is not None else dataclasses.asdict(ids)
        wrong = {k: v for k, v in recorded.items() if v != getattr(ids, k)}
        if wrong:
            raise ckpt.CheckpointError(
                f"{model_dir / SAVED_RUN_FILE}: latent token ids {wrong} do not match the tokenizer"
            )
    elif has_adapter(model_dir):
        base = merge_adapter(base, model_dir)
    return base, latent_rows_trained(source)
