"""LoRA through peft with InternVL's keys, and the latent token rows that stay trainable under it.

As InternVL's fine-tune (internvl_chat's wrap_llm_lora / wrap_backbone_lora): `use_llm_lora: R` puts
adapters of rank R on the language model's attention and MLP projections, `use_backbone_lora: R` on the
vision backbone's, with alpha 2R and dropout 0.05 unless the keys say otherwise. A part with adapters has
its own weights frozen (InternVL wraps the whole part with peft, which freezes it: the language model
with its head, or the vision backbone); the other parts keep their freeze flags. The three latent token
rows of the embeddings and the head stay trainable (TrainableRows).

A checkpoint's model/ directory holds the plain weights in from_pretrained's layout (the trained rows
written into their matrices) and model/adapter/ the adapters in peft's own format, so
`PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model/), model/adapter)` is the
trained model, and merging them gives the plain model that --export writes.

peft is imported only here, and only when LoRA is on: it is an optional dependency.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dataset import LatentIds
from utils import CheckpointError, Config, ModelSetupError

ADAPTER_DIR = "adapter"  # inside a model directory: peft's adapter_config.json + adapter_model.safetensors
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before module names in its adapter files


def _peft() -> ModuleType:
    try:
        import peft
    except ImportError:
        raise ModelSetupError(
            "LoRA (use_llm_lora / use_backbone_lora) needs peft, which is not installed: pip install peft"
        ) from None
    return peft


class TrainableRows(nn.Module):
    """An embedding or output head whose matrix is frozen except rows `ids`, held as a parameter of their own.

    The matrix stays the layer's own parameter under its own name (`weight`), so checkpoints and
    from_pretrained see the usual keys; `rows` is the only trainable tensor. Hand-written rather than
    peft's trainable_token_indices, which rebuilds the whole (V, H) matrix with the rows copied in on
    every call from a host list of ids (a host-to-device copy, which a captured CUDA graph forbids):
    here only the outputs of those rows are replaced.
    """

    def __init__(self, layer: nn.Module, ids: list[int], rows: nn.Parameter | None = None) -> None:
        super().__init__()
        if type(layer) not in (nn.Embedding, nn.Linear):
            raise ModelSetupError(
                f"trainable latent rows: expected nn.Embedding or nn.Linear, got {type(layer).__name__}"
            )
        self.is_embedding = isinstance(layer, nn.Embedding)
        self.padding_idx = layer.padding_idx if self.is_embedding else None
        self.weight = layer.weight  # frozen
        self.bias = None if self.is_embedding else layer.bias
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=layer.weight.device), persistent=False)
        # a tied head shares the embedding's rows, as it shares its matrix
        self.rows = rows if rows is not None else nn.Parameter(layer.weight.detach()[ids].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_embedding:  # x: (..., ) token ids
            out = F.embedding(x, self.weight, self.padding_idx)  # (..., H)
            hit = x.unsqueeze(-1) == self.ids  # (..., k)
            new = self.rows[hit.int().argmax(-1)]  # (..., H): the row of the id that matched (row 0 where none did)
            return torch.where(hit.any(-1, keepdim=True), new.to(out.dtype), out)
        out = F.linear(x, self.weight, self.bias)  # (..., V)
        bias = None if self.bias is None else self.bias[self.ids]
        new = F.linear(x, self.rows, bias)  # (..., k)
        return out.index_copy(out.dim() - 1, self.ids, new.to(out.dtype))


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _targets(model: nn.Module, prefix: str, suffixes: list[str], key: str, part: str) -> list[str]:
    """Full names of the linear layers under `prefix` whose names end in one of suffixes (peft's and InternVL's
    matching); a suffix that matches none is an error naming the key."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith(prefix + ".")]
    found = []
    for suffix in suffixes:
        hits = [name for name in linear if name.endswith("." + suffix)]
        if not hits:
            examples = sorted({".".join(name.split(".")[-2:]) for name in linear})[:8]
            raise ModelSetupError(
                f"key '{key}': '{suffix}' names no linear layer of the {part} (its layers end in e.g. {examples})"
            )
        found += hits
    return sorted(set(found))


class _Part(NamedTuple):
    """A part of the model with adapters: its module name, rank, alpha, adapted layers, what freezes."""

    prefix: str
    rank: int
    alpha: int
    targets: list[str]
    frozen: list[nn.Module | None]


