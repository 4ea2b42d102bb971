"""Multimodal data path: records with images (or a video) → tokens with expanded image blocks.

`<image>` is only a prompt placeholder: each one becomes <img> + <IMG_CONTEXT> × (tokens per tile
× tiles) + </img> in input_ids. When the data set is built every image is decoded once (on
threads) for its size and tile count, so missing, truncated or corrupt files and over-long samples
fail before training starts; decoding and tiling for training run in DataLoader workers, in
MultimodalDataset.__getitem__. Tile budgets and video frames follow InternVL (see
`image_tile_budget`, `frame_indices`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dataset import DataError, check_tokenization, check_user_text, control_text, load_records, tokenize_sample
from multimodal.prompts import IMAGE_PLACEHOLDER, PROMPT_TEMPLATES
from multimodal.transforms import ImageLoadError, ImageTransform, decoded_size
from utils import Config

# Threads that decode images while the data set is built: Pillow's decoders release the GIL.
_DECODE_THREADS = min(8, os.cpu_count() or 1)
_DECODE_CHUNK = 1024  # images in flight at once (bounds the futures held for very large data sets)


@dataclasses.dataclass(frozen=True)
class ImageTokens:
    """Token ids of an image block, read off the processor (which reads them off the tokenizer)."""

    start: int
    context: int
    end: int
    per_tile: int

    @classmethod
    def from_processor(cls, processor: Any) -> ImageTokens:
        return cls(
            processor.start_image_token_id,
            processor.image_token_id,
            processor.end_image_token_id,
            processor.image_seq_length,
        )

    def block(self, n_tiles: int) -> list[int]:
        return [self.start] + [self.context] * (self.per_tile * n_tiles) + [self.end]


@dataclasses.dataclass(frozen=True)
class Visual:
    """One image (or one video frame) of a record: its file, tile budget and tile count."""

    path: Path
    max_tiles: int
    n_tiles: int
    frame: int | None = None


def resolve_media_path(image_dir: str | Path, rel: str, allow_external: bool, where: str) -> Path:
    """image_dir / rel, refusing paths that escape image_dir (../, absolute, symlinks) unless allowed."""
    root = Path(image_dir).resolve()
    path = (root / rel).resolve()  # resolve() follows symlinks, so a link out of root is caught too
    if not allow_external and not path.is_relative_to(root):
        raise DataError(f"{where}: path '{rel}' escapes image_dir {root} (set allow_external_images: true to allow)")
    return path


def decoded_sizes(images: list[tuple[Path, str]]) -> dict[Path, tuple[int, int]]:
    """Each image's size as the model sees it, from decoding the whole file (see transforms.decoded_size).

    images: (path, where) in record order. Files decode on threads, each once however many records
    use it; the first unreadable one in record order fails, naming the first record that uses it.
    """
    first_use: dict[Path, str] = {}
    for path, where in images:
        first_use.setdefault(path, where)
    paths, sizes = list(first_use), {}
    if not paths:
        return sizes
    with concurrent.futures.ThreadPoolExecutor(min(_DECODE_THREADS, len(paths))) as pool:
        for start in range(0, len(paths), _DECODE_CHUNK):
            chunk = paths[start : start + _DECODE_CHUNK]
            try:
                sizes.update(zip(chunk, pool.map(decoded_size, chunk)))  # map yields (and raises) in order
            except ImageLoadError as e:
                pool.shutdown(wait=False, cancel_futures=True)  # no need to decode the rest
                raise DataError(f"{first_use[e.path]}: unreadable image {e.path}: {e.reason}") from None
    return sizes


def image_tile_budget(max_tiles: int, n_images: int) -> int:
    """Tiles each image of a record may take: InternVL's fine-tune splits max_dynamic_patch among a
    sample's images, `max(1, max_dynamic_patch // num_image)` (internvl_chat_finetune.py)."""
    return max(1, max_tiles // n_images)


@functools.cache
def tiler(image_size: int, max_tiles: int) -> ImageTransform:
    """The tiler of one tile budget, built once: the data set is built with it (tile counts) and read
    with it (pixels), so both agree."""
    return ImageTransform(image_size, max_tiles)


def frame_indices(n_frames: int, num_segments: int) -> list[int]:
    """The frames InternVL samples from a video: the model card's `get_index` over the whole video.

    It cuts frames 0 .. n_frames - 1 (its `max_frame = len(video) - 1`) into num_segments equal
    segments of `seg = max_frame / num_segments` and takes `int(seg / 2 + round(seg * i))` for each
    (numpy's round, half to even, as Python's). A video shorter than num_segments repeats frames, as
    there. E.g. 100 frames, 8 segments: 6, 18, 31, 43, 56, 68, 80, 93.
    """
    seg = (n_frames - 1) / num_segments
    return [int(seg / 2 + round(seg * i)) for i in range(num_segments)]


def _video_frames(path: Path, num_frames: int, where: str) -> tuple[list[int], tuple[int, int]]:
    """The sampled frame indices of a video and its frame size (from decoding frame 0)."""
    reader = _open_video(path, where)
    if len(reader) < 1:
        raise DataError(f"{where}: unreadable video {path}: it has no frames")
    try:
        height, width = reader[0].shape[:2]
    except Exception as e:  # decord raises its own DECORDError
        raise DataError(f"{where}: unreadable video {path}: {e}") from None
    return frame_indices(len(reader), num_frames), (width, height)


def _open_video(path: Path, where: str) -> Any:
    import decord  # only video records need it

    if not path.exists():
        raise DataError(f"{where}: video not found: {path}")
    try:
        return decord.VideoReader(str(path))
    except Exception as e:  # decord raises its own DECORDError for any unreadable file
        raise DataError(f"{where}: unreadable video {path}: {e}") from None


def media_prompt(n_images: int, n_frames: int) -> str:
    """InternVL's placeholder layout: one `<image>`, numbered images, or one line per video frame.

    Video frames are `Frame1: <image>` as the model card's chat and transformers' InternVLProcessor write
    them (the prompt an exported model is served with), not the fine-tune script's `Frame-1: <image>`;
    and the frames are frame_indices' fixed segment midpoints in training too, not its 8-32 random ones:
    training, evaluation and serving see one prompt per video, and a resumed run the same samples."""
    if n_frames:
        return "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_frames))
    if n_images == 1:
        return f"{IMAGE_PLACEHOLDER}\n"
    return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_images))


