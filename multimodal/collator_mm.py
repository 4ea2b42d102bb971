"""Batching for the multimodal path: the text collator plus pixel_values and tiles per sample."""

from __future__ import annotations

from typing import Any

import torch

from dataset import MyCollator


class MultimodalCollator(MyCollator):
    """Latent-aligned padding (MyCollator), tiles concatenated in batch order, num_patches_list.

    Samples with and without images can share a batch: the latter contribute 0 tiles. A batch
    without any image gets pixel_values None.
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        pixels = [f["pixel_values"] for f in features if "pixel_values" in f]
        text = [{k: v for k, v in f.items() if k not in ("pixel_values", "num_patches")} for f in features]
        batch = super().__call__(text)
        batch["num_patches_list"] = torch.tensor([f.get("num_patches", 0) for f in features], dtype=torch.long)
        batch["pixel_values"] = torch.cat(pixels) if pixels else None
        return batch
