"""Original-format InternVL -> native conversion, on a tiny random model (no hub access).

A tiny native InternVLForConditionalGeneration is turned into an original-layout checkpoint by an
independent, hand-written inverse mapping; converting it back must give the same weights and logits,
and its vision path must match a plain-torch re-implementation of the original InternViT + mlp1.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    Qwen2Config,
)

from multimodal import convert
from multimodal.convert import convert_original_checkpoint, is_original_format, resolve_model
from utils import ModelSetupError

pytestmark = pytest.mark.transformers  # exercises transformers' model code (with_transformers.sh)

VISION = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=56, patch_size=14
)
TEXT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
VOCAB_SIZE = 272
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|video_pad|>", "<img>", "</img>", "<IMG_CONTEXT>"]
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")]
TOKENS_PER_TILE = 4  # (56 / 14)^2 * 0.5^2


def _write_tokenizer(directory: Path) -> dict[str, int]:
    """Byte-level BPE in the original repo's files (vocab.json, merges.txt, tokenizer_config.json)."""
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    ids = {token: len(vocab) + i for i, token in enumerate(SPECIALS)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    (directory / "added_tokens.json").write_text(json.dumps(ids))
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in ids.items()
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIALS[1:],
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "bos_token": None,
        "model_max_length": 8192,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.T", None]},
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return ids


def _native_model(image_token_id: int, qk_norm: bool = False) -> InternVLForConditionalGeneration:
    """Tiny native model; every parameter perturbed so any misplaced tensor changes the output."""
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            **VISION, attention_bias=True, use_qk_norm=qk_norm, norm_type="rms_norm" if qk_norm else "layer_norm"
        ),
        text_config=Qwen2Config(
            **TEXT,
            vocab_size=VOCAB_SIZE,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6},
        ),
        image_token_id=image_token_id,
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def _original_state_dict(model: InternVLForConditionalGeneration, qk_norm: bool = False) -> dict[str, torch.Tensor]:
    """Inverse mapping written out key by key (independent of the converter's rules)."""
    sd = {key: value.clone() for key, value in model.state_dict().items()}
    v = "model.vision_tower."
    out = {
        "vision_model.embeddings.class_embedding": sd.pop(v + "embeddings.cls_token"),
        "vision_model.embeddings.position_embedding": sd.pop(v + "embeddings.position_embeddings"),
    }
    for kind in ("weight", "bias"):
        out[f"vision_model.embeddings.patch_embedding.{kind}"] = sd.pop(
            f"{v}embeddings.patch_embeddings.projection.{kind}"
        )
        for index, native in ((0, "layer_norm"), (1, "linear_1"), (3, "linear_2")):
            out[f"mlp1.{index}.{kind}"] = sd.pop(f"model.multi_modal_projector.{native}.{kind}")
    for layer in range(VISION["num_hidden_layers"]):
        n, o = f"{v}encoder.layer.{layer}.", f"vision_model.encoder.layers.{layer}."
        out[o + "ls1"], out[o + "ls2"] = sd.pop(n + "lambda_1"), sd.pop(n + "lambda_2")
        for kind in ("weight", "bias"):
            out[o + f"attn.qkv.{kind}"] = torch.cat([sd.pop(n + f"attention.{p}_proj.{kind}") for p in "qkv"])
            out[o + f"attn.proj.{kind}"] = sd.pop(n + f"attention.projection_layer.{kind}")
            out[o + f"mlp.fc1.{kind}"], out[o + f"mlp.fc2.{kind}"] = (
                sd.pop(n + f"mlp.fc1.{kind}"),
                sd.pop(n + f"mlp.fc2.{kind}"),
            )
        for kind in ("weight",) if qk_norm else ("weight", "bias"):  # RMSNorm has no bias
            out[o + f"norm1.{kind}"] = sd.pop(n + f"layernorm_before.{kind}")
            out[o + f"norm2.{kind}"] = sd.pop(n + f"layernorm_after.{kind}")
        if qk_norm:
            out[o + "attn.q_norm.weight"] = sd.pop(n + "attention.q_norm.weight")
            out[o + "attn.k_norm.weight"] = sd.pop(n + "attention.k_norm.weight")
    out["language_model.lm_head.weight"] = sd.pop("lm_head.weight")
    for key in [k for k in sd if k.startswith("model.language_model.")]:
        out["language_model.model." + key.removeprefix("model.language_model.")] = sd.pop(key)
    assert not sd, f"inverse mapping left native keys unhandled: {sorted(sd)}"
    return out


