"""Video records: frame sampling, per-frame tiling, prompt layout, errors, and a Coconut forward.

The test writes its own small videos with PyAV (mpeg4 in mp4, which decord reads): every frame
is one solid colour, distinct per frame, so each tile's mean colour tells which frame it came
from. mpeg4 is lossy, so colours are compared with a tolerance and by nearest frame colour.
"""

from __future__ import annotations

import json

import av  # test-only dependency (requirements-test.txt): decord cannot write videos
import decord
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from coconut import Coconut
from dataset import DataError, get_cot_latent_dataset
from modeling.loading import add_latent_tokens
from multimodal.collator_mm import MultimodalCollator
from multimodal.dataset_mm import ImageTokens, MultimodalDataset, frame_indices, get_mm_dataset
from tests.helpers.images import ref_pixel_values
from tests.helpers.runs import mm_config as cfg

pytestmark = pytest.mark.transformers  # exercises transformers' model code (with_transformers.sh)

N_FRAMES = 20
COLOUR_TOL = 10.0  # uint8 units; mpeg4 at this size is off by at most ~5


def colour(i: int) -> np.ndarray:
    """Frame i's solid RGB colour; consecutive frames differ by >= 13 in every channel."""
    return np.array([(i * 37) % 256, (255 - i * 13) % 256, (i * 89 + 40) % 256], dtype=np.uint8)


COLOURS = np.stack([colour(i) for i in range(N_FRAMES)]).astype(np.float64)


def write_video(path, n_frames: int = N_FRAMES, width: int = 64, height: int = 48) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n_frames):
            frame = np.broadcast_to(colour(i), (height, width, 3)).copy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_data(tmp_path, records, videos):
    """records → train.json; videos: {name: (width, height)} written under image_dir/train."""
    image_dir = tmp_path / "media"
    (image_dir / "train").mkdir(parents=True)
    for name, (w, h) in videos.items():
        write_video(image_dir / "train" / name, width=w, height=h)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path, image_dir


def record(video, question="What colour comes first?", **kw):
    return {"question": question, "steps": ["It changes.", "Then red."], "answer": "green", "video": video, **kw}


# The frames InternVL samples from this file's 20-frame videos, worked out by hand from the model card's
# get_index (see test_frame_indices_follow_internvl_get_index): max_frame 19, seg = 19 / n.
INTERNVL_FRAMES = {
    2: [4, 14],  # seg 9.5: int(4.75 + 0), int(4.75 + round(9.5) = 10)
    3: [3, 9, 16],
    4: [2, 7, 12, 16],
    5: [1, 5, 9, 12, 16],
    8: [1, 3, 6, 8, 11, 13, 15, 18],
}