def question_ids(tokenizer: Any, text: str, blocks: list[list[int]], where: str = "prompt") -> list[int]:
    """Tokenize a prompt, replacing each `<image>` placeholder by its image block."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(blocks):
        raise DataError(
            f"{where}: the prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders for {len(blocks)} images"
        )
    ids = tokenizer.encode(pieces[0], add_special_tokens=True)
    for block, piece in zip(blocks, pieces[1:]):
        ids += block + tokenizer.encode(piece, add_special_tokens=False)
    return ids


class MediaBuilder:
    """Turns one record into (prompt, visuals) for a config's prompt and tiling settings."""

    def __init__(self, config: Config, image_tokens: ImageTokens) -> None:
        self.config = config
        self.image_tokens = image_tokens
        self.template = PROMPT_TEMPLATES[config.prompt_format]

    def image_paths(self, record: dict[str, Any], where: str) -> list[Path]:
        """The record's image files, inside image_dir (unless allowed otherwise) and present."""
        images = record.get("image")
        if images is None:
            return []
        paths = []
        for rel in [images] if isinstance(images, str) else images:
            path = resolve_media_path(self.config.image_dir, rel, self.config.allow_external_images, where)
            if not path.exists():
                raise DataError(f"{where}: image not found: {path}")
            paths.append(path)
        return paths

    def images(self, paths: list[Path], sizes: dict[Path, tuple[int, int]]) -> list[Visual]:
        if not paths:
            return []
        budget = image_tile_budget(self.config.max_tiles, len(paths))
        transform = tiler(self.config.image_size, budget)
        return [Visual(p, budget, transform.num_tiles(*sizes[p])) for p in paths]

    def video(self, record: dict[str, Any], where: str) -> list[Visual]:
        path = resolve_media_path(self.config.image_dir, record["video"], self.config.allow_external_images, where)
        indices, (w, h) = _video_frames(path, record.get("num_frames", self.config.num_frames), where)
        budget = self.config.video_tiles
        n = tiler(self.config.image_size, budget).num_tiles(w, h)
        return [Visual(path, budget, n, frame=i) for i in indices]

    def prompt(self, record: dict[str, Any], visuals: list[Visual]) -> str:
        """The question as the prompt template renders it, one `<image>` per visual."""
        n_frames = sum(v.frame is not None for v in visuals)
        media = media_prompt(len(visuals) - n_frames, n_frames) if visuals else ""
        return self.template.format(media=media, question=record["question"])

    def blocks(self, visuals: list[Visual]) -> list[list[int]]:
        return [self.image_tokens.block(v.n_tiles) for v in visuals]


