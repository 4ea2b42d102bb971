"""Multimodal data path: records with images (or a video) → tokens with expanded image blocks.

`<image>` is only a prompt placeholder: each one becomes <img> + <IMG_CONTEXT> × (tokens per tile
× tiles) + </img> in input_ids. Tile counts are computed from image headers when the data set is
built (cheap, and it finds missing files and over-long samples before training starts); decoding
and tiling run in DataLoader workers, in MultimodalDataset.__getitem__.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dataset import DataError, load_records, tokenize_sample
from multimodal.prompts import IMAGE_PLACEHOLDER, PROMPT_TEMPLATES
from multimodal.transforms import ImageLoadError, ImageTransform
from utils import Config

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


@dataclasses.dataclass(frozen=True)
class ImageTokens:
    """Token ids of an image block, read off the processor (which reads them off the tokenizer)."""

    start: int
    context: int
    end: int
    per_tile: int

    @classmethod
    def from_processor(cls, processor: Any) -> ImageTokens:
        return cls(processor.start_image_token_id, processor.image_token_id, processor.end_image_token_id,
                   processor.image_seq_length)

    def block(self, n_tiles: int) -> list[int]:
        return [self.start] + [self.context] * (self.per_tile * n_tiles) + [self.end]


@dataclasses.dataclass(frozen=True)
class Visual:
    """One image (or one video frame) of a record and its tile count."""

    path: Path
    n_tiles: int
    frame: int | None = None


def resolve_media_path(image_dir: str | Path, rel: str, allow_external: bool, where: str) -> Path:
    """image_dir / rel, refusing paths that escape image_dir (../, absolute, symlinks) unless allowed."""
    root = Path(image_dir).resolve()
    path = (root / rel).resolve()  # resolve() follows symlinks, so a link out of root is caught too
    if not allow_external and not path.is_relative_to(root):
        raise DataError(f"{where}: path '{rel}' escapes image_dir {root} (set allow_external_images: true to allow)")
    return path


def image_size_after_exif(path: Path, where: str) -> tuple[int, int]:
    """(width, height) as the model will see it, from the header only (EXIF rotation applied)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if _orientation(img) in _TRANSPOSED_ORIENTATIONS:
                    width, height = height, width
    except FileNotFoundError:
        raise DataError(f"{where}: image not found: {path}") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{where}: unreadable image {path}: {e}") from None
    return width, height


def _orientation(img: Image.Image) -> int:
    """EXIF orientation from the header. PNG's getexif() decodes the whole image to look for a
    late eXIf chunk, so for PNG only a chunk before the pixel data (img.info) is read."""
    if img.format == "PNG":
        exif = Image.Exif()
        if "exif" in img.info:
            exif.load(img.info["exif"])
        return exif.get(_EXIF_ORIENTATION, 1)
    return img.getexif().get(_EXIF_ORIENTATION, 1)


def _video_frames(path: Path, num_frames: int, where: str) -> tuple[list[int], tuple[int, int]]:
    """Frame indices sampled uniformly (segment centres, as InternVL's video demo) and the frame size."""
    reader = _open_video(path, where)
    total = len(reader)
    indices = sorted({int((i + 0.5) * total / num_frames) for i in range(num_frames)})
    height, width = reader[0].shape[:2]
    return indices, (width, height)


def _open_video(path: Path, where: str) -> Any:
    import decord  # only video records need it

    if not path.exists():
        raise DataError(f"{where}: video not found: {path}")
    try:
        return decord.VideoReader(str(path))
    except Exception as e:  # decord raises its own DECORDError for any unreadable file
        raise DataError(f"{where}: unreadable video {path}: {e}") from None


def media_prompt(n_images: int, n_frames: int) -> str:
    """InternVL's placeholder layout: one `<image>`, numbered images, or one line per video frame."""
    if n_frames:
        return "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_frames))
    if n_images == 1:
        return f"{IMAGE_PLACEHOLDER}\n"
    return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_images))


