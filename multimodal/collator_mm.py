"""Batching for the multimodal path: the text collator plus pixel_values and tiles per sample."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dataset import Batch, MyCollator


class MultimodalCollator(MyCollator):
    """Latent-aligned padding (MyCollator), tiles concatenated in batch order, num_patches per sample.

    Samples with and without images can share a batch: the latter contribute 0 tiles. A batch
    without any image gets pixel_values None.
    """

    def __call__(self, features: list[dict[str, Any]]) -> Batch:
        pixels = [f["pixel_values"] for f in features if "pixel_values" in f]
        text = [{k: v for k, v in f.items() if k not in ("pixel_values", "num_patches")} for f in features]
        return dataclasses.replace(
            super().__call__(text),
            pixel_values=torch.cat(pixels) if pixels else None,
            num_patches=torch.tensor([f.get("num_patches", 0) for f in features], dtype=torch.long),
        )
