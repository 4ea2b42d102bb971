"""InternVL3's architecture and processor, built from sizes: one place for the tiny offline model,
the converter of original-format checkpoints, and the full-size benchmark."""

from __future__ import annotations

from typing import Any

from PIL import Image
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    Qwen2Config,
)

from multimodal.transforms import IMAGENET_MEAN, IMAGENET_STD


def internvl3_config(
    vision: dict[str, Any], text: dict[str, Any], image_token_id: int, image_seq_length: int
) -> InternVLConfig:
    """InternVL3's architecture at the given sizes: InternViT (qkv bias, layer scale, no qk-norm,
    mean pooling: no final norm), pixel shuffle 0.5, gelu projector, Qwen2 with an untied head."""
    return InternVLConfig(
        vision_config=InternVLVisionConfig(
            patch_size=14,
            attention_bias=True,
            use_qk_norm=False,
            norm_type="layer_norm",
            layer_scale_init_value=0.1,
            use_mean_pooling=True,
            **vision,
        ),
        text_config=Qwen2Config(tie_word_embeddings=False, **text),
        image_token_id=image_token_id,
        image_seq_length=image_seq_length,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def internvl_processor(
    tokenizer: Any, image_size: int, image_seq_length: int, min_tiles: int = 1, max_tiles: int = 12
) -> InternVLProcessor:
    """InternVL tiling (crop_to_patches + thumbnail, bicubic, ImageNet mean/std) plus the tokenizer.

    The tokenizer must expose <img>/</img>/<IMG_CONTEXT> and a video token as InternVLProcessor
    reads them; it also insists on a video processor, which gets the same frame size and normalisation.
    """
    pixels = dict(
        size={"height": image_size, "width": image_size},
        resample=Image.Resampling.BICUBIC,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            **pixels, crop_to_patches=True, min_patches=min_tiles, max_patches=max_tiles
        ),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(**pixels),
        image_seq_length=image_seq_length,
    )