def question_ids(tokenizer: Any, text: str, blocks: list[list[int]]) -> list[int]:
    """Tokenize a prompt, replacing each `<image>` placeholder by its image block."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(blocks):
        raise DataError(f"prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders for {len(blocks)} images")
    ids = tokenizer.encode(pieces[0], add_special_tokens=True)
    for block, piece in zip(blocks, pieces[1:]):
        ids += block + tokenizer.encode(piece, add_special_tokens=False)
    return ids


def media_transforms(config: Config) -> tuple[ImageTransform, ImageTransform]:
    """The tilers of a config's images (up to max_tiles) and video frames (up to video_tiles).

    The data set is built with them (tile counts) and read with them (pixels): one definition.
    """
    return ImageTransform(config.image_size, config.max_tiles), ImageTransform(config.image_size, config.video_tiles)


class MediaBuilder:
    """Turns one record into (question ids, visuals) for a config's prompt and tiling settings."""

    def __init__(self, config: Config, tokenizer: Any, image_tokens: ImageTokens) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.image_transform, self.frame_transform = media_transforms(config)
        self.template = PROMPT_TEMPLATES[config.prompt_format]

    def visuals(self, record: dict[str, Any], where: str) -> list[Visual]:
        if record.get("video") is not None:
            path = resolve_media_path(self.config.image_dir, record["video"], self.config.allow_external_images, where)
            indices, (w, h) = _video_frames(path, record.get("num_frames", self.config.num_frames), where)
            n = self.frame_transform.num_tiles(w, h)
            return [Visual(path, n, frame=i) for i in indices]
        images = record.get("image")
        if images is None:
            return []
        out = []
        for rel in [images] if isinstance(images, str) else images:
            path = resolve_media_path(self.config.image_dir, rel, self.config.allow_external_images, where)
            out.append(Visual(path, self.image_transform.num_tiles(*image_size_after_exif(path, where))))
        return out

    def question(self, record: dict[str, Any], visuals: list[Visual]) -> list[int]:
        n_frames = sum(v.frame is not None for v in visuals)
        media = media_prompt(len(visuals) - n_frames, n_frames) if visuals else ""
        text = self.template.format(media=media, question=record["question"])
        return question_ids(self.tokenizer, text, [self.image_tokens.block(v.n_tiles) for v in visuals])


def get_mm_dataset(
    path: str | Path, tokenizer: Any, image_tokens: ImageTokens, config: Config, max_size: int | None = None
) -> tuple[list[dict[str, Any]], dict[int, list[Visual]]]:
    """Tokenized base samples (as dataset.get_dataset) plus each sample's visuals, keyed by idx."""
    return tokenize_mm_records(load_records(path)[:max_size], str(path), tokenizer, image_tokens, config)


def tokenize_mm_records(
    records: list[dict[str, Any]], source: str, tokenizer: Any, image_tokens: ImageTokens, config: Config
) -> tuple[list[dict[str, Any]], dict[int, list[Visual]]]:
    builder = MediaBuilder(config, tokenizer, image_tokens)
    samples, media = [], {}
    for idx, record in enumerate(records):
        where = f"{source}: record {idx}"
        visuals = builder.visuals(record, where)
        samples.append(tokenize_sample(record, idx, tokenizer, builder.question(record, visuals)))
        media[idx] = visuals
    return samples, media


class MultimodalDataset(torch.utils.data.Dataset):
    """Stage samples + pixel_values, decoded and tiled on access (so in DataLoader workers)."""

    def __init__(
        self, samples: list[dict[str, Any]], media: dict[int, list[Visual]], config: Config, source: str
    ) -> None:
        self.samples = samples
        self.media = media
        self.source = source
        self.image_transform, self.frame_transform = media_transforms(config)

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
            tensors = [self.frame_transform(Image.fromarray(np.ascontiguousarray(f))) for f in frames]
        else:
            tensors = []
            for v in visuals:
                try:
                    tensors.append(self.image_transform.load_pixel_values(v.path))
                except ImageLoadError as e:
                    raise DataError(f"{where}: {e}") from None
        for v, t in zip(visuals, tensors):
            if t.shape[0] != v.n_tiles:  # the file changed since the data set was built
                raise DataError(f"{where}: {v.path} gives {t.shape[0]} tiles, expected {v.n_tiles}")
        return tensors

