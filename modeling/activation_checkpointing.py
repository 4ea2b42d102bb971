"""Activation checkpointing that stays exact inside the latent loop.

HF gradient checkpointing forces use_cache=False and drops the cache inside each decoder layer,
so the latent loop would silently compute wrong logits; plain torch.utils.checkpoint around a
layer that appends to the shared cache appends K/V a second time when it recomputes in backward.
Here each checkpointed layer call gets its own one-layer cache holding exactly the past K/V it
saw (passed in as checkpoint inputs) and returns its new K/V; they are appended to the shared
cache outside the checkpointed region (docs/design.md §5). The recomputation runs the attention
function the forward ran (decoder_steps switches it, hf_compat.grouped_attention). In the one-token
latent passes the past K/V are the prefix and the latents, in two parts (decoder_steps.LatentKV).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling.decoder_steps import LatentKV
from modeling.hf_compat import KVSplit, attention_implementation, cache_keyword, extend_kv, layer_past

PastKV = torch.Tensor | KVSplit | None  # a layer's keys or values before a call: none, whole, or in two parts


class _OneLayerCache:
    """Stands in for the shared cache during one layer call: past K/V in, new K/V recorded."""

    def __init__(self, past_keys: PastKV, past_values: PastKV) -> None:
        self.past_keys, self.past_values = past_keys, past_values
        self.new_keys: torch.Tensor | None = None
        self.new_values: torch.Tensor | None = None

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor | KVSplit, torch.Tensor | KVSplit]:
        self.new_keys, self.new_values = keys, values
        return extend_kv(self.past_keys, keys), extend_kv(self.past_values, values)


def _checkpointed_forward(
    forward: Callable, attention: nn.Module, cache_kw: str, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    if not torch.is_grad_enabled():
        return forward(hidden_states, *args, **kwargs)
    config, name = attention.config, attention.config._attn_implementation

    def under_forward_attention(*call_args: Any, **call_kwargs: Any) -> Any:
        # The recomputation in backward must run the attention function this forward ran (the
        # switch is undone by then). Traced, the graph holds it already, and dynamo takes no
        # context_fn; but a release whose layers break the graph recomputes eagerly even then
        # (transformers 5.25), so the switch is made inside the checkpointed function itself.
        if torch.compiler.is_compiling():
            return forward(*call_args, **call_kwargs)
        with attention_implementation(config, name):
            return forward(*call_args, **call_kwargs)

    shared = kwargs.get(cache_kw)
    if shared is None:
        return checkpoint(under_forward_attention, hidden_states, *args, use_reentrant=False, **kwargs)
    layer_idx = attention.layer_idx
    past_keys, past_values = shared.past(layer_idx) if isinstance(shared, LatentKV) else layer_past(shared, layer_idx)

    def run(h: torch.Tensor, pk: PastKV, pv: PastKV) -> tuple[Any, torch.Tensor, torch.Tensor]:
        local = _OneLayerCache(pk, pv)
        out = under_forward_attention(h, *args, **{**kwargs, cache_kw: local})
        return out, local.new_keys, local.new_values

    out, new_keys, new_values = checkpoint(run, hidden_states, past_keys, past_values, use_reentrant=False)
    shared.update(new_keys, new_values, layer_idx)
    return out


def enable_latent_checkpointing(decoder_layers: nn.ModuleList) -> None:
    """Checkpoint every decoder layer in a way that keeps the KV-cached latent loop exact."""
    for layer in decoder_layers:
        attention = getattr(layer, "self_attn", None)
        if attention is None or not hasattr(attention, "layer_idx"):
            raise TypeError(f"{type(layer).__name__}: expected a decoder layer with self_attn.layer_idx")
        forward = layer.forward
        layer.forward = functools.partial(_checkpointed_forward, forward, attention, cache_keyword(forward))