def _original_config(qk_norm: bool = False, new_spellings: bool = False, dtype: str = "float32") -> dict:
    """config.json as OpenGVLab publishes it (stale generic keys included)."""
    rope = (
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}
        if new_spellings
        else {"rope_theta": 1e6, "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"}}
    )
    dtype_key = "dtype" if new_spellings else "torch_dtype"
    return {
        "model_type": "internvl_chat",
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        },
        "vision_config": {
            "model_type": "intern_vit_6b",
            "architectures": ["InternVisionModel"],
            **VISION,
            "num_channels": 3,
            "qkv_bias": True,
            "qk_normalization": qk_norm,
            "layer_norm_eps": 1e-6,
            "norm_type": "rms_norm" if qk_norm else "layer_norm",
            "hidden_act": "gelu",
            "use_flash_attn": False,
            "drop_path_rate": 0.1,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 0.1,
            dtype_key: dtype,
        },
        "llm_config": {
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            **TEXT,
            "vocab_size": VOCAB_SIZE,
            "hidden_act": "silu",
            **rope,
            "tie_word_embeddings": False,
            "use_cache": False,
            "bos_token_id": 263,
            "eos_token_id": 263,
            "max_window_layers": 70,
            "sliding_window": None,
            "use_sliding_window": False,
            "max_length": 20,
            "do_sample": False,
            "moe_config": None,
            "use_bfloat16": False,
            "_attn_implementation_autoset": True,
            "transformers_version": "4.37.2",
            dtype_key: dtype,
        },
        "downsample_ratio": 0.5,
        "force_image_size": 56,
        "select_layer": -1,
        "ps_version": "v2",
        "template": "internvl2_5",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        dtype_key: dtype,
    }


