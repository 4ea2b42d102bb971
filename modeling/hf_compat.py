"""The few transformers 5.x details that differ between releases, and the attention function that
decoder_steps registers with transformers (K/V heads read grouped, K/V read in two parts)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import NamedTuple

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


class KVSplit(NamedTuple):
    """One layer's keys (or values) in two parts [B, K/V heads, T, D]: a cached prefix and the tokens
    after it, which attention reads where they lie instead of from a concatenated copy."""

    prefix: torch.Tensor
    tail: torch.Tensor


def extend_kv(past: torch.Tensor | KVSplit | None, new: torch.Tensor) -> torch.Tensor | KVSplit:
    """past followed by new along the sequence; a KVSplit grows its tail only (the prefix is not copied)."""
    if past is None:
        return new
    if isinstance(past, KVSplit):
        return KVSplit(past.prefix, torch.cat([past.tail, new], dim=-2))
    return torch.cat([past, new], dim=-2)


GROUPED_SDPA = "coconut_grouped_sdpa"


def _grouped_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | KVSplit,
    value: torch.Tensor | KVSplit,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except that the query heads of a group attend to its K/V head as it is.

    With a mask, 5.17 (and any release under torch.compile) repeats K and V once per query head
    before sdpa: for InternVL3-1B (14 query / 2 K/V heads) 7 copies of the whole cache per layer,
    kept for the backward in the latent passes and re-read at every decode step. Here a group's
    query heads are instead sdpa's query rows against that group's K/V: the same scores, no copy.
    (5.24 does this itself for one token outside torch.compile, `pack_gqa`.) One token's mask
    [B, 1, 1, L] serves every row; for T tokens the mask must come laid out per group,
    [B, 1, groups·T, L] (grouped_rows_mask). Keys given as a KVSplit (one token only) are attended
    in their two parts (split_attention).
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if isinstance(key, KVSplit) and isinstance(value, KVSplit):
        return split_attention(query, key, value, attention_mask, groups, dropout, scaling), None
    batch, heads, length, dim = query.shape
    if groups == 1 or not _mask_fits_rows(attention_mask, groups, length):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows = query.reshape(batch, heads // groups, groups * length, dim)  # row g·T + t: head (group, g), token t
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, length, dim).transpose(1, 2), None


def _mask_fits_rows(mask: torch.Tensor | None, groups: int, length: int) -> bool:
    """Whether the mask serves _grouped_sdpa's rows: shared by the heads, with one row (one token)
    or a row per grouped query row; no mask only for one token (T tokens need their causal mask)."""
    if mask is None:
        return length == 1
    return mask.shape[1] == 1 and mask.shape[2] in ({1, groups} if length == 1 else {groups * length})


def grouped_rows_mask(allowed: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """A boolean [B, 1, T, L] mask (True = attend) laid out for _grouped_sdpa's rows, [B, 1, groups·T, L],
    additive in dtype (the dtype sdpa computes in). Built once per pass for every layer: expanded in
    each layer's attention, or converted there by sdpa (which turns a boolean mask into one of the
    query's dtype at every call), it would keep one copy per layer for the backward. Its rows are
    padded to a multiple of 16 elements (a view of the first L): CUDA's memory-efficient kernel
    copies a mask with unaligned rows at every call."""
    rows = allowed.repeat(1, 1, groups, 1)
    length = rows.shape[-1]
    mask = torch.zeros(*rows.shape[:-1], -(-length // 16) * 16, dtype=dtype, device=rows.device)[..., :length]
    return mask.masked_fill_(~rows, float("-inf"))


def split_attention(
    query: torch.Tensor,
    key: KVSplit,
    value: KVSplit,
    mask: torch.Tensor | None,
    groups: int,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """One query token against K/V held as prefix + tail: one softmax over both parts' scores.

    What autograd keeps is the prefix (the same tensors every pass), the small tail and the
    scores [B, K/V heads, groups, L], not a concatenated copy of the K/V per pass. Scores in the
    query's dtype and softmax in fp32, as transformers' eager attention computes them. Batched
    matrix products over (B · K/V heads): a one-token pass is bound by the work per operator.
    """
    batch, heads, _, dim = query.shape
    kv_heads = heads // groups
    rows = query.reshape(batch * kv_heads, groups, dim) * (dim**-0.5 if scaling is None else scaling)
    prefix_keys, prefix_values = key.prefix.flatten(0, 1), value.prefix.flatten(0, 1)  # (B · K/V heads, P, D)
    scores = torch.cat([torch.bmm(rows, prefix_keys.mT), torch.bmm(rows, key.tail.flatten(0, 1).mT)], dim=-1)
    scores = scores.view(batch, kv_heads, groups, -1)  # (B, K/V heads, groups, L)
    if mask is not None:  # [B, 1, 1, L]: True (or 0.0) where attended
        scores = torch.where(mask, scores, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    probs = probs.to(query.dtype).view(batch * kv_heads, groups, -1)
    cut = prefix_keys.shape[1]
    out = torch.baddbmm(torch.bmm(probs[..., :cut], prefix_values), probs[..., cut:], value.tail.flatten(0, 1))
    return out.view(batch, 1, heads, dim)


AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa)


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


def grouped_attention(config: PretrainedConfig) -> contextlib.AbstractContextManager[None]:
    """Route sdpa attention through _grouped_sdpa while decoder_steps drives the layers."""
    current = config._attn_implementation
    return attention_implementation(config, GROUPED_SDPA if current == "sdpa" else current)
