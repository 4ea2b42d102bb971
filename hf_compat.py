"""The few transformers 5.x details that differ between releases, in one place."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import DynamicCache


def cache_keyword(forward: Callable) -> str:
    """Name of the KV-cache argument: `cache` in newer 5.x, `past_key_values` in 5.17.

    Newer releases still accept `past_key_values` as a deprecated alias, but 5.17 would silently
    swallow `cache` into **kwargs, so the name is read off the signature.
    """
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def layer_past(cache: DynamicCache, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The keys and values a DynamicCache holds for one layer (None before its first update)."""
    if layer_idx >= len(cache.layers) or not cache.layers[layer_idx].is_initialized:
        return None, None
    layer = cache.layers[layer_idx]
    return layer.keys, layer.values