def apply_lora(model: nn.Module, config: Config, rows: LatentIds | None) -> None:
    """Put the config's adapters into `model` (in place), freeze the weights of the parts that have them,
    and keep the latent rows (`rows`, for runs that use them) trainable under use_llm_lora."""
    peft = _peft()
    parts = []
    if config.use_llm_lora:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        prefix = _module_name(model, decoder)
        names = _targets(model, prefix, config.llm_lora_target_modules, "llm_lora_target_modules", "language model")
        parts.append(
            _Part(prefix, config.use_llm_lora, config.llm_lora_alpha or 2 * config.use_llm_lora, names, [decoder, head])
        )
    if config.use_backbone_lora:
        vision = getattr(getattr(model, "model", None), "vision_tower", None)
        if vision is None:
            raise ModelSetupError("key 'use_backbone_lora': only multimodal (InternVL) models have a vision backbone")
        prefix = _module_name(model, vision)
        names = _targets(
            model, prefix, config.backbone_lora_target_modules, "backbone_lora_target_modules", "vision backbone"
        )
        parts.append(
            _Part(
                prefix,
                config.use_backbone_lora,
                config.backbone_lora_alpha or 2 * config.use_backbone_lora,
                names,
                [vision],
            )
        )
    # One adapter over both parts, each with its own rank and alpha (peft matches these patterns to module names)
    lora_config = peft.LoraConfig(
        r=parts[0].rank,
        lora_alpha=parts[0].alpha,
        lora_dropout=config.lora_dropout,
        target_modules=[name for part in parts for name in part.targets],
        rank_pattern={rf"{re.escape(part.prefix)}\..*": part.rank for part in parts},
        alpha_pattern={rf"{re.escape(part.prefix)}\..*": part.alpha for part in parts},
    )
    frozen = {id(p) for part in parts for module in part.frozen if module is not None for p in module.parameters()}
    trainable = {id(p): p.requires_grad and id(p) not in frozen for p in model.parameters()}
    peft.inject_adapter_in_model(lora_config, model, ADAPTER_NAME)
    for p in model.parameters():  # peft froze everything but the adapters: parts without them keep their flags
        if id(p) in trainable:
            p.requires_grad_(trainable[id(p)])
    if rows is not None and config.use_llm_lora:
        _train_rows(model, [rows.start, rows.latent, rows.end])


def _train_rows(model: nn.Module, ids: list[int]) -> None:
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    wrapped = TrainableRows(embedding, ids)
    model.set_input_embeddings(wrapped)
    if head is not None:
        model.set_output_embeddings(TrainableRows(head, ids, wrapped.rows if tied else None))


def has_adapter(model_dir: str | Path) -> bool:
    return (Path(model_dir) / ADAPTER_DIR / "adapter_config.json").is_file()


def split_state(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A full state dict of `model` (names as in model.state_dict()) as (the plain model's weights, in
    from_pretrained's layout with trained rows written in; the adapters, in peft's file layout).

    A model without adapters or trainable rows gives (state, {}).
    """
    rows = {name: m for name, m in model.named_modules() if isinstance(m, TrainableRows)}
    lora = set()
    if hasattr(model, "peft_config"):
        layer = _peft().tuners.lora.LoraLayer
        lora = {name for name, m in model.named_modules() if isinstance(m, layer)}
    if not rows and not lora:
        return state, {}
    plain = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in rows:
            if param == "weight":
                ids = rows[module].ids.to(value.device)
                value = value.index_copy(0, ids, state[f"{module}.rows"].to(value))
            if param != "rows":
                plain[key] = value
            continue
        owner = _owner(key, lora)
        if owner is None:
            plain[key] = value
        elif key.startswith(f"{owner}.base_layer."):  # the adapted layer's own weights
            plain[f"{owner}.{key.removeprefix(owner + '.base_layer.')}"] = value
        # else: lora_A, lora_B, the adapter's
    if not lora:
        return plain, {}
    adapter = _peft().get_peft_model_state_dict(
        model, state_dict=state, adapter_name=ADAPTER_NAME, save_embedding_layers=False
    )
    return plain, {PEFT_PREFIX + k: v.contiguous() for k, v in adapter.items()}


def _owner(key: str, modules: set[str]) -> str | None:
    """The module of `modules` that holds parameter `key`, if any."""
    parts = key.split(".")
    return next((owner for i in range(len(parts) - 1, 0, -1) if (owner := ".".join(parts[:i])) in modules), None)


def save_adapter(model: nn.Module, model_dir: str | Path, adapter: dict[str, torch.Tensor]) -> None:
    """Write the adapters as peft does: adapter_config.json + adapter_model.safetensors in model_dir/adapter."""
    out = Path(model_dir) / ADAPTER_DIR
    out.mkdir(parents=True, exist_ok=True)
    model.peft_config[ADAPTER_NAME].save_pretrained(out)
    save_file(adapter, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def load_adapter(model: nn.Module, model_dir: str | Path) -> None:
    """Restore a checkpoint's adapters, exactly, into a model that apply_lora set up the same way."""
    path = Path(model_dir) / ADAPTER_DIR / ADAPTER_WEIGHTS
    try:
        state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(path).items()}
    except Exception as e:  # missing, truncated or corrupt file: safetensors raises several kinds
        raise CheckpointError(f"{path}: unreadable adapter weights: {e}") from None
    own = {k for k in _peft().get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)}
    if set(state) != own:
        odd = sorted(set(state) ^ own)
        raise CheckpointError(
            f"{path}: the adapters do not fit this run's LoRA keys ({len(odd)} tensors differ, first '{odd[0]}')"
        )
    try:
        _peft().set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    except RuntimeError as e:  # load_state_dict's shape mismatch: adapters of another rank
        reason = " ".join(str(e).split())
        raise CheckpointError(f"{path}: the adapters do not fit this run's LoRA keys: {reason}") from None


def merge_adapter(model: nn.Module, model_dir: str | Path) -> nn.Module:
    """The plain model with model_dir's adapters added into its weights, by peft's own merge (what --export
    writes, and what another run starting from a LoRA checkpoint trains on)."""
    peft = _peft()
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 for its deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        adapted = peft.PeftModel.from_pretrained(model, str(Path(model_dir) / ADAPTER_DIR))
    merged = adapted.merge_and_unload()
    if hasattr(merged, "peft_config"):  # unloaded: nothing of peft is left to describe
        del merged.peft_config
    return merged
