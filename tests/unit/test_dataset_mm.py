"""Multimodal data path: image-block expansion, prompt formats, tile budgets, collation, image errors."""

from __future__ import annotations

import io
import json
import zlib

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from dataset import DataError, LatentIds, get_cot_latent_dataset
from multimodal.collator_mm import MultimodalCollator
from multimodal.dataset_mm import ImageTokens, MultimodalDataset, get_mm_dataset
from tests.helpers.images import make_image, ref_pixel_values
from tests.helpers.runs import mm_config as cfg

pytestmark = pytest.mark.transformers  # exercises transformers' model code (with_transformers.sh)


@pytest.fixture()
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


def write_data(tmp_path, records, images):
    """records → train.json; images: {name: (width, height)}, each a different noisy gradient, so no two
    images (and no two tiles of one image) have the same pixels."""
    image_dir = tmp_path / "images"
    (image_dir / "train").mkdir(parents=True)
    for name, size in images.items():
        make_image(*size, seed=zlib.crc32(name.encode())).save(image_dir / "train" / name)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path, image_dir


def model_card_pixels(image_dir, names, max_num):
    """The model card's tiling of each named file with `max_num` tiles, concatenated (the reference)."""
    return torch.cat([ref_pixel_values(Image.open(image_dir / "train" / n).convert("RGB"), 56, max_num) for n in names])


RECORDS = [
    {"question": "What shape?", "steps": ["It is a circle."], "answer": "circle", "image": "train/square.png"},
    {"question": "What colour?", "steps": ["It is red."], "answer": "red", "image": "train/wide.png"},
    {"question": "No image?", "steps": ["None."], "answer": "yes"},
    {
        "question": "Two images?",
        "steps": ["Both red."],
        "answer": "yes",
        "image": ["train/square.png", "train/tall.png"],
    },
]
IMAGES = {"square.png": (40, 40), "wide.png": (300, 100), "tall.png": (50, 250)}


def test_image_context_count_equals_tiles_times_tokens(tmp_path, processor):
    path, image_dir = write_data(tmp_path, RECORDS, IMAGES)
    config = cfg(image_dir)
    tokens = ImageTokens.from_processor(processor)
    # a 56 px tile is 4x4 patches of 14 px, pixel-shuffled by 0.5: 4 tokens; the ids are the tokenizer's
    tok = processor.tokenizer
    image_ids = tok.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])
    assert [tokens.start, tokens.context, tokens.end, tokens.per_tile] == image_ids + [4]
    samples, media = get_mm_dataset(path, processor.tokenizer, tokens, config)
    dataset = MultimodalDataset(samples, media, config, str(path))
    # 300x100 → 3x1 grid + thumbnail; record 3's two images share max_tiles 6, 3 each: 50x250 → 1x3 + thumbnail
    expected_tiles = [1, 4, 0, 1 + 4]
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
    system = (
        "<|im_start|>system\n你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
        "多模态大语言模型。<|im_end|>\n"
    )
    assert text.startswith(system + "<|im_start|>user\n<img>")
    assert text.endswith("</img>\nWhat shape?<|im_end|>\n<|im_start|>assistant\n")


