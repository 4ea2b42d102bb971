"""Model and processor loading (converting original InternVL checkpoints), latent tokens and their rows, freeze."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AddedToken, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from dataset import LatentIds
from storage.saved_run import SavedRun
from utils import Config, ConfigError, ModelSetupError

START_LATENT, END_LATENT, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"
# The original initialises new token rows from "<<" (COCONUT issue #41: not from themselves).
INIT_FROM = "<<"


def add_latent_tokens(tokenizer: Any, model: nn.Module | None = None) -> LatentIds:
    """Add COCONUT's three special tokens to the tokenizer; with a model, also give them rows from "<<".

    The original adds them to the tokenizer in every run, and gives them rows only in coconut and
    pause runs (init_latent_rows). A tokenizer that already has them as added special tokens (a
    checkpoint of this project) keeps them; one that has the same strings as ordinary vocabulary is
    an error, since their meaning would silently change.
    """
    names = (START_LATENT, LATENT, END_LATENT)
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    vocab = tokenizer.get_vocab()
    clash = [n for n in names if n in vocab and n not in added]
    if clash:
        raise ModelSetupError(f"tokenizer already has {clash} as ordinary tokens; cannot use them as latent markers")
    new = [n for n in names if n not in vocab]
    if new:
        tokenizer.add_tokens([AddedToken(n, special=True, normalized=False) for n in new], special_tokens=True)
    ids = LatentIds(*(tokenizer.convert_tokens_to_ids(n) for n in names))
    if model is not None:
        init_latent_rows(model, tokenizer, ids)
    return ids


def latent_rows_trained(source: SavedRun | None) -> bool:
    """Whether a loaded model's latent token rows were trained: only by a coconut or pause run.

    A CoT, no_cot or no_thoughts checkpoint has no such rows (or untrained ones, in a padded
    vocabulary), nor has a model this project did not write (source None): a coconut or pause run
    starting from one initialises them from its "<<", as the original does after loading.
    """
    return source is not None and source.config.uses_markers


def grow_embeddings(model: nn.Module, rows: int) -> None:
    """Resize embeddings and head to at least `rows` rows; a padded vocabulary is never shrunk."""
    if rows > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)


def init_latent_rows(model: nn.Module, tokenizer: Any, ids: LatentIds) -> None:
    """Give the three tokens rows in the embeddings and the (untied) head, copied from "<<"'s.

    The original resizes to len(tokenizer) and copies "<<" into the rows (COCONUT issue #41: not
    from themselves). A matrix with more rows than the tokenizer (a padded vocabulary) already has
    rows at those ids, untrained: they are overwritten the same way.
    """
    grow_embeddings(model, len(tokenizer))
    source = tokenizer.encode(INIT_FROM, add_special_tokens=False)[0]
    rows = [ids.start, ids.latent, ids.end]
    matrices = (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    with torch.no_grad():
        for weight in {id(w): w for w in matrices}.values():  # a tied head once
            weight[rows] = weight[source].clone()


def freeze(model: nn.Module, config: Config) -> None:
    """InternVL's fine-tune switches: freeze_backbone (vision tower), freeze_mlp (projector), freeze_llm."""
    parts = {
        "freeze_backbone": lambda m: m.model.vision_tower,
        "freeze_mlp": lambda m: m.model.multi_modal_projector,
        "freeze_llm": lambda m: nn.ModuleList([m.model.language_model, m.lm_head]),
    }
    for key, part in parts.items():
        if getattr(config, key):
            if not hasattr(getattr(model, "model", None), "vision_tower"):
                raise ModelSetupError(f"{key}: only multimodal (InternVL) models have this part")
            part(model).requires_grad_(False)


def check_image_size(model_dir: str | Path, image_size: int) -> None:
    """Tiles must have the vision tower's own size, read from config.json before any weights load.

    Equality, not "a multiple of the patch size": the processor's tokens per tile are fixed by that
    size, and a larger tile gives more vision features than <IMG_CONTEXT> placeholders.
    """
    path = Path(model_dir) / "config.json"
    try:
        vision = json.loads(path.read_text()).get("vision_config") or {}
    except (OSError, ValueError, AttributeError):
        return  # not an InternVL config: loading the model reports it
    native, patch = (
        v[0] if isinstance(v, (list, tuple)) else v for v in (vision.get("image_size"), vision.get("patch_size"))
    )
    if native is not None and image_size != native:
        raise ConfigError(
            f"key 'image_size': {image_size} does not fit the model's vision tower "
            f"(image_size {native}, patch size {patch} in {path}); set image_size: {native}"
        )


def load_processor(model_dir: str | Path, multimodal: bool, trust_remote_code: bool = False) -> Any:
    """AutoProcessor for InternVL (tiling + tokenizer), AutoTokenizer for text-only models.

    trust_remote_code is always passed: left unset, transformers asks on stdin whether to run a directory's
    auto_map code, and a "y" (or a script's piped input) runs it. InternVL never runs it (see load_base_model).
    """
    try:
        if multimodal:
            return AutoProcessor.from_pretrained(model_dir, trust_remote_code=False)
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as e:
        raise _cannot_load("processor" if multimodal else "tokenizer", model_dir, e) from None


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def load_base_model(model_dir: str | Path, multimodal: bool, trust_remote_code: bool = False) -> nn.Module:
    """The HF model with fp32 master weights (mixed precision happens in the trainer).

    trust_remote_code only matters for text-only models with custom code; InternVL is always
    the native class (original-format checkpoints are converted, never executed).
    """
    cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    try:
        return cls.from_pretrained(
            model_dir,
            dtype=torch.float32,
            attn_implementation="sdpa",
            trust_remote_code=trust_remote_code and not multimodal,
        )
    except _LOAD_ERRORS as e:
        raise _cannot_load("model", model_dir, e) from None


# What from_pretrained raises for a directory it cannot use (missing or corrupt files, unknown classes,
# refused remote code); anything else is a bug and keeps its traceback.
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)
_AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def _cannot_load(what: str, model_dir: str | Path, error: Exception) -> ModelSetupError:
    """One line for a failed from_pretrained; transformers' refusal of remote code becomes the config key to set."""
    maps = [name for name in _AUTO_MAP_FILES if "auto_map" in _json_or_empty(Path(model_dir) / name)]
    if maps and "trust_remote_code" in str(error):
        return ModelSetupError(
            f"{model_dir}: cannot load the {what} without running the directory's own code (auto_map in "
            f"{', '.join(maps)}); it runs only with trust_remote_code: true, for text-only models"
        )
    return ModelSetupError(f"{model_dir}: cannot load the {what}: {' '.join(str(error).split())}")


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
