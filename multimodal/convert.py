"""One-time conversion of InternVL checkpoints from OpenGVLab's original layout to transformers' native one.

OpenGVLab publishes InternVL3 (e.g. OpenGVLab/InternVL3-1B-Pretrained) in its remote-code format
(model_type "internvl_chat", weights vision_model.* / mlp1.* / language_model.*). transformers'
InternVLForConditionalGeneration (model_type "internvl") cannot load it, and the remote-code model's
forward takes no inputs_embeds, which the latent loop needs. This module rewrites such a checkpoint
once into the native layout (weights, config, processor) and never executes code from a model repo.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import (
    GenerationConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    PreTrainedConfig,
    Qwen2Config,
    Qwen2Tokenizer,
)

from multimodal.internvl import internvl_processor
from storage import atomic
from utils import ModelSetupError, is_local_model_path

ORIGINAL_MODEL_TYPE = "internvl_chat"
MARKER_FILE = "coconut_conversion.json"

# Names InternVLProcessor reads from the tokenizer (both 5.17 and 5.24) -> token text.
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
# The processor also needs a video token; use one already in the vocabulary so the vocab never grows.
VIDEO_TOKEN_CANDIDATES = ("<video>", "<|video_pad|>")

# Original InternViT config keys -> InternVLVisionConfig fields.
_VISION_CONFIG_KEYS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "hidden_act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
    "norm_type": "norm_type",
    "initializer_range": "initializer_range",
    "num_channels": "num_channels",
    "patch_size": "patch_size",
    "image_size": "image_size",
    "qkv_bias": "attention_bias",
    "qk_normalization": "use_qk_norm",
    "attention_dropout": "attention_dropout",
    "dropout": "projection_dropout",
}

_VISION_LAYER = r"vision_model\.encoder\.layers\.(\d+)\."
_NATIVE_VISION_LAYER = r"model.vision_tower.encoder.layer.\1."
# Original key (full match) -> native key. attn.qkv is split separately (see _QKV).
_KEY_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"vision_model\.embeddings\.class_embedding", "model.vision_tower.embeddings.cls_token"),
        (r"vision_model\.embeddings\.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
        (
            r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
            r"model.vision_tower.embeddings.patch_embeddings.projection.\1",
        ),
        (_VISION_LAYER + r"attn\.proj\.(weight|bias)", _NATIVE_VISION_LAYER + r"attention.projection_layer.\2"),
        (_VISION_LAYER + r"attn\.(q_norm|k_norm)\.(weight|bias)", _NATIVE_VISION_LAYER + r"attention.\2.\3"),
        (_VISION_LAYER + r"ls([12])", _NATIVE_VISION_LAYER + r"lambda_\2"),
        (_VISION_LAYER + r"norm1\.(weight|bias)", _NATIVE_VISION_LAYER + r"layernorm_before.\2"),
        (_VISION_LAYER + r"norm2\.(weight|bias)", _NATIVE_VISION_LAYER + r"layernorm_after.\2"),
        (_VISION_LAYER + r"mlp\.(fc[12])\.(weight|bias)", _NATIVE_VISION_LAYER + r"mlp.\2.\3"),
        (r"mlp1\.0\.(weight|bias)", r"model.multi_modal_projector.layer_norm.\1"),
        (r"mlp1\.1\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
        (r"mlp1\.3\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
        (r"language_model\.model\.(.+)", r"model.language_model.\1"),
        (r"language_model\.lm_head\.(weight|bias)", r"lm_head.\1"),
    )
]
_QKV = re.compile(_VISION_LAYER + r"attn\.qkv\.(weight|bias)")


def _read_config(model_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def is_original_format(model_dir: str | Path) -> bool:
    """True when model_dir holds an InternVL checkpoint in OpenGVLab's remote-code layout."""
    config_file = Path(model_dir) / "config.json"
    return config_file.is_file() and _read_config(model_dir).get("model_type") == ORIGINAL_MODEL_TYPE


