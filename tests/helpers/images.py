"""Test images, and the InternVL3 model card's tiling as the reference that multimodal.transforms must equal."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.functional import InterpolationMode

# ---------------------------------------------------------------------------------------------
# Reference: InternVL3 model card code, copied verbatim apart from names/formatting.
# ---------------------------------------------------------------------------------------------

# The model card's constants, spelled out (not imported from the module under test, so a wrong
# constant there cannot move the reference with it).
MODEL_CARD_IMAGENET_MEAN = (0.485, 0.456, 0.406)
MODEL_CARD_IMAGENET_STD = (0.229, 0.224, 0.225)


def ref_build_transform(input_size: int) -> T.Compose:
    return T.Compose(
        [
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=MODEL_CARD_IMAGENET_MEAN, std=MODEL_CARD_IMAGENET_STD),
        ]
    )


def ref_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def ref_target_ratio(width, height, min_num, max_num, image_size):
    aspect_ratio = width / height
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return ref_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size)


def ref_dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    target_aspect_ratio = ref_target_ratio(orig_width, orig_height, min_num, max_num, image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range((target_width // image_size) * (target_height // image_size)):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def ref_pixel_values(image, input_size=448, max_num=12, use_thumbnail=True):
    image = image.convert("RGB")
    transform = ref_build_transform(input_size)
    images = ref_dynamic_preprocess(image, image_size=input_size, use_thumbnail=use_thumbnail, max_num=max_num)
    return torch.stack([transform(img) for img in images])


# ---------------------------------------------------------------------------------------------
# Test images
# ---------------------------------------------------------------------------------------------


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradient plus noise: exercises interpolation without being pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], axis=-1)
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
