"""Image loading and InternVL dynamic tiling.

Tiling reproduces ``dynamic_preprocess`` + ``build_transform`` from the InternVL3 model card
(DESIGN.md section 2), because the vision tower was trained on exactly those tiles.

Why this is implemented here instead of using transformers' GotOcr2 image processor
(checked against transformers 5.17 and 5.24):

* ``GotOcr2ImageProcessor`` is the torchvision backend in 5.x. Its bicubic resize is
  ``torch`` bicubic (a=-0.75, antialias) on tensors, not PIL bicubic (a=-0.5, uint8 rounding),
  so pixel values differ from the model card's (max |diff| ~0.035 after normalisation on a
  1500x700 image).
* ``GotOcr2ImageProcessorPil`` gives bit-identical pixels and identical grids for
  ``min_tiles=1``, but enumerates candidate grids width-major, while the model card stable-sorts
  a ``set`` by area. For ``min_tiles > 1`` equal-area ties then resolve differently (e.g.
  2288x880 with min=max=5: model card picks 1x5, HF picks 5x1). It also defaults to CLIP
  mean/std, and the class names moved between transformers releases.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageLoadError(ValueError):
    """An image file could not be turned into an RGB image (missing, corrupt, too large, ...).

    ``args`` is ``(path, reason)`` so the error survives pickling across DataLoader workers.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot load image {str(self.path)!r}: {self.reason}"


def _check_positive_int(name: str, value: object, minimum: int = 1) -> None:
    """Reject non-int and too-small sizes early, naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _has_alpha(img: Image.Image) -> bool:
    """Whether the image carries transparency (Pillow's ``has_transparency_data``, 10.0-safe)."""
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode.endswith("A")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit int / float grayscale to 8-bit.

    Pillow's own ``convert("L")`` clips these at 255, which turns most 16-bit images white.
    16-bit modes use their nominal 0..65535 range. Modes ``I`` and ``F`` carry no nominal
    range, so the data decides: values already in 0..255 (``I``/``F``) or 0..1 (``F``) keep
    their meaning, ``I`` values within 0..65535 are treated as 16-bit, anything else is
    stretched min..max (a constant image becomes black).
    """
    data = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if img.mode in _UINT16_MODES or (img.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        scaled = data / 257.0
    elif lo >= 0 and hi <= 1 and img.mode == "F":
        scaled = data * 255.0
    elif lo >= 0 and hi <= 255:
        scaled = data
    else:
        scaled = (data - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white.

    White (not Pillow's default black from dropping alpha) because transparent regions of
    documents, logos and icons are meant to show the page behind them.
    """
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _UINT16_MODES or img.mode in ("I", "F"):
        return _high_depth_to_l(img).convert("RGB")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open, EXIF-orient, fully decode and convert an image file to RGB.

    Decoding happens here (not lazily on first use) so that truncated or corrupt files fail
    with an :class:`ImageLoadError` naming the file instead of deep inside a batch. Pillow's
    decompression-bomb *warning* (between 1x and 2x ``Image.MAX_IMAGE_PIXELS``) is turned into
    an error as well; the global limit itself is left untouched.
    """
    file = Path(path)
    if not file.exists():
        raise ImageLoadError(path, "file not found")
    if not file.is_file():
        raise ImageLoadError(path, "not a regular file")
    if file.stat().st_size == 0:
        raise ImageLoadError(path, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                img.load()
                oriented = ImageOps.exif_transpose(img)
            return to_rgb(oriented)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, f"decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not a recognised image format") from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, EOFError, zlib.error, ...
        reason = f"corrupt, truncated or unsupported image data ({type(exc).__name__}: {exc})"
        raise ImageLoadError(path, reason) from exc


@lru_cache(maxsize=64)
def _target_ratios(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Candidate (columns, rows) grids in the model card's exact order.

    The model card stable-sorts a ``set`` by area, so grids of equal area keep set iteration
    order, which decides equal-area ties. The set is built with the card's exact comprehension
    (same insertion sequence; int-tuple hashes are deterministic in CPython) to reproduce it.
    """
    ratios = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return tuple(sorted(ratios, key=lambda r: r[0] * r[1]))


def tile_grid(width: int, height: int, image_size: int, max_tiles: int, min_tiles: int = 1) -> tuple[int, int]:
    """Return the (columns, rows) grid the model card's ``find_closest_aspect_ratio`` picks.

    Closest aspect ratio wins; on an exact tie a later (larger-area) grid replaces the current
    one only when the image area exceeds half the grid's pixel area, so small images are not
    blown up into many tiles.
    """
    _check_positive_int("width", width)
    _check_positive_int("height", height)
    _check_positive_int("image_size", image_size)
    _check_positive_int("max_tiles", max_tiles)
    _check_positive_int("min_tiles", min_tiles)
    if min_tiles > max_tiles:
        raise ValueError(f"min_tiles ({min_tiles}) must be <= max_tiles ({max_tiles})")
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in _target_ratios(min_tiles, max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


class ImageTransform:
    """PIL image -> InternVL pixel_values: dynamic tiles (+ thumbnail), ImageNet-normalised."""

    def __init__(
        self,
        image_size: int = 448,
        max_tiles: int = 12,
        use_thumbnail: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        _check_positive_int("image_size", image_size)
        _check_positive_int("max_tiles", max_tiles)
        if len(mean) != 3:
            raise ValueError(f"mean must have 3 values (RGB), got {mean!r}")
        if len(std) != 3 or any(s == 0 for s in std):
            raise ValueError(f"std must have 3 non-zero values (RGB), got {std!r}")
        self.image_size = image_size
        self.max_tiles = max_tiles
        self.use_thumbnail = use_thumbnail
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def num_tiles(self, width: int, height: int) -> int:
        """Tiles an image of this size becomes (known from its header, before decoding)."""
        cols, rows = tile_grid(width, height, self.image_size, self.max_tiles)
        return cols * rows + (1 if self.use_thumbnail and cols * rows != 1 else 0)

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        """The model card's ``dynamic_preprocess``: row-major tiles, then the thumbnail if >1 tile."""
        image = to_rgb(image)
        size = self.image_size
        cols, rows = tile_grid(image.width, image.height, size, self.max_tiles)
        resized = image.resize((size * cols, size * rows), Image.Resampling.BICUBIC)
        tiles = [
            resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
            for r in range(rows)
            for c in range(cols)
        ]
        if self.use_thumbnail and len(tiles) != 1:
            tiles.append(image.resize((size, size), Image.Resampling.BICUBIC))
        return tiles

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Return float32 pixel_values [N, 3, image_size, image_size].

        Same float32 ops as torchvision ``ToTensor`` + ``Normalize`` (divide by 255, subtract
        mean, divide by std), so values match the model card bit for bit.
        """
        stacked = np.stack([np.asarray(tile, dtype=np.uint8) for tile in self.tiles(image)])
        pixels = torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div(255)
        return pixels.sub(self.mean).div(self.std).contiguous()

    def load_pixel_values(self, path: str | Path) -> torch.Tensor:
        """Load an image file (see :func:`load_image`) and tile it."""
        return self(load_image(path))