def test_collator_concatenates_tiles_in_batch_order(tmp_path, processor):
    """pixel_values holds each sample's tiles in batch order (not record order, not reversed), each
    sample's equal to the model card's tiling of its own files. Every image differs, and so does
    every tile, so any other order shows."""
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
    assert batch.num_patches.tolist() == [4, 0, 1, 5]
    per_sample_pixels = [
        model_card_pixels(image_dir, ["wide.png"], 6),  # record 1
        model_card_pixels(image_dir, ["square.png"], 6),  # record 0 (record 2 has no image)
        model_card_pixels(image_dir, ["square.png", "tall.png"], 3),  # record 3: two images, 6 // 2 tiles each
    ]
    expected = torch.cat(per_sample_pixels)
    assert batch.pixel_values.shape == (10, 3, 56, 56)
    torch.testing.assert_close(batch.pixel_values, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(torch.cat(per_sample_pixels[::-1]), expected)  # reverse sample order would show
    per_sample = (batch.input_ids == tokens.context).sum(1)
    assert per_sample.tolist() == [n * tokens.per_tile for n in [4, 0, 1, 5]]
    no_images = MultimodalCollator(tok.pad_token_id, ids.latent)([items[1]])
    assert no_images.pixel_values is None and no_images.num_patches.tolist() == [0]


def test_several_images_split_the_tile_budget(tmp_path, processor):
    """InternVL's fine-tune (OpenGVLab/InternVL internvl_chat/internvl/train/internvl_chat_finetune.py,
    LazySupervisedDataset.multi_modal_multi_image_get_item) tiles each of a sample's num_image images with
    `max_num=max(1, self.max_dynamic_patch // num_image)`; a single image (multi_modal_get_item) gets
    max_dynamic_patch. With max_tiles 6 a 600x100 (6:1) image becomes: alone 6x1 + thumbnail = 7 tiles;
    one of 2, 3 tiles: 3x1 + thumbnail = 4; one of 3, 2 tiles: 2x1 + thumbnail = 3; one of 7, 6 // 7 = 0
    → 1 tile."""
    records = [
        {"question": "One?", "steps": ["a"], "answer": "1", "image": "train/w.png"},
        {"question": "One in a list?", "steps": ["a"], "answer": "1", "image": ["train/w.png"]},
        {"question": "Two?", "steps": ["a"], "answer": "2", "image": ["train/w.png", "train/v.png"]},
        {"question": "Three?", "steps": ["a"], "answer": "3", "image": ["train/w.png"] * 3},
        {"question": "Seven?", "steps": ["a"], "answer": "7", "image": ["train/w.png"] * 7},
    ]
    path, image_dir = write_data(tmp_path, records, {"w.png": (600, 100), "v.png": (600, 100)})
    config = cfg(image_dir, max_tiles=6)
    tokens = ImageTokens.from_processor(processor)
    samples, media = get_mm_dataset(path, processor.tokenizer, tokens, config)
    expected = [[7], [7], [4, 4], [3, 3, 3], [1] * 7]
    assert [[v.n_tiles for v in media[i]] for i in range(5)] == expected
    dataset = MultimodalDataset(samples, media, config, str(path))
    for i, (names, budget) in enumerate(
        [(["w.png"], 6), (["w.png"], 6), (["w.png", "v.png"], 3), (["w.png"] * 3, 2), (["w.png"] * 7, 1)]
    ):
        assert samples[i]["question_tokenized"].count(tokens.context) == sum(expected[i]) * tokens.per_tile
        expected_pixels = model_card_pixels(image_dir, names, budget)
        torch.testing.assert_close(dataset[i]["pixel_values"], expected_pixels, rtol=0, atol=1e-6)


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


def truncated(image, fmt):
    """The image's file bytes cut in half: the header is intact, the pixel data is not."""
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize("fmt, name", [("PNG", "cut.png"), ("JPEG", "cut.jpg")])
def test_truncated_image_fails_at_build_time(tmp_path, processor, fmt, name):
    """A file whose header reads fine but whose body is cut fails when the data set is built (every
    image is decoded then), naming record and path, not after an epoch in a DataLoader worker."""
    records = RECORDS[:1] + [{"question": "q", "steps": [], "answer": "a", "image": f"train/{name}"}]
    path, image_dir = write_data(tmp_path, records, IMAGES)
    (image_dir / "train" / name).write_bytes(truncated(make_image(300, 200), fmt))
    with Image.open(image_dir / "train" / name) as header_only:
        assert header_only.size == (300, 200)  # what a header check sees: a valid image
    with pytest.raises(DataError, match=rf"record 1: unreadable image .*{name}: corrupt, truncated"):
        get_mm_dataset(path, processor.tokenizer, ImageTokens.from_processor(processor), cfg(image_dir))


def test_first_unreadable_image_in_record_order_is_named(tmp_path, processor):
    """Images decode on threads; the error still names the first bad record, although a later one (an
    empty file) fails at once and the earlier one (a large truncated PNG) only after decoding."""
    records = [
        {"question": "q", "steps": [], "answer": "a", "image": "train/square.png"},
        {"question": "q", "steps": [], "answer": "a", "image": "train/big.png"},
        {"question": "q", "steps": [], "answer": "a", "image": ["train/wide.png", "train/empty.png"]},
    ]
    path, image_dir = write_data(tmp_path, records, IMAGES)
    (image_dir / "train" / "big.png").write_bytes(truncated(make_image(2000, 1500), "PNG"))
    (image_dir / "train" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"record 1: unreadable image .*big\.png"):
        get_mm_dataset(path, processor.tokenizer, ImageTokens.from_processor(processor), cfg(image_dir))


@pytest.mark.parametrize("prompt_format", ["plain", "internvl2_5"])
def test_loading_checks_tokenization_of_the_rendered_prompt(tmp_path, internvl3_tokenizer, prompt_format):
    """The original's check (facebookresearch/coconut dataset.py, get_dataset's "verify" block: record 0's
    whole text tokenized at once equals its pieces' tokens) on the multimodal path, with the real InternVL3
    tokenizer: the whole text is the prompt as the template renders it, each <image> replaced by its
    image block's text, + the steps + "### " + answer. (The builds that pass here pass it: were the whole
    text anything else, such as the bare question, every build would fail.) An empty first step puts
    "\n" after the prompt's final "\n": one token "\n\n" in the whole text, two in the pieces."""
    tok = internvl3_tokenizer
    tokens = ImageTokens(tok.start_image_token_id, tok.context_image_token_id, tok.end_image_token_id, per_tile=4)
    bad = {"question": "What shape?", "steps": ["", "A circle."], "answer": "circle", "image": "train/square.png"}
    path, image_dir = write_data(tmp_path, [bad] + RECORDS, IMAGES)
    config = cfg(image_dir, prompt_format=prompt_format)
    with pytest.raises(DataError, match=rf"^{path}: record 0: tokenizing question, steps and answer apart differs"):
        get_mm_dataset(path, tok, tokens, config)
    path.write_text(json.dumps(RECORDS + [bad]))  # only record 0 is checked, as in the original
    samples, _ = get_mm_dataset(path, tok, tokens, config)
    assert len(samples) == 5 and samples[0]["question_tokenized"].count(tokens.context) == 4


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
    record = {"question": "q", "steps": [], "answer": "a", "image": f"train/{name}"}
    path, image_dir = write_data(tmp_path, [record], {})
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: a 300x100 file is seen as 100x300
    Image.new("RGB", (300, 100)).save(image_dir / "train" / name, exif=exif)
    config = cfg(image_dir)
    samples, media = get_mm_dataset(path, processor.tokenizer, ImageTokens.from_processor(processor), config)
    assert media[0][0].n_tiles == 4  # 1x3 grid + thumbnail
    assert MultimodalDataset(samples, media, config, str(path))[0]["pixel_values"].shape[0] == 4