def get_mm_dataset(
    path: str | Path, tokenizer: Any, image_tokens: ImageTokens, config: Config, max_size: int | None = None
) -> tuple[list[dict[str, Any]], dict[int, list[Visual]]]:
    """Tokenized base samples (as dataset.get_dataset) plus each sample's visuals, keyed by idx."""
    return tokenize_mm_records(load_records(path)[:max_size], str(path), tokenizer, image_tokens, config)


def tokenize_mm_records(
    records: list[dict[str, Any]], source: str, tokenizer: Any, image_tokens: ImageTokens, config: Config
) -> tuple[list[dict[str, Any]], dict[int, list[Visual]]]:
    """Resolve every record's media, decode its images, expand its image blocks and tokenize it.

    Record 0 then gets the original's tokenization self-check, on the prompt as rendered with its
    image blocks in place.
    """
    builder = MediaBuilder(config, image_tokens)
    wheres = [f"{source}: record {idx}" for idx in range(len(records))]
    control = control_text(tokenizer, reserved=(IMAGE_PLACEHOLDER,))  # a record's images come from its keys
    for record, where in zip(records, wheres):
        check_user_text(record, control, where)
    paths = [builder.image_paths(r, where) for r, where in zip(records, wheres)]
    sizes = decoded_sizes([(p, where) for ps, where in zip(paths, wheres) for p in ps])
    samples, media = [], {}
    for idx, (record, where) in enumerate(zip(records, wheres)):
        is_video = record.get("video") is not None
        visuals = builder.video(record, where) if is_video else builder.images(paths[idx], sizes)
        prompt, blocks = builder.prompt(record, visuals), builder.blocks(visuals)
        samples.append(tokenize_sample(record, idx, tokenizer, question_ids(tokenizer, prompt, blocks, where)))
        media[idx] = visuals
        if idx == 0:  # the prompt as one string: each placeholder replaced by its block's text
            pieces = prompt.split(IMAGE_PLACEHOLDER)
            whole = pieces[0] + "".join(tokenizer.decode(b) + piece for b, piece in zip(blocks, pieces[1:]))
            check_tokenization(samples[0], whole, record, tokenizer, where)
    return samples, media


class MultimodalDataset(torch.utils.data.Dataset):
    """Stage samples + pixel_values, decoded and tiled on access (so in DataLoader workers)."""

    def __init__(
        self, samples: list[dict[str, Any]], media: dict[int, list[Visual]], config: Config, source: str
    ) -> None:
        self.samples = samples
        self.media = media
        self.source = source
        self.image_size = config.image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = dict(self.samples[i])
        visuals = self.media[sample["idx"]]
        where = f"{self.source}: record {sample['idx']}"
        if visuals:
            sample["pixel_values"] = torch.cat(self._pixels(visuals, where))
        sample["num_patches"] = sum(v.n_tiles for v in visuals)
        return sample

    def _pixels(self, visuals: list[Visual], where: str) -> list[torch.Tensor]:
        if visuals[0].frame is not None:
            reader = _open_video(visuals[0].path, where)
            try:
                frames = reader.get_batch([v.frame for v in visuals]).asnumpy()
            except Exception as e:  # the file changed since the data set was built (e.g. fewer frames)
                raise DataError(f"{where}: unreadable video {visuals[0].path}: {e}") from None
            transform = tiler(self.image_size, visuals[0].max_tiles)
            tensors = [transform(Image.fromarray(np.ascontiguousarray(f))) for f in frames]
        else:
            tensors = []
            for v in visuals:
                try:
                    tensors.append(tiler(self.image_size, v.max_tiles).load_pixel_values(v.path))
                except ImageLoadError as e:
                    raise DataError(f"{where}: {e}") from None
        for v, t in zip(visuals, tensors):
            if t.shape[0] != v.n_tiles:  # the file changed since the data set was built
                raise DataError(f"{where}: {v.path} gives {t.shape[0]} tiles, expected {v.n_tiles}")
        return tensors