def _dtype(config: dict[str, Any]) -> str | None:
    """Published configs spell it torch_dtype (older transformers), newer ones dtype."""
    return config.get("dtype") or config.get("torch_dtype")


def _rope_parameters(llm: dict[str, Any]) -> dict[str, Any]:
    """transformers 5.x keeps rope_theta and rope_scaling together in rope_parameters."""
    if llm.get("rope_parameters"):
        return dict(llm["rope_parameters"])
    scaling = dict(llm.get("rope_scaling") or {})
    legacy_type = scaling.pop("type", "default")
    params = {"rope_type": scaling.pop("rope_type", legacy_type), **scaling}
    if "rope_theta" in llm:
        params["rope_theta"] = llm["rope_theta"]
    return params


def _own_fields(config_class: type[PreTrainedConfig]) -> set[str]:
    """A config class's model-specific fields: the original configs carry many stale generic keys."""
    return set(config_class.__dataclass_fields__) - set(PreTrainedConfig.__dataclass_fields__)


def _text_config(llm: dict[str, Any]) -> Qwen2Config:
    if llm.get("model_type") != "qwen2":
        raise ValueError(
            f"only Qwen2 language models are supported, got llm_config.model_type={llm.get('model_type')!r}"
        )
    kwargs = {key: value for key, value in llm.items() if key in _own_fields(Qwen2Config)}
    kwargs["rope_parameters"] = _rope_parameters(llm)
    # The original saves use_cache False (a training setting) and never ties lm_head to the embeddings.
    kwargs.update(use_cache=True, tie_word_embeddings=False, dtype=_dtype(llm))
    return Qwen2Config(**kwargs)


def _vision_config(vision: dict[str, Any], dtype: str | None) -> InternVLVisionConfig:
    kwargs = {native: vision[key] for key, native in _VISION_CONFIG_KEYS.items() if key in vision}
    # The original encoder has no final norm; native skips it only with mean pooling (unused otherwise).
    return InternVLVisionConfig(**kwargs, use_mean_pooling=True, dtype=dtype)


