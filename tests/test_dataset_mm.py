"""Multimodal data path: image-block expansion, prompt formats, collation, and image errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from dataset import DataError, LatentIds, get_cot_latent_dataset
from multimodal.collator_mm import MultimodalCollator
from multimodal.dataset_mm import ImageTokens, MultimodalDataset, get_mm_dataset
from tests.run_helpers import mm_config as cfg


@pytest.fixture()
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


def write_data(tmp_path, records, images):
    image_dir = tmp_path / "images"
    (image_dir / "train").mkdir(parents=True)
    for name, size in images.items():
        Image.new("RGB", size, (200, 30, 30)).save(image_dir / "train" / name)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path, image_dir


RECORDS = [
    {"question": "What shape?", "steps": ["It is a circle."], "answer": "circle", "image": "train/square.png"},
    {"question": "What colour?", "steps": ["It is red."], "answer": "red", "image": "train/wide.png"},
    {"question": "No image?", "steps": ["None."], "answer": "yes"},
    {"question": "Two images?", "steps": ["Both red."], "answer": "yes", "image": ["train/square.png", "train/tall.png"]},
]
IMAGES = {"square.png": (40, 40), "wide.png": (300, 100), "tall.png": (50, 250)}


def test_image_context_count_equals_tiles_times_tokens(tmp_path, processor):
    path, image_dir = write_data(tmp_path, RECORDS, IMAGES)
    config = cfg(image_dir)
    tokens = ImageTokens.from_processor(processor)
    samples, media = get_mm_dataset(path, processor.tokenizer, tokens, config)
    dataset = MultimodalDataset(samples, media, config, str(path))
    expected_tiles = [1, 4, 0, 1 + 6]  # 300x100 → 3x1 grid + thumbnail; 50x250 → 1x5 + thumbnail
    for i, sample in enumerate(dataset):
        ids = sample["input_ids"] if "input_ids" in sample else sample["question_tokenized"]
        assert ids.count(tokens.context) == expected_tiles[i] * tokens.per_tile
        assert sample["num_patches"] == expected_tiles[i]
        n_images = len(media[i])
        assert ids.count(tokens.start) == ids.count(tokens.end) == n_images
        if expected_tiles[i]:
            assert sample["pixel_values"].shape == (expected_tiles[i], 3, 56, 56)
        else:
            assert "pixel_values" not in sample
    assert "<image>" not in processor.tokenizer.get_vocab()
    text = processor.tokenizer.decode(samples[3]["question_tokenized"])
    assert "Image-1: <img>" in text and "Image-2: <img>" in text


def test_prompt_formats(tmp_path, processor):
    path, image_dir = write_data(tmp_path, RECORDS[:1], IMAGES)
    tokens = ImageTokens.from_processor(processor)
    tok = processor.tokenizer
    plain, _ = get_mm_dataset(path, tok, tokens, cfg(image_dir))
    assert tok.decode(plain[0]["question_tokenized"]).endswith("</img>\nWhat shape?\n")
    chat, _ = get_mm_dataset(path, tok, tokens, cfg(image_dir, prompt_format="internvl2_5"))
    text = tok.decode(chat[0]["question_tokenized"])
    # InternVL's template `internvl2_5` (its conversation.py), system turn included, spelled out here
    system = ("<|im_start|>system\n你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
              "多模态大语言模型。<|im_end|>\n")
    assert text.startswith(system + "<|im_start|>user\n<img>")
    assert text.endswith("</img>\nWhat shape?<|im_end|>\n<|im_start|>assistant\n")


def test_collator_concatenates_tiles_in_batch_order(tmp_path, processor):
    path, image_dir = write_data(tmp_path, RECORDS, IMAGES)
    config = cfg(image_dir)
    tok = processor.tokenizer
    tokens = ImageTokens.from_processor(processor)
    samples, media = get_mm_dataset(path, tok, tokens, config)
    ids = LatentIds(start=tok.convert_tokens_to_ids("<img>"), latent=tok.eos_token_id - 1, end=tok.eos_token_id - 2)
    stage = get_cot_latent_dataset(1, samples, config, ids)
    dataset = MultimodalDataset(stage, media, config, str(path))
    items = [dataset[i] for i in (1, 2, 0, 3)]
    batch = MultimodalCollator(tok.pad_token_id, ids.latent)(items)
    assert batch["num_patches_list"].tolist() == [4, 0, 1, 7]
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"], items[3]["pixel_values"]]))
    per_sample = (batch["input_ids"] == tokens.context).sum(1)
    assert per_sample.tolist() == [n * tokens.per_tile for n in [4, 0, 1, 7]]
    no_images = MultimodalCollator(tok.pad_token_id, ids.latent)([items[1]])
    assert no_images["pixel_values"] is None and no_images["num_patches_list"].tolist() == [0]


def test_missing_image_names_record_and_path(tmp_path, processor):
    records = RECORDS[:1] + [{"question": "q", "steps": [], "answer": "a", "image": "train/missing.png"}]
    path, image_dir = write_data(tmp_path, records, IMAGES)
    with pytest.raises(DataError, match=r"record 1: image not found: .*missing\.png"):
        get_mm_dataset(path, processor.tokenizer, ImageTokens.from_processor(processor), cfg(image_dir))


def test_corrupt_image_fails_in_loading_with_record_and_path(tmp_path, processor):
    path, image_dir = write_data(tmp_path, RECORDS[:1], IMAGES)
    config = cfg(image_dir)
    samples, media = get_mm_dataset(path, processor.tokenizer, ImageTokens.from_processor(processor), config)
    data = (image_dir / "train" / "square.png").read_bytes()
    (image_dir / "train" / "square.png").write_bytes(data[: len(data) // 2])  # truncated after indexing
    with pytest.raises(DataError, match=r"record 0: .*square\.png"):
        MultimodalDataset(samples, media, config, str(path))[0]


def test_unreadable_image_named_at_build_time(tmp_path, processor):
    path, image_dir = write_data(tmp_path, RECORDS[:1], IMAGES)
    (image_dir / "train" / "square.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"record 0: unreadable image .*square\.png"):
        get_mm_dataset(path, processor.tokenizer, ImageTokens.from_processor(processor), cfg(image_dir))


@pytest.mark.parametrize("rel", ["../outside.png", "/etc/passwd", "train/link.png"])
def test_paths_cannot_escape_image_dir(tmp_path, processor, rel):
    records = [{"question": "q", "steps": [], "answer": "a", "image": rel}]
    path, image_dir = write_data(tmp_path, records, IMAGES)
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (image_dir / "train" / "link.png").symlink_to(tmp_path / "outside.png")
    tokens = ImageTokens.from_processor(processor)
    with pytest.raises(DataError, match="escapes image_dir"):
        get_mm_dataset(path, processor.tokenizer, tokens, cfg(image_dir))
    if rel != "/etc/passwd":  # allowed when the config opts in
        samples, _ = get_mm_dataset(path, processor.tokenizer, tokens, cfg(image_dir, allow_external_images=True))
        assert samples[0]["question_tokenized"].count(tokens.context) == tokens.per_tile


@pytest.mark.parametrize("name", ["rot.jpg", "rot.png"])
def test_exif_rotation_changes_tile_count_consistently(tmp_path, processor, name):
    path, image_dir = write_data(tmp_path, [{"question": "q", "steps": [], "answer": "a", "image": f"train/{name}"}], {})
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: a 300x100 file is seen as 100x300
    Image.new("RGB", (300, 100)).save(image_dir / "train" / name, exif=exif)
    config = cfg(image_dir)
    samples, media = get_mm_dataset(path, processor.tokenizer, ImageTokens.from_processor(processor), config)
    assert media[0][0].n_tiles == 4  # 1x3 grid + thumbnail
    assert MultimodalDataset(samples, media, config, str(path))[0]["pixel_values"].shape[0] == 4