def tile_colours(pixel_values: torch.Tensor) -> np.ndarray:
    """Mean RGB (uint8 scale) of each normalised tile (the model card's ImageNet mean and std)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((pixel_values * std + mean) * 255).mean(dim=(2, 3)).double().numpy()


def assert_tiles_show_frames(pixel_values, frames, tiles_per_frame):
    """Tiles come frame by frame, and each frame's tiles have that frame's colour."""
    got = tile_colours(pixel_values)
    assert got.shape[0] == len(frames) * tiles_per_frame
    for t, rgb in enumerate(got):
        expected = frames[t // tiles_per_frame]
        nearest = int(np.abs(COLOURS - rgb).max(axis=1).argmin())
        assert nearest == expected, (t, rgb, COLOURS[expected])
        assert np.abs(rgb - COLOURS[expected]).max() < COLOUR_TOL, (t, rgb, COLOURS[expected])


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


def frame_lines(tok, image_tokens, ids, tiles_per_frame):
    """The decoded prompt and the image block each Frame line must carry."""
    text = tok.decode(ids)
    block = "<img>" + "<IMG_CONTEXT>" * (image_tokens.per_tile * tiles_per_frame) + "</img>"
    return text, block


def test_decord_reads_the_written_video(tmp_path):
    write_video(tmp_path / "v.mp4")
    reader = decord.VideoReader(str(tmp_path / "v.mp4"))
    assert len(reader) == N_FRAMES
    frames = reader.get_batch(list(range(N_FRAMES))).asnumpy()
    assert frames.shape == (N_FRAMES, 48, 64, 3)
    assert np.abs(frames.reshape(N_FRAMES, -1, 3).mean(1) - COLOURS).max() < COLOUR_TOL


def test_frame_indices_follow_internvl_get_index():
    """InternVL's video sampling (the InternVL3 model card's load_video, as in OpenGVLab/InternVL's chat
    demos): `max_frame = len(vr) - 1`, then get_index without bounds takes start_idx 0, end_idx
    max_frame, `seg_size = float(end_idx - start_idx) / num_segments` and frame
    `int(start_idx + seg_size / 2 + np.round(seg_size * idx))` for idx in range(num_segments).
    Worked by hand: 100 frames, 8 segments: seg 12.375, so 6, 18 (6.1875 + 12), 31 (+ round(24.75) = 25),
    43, 56 (+ round(49.5) = 50, half to even), 68, 80 (+ round(74.25) = 74), 93; segment centres of all
    100 frames, (i + 0.5) * 100 / 8, would give 81 for the seventh. 21 frames, 8 segments: seg 2.5, and
    np.round takes halves to even: round(2.5) = 2, round(7.5) = 8, round(12.5) = 12, round(17.5) = 18.
    A video with fewer frames than segments repeats frames, as get_index does."""
    assert frame_indices(100, 8) == [6, 18, 31, 43, 56, 68, 80, 93]
    assert frame_indices(21, 8) == [1, 3, 6, 9, 11, 13, 16, 19]
    assert frame_indices(5, 8) == [0, 0, 1, 2, 2, 2, 3, 4]
    assert frame_indices(1, 3) == [0, 0, 0]
    assert frame_indices(20, 1) == [9]
    for n, frames in INTERNVL_FRAMES.items():
        assert frame_indices(N_FRAMES, n) == frames


def test_video_frames_tiles_prompt_and_pixels(tmp_path, processor):
    path, image_dir = write_data(tmp_path, [record("train/clip.mp4")], {"clip.mp4": (64, 48)})
    config = cfg(image_dir)  # num_frames 8, video_tiles 1 by default
    tok, tokens = processor.tokenizer, ImageTokens.from_processor(processor)
    samples, media = get_mm_dataset(path, tok, tokens, config)

    frames = [v.frame for v in media[0]]
    assert frames == INTERNVL_FRAMES[8]
    assert all(v.n_tiles == 1 for v in media[0])

    ids = samples[0]["question_tokenized"]
    assert ids.count(tokens.context) == 8 * 1 * tokens.per_tile
    assert ids.count(tokens.start) == ids.count(tokens.end) == 8
    text, block = frame_lines(tok, tokens, ids, 1)
    assert text == "".join(f"Frame{i + 1}: {block}\n" for i in range(8)) + "What colour comes first?\n"
    assert "Frame9" not in text

    sample = MultimodalDataset(samples, media, config, str(path))[0]
    assert sample["num_patches"] == 8
    assert sample["pixel_values"].shape == (8, 3, 56, 56)
    assert_tiles_show_frames(sample["pixel_values"], frames, 1)


def test_video_tiles_tile_each_wide_frame(tmp_path, processor):
    records = [record("train/wide.mp4")]
    path, image_dir = write_data(tmp_path, records, {"wide.mp4": (160, 48)})
    tok, tokens = processor.tokenizer, ImageTokens.from_processor(processor)

    one = get_mm_dataset(path, tok, tokens, cfg(image_dir, num_frames=4))[1]
    assert [v.n_tiles for v in one[0]] == [1] * 4  # video_tiles 1: a wide frame is still one tile

    config = cfg(image_dir, num_frames=4, video_tiles=2)
    per_frame = 3  # 160x48 with up to 2 tiles: a 2x1 grid + thumbnail per frame
    samples, media = get_mm_dataset(path, tok, tokens, config)
    frames = [v.frame for v in media[0]]
    assert frames == INTERNVL_FRAMES[4]
    assert [v.n_tiles for v in media[0]] == [per_frame] * 4

    ids = samples[0]["question_tokenized"]
    assert ids.count(tokens.context) == 4 * per_frame * tokens.per_tile
    text, block = frame_lines(tok, tokens, ids, per_frame)
    assert text.startswith("".join(f"Frame{i + 1}: {block}\n" for i in range(4)))

    sample = MultimodalDataset(samples, media, config, str(path))[0]
    assert sample["num_patches"] == 4 * per_frame
    assert sample["pixel_values"].shape == (4 * per_frame, 3, 56, 56)
    assert_tiles_show_frames(sample["pixel_values"], frames, per_frame)
    # exactly the image tiling of each decoded frame, concatenated frame by frame
    decoded = decord.VideoReader(str(image_dir / "train" / "wide.mp4")).get_batch(frames).asnumpy()
    expected = torch.cat([ref_pixel_values(Image.fromarray(f), input_size=56, max_num=2) for f in decoded])
    torch.testing.assert_close(sample["pixel_values"], expected, rtol=0, atol=0)


def test_record_num_frames_overrides_config(tmp_path, processor):
    records = [
        record("train/clip.mp4", num_frames=3),
        record("train/clip.mp4"),
        record("train/clip.mp4", num_frames=30),
    ]
    path, image_dir = write_data(tmp_path, records, {"clip.mp4": (64, 48)})
    config = cfg(image_dir, num_frames=5)
    tok, tokens = processor.tokenizer, ImageTokens.from_processor(processor)
    samples, media = get_mm_dataset(path, tok, tokens, config)
    assert [v.frame for v in media[0]] == INTERNVL_FRAMES[3]
    assert [v.frame for v in media[1]] == INTERNVL_FRAMES[5]
    # more frames asked than the video has: some repeat, as in InternVL's get_index (seg 19 / 30), and
    # the prompt, the tokens and the pixels agree on all 30
    assert [v.frame for v in media[2]] == [
        0,
        1,
        1,
        2,
        3,
        3,
        4,
        4,
        5,
        6,
        6,
        7,
        8,
        8,
        9,
        10,
        10,
        11,
        11,
        12,
        13,
        13,
        14,
        15,
        15,
        16,
        16,
        17,
        18,
        18,
    ]
    dataset = MultimodalDataset(samples, media, config, str(path))
    for i, n in enumerate([3, 5, 30]):
        ids = samples[i]["question_tokenized"]
        assert ids.count(tokens.context) == n * tokens.per_tile
        text = tok.decode(ids)
        assert f"Frame{n}: <img>" in text and f"Frame{n + 1}:" not in text
        sample = dataset[i]
        assert sample["pixel_values"].shape[0] == sample["num_patches"] == n
        assert_tiles_show_frames(sample["pixel_values"], [v.frame for v in media[i]], 1)


def test_missing_video_names_record_and_path(tmp_path, processor):
    records = [record("train/clip.mp4"), record("train/missing.mp4")]
    path, image_dir = write_data(tmp_path, records, {"clip.mp4": (64, 48)})
    with pytest.raises(DataError, match=r"record 1: video not found: .*missing\.mp4"):
        get_mm_dataset(path, processor.tokenizer, ImageTokens.from_processor(processor), cfg(image_dir))


def test_corrupt_video_names_record_and_path(tmp_path, processor):
    records = [record("train/clip.mp4"), record("train/bad.mp4")]
    path, image_dir = write_data(tmp_path, records, {"clip.mp4": (64, 48)})
    (image_dir / "train" / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match=r"record 1: unreadable video .*bad\.mp4"):
        get_mm_dataset(path, processor.tokenizer, ImageTokens.from_processor(processor), cfg(image_dir))


def test_video_corrupted_after_indexing_fails_in_loading(tmp_path, processor):
    path, image_dir = write_data(tmp_path, [record("train/clip.mp4")], {"clip.mp4": (64, 48)})
    config = cfg(image_dir)
    samples, media = get_mm_dataset(path, processor.tokenizer, ImageTokens.from_processor(processor), config)
    (image_dir / "train" / "clip.mp4").write_bytes(b"not a video at all" * 100)
    with pytest.raises(DataError, match=r"record 0: unreadable video .*clip\.mp4"):
        MultimodalDataset(samples, media, config, str(path))[0]


def test_video_shortened_after_indexing_fails_in_loading(tmp_path, processor):
    path, image_dir = write_data(tmp_path, [record("train/clip.mp4")], {"clip.mp4": (64, 48)})
    config = cfg(image_dir)
    samples, media = get_mm_dataset(path, processor.tokenizer, ImageTokens.from_processor(processor), config)
    write_video(image_dir / "train" / "clip.mp4", n_frames=5)  # sampled frames 6..18 no longer exist
    with pytest.raises(DataError, match=r"record 0: unreadable video .*clip\.mp4"):
        MultimodalDataset(samples, media, config, str(path))[0]


@pytest.mark.parametrize("rel", ["../outside.mp4", "/etc/passwd", "train/link.mp4"])
def test_video_paths_cannot_escape_image_dir(tmp_path, processor, rel):
    path, image_dir = write_data(tmp_path, [record(rel, num_frames=2)], {})
    write_video(tmp_path / "outside.mp4")
    (image_dir / "train" / "link.mp4").symlink_to(tmp_path / "outside.mp4")
    tokens = ImageTokens.from_processor(processor)
    with pytest.raises(DataError, match="escapes image_dir"):
        get_mm_dataset(path, processor.tokenizer, tokens, cfg(image_dir))
    if rel != "/etc/passwd":  # allowed when the config opts in
        samples, media = get_mm_dataset(path, processor.tokenizer, tokens, cfg(image_dir, allow_external_images=True))
        assert [v.frame for v in media[0]] == INTERNVL_FRAMES[2]
        assert samples[0]["question_tokenized"].count(tokens.context) == 2 * tokens.per_tile


def test_coconut_forward_on_video_batch(tmp_path, tiny_model_dir):
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = processor.tokenizer
    ids = add_latent_tokens(tok, model)
    records = [
        record("train/clip.mp4", num_frames=4),
        record("train/wide.mp4", question="Is it wide?"),
        {"question": "No video?", "steps": ["None."], "answer": "yes"},
    ]
    path, image_dir = write_data(tmp_path, records, {"clip.mp4": (64, 48), "wide.mp4": (160, 48)})
    config = cfg(image_dir, num_frames=3, video_tiles=2)
    tokens = ImageTokens.from_processor(processor)
    samples, media = get_mm_dataset(path, tok, tokens, config)
    stage = get_cot_latent_dataset(1, samples, config, ids)  # first step → one continuous thought
    dataset = MultimodalDataset(stage, media, config, str(path))
    batch = MultimodalCollator(tok.pad_token_id, ids.latent)([dataset[i] for i in range(3)])
    assert batch.num_patches.tolist() == [4 * 1, 3 * 3, 0]  # 64x48 → 1 tile, 160x48 → 2 + thumbnail
    assert batch.pixel_values.shape == (13, 3, 56, 56)
    assert (batch.input_ids == tokens.context).sum(1).tolist() == [4 * 4, 9 * 4, 0]
    assert (batch.input_ids == ids.latent).sum(1).tolist() == [1, 1, 1]

    coconut = Coconut(model, ids.latent, ids.start, ids.end, tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision_inputs = []
    model.model.vision_tower.register_forward_pre_hook(
        lambda m, args, kwargs: vision_inputs.append((args[0] if args else kwargs["pixel_values"]).shape[0]),
        with_kwargs=True,
    )
    out = coconut(batch)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    assert vision_inputs == [13]  # all frame tiles of the batch through the vision tower once
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "vision_tower" in n and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
