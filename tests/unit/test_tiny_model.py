"""The tiny checkpoint must behave like a real native InternVL checkpoint, offline and reproducibly."""

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    InternVLForConditionalGeneration,
    InternVLProcessor,
)

from multimodal import tiny_model
from multimodal.tiny_model import (
    COMPLETE_MARKER,
    TINY_IMAGE_SEQ_LENGTH,
    build_tiny_model,
    build_tiny_tokenizer,
    ensure_tiny_model,
)
from storage import atomic

pytestmark = pytest.mark.transformers  # exercises transformers' model code (with_transformers.sh)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> InternVLForConditionalGeneration:
    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path) -> InternVLProcessor:
    return AutoProcessor.from_pretrained(tiny_model_dir)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def test_loads_with_auto_classes(model, processor, tiny_model_dir: Path) -> None:
    assert isinstance(model, InternVLForConditionalGeneration)
    assert isinstance(processor, InternVLProcessor)
    assert type(processor.image_processor).__name__ == "GotOcr2ImageProcessor"
    assert processor.image_seq_length == TINY_IMAGE_SEQ_LENGTH == 4
    cfg = model.config
    assert cfg.tie_word_embeddings is False and cfg.text_config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert cfg.vision_config.use_mean_pooling and cfg.downsample_ratio == 0.5
    assert cfg.text_config.vocab_size == len(AutoTokenizer.from_pretrained(tiny_model_dir))


def test_image_token_id_matches_tokenizer(model, processor) -> None:
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.context_image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert processor.image_token_id == model.config.image_token_id
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok.padding_side == "right"


def test_processor_expands_image_per_tile(processor) -> None:
    tok = processor.tokenizer
    wide = Image.new("RGB", (112, 56), (255, 0, 0))  # 2x1 grid + thumbnail = 3 tiles
    square = Image.new("RGB", (40, 40), (0, 0, 255))  # 1 tile
    out = processor(
        text=["<IMG_CONTEXT>\nWhat shape?", "Is it blue? <IMG_CONTEXT>"],
        images=[wide, square],
        padding=True,
        return_tensors="pt",
    )
    assert out["pixel_values"].shape == (4, 3, 56, 56)
    for row, mask, tiles in zip(out["input_ids"], out["attention_mask"], (3, 1)):
        ids = row[mask.bool()].tolist()
        block = [tok.start_image_token_id] + [tok.context_image_token_id] * 4 * tiles + [tok.end_image_token_id]
        start = ids.index(tok.start_image_token_id)
        assert ids[start : start + len(block)] == block
        assert ids.count(tok.context_image_token_id) == 4 * tiles


def test_forward_with_pixel_values(model, processor) -> None:
    image = Image.new("RGB", (56, 56), (0, 255, 0))
    inputs = processor(text=["<IMG_CONTEXT>\nWhat colour?"], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_tokenizer_is_deterministic() -> None:
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab() and 1000 <= len(a) <= 2100
    text = "### 42\nyes, a red circle"
    assert a.encode(text) == b.encode(text) and a.decode(a.encode(text)) == text


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, tiny_model_dir: Path) -> None:
    a, b, c = (build_tiny_model(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    wa, wc = _weights(a), _weights(c)
    assert wa.keys() == wc.keys()
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    cached = _weights(tiny_model_dir)  # the cached seed-0 checkpoint, possibly built earlier
    assert all(torch.equal(wa[k], cached[k]) for k in wa)


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


def test_ensure_rebuilds_interrupted_build(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    leftover = atomic.temp_path(out)  # a build killed before its rename
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    out.mkdir()  # a partial checkpoint without the completion marker
    (out / "config.json").write_text("{}")

    assert ensure_tiny_model(out) == out
    assert (out / COMPLETE_MARKER).exists() and not leftover.exists()
    assert list(tmp_path.iterdir()) == [out]
    assert isinstance(AutoModelForImageTextToText.from_pretrained(out), InternVLForConditionalGeneration)

    seed0 = _weights(out)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    ensure_tiny_model(out)  # complete: no rebuild
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    ensure_tiny_model(out, seed=1)  # another seed: rebuilt in place
    seed1 = _weights(out)
    assert any(not torch.equal(seed0[k], seed1[k]) for k in seed0)
    assert list(tmp_path.iterdir()) == [out]


def test_cli_writes_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["tiny_model", str(tmp_path / "cli"), "--seed", "3"])
    tiny_model.main()
    assert isinstance(AutoProcessor.from_pretrained(tmp_path / "cli"), InternVLProcessor)