def _write_original(directory: Path, model: InternVLForConditionalGeneration, config: dict, **kwargs) -> Path:
    directory.mkdir(parents=True)
    _write_tokenizer(directory)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [263, 265], "max_new_tokens": 7}))
    (directory / "modeling_internvl_chat.py").write_text("raise RuntimeError('remote code must never run')\n")
    save_file(_original_state_dict(model, **kwargs), directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("convert")
    ids = _write_tokenizer(root)
    native = _native_model(ids["<IMG_CONTEXT>"])
    src = _write_original(root / "InternVL3-tiny", native, _original_config())
    dst = convert_original_checkpoint(src, root / "converted")
    return {"root": root, "ids": ids, "native": native, "src": src, "dst": dst}


def _inputs(ids: dict[str, int], tiles: int = 2) -> dict[str, torch.Tensor]:
    image = [ids["<img>"]] + [ids["<IMG_CONTEXT>"]] * (TOKENS_PER_TILE * tiles) + [ids["</img>"]]
    input_ids = torch.tensor([[ids["<|im_start|>"], 10, 20, *image, 30, 40, ids["<|im_end|>"]]])
    torch.manual_seed(1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(tiles, 3, 56, 56),
    }


def _original_image_features(
    sd: dict[str, torch.Tensor], pixel_values: torch.Tensor, ratio: float = 0.5
) -> torch.Tensor:
    """OpenGVLab's InternViT (no final norm) + extract_feature (drop CLS, pixel_shuffle v2, mlp1), eval mode."""
    width, heads = VISION["hidden_size"], VISION["num_attention_heads"]
    x = F.conv2d(
        pixel_values,
        sd["vision_model.embeddings.patch_embedding.weight"],
        sd["vision_model.embeddings.patch_embedding.bias"],
        stride=VISION["patch_size"],
    )
    x = x.flatten(2).transpose(1, 2)
    cls = sd["vision_model.embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["vision_model.embeddings.position_embedding"]
    batch, length, _ = x.shape
    for layer in range(VISION["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{layer}."
        h = F.layer_norm(x, (width,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * (width // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        attn = F.linear(
            attn.transpose(1, 2).reshape(batch, length, width), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]
        )
        x = x + attn * sd[p + "ls1"]
        h = F.layer_norm(x, (width,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        mlp = F.linear(
            F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
            sd[p + "mlp.fc2.weight"],
            sd[p + "mlp.fc2.bias"],
        )
        x = x + mlp * sd[p + "ls2"]
    side = int((length - 1) ** 0.5)
    x = x[:, 1:].reshape(batch, side, side, width)
    n, w, h_, c = x.shape  # pixel_shuffle, ps_version "v2"
    x = x.view(n, w, int(h_ * ratio), int(c / ratio)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h_ * ratio), int(w * ratio), int(c / ratio**2)).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, -1, x.shape[-1])
    x = F.layer_norm(x, (x.shape[-1],), sd["mlp1.0.weight"], sd["mlp1.0.bias"])
    return F.linear(F.gelu(F.linear(x, sd["mlp1.1.weight"], sd["mlp1.1.bias"])), sd["mlp1.3.weight"], sd["mlp1.3.bias"])


def test_format_detection(case: dict) -> None:
    assert is_original_format(case["src"])
    assert not is_original_format(case["dst"])
    assert not is_original_format(case["root"])  # no config.json


def test_converted_weights_and_logits_equal_native(case: dict) -> None:
    converted = AutoModelForImageTextToText.from_pretrained(case["dst"]).eval()
    assert type(converted) is InternVLForConditionalGeneration
    native_sd, converted_sd = case["native"].state_dict(), converted.state_dict()
    assert native_sd.keys() == converted_sd.keys()
    for key, value in native_sd.items():
        assert torch.equal(value, converted_sd[key]), key
    inputs = _inputs(case["ids"])
    with torch.no_grad():
        expected = case["native"](**inputs).logits
        actual = converted(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_vision_path_matches_original_reference(case: dict) -> None:
    converted = AutoModelForImageTextToText.from_pretrained(case["dst"]).eval()
    pixel_values = _inputs(case["ids"])["pixel_values"]
    original_sd = _original_state_dict(case["native"])
    with torch.no_grad():
        actual = converted.model.get_image_features(pixel_values=pixel_values).pooler_output
        expected = _original_image_features(original_sd, pixel_values)
    assert actual.shape == (2, TOKENS_PER_TILE, TEXT["hidden_size"])
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_converted_config(case: dict) -> None:
    config = AutoConfig.from_pretrained(case["dst"])
    assert config.model_type == "internvl" and config.architectures == ["InternVLForConditionalGeneration"]
    assert config.tie_word_embeddings is False and config.text_config.tie_word_embeddings is False
    rope = config.text_config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("dynamic", 2.0, 1e6)
    assert config.image_token_id == case["ids"]["<IMG_CONTEXT>"]
    assert config.image_seq_length == TOKENS_PER_TILE and config.downsample_ratio == 0.5
    assert config.vision_feature_layer == -1 and config.vision_config.use_mean_pooling is True
    assert config.vision_config.attention_bias is True and config.vision_config.use_qk_norm is False
    assert config.text_config.use_cache is True and config.text_config.vocab_size == VOCAB_SIZE
    assert config.dtype == torch.float32
    assert not hasattr(config.text_config, "moe_config") and not hasattr(config.text_config, "use_bfloat16")
    generation = json.loads((case["dst"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [263, 265] and generation["max_new_tokens"] == 7
    assert not list(case["dst"].glob("*.py")) and not list(case["dst"].glob("*.tmp-*"))


def test_processor_loads_and_feeds_model(case: dict) -> None:
    processor = AutoProcessor.from_pretrained(case["dst"])
    ids = case["ids"]
    tokenizer = processor.tokenizer
    assert "auto_map" not in json.loads((case["dst"] / "tokenizer_config.json").read_text())
    assert (tokenizer.start_image_token_id, tokenizer.end_image_token_id) == (ids["<img>"], ids["</img>"])
    assert tokenizer.context_image_token_id == ids["<IMG_CONTEXT>"] and tokenizer.video_token == "<|video_pad|>"
    assert len(tokenizer) <= VOCAB_SIZE and processor.image_seq_length == TOKENS_PER_TILE
    image_processor = processor.image_processor
    assert image_processor.crop_to_patches and image_processor.max_patches == 12
    assert image_processor.size["height"] == 56 and list(image_processor.image_mean) == [0.485, 0.456, 0.406]

    image = Image.new("RGB", (112, 56), (200, 30, 90))  # 2:1 -> 2 tiles + thumbnail
    batch = processor(images=[image], text=["<IMG_CONTEXT>\nhello"], return_tensors="pt")
    assert batch["pixel_values"].shape == (3, 3, 56, 56)
    row = batch["input_ids"][0].tolist()
    assert row.count(ids["<IMG_CONTEXT>"]) == 3 * TOKENS_PER_TILE and row[0] == ids["<img>"]
    model = AutoModelForImageTextToText.from_pretrained(case["dst"]).eval()
    with torch.no_grad():
        assert model(**batch).logits.shape == (1, len(row), VOCAB_SIZE)


@pytest.mark.parametrize("storage", ["sharded", "bin"])
def test_bf16_qk_norm_new_spellings(tmp_path: Path, case: dict, storage: str) -> None:
    """dtype/rope_parameters spellings, RMSNorm + qk-norm keys, sharded safetensors or a weights-only .bin."""
    native = _native_model(case["ids"]["<IMG_CONTEXT>"], qk_norm=True).to(torch.bfloat16)
    src = _write_original(tmp_path / "src", native, _original_config(True, True, "bfloat16"), qk_norm=True)
    weights = _original_state_dict(native, qk_norm=True)
    (src / "model.safetensors").unlink()
    if storage == "sharded":
        keys = sorted(weights)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, shard_keys in shards.items():
            save_file({k: weights[k] for k in shard_keys}, src / name, metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        torch.save(weights, src / "pytorch_model.bin")
    dst = convert_original_checkpoint(src, tmp_path / "dst")
    converted = AutoModelForImageTextToText.from_pretrained(dst)
    assert converted.dtype == torch.bfloat16 and converted.config.vision_config.use_qk_norm
    assert converted.config.text_config.rope_parameters["rope_type"] == "dynamic"
    native_sd, converted_sd = native.state_dict(), converted.state_dict()
    assert native_sd.keys() == converted_sd.keys()
    assert all(torch.equal(value, converted_sd[key]) for key, value in native_sd.items())


def _copy_with_weights(case: dict, directory: Path, edit: Callable[[dict[str, torch.Tensor]], Any]) -> Path:
    src = Path(shutil.copytree(case["src"], directory))
    weights = _original_state_dict(case["native"])
    edit(weights)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    return src


def test_leftover_key_is_named(tmp_path: Path, case: dict) -> None:
    src = _copy_with_weights(
        case, tmp_path / "src", lambda w: w.update({"vision_model.encoder.norm.weight": torch.ones(64)})
    )
    with pytest.raises(ValueError, match=r"vision_model\.encoder\.norm\.weight"):
        convert_original_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_missing_key_is_named(tmp_path: Path, case: dict) -> None:
    src = _copy_with_weights(case, tmp_path / "src", lambda w: w.pop("mlp1.3.bias"))
    with pytest.raises(ValueError, match=r"missing: \['model\.multi_modal_projector\.linear_2\.bias'\]"):
        convert_original_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(ps_version="v1"), "ps_version 'v1' is not supported"),
        (lambda c: c.pop("ps_version"), "ps_version 'v1' is not supported"),  # the original code's default
        (lambda c: c["llm_config"].update(model_type="llama"), "only Qwen2"),
        (lambda c: c.update(force_image_size=448), "force_image_size 448 differs"),
        (lambda c: c["llm_config"].update(vocab_size=100), "outside the vocabulary"),
    ],
)
def test_unsupported_configs_rejected(tmp_path: Path, case: dict, edit: Callable[[dict], Any], message: str) -> None:
    src = Path(shutil.copytree(case["src"], tmp_path / "src"))
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        convert_original_checkpoint(src, tmp_path / "dst")


def test_resolve_model_converts_once_and_reuses(tmp_path: Path, case: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    src = Path(shutil.copytree(case["src"], tmp_path / "InternVL3-tiny"))
    cache = tmp_path / "cache"
    calls = []
    real_convert = convert.convert_original_checkpoint
    monkeypatch.setattr(convert, "convert_original_checkpoint", lambda s, d: calls.append(d) or real_convert(s, d))

    first = resolve_model(str(src), cache)
    assert Path(first).parent == cache and not is_original_format(first) and len(calls) == 1
    assert resolve_model(str(src), cache) == first and len(calls) == 1  # reused
    assert resolve_model(first, cache) == first and len(calls) == 1  # native dirs pass through

    (src / "config.json").write_text((src / "config.json").read_text() + "\n")  # source changed
    assert resolve_model(str(src), cache) == first and len(calls) == 2
    AutoModelForImageTextToText.from_pretrained(first)
    assert [p.name for p in cache.iterdir()] == [Path(first).name]  # no temp or stale dirs left

    with pytest.raises(ModelSetupError, match="no such model directory"):
        resolve_model(str(tmp_path / "absent"), cache)


def test_resolve_model_hub_id(tmp_path: Path, case: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub ids go through snapshot_download (faked here), without *.py unless remote code is trusted."""
    requests = []

    def fake_snapshot_download(repo_id: str, ignore_patterns: list[str] | None = None) -> str:
        requests.append((repo_id, ignore_patterns))
        return str(case["src"] if repo_id.endswith("Pretrained") else case["dst"])

    monkeypatch.setattr(convert.huggingface_hub, "snapshot_download", fake_snapshot_download)
    path = resolve_model("OpenGVLab/InternVL3-1B-Pretrained", tmp_path)
    assert Path(path) == tmp_path / "OpenGVLab--InternVL3-1B-Pretrained" and not is_original_format(path)
    assert resolve_model("OpenGVLab/InternVL3-1B-hf", tmp_path, trust_remote_code=True) == str(case["dst"])
    assert requests == [("OpenGVLab/InternVL3-1B-Pretrained", ["*.py"]), ("OpenGVLab/InternVL3-1B-hf", None)]
