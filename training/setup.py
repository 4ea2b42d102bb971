"""A run's set-up: where its weights come from, its model (the one assembly, sharded over the ranks), its data."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dataset import drop_overlong, load_records, tokenize_records
from modeling.assembly import Assembly, assemble
from multimodal.convert import resolve_model
from multimodal.dataset_mm import ImageTokens, MultimodalDataset, tokenize_mm_records
from storage import checkpoints as ckpt
from training.checkpointer import Resume
from training.distributed import DistInfo, barrier, device_mesh, mixed_precision_dtype, shard
from utils import Config

DEBUG_TRAIN_SIZE, DEBUG_VAL_SIZE = 5000, 32  # the original's debug subset sizes


def build_model(config: Config, info: DistInfo, resume: Resume | None) -> Assembly:
    """The run's model on its device: resumed, from load_model_path, or the base model; sharded over the ranks."""
    load = config.load_model_path
    bare_file = resume is None and load and ckpt.model_dir_of(load) is None  # a bare state-dict file
    parts = assemble(
        config,
        _model_dir(config, info, resume),
        info.device,
        restore=resume is not None,
        training=True,
        distributed=info.distributed,
        weights_file=load if bare_file else None,
    )
    if info.distributed:
        vision = parts.base.model.vision_tower.encoder.layer if config.multimodal else None
        dtype = mixed_precision_dtype(config.bf16, config.fp16)
        mesh = device_mesh(config.fsdp_shard_size, info.device)
        shard(parts.model, parts.base.get_decoder().layers, vision, dtype, mesh)
    return parts


def _model_dir(config: Config, info: DistInfo, resume: Resume | None) -> str:
    if resume is not None:
        return str(ckpt.model_dir_of(resume.path))
    if config.load_model_path and ckpt.model_dir_of(config.load_model_path):
        return str(ckpt.model_dir_of(config.load_model_path))
    # rank 0 converts an original-format checkpoint once; the others then find it cached
    cache = Path(config.model_cache_dir).expanduser()
    if info.is_main:
        path = resolve_model(config.model_id, cache, config.trust_remote_code)
    barrier()
    if not info.is_main:
        path = resolve_model(config.model_id, cache, config.trust_remote_code)
    return path


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


def load_split(config: Config, parts: Assembly, path: str, max_size: int | None) -> Split:
    """A data file's records (the first max_size), tokenized; samples over max_length dropped."""
    records = load_records(path)[:max_size]
    if config.multimodal:
        image_tokens = ImageTokens.from_processor(parts.processor)
        base, media = tokenize_mm_records(records, path, parts.tokenizer, image_tokens, config)
    else:
        base, media = tokenize_records(records, parts.tokenizer, path), {}
    max_length = config.max_length or parts.base.config.get_text_config().max_position_embeddings
    return Split(path, records, drop_overlong(base, config, parts.ids, max_length, path), media)