def image_seq_length(image_size: int, patch_size: int, downsample_ratio: float) -> int:
    """Tokens per tile: patch grid squared, shrunk by pixel shuffle."""
    tokens = (image_size // patch_size) ** 2 * downsample_ratio**2
    if not float(tokens).is_integer():
        raise ValueError(
            f"image {image_size}/patch {patch_size} with downsample {downsample_ratio} gives {tokens} tokens"
        )
    return int(tokens)


def _native_config(original: dict[str, Any], image_token_id: int) -> InternVLConfig:
    """Build the native InternVLConfig from an original internvl_chat config.json."""
    ps_version = original.get("ps_version", "v1")  # the original code's default
    if ps_version != "v2":
        raise ValueError(
            f"ps_version {ps_version!r} is not supported: native InternVL implements pixel shuffle 'v2' only"
        )
    vision = original["vision_config"]
    image_size = original.get("force_image_size") or vision["image_size"]
    if image_size != vision["image_size"]:
        raise ValueError(f"force_image_size {image_size} differs from vision_config.image_size {vision['image_size']}")
    dtype = _dtype(original) or _dtype(original["llm_config"])
    downsample_ratio = original.get("downsample_ratio", 0.5)
    return InternVLConfig(
        vision_config=_vision_config(vision, dtype),
        text_config=_text_config(original["llm_config"]),
        image_token_id=image_token_id,
        image_seq_length=image_seq_length(image_size, vision["patch_size"], downsample_ratio),
        downsample_ratio=downsample_ratio,
        vision_feature_layer=original.get("select_layer", -1),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        dtype=dtype,
    )


def load_original_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Read safetensors (single or sharded); a .bin only via torch.load(weights_only=True), never a full pickle."""
    model_dir = Path(model_dir)
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = model_dir / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (model_dir / single_name).is_file():
            files = [single_name]
        else:
            continue
        state_dict: dict[str, torch.Tensor] = {}
        for name in files:
            path = model_dir / name
            if name.endswith(".safetensors"):
                state_dict.update(load_file(path))
            else:
                state_dict.update(torch.load(path, map_location="cpu", weights_only=True))
        return state_dict
    raise FileNotFoundError(f"no model.safetensors(.index.json) or pytorch_model.bin(.index.json) in {model_dir}")


def convert_state_dict(state_dict: dict[str, torch.Tensor], vision_hidden_size: int) -> dict[str, torch.Tensor]:
    """Rename original keys to native ones and split each fused vision qkv row-wise into q/k/v.

    Raises ValueError naming every key no rule covers.
    """
    converted: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        qkv = _QKV.fullmatch(key)
        if qkv:
            if tensor.shape[0] != 3 * vision_hidden_size:
                raise ValueError(f"{key} has {tensor.shape[0]} rows, expected 3 x {vision_hidden_size}")
            layer, kind = qkv.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                converted[f"model.vision_tower.encoder.layer.{layer}.attention.{name}.{kind}"] = part.contiguous()
            continue
        for pattern, replacement in _KEY_RULES:
            if pattern.fullmatch(key):
                converted[pattern.sub(replacement, key)] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"original checkpoint keys with no native counterpart: {sorted(unmapped)}")
    return converted


def _check_against_native(converted: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Every native parameter must be produced exactly once with its shape; name what is off."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong_shape = sorted(
        f"{key}: {tuple(converted[key].shape)} vs native {tuple(expected[key].shape)}"
        for key in set(expected) & set(converted)
        if converted[key].shape != expected[key].shape
    )
    problems = [
        f"{label}: {keys}"
        for label, keys in (("missing", missing), ("left over", unexpected), ("shape mismatch", wrong_shape))
        if keys
    ]
    if problems:
        raise ValueError("converted checkpoint does not match the native InternVL model; " + "; ".join(problems))


def _load_tokenizer(src: Path) -> Qwen2Tokenizer:
    """Load the tokenizer class directly (AutoTokenizer would ask to run the repo's remote code)."""
    vocab = Qwen2Tokenizer.from_pretrained(src).get_vocab()
    missing = [text for text in IMAGE_TOKENS.values() if text not in vocab]
    if missing:
        raise ValueError(f"tokenizer in {src} lacks the InternVL image tokens {missing}")
    video_token = next((text for text in VIDEO_TOKEN_CANDIDATES if text in vocab), None)
    if video_token is None:
        raise ValueError(f"tokenizer in {src} has none of the video tokens {VIDEO_TOKEN_CANDIDATES}")
    # Named *_token kwargs become attributes (and *_id properties) saved into tokenizer_config.json.
    tokenizer = Qwen2Tokenizer.from_pretrained(src, **IMAGE_TOKENS, video_token=video_token)
    tokenizer.init_kwargs.pop("auto_map", None)  # no remote-code pointers in the native copy
    return tokenizer


def _processor(tokenizer: Qwen2Tokenizer, original: dict[str, Any], config: InternVLConfig) -> InternVLProcessor:
    """The original's tiling settings (force_image_size, min/max_dynamic_patch) on the native processor."""
    return internvl_processor(
        tokenizer,
        config.vision_config.image_size[0],
        config.image_seq_length,
        min_tiles=original.get("min_dynamic_patch", 1),
        max_tiles=original.get("max_dynamic_patch", 12),
    )


def convert_original_checkpoint(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Write a native InternVL checkpoint + processor for the original-format src_dir into dst_dir.

    Written into a temporary sibling and renamed, so dst_dir either is complete or does not exist.
    Raises FileExistsError if dst_dir exists (also when a concurrent conversion finished first).
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if not is_original_format(src):
        raise ValueError(f"{src} is not an original-format InternVL checkpoint (model_type {ORIGINAL_MODEL_TYPE!r})")
    if dst.exists():
        raise FileExistsError(dst)
    original = _read_config(src)
    tokenizer = _load_tokenizer(src)
    config = _native_config(original, image_token_id=tokenizer.context_image_token_id)
    if config.image_token_id >= config.text_config.vocab_size:
        raise ValueError(
            f"<IMG_CONTEXT> id {config.image_token_id} is outside the vocabulary ({config.text_config.vocab_size})"
        )

    converted = convert_state_dict(load_original_state_dict(src), config.vision_config.hidden_size)
    with torch.device("meta"):  # no random init of ~1B parameters; real tensors are assigned below
        model = InternVLForConditionalGeneration(config)
    _check_against_native(converted, model)
    model.load_state_dict(converted, strict=True, assign=True)
    if (src / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(src)

    dst.parent.mkdir(parents=True, exist_ok=True)
    # no atomic.remove_leftovers here: a cache may be shared by hosts, whose running conversions this one cannot see
    with atomic.atomic_dir(dst, replace=False) as tmp:  # FileExistsError if another process converted it meanwhile
        model.save_pretrained(tmp)  # safetensors, the only format in transformers 5.x
        _processor(tokenizer, original, config).save_pretrained(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps({"source": str(src.resolve()), "fingerprint": _fingerprint(src)}))
    return dst


def _fingerprint(src: Path) -> list[list[Any]]:
    """Name, size and mtime of the source's config and weight files: detects a changed source."""
    files = sorted(p for p in src.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _is_converted_from(dst: Path, src: Path) -> bool:
    marker = dst / MARKER_FILE
    if not marker.is_file():
        return False
    record = json.loads(marker.read_text())
    return record.get("source") == str(src.resolve()) and record.get("fingerprint") == _fingerprint(src)


def _sanitize(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", model_id.strip("/\\")).strip("-.") or "model"


def resolve_model(model_id: str, cache_dir: str | Path, trust_remote_code: bool = False) -> str:
    """Return a directory that AutoModelForImageTextToText/AutoProcessor load natively.

    Native (or non-InternVL) directories are returned as they are; an original-format InternVL
    checkpoint is converted once into cache_dir/<sanitized model_id> and reused while its source is
    unchanged. A hub id is downloaded first (users' machines only). trust_remote_code only decides
    whether a hub snapshot also fetches the repo's *.py files; nothing here ever runs them.
    Raises ModelSetupError, one line naming model_id, for a missing directory, a hub id that cannot be
    fetched (unknown, or not cached while offline) and a checkpoint the converter refuses.
    """
    local = Path(model_id).expanduser()
    if local.is_dir():
        src = local
    elif is_local_model_path(model_id):
        raise ModelSetupError(f"model_id '{model_id}': no such model directory")
    else:
        try:
            src = Path(
                huggingface_hub.snapshot_download(model_id, ignore_patterns=None if trust_remote_code else ["*.py"])
            )
        except (OSError, ValueError) as e:  # hub errors are OSErrors; a malformed id is a ValueError
            raise ModelSetupError(
                f"model_id '{model_id}': not a local directory, and the hub gives no copy: {_one_line(e)}"
            ) from None
    try:
        if not is_original_format(src):
            return str(src)
        dst = Path(cache_dir) / _sanitize(model_id)
        if _is_converted_from(dst, src):
            return str(dst)
        if dst.exists():  # stale or foreign: move aside atomically, then delete
            atomic.remove_dir(dst)
        try:
            convert_original_checkpoint(src, dst)
        except FileExistsError:
            if not _is_converted_from(dst, src):
                raise
        return str(dst)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        # a malformed original config (missing keys, wrong types), unreadable weights, an unwritable cache
        reason = f"{type(e).__name__}: {_one_line(e)}" if isinstance(e, (KeyError, TypeError)) else _one_line(e)
        raise ModelSetupError(
            f"model_id '{model_id}': cannot convert the original-format InternVL checkpoint "
            f"{src} into {cache_dir}: {reason}"
        ) from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
