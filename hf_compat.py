"""The few transformers 5.x details that differ between releases, in one place."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, DynamicCache, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward


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


ONE_TOKEN_SDPA = "coconut_one_token_sdpa"


def _one_token_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except that one query token attends to grouped K/V heads as they are.

    With a padding mask, 5.17 (and any release under torch.compile) repeats K and V once per query
    head before sdpa: for InternVL3-1B (14 query / 2 K/V heads) 7 copies of the whole cache per
    layer and step, kept for the backward in the latent passes and re-read at every decode step.
    One token's query heads of a group are instead sdpa's query rows against that group's K/V (the
    mask [B, 1, 1, L] broadcasts over them): the same scores, no copy. 5.24 does this itself
    outside torch.compile (`pack_gqa`).
    """
    groups = getattr(module, "num_key_value_groups", 1)
    one_mask_row = attention_mask is None or attention_mask.shape[1] == attention_mask.shape[2] == 1
    if query.shape[2] != 1 or groups == 1 or not one_mask_row:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    rows = query.reshape(batch, heads // groups, groups, dim)
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(batch, 1, heads, dim), None


AttentionInterface.register(ONE_TOKEN_SDPA, _one_token_sdpa)


@contextlib.contextmanager
def attention_implementation(config: PretrainedConfig, name: str) -> Iterator[None]:
    """The config names `name` as its attention function for the duration.

    transformers looks the attention function up in the config at every call and has no per-call
    choice. Only around calls of decoder layers: a decoder's own forward also looks the name up
    among its mask builders, which know only transformers' own names.
    """
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def one_token_attention(config: PretrainedConfig) -> contextlib.AbstractContextManager[None]:
    """Route sdpa attention through _one_token_sdpa while the layers run one-token steps."""
    current = config._attn_implementation
    return attention_implementation(config, ONE_TOKEN_SDPA if current == "sdpa" else current)
