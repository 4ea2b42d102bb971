"""Blank-image control data: a copy of a data set with every image replaced by a blank one.

    python -m preprocessing.blank_images SRC_DIR DST_DIR [--fill R,G,B]

Every image file under SRC_DIR is written to the same relative path under DST_DIR as a single-colour
image (white unless --fill) of the same size as the model sees it (EXIF rotation applied, so every
image keeps its tile count); every other file (train/val/test.json, ...) is copied unchanged. A
config that points train_path/val_path/image_dir at the copy trains on the same questions, steps and
answers with nothing in the pixels, so what it reaches is the best a text-only model can do: the
control for "the answers come from the images". Videos are refused (they would pass through unblanked).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

from dataset import DataError
from multimodal.transforms import ImageLoadError, decoded_size

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
WHITE = (255, 255, 255)


def blank_image(src: Path, dst: Path, fill: tuple[int, int, int] = WHITE) -> None:
    """dst: a `fill`-coloured RGB image of src's (EXIF-rotated) size, in the format dst's suffix names."""
    try:
        size = decoded_size(src)
    except ImageLoadError as e:
        raise DataError(str(e)) from None
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, fill).save(dst)


def blank_copy(src_dir: str | Path, dst_dir: str | Path, fill: tuple[int, int, int] = WHITE) -> dict[str, int]:
    """Copy src_dir to dst_dir, every image blanked; returns {"images": n, "files": m} (m copied as they are)."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not src_dir.is_dir():
        raise DataError(f"{src_dir}: not a directory")
    if dst_dir.resolve().is_relative_to(src_dir.resolve()):
        raise DataError(f"{dst_dir}: the copy must lie outside {src_dir}")
    counts = {"images": 0, "files": 0}
    for path in sorted(p for p in src_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(src_dir)
        suffix = path.suffix.lower()
        if suffix in VIDEO_SUFFIXES:
            raise DataError(f"{path}: videos are not blanked; a blank-image control needs image-only data")
        if suffix in IMAGE_SUFFIXES:
            blank_image(path, dst_dir / rel, fill)
            counts["images"] += 1
        else:
            (dst_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dst_dir / rel)
            counts["files"] += 1
    return counts


def _rgb(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
        raise argparse.ArgumentTypeError(f"expected R,G,B with values 0..255, got {text!r}")
    return parts[0], parts[1], parts[2]


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src_dir", help="data set directory (JSON files and images below it)")
    parser.add_argument("dst_dir", help="where the blanked copy goes (outside src_dir)")
    parser.add_argument("--fill", type=_rgb, default=WHITE, help="blank colour as R,G,B (default 255,255,255)")
    args = parser.parse_args(argv)
    counts = blank_copy(args.src_dir, args.dst_dir, args.fill)
    print(f"{args.dst_dir}: {counts['images']} images blanked, {counts['files']} other files copied")
    return counts


if __name__ == "__main__":
    main()
