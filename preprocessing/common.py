"""What every builder shares: image placement, sentence splitting, and write → validate → report.

Image layout: one config-level ``image_dir`` serves all splits, so a record's ``image`` is the
path relative to it, ``"{split}/{file}"``, and the file lies at ``<image_dir>/{split}/{file}``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from dataset import DataError, load_records

Record = dict[str, Any]
# Modes PNG stores as they are; anything else (CMYK, YCbCr, ...) is converted to RGB.
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
# A sentence ends at . ! or ? followed by whitespace, or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n+\s*")


def image_path(image_dir: str | Path, split: str, name: str) -> tuple[str, Path]:
    """The record's relative path and the file's absolute location for one image."""
    rel = f"{split}/{name}"
    dest = Path(image_dir) / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    return rel, dest


def save_image(image: Image.Image, image_dir: str | Path, split: str, name: str) -> str:
    """Save a PIL image as PNG under the layout; returns the record's relative path."""
    rel, dest = image_path(image_dir, split, name)
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    image.save(dest, format="PNG", optimize=True)
    return rel


def copy_image(src: str | Path, image_dir: str | Path, split: str, name: str) -> str:
    """Copy an existing image file byte for byte (keeps the source's small PNGs small)."""
    rel, dest = image_path(image_dir, split, name)
    shutil.copyfile(src, dest)
    return rel


def split_sentences(text: str | None) -> list[str]:
    """A deliberately simple regex sentence splitter; empty pieces are dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text or "") if s.strip()]


def format_choices(question: str, choices: Iterable[str], context: str | None = None) -> str:
    """Question (+ context) + lettered options, as multiple-choice records put them in the text."""
    options = " ".join(f"({letter(i)}) {c}" for i, c in enumerate(choices))
    parts = [question.strip()]
    if context and context.strip():
        parts.append(f"Context: {context.strip()}")
    parts.append(f"Options: {options}")
    return "\n".join(parts)


def letter(index: int) -> str:
    """Choice index → letter (0 → "A")."""
    return chr(ord("A") + index)


def write_splits(splits: Mapping[str, list[Record]], out_dir: str | Path, image_dir: str | Path) -> dict[str, int]:
    """Write <out_dir>/<split>.json for each split, validate it as training will read it, report counts.

    Validation goes through dataset.load_records (the project's own reader), and every referenced
    image must exist under image_dir — a builder that passes this produces files a run accepts.
    """
    out_dir, image_dir = Path(out_dir), Path(image_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, records in splits.items():
        path = out_dir / f"{split}.json"
        path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        loaded = load_records(path)
        n_images = 0
        for i, record in enumerate(loaded):
            paths = record.get("image") or []
            for rel in [paths] if isinstance(paths, str) else paths:
                if not (image_dir / rel).is_file():
                    raise DataError(f"{path}: record {i}: key 'image': not found under {image_dir}: {rel}")
                n_images += 1
        counts[split] = len(loaded)
        print(f"{split}: {len(loaded)} records, {n_images} image references -> {path}")
    return counts


RowConverter = Callable[[Mapping[str, Any], int], tuple[Record, Image.Image | None, str]]


def convert_rows(
    rows: Iterable[Mapping[str, Any]],
    convert: RowConverter,
    split: str,
    image_dir: str | Path,
    require_image: bool = False,
) -> list[Record]:
    """Apply a per-row converter to a Hugging Face split and save its images.

    convert(row, idx) returns (record without image, PIL image or None, image id). Rows without
    an image become text-only records unless require_image is set, then they are skipped.
    """
    records = []
    for idx, row in enumerate(rows):
        record, image, image_id = convert(row, idx)
        if image is not None:
            record["image"] = save_image(image, image_dir, split, f"{image_id}.png")
        elif require_image:
            continue
        records.append(record)
    return records


# Hugging Face split names → ours.
HF_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def hf_main(dataset_name: str, convert: RowConverter, argv: list[str] | None = None) -> dict[str, int]:
    """Command line shared by the Hugging Face converters (needs network access to download)."""
    parser = argparse.ArgumentParser(description=f"Convert {dataset_name} to COCONUT JSON + images.")
    parser.add_argument("--out-dir", required=True, help="where <split>.json go")
    parser.add_argument("--image-dir", required=True, help="images go to <image-dir>/<split>/<id>.png")
    parser.add_argument("--require-image", action="store_true", help="skip rows that have no image")
    parser.add_argument("--max-per-split", type=int, default=None, help="keep the first N rows of each split")
    args = parser.parse_args(argv)

    import datasets  # imported here: the converters' tests never need it

    splits = {}
    for hf_split, split in HF_SPLITS.items():
        rows = datasets.load_dataset(dataset_name, split=hf_split)
        if args.max_per_split is not None:
            rows = rows.select(range(min(args.max_per_split, len(rows))))
        splits[split] = convert_rows(rows, convert, split, args.image_dir, args.require_image)
    return write_splits(splits, args.out_dir, args.image_dir)
