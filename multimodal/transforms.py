"""Image loading and InternVL dynamic tiling.

Tiling is ``dynamic_preprocess`` + ``build_transform`` from the InternVL3 model card (docs/design.md
§3), because the vision tower was trained on exactly those tiles. transformers'
``GotOcr2ImageProcessorPil`` computes it bit for bit (PIL bicubic, the same grid choice) for the
only case used here, ``min_patches=1``; the tests compare it with the model card's code.
``GotOcr2ImageProcessor`` (the torchvision backend) is not used: its torch bicubic resize gives
pixel values up to ~0.035 away from the model card's after normalisation.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from transformers import GotOcr2ImageProcessorPil

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


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


@contextlib.contextmanager
def _image_errors(path: str | Path) -> Iterator[None]:
    """Checks the file, then turns whatever opening and decoding it raises into an ImageLoadError.

    Pillow's decompression-bomb warning is an error as well (_open); the global limit is left untouched.
    """
    file = Path(path)
    if not file.exists():
        raise ImageLoadError(path, "file not found")
    if not file.is_file():
        raise ImageLoadError(path, "not a regular file")
    if file.stat().st_size == 0:
        raise ImageLoadError(path, "file is empty (0 bytes)")
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, f"decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not a recognised image format") from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, EOFError, zlib.error, ...
        reason = f"corrupt, truncated or unsupported image data ({type(exc).__name__}: {exc})"
        raise ImageLoadError(path, reason) from exc


_OPEN_LOCK = threading.Lock()


def _open(path: str | Path) -> Image.Image:
    """Image.open with Pillow's decompression-bomb *warning* (between 1x and 2x ``Image.MAX_IMAGE_PIXELS``)
    raised as an error. Warning filters are global to the process and catch_warnings is not thread-safe:
    the data set's check opens images on several threads, and without the lock one thread's exit could
    restore the filters while another opens a bomb, which would then decode on. Opening reads only the
    header, so the lock costs little; decoding runs outside it."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(path)


def load_image(path: str | Path) -> Image.Image:
    """Open, EXIF-orient, fully decode and convert an image file to RGB.

    Decoding happens here (not lazily on first use) so that truncated or corrupt files fail
    with an :class:`ImageLoadError` naming the file instead of deep inside a batch.
    """
    with _image_errors(path), _open(path) as img:
        img.load()
        oriented = ImageOps.exif_transpose(img)
    return to_rgb(oriented)


def decoded_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image :func:`load_image` returns, after decoding the whole file.

    The data set is built with this, so a file that is truncated or corrupt past its header fails
    then, not mid-epoch. JPEGs decode in draft mode (libjpeg's DCT scaling, 1/8 of each side): every
    entropy-coded block is still read, so truncation and broken streams fail as in a full decode,
    for a fraction of the cost. Other formats decode in full.
    """
    with _image_errors(path), _open(path) as img:
        width, height = img.size
        img.draft(None, (1, 1))  # a no-op for formats other than JPEG
        img.load()
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)  # what ImageOps.exif_transpose reads
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


class ImageTransform:
    """PIL image -> InternVL pixel_values: dynamic tiles (+ thumbnail), ImageNet-normalised."""

    def __init__(
        self,
        image_size: int = 448,
        max_tiles: int = 12,
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
        # explicit mean/std: the processor's defaults are CLIP's, InternVL uses ImageNet's
        self.processor = GotOcr2ImageProcessorPil(
            size={"height": image_size, "width": image_size},
            crop_to_patches=True,
            min_patches=1,
            max_patches=max_tiles,
            resample=Image.Resampling.BICUBIC,
            image_mean=list(mean),
            image_std=list(std),
        )

    def num_tiles(self, width: int, height: int) -> int:
        """Tiles an image of this size becomes, thumbnail included (known from its header)."""
        _check_positive_int("width", width)
        _check_positive_int("height", height)
        return self.processor.get_number_of_image_patches(height, width)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Return float32 pixel_values [N, 3, image_size, image_size]: row-major tiles, then the
        thumbnail when there is more than one tile."""
        return self.processor(images=to_rgb(image), return_tensors="pt")["pixel_values"].float()

    def load_pixel_values(self, path: str | Path) -> torch.Tensor:
        """Load an image file (see :func:`load_image`) and tile it."""
        return self(load_image(path))
