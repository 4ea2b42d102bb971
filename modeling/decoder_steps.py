"""One-token steps through a decoder's layers, without the decoder's forward.

For a one-token step the work around the kernels is the whole cost on a GPU, and transformers'
decoder forward does a lot of it per call: it rebuilds the attention mask, re-evaluates RoPE
(dynamic RoPE, as in InternVL3-1B, syncs with the host to check the length) and, for decoding,
grows a DynamicCache with torch.cat. For decoders built like Llama/Qwen2 (`layers`, `norm`,
`rotary_emb`, full attention) the steps here call the layers directly, with RoPE cos/sin for
every position computed once and the mask sliced or derived on the device, and attention that
reads the grouped K/V heads as they are (hf_compat.grouped_attention):

- LatentStepper: COCONUT's latent passes after the prefix, in training and in the prompt, with no
  host sync per pass and no copy of the cache kept for the backward per pass (LatentKV); the
  one-token passes optionally compiled (Coconut.compile_latent_passes: a torch.compile mode).
- StaticGreedyDecoder: greedy decoding on K/V buffers preallocated for the whole generation; the
  next token is picked on the device, so a step has no host sync and the same shapes and
  addresses every time. Steps queue without waiting for the GPU and can be replayed as one
  captured CUDA graph (capture_cuda_graph).

coconut.Coconut falls back to the decoder's own forward for any other decoder.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from transformers import DynamicCache

from modeling.hf_compat import KVSplit, cache_keyword, extend_kv, grouped_attention, grouped_rows_mask, layer_past


@dataclasses.dataclass
class PromptState:
    """A batch's prompt after the latent passes: its cache, mask, next positions and last logits."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, prompt length], left-padded
    next_pos: torch.Tensor  # [B] position of the first new token
    logits: torch.Tensor  # [B, vocab] at each prompt's last real position


def drivable(decoder: nn.Module) -> bool:
    """Whether the decoder's layers can be driven directly: rotary positions, full causal attention."""
    config = getattr(decoder, "config", None)
    if not all(hasattr(decoder, name) for name in ("layers", "norm", "rotary_emb")) or config is None:
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return not getattr(config, "use_sliding_window", False) and set(layer_types) == {"full_attention"}


def rope_table(
    decoder: nn.Module, like: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """RoPE cos/sin [B, T, D] for all positions at once, in like's dtype, as the per-call path gives them.

    Dynamic RoPE picks its frequencies from the longest position of each call; below the original
    context length (InternVL3-1B: 32768) that is always the original set, so one table serves
    every step. None where that does not hold (or for RoPE kinds that vary otherwise).
    """
    rotary = decoder.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if not isinstance(rope_type, str) or rope_type == "longrope":
        return None
    if "dynamic" in rope_type and int(positions.max()) + 1 >= rotary.original_max_seq_len:
        return None
    return rotary(like, positions)


def run_layers(
    decoder: nn.Module,
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    cache: object,
    cache_kw: str,
) -> torch.Tensor:
    """The decoder's layers and final norm on new positions whose past K/V are in cache."""
    for layer in decoder.layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, use_cache=True, **{cache_kw: cache})
    return decoder.norm(hidden)


@functools.cache
def compiled_run_layers(mode: str) -> Callable[..., torch.Tensor]:
    """run_layers under torch.compile(mode=mode), built on first use. dynamic=True: the graphs serve
    every batch, whatever the cached length (the cache is traced, not guarded per length; LatentKV
    says why the first pass has its own); under "reduce-overhead" CUDA graphs are recorded per
    distinct length."""
    return torch.compile(run_layers, dynamic=True, mode=mode)


class LatentKV:
    """The batch's DynamicCache as the one-token latent passes see it: each layer's K/V in two parts
    (hf_compat.KVSplit), the prefix where pass 0 left it and a tail that the latents extend.

    DynamicCache.update concatenates the whole past with every new token, and autograd keeps each
    concatenation (attention saves its K/V): about 0.7 GB for six latents at batch 8, full size, bf16.
    Here only the tail is concatenated; attention reads the two parts (hf_compat.split_attention).
    The tail starts as a copy of the prefix's last two tokens (the prefix is a view of the rest),
    so that at every pass it is a contiguous tensor at least 2 long: torch.compile specializes a
    graph for the lengths 0 and 1, and one compiled for those would not serve the later passes.
    (It also gives equal sizes one symbol: the first pass's tail, 2 long, shares InternVL3-1B's
    2 K/V heads', so that pass gets its own graph and every later pass and batch shares a second.)
    commit() appends the latents to the DynamicCache for the pass after them.
    """

    SEED = 2  # prefix tokens the tail starts with

    def __init__(self, cache: DynamicCache, n_layers: int) -> None:
        self.cache = cache
        self.parts: list[tuple[KVSplit, KVSplit]] = []
        for idx in range(n_layers):
            keys, values = layer_past(cache, idx)
            if keys is None or values is None:
                raise ValueError(f"the prefix pass left no keys for decoder layer {idx}")
            cut = max(keys.shape[2] - self.SEED, 0)
            self.parts.append(
                (
                    KVSplit(keys[:, :, :cut], keys[:, :, cut:].contiguous()),
                    KVSplit(values[:, :, :cut], values[:, :, cut:].contiguous()),
                )
            )
        self.seeded = self.parts[0][0].tail.shape[2]

    def past(self, layer_idx: int) -> tuple[KVSplit, KVSplit]:
        """The layer's K/V before the next token, in two parts."""
        return self.parts[layer_idx]

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[KVSplit, KVSplit]:
        past_keys, past_values = self.parts[layer_idx]
        self.parts[layer_idx] = (extend_kv(past_keys, keys), extend_kv(past_values, values))
        return self.parts[layer_idx]

    def commit(self) -> None:
        """Append the latents' K/V to the DynamicCache (one concatenation per layer)."""
        for idx, (keys, values) in enumerate(self.parts):
            self.cache.update(keys.tail[:, :, self.seeded :], values.tail[:, :, self.seeded :], idx)


class LatentStepper:
    """The latent passes after the prefix of one batch, driving the decoder's layers directly.

    Built once per forward on the batch's DynamicCache, which pass 0 (the decoder's own forward)
    filled with the prefix: RoPE for every position and the padding mask [B, 1, 1, L] (True =
    attend), or no mask when nothing is padded, as transformers does (its sdpa then picks a
    kernel without a mask input). One-token passes (`__call__`) read the prefix K/V where they lie
    (LatentKV); the last pass (`finish`) appends the latents to the cache and runs the rest of the
    sequence. Attention reads the K/V heads grouped (hf_compat.grouped_attention): the one-token
    passes keep no copy of the cache for the backward, and the last pass keeps one, unrepeated (the
    plain step keeps the same of its one pass). With compile_mode (a torch.compile mode),
    one-token passes that record gradients run the layers compiled (fused kernels; with
    "reduce-overhead", CUDA graphs); the rest stays eager.
    """

    def __init__(
        self,
        decoder: nn.Module,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
        cache: DynamicCache,
        compile_mode: str | None,
    ) -> None:
        self.decoder = decoder
        self.cos, self.sin = rope
        self.mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        self.cols = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        self.cache = cache
        self.latents: LatentKV | None = None  # built at the first one-token pass, once pass 0 filled the cache
        self.cache_kw = cache_keyword(type(decoder.layers[0]).forward)
        self.run = compiled_run_layers(compile_mode) if compile_mode and torch.is_grad_enabled() else run_layers

    @classmethod
    def create(
        cls,
        decoder: nn.Module,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        compile_mode: str | None = None,
    ) -> LatentStepper | None:
        """A stepper for this batch, or None where the layers cannot be driven directly (or attention
        is not sdpa, the only kind whose function reads K/V in two parts)."""
        sdpa = decoder.config._attn_implementation == "sdpa"
        rope = rope_table(decoder, embeds, position_ids) if sdpa and drivable(decoder) else None
        return None if rope is None else cls(decoder, rope, attention_mask, cache, compile_mode)

    def __call__(self, hidden: torch.Tensor, column: int) -> torch.Tensor:
        """Post-norm last hidden state of column `column`, a latent (its input embedding: hidden [B, 1, H])."""
        rope = (self.cos[:, column : column + 1], self.sin[:, column : column + 1])
        mask = None if self.mask is None else self.mask[..., : column + 1]
        if self.latents is None:
            self.latents = LatentKV(self.cache, len(self.decoder.layers))
        with grouped_attention(self.decoder.config):
            return self.run(self.decoder, hidden, rope, mask, self.latents, self.cache_kw)

    def finish(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Post-norm last hidden states of columns start.. (inputs hidden [B, T, H]), after the latents."""
        if self.latents is not None:
            self.latents.commit()
        end = start + hidden.shape[1]
        rope = (self.cos[:, start:end], self.sin[:, start:end])
        allowed = (self.cols[:end] <= self.cols[start:end, None])[None, None]  # (1, 1, T, end): causal
        if self.mask is not None:
            allowed = allowed & self.mask[..., :end]
        config = self.decoder.config
        device = hidden.device.type
        # the dtype sdpa computes in: autocast's, else that of the rotated queries (RoPE's)
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.cos.dtype
        mask = grouped_rows_mask(allowed, config.num_attention_heads // config.num_key_value_heads, dtype)
        with grouped_attention(config):
            return run_layers(self.decoder, hidden, rope, mask, self.cache, self.cache_kw)


class StaticKV:
    """Per-layer K/V buffers that the decoder layers write into in place (duck-types Cache.update).

    `column` (a one-element device tensor) is where the next token's K/V go; the caller advances it.
    """

    def __init__(self, prefix: DynamicCache, n_layers: int, total_len: int, column: torch.Tensor) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for idx in range(n_layers):
            past_k, past_v = layer_past(prefix, idx)
            if past_k is None or past_v is None:
                raise ValueError(f"the prompt's cache has no keys for decoder layer {idx}")
            self.keys.append(_extend(past_k, total_len))
            self.values.append(_extend(past_v, total_len))
        self.column = column

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(2, self.column, keys)
        self.values[layer_idx].index_copy_(2, self.column, values)
        return self.keys[layer_idx], self.values[layer_idx]


def _extend(past: torch.Tensor, total_len: int) -> torch.Tensor:
    buffer = past.new_zeros(*past.shape[:2], total_len, past.shape[3])
    buffer[:, :, : past.shape[2]] = past
    return buffer


class LanguageModel(Protocol):
    """What the decoders need of coconut's model adapter."""

    decoder: nn.Module

    def decode(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor: ...

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor: ...


class GreedyDecoder(abc.ABC):
    """Greedy decoding state in fixed device buffers: the tokens so far and which samples are done.

    `tokens[:, 0]` is the first new token (from the prompt's logits); each `step()` feeds
    `tokens[:, t]` through the decoder and writes `tokens[:, t + 1]`, pad once a sample has
    emitted eos. No step reads anything back to the host.
    """

    def __init__(
        self, lm: LanguageModel, prompt: PromptState, max_new_tokens: int, eos_token_id: int, pad_token_id: int
    ) -> None:
        batch, device = prompt.logits.shape[0], prompt.logits.device
        self.lm, self.prompt = lm, prompt
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self._emit(prompt.logits, torch.zeros(1, dtype=torch.long, device=device))

    def _emit(self, logits: torch.Tensor, t: torch.Tensor) -> None:
        """Write the greedy token for position t (a one-element device tensor), pad if finished."""
        token = torch.where(self.finished, self.pad_token_id, logits.argmax(-1))
        self.finished |= token == self.eos_token_id
        self.tokens.index_copy_(1, t, token[:, None])

    @abc.abstractmethod
    def step(self) -> None:
        """Feed the last token through the decoder and write the next one."""


class CacheGreedyDecoder(GreedyDecoder):
    """Any decoder through its own forward and the prompt's growing DynamicCache (the general path)."""

    def __init__(
        self, lm: LanguageModel, prompt: PromptState, max_new_tokens: int, eos_token_id: int, pad_token_id: int
    ) -> None:
        super().__init__(lm, prompt, max_new_tokens, eos_token_id, pad_token_id)
        self.attention_mask = prompt.attention_mask
        self.t = 0

    def step(self) -> None:
        t, mask = self.t, self.attention_mask
        self.attention_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        positions = self.prompt.next_pos[:, None] + t
        hidden = self.lm.decode(
            self.lm.embed_tokens(self.tokens[:, t : t + 1]), self.attention_mask, positions, self.prompt.cache
        )
        self._emit(self.lm.head(hidden[:, -1]), torch.full((1,), t + 1, device=self.tokens.device))
        self.t += 1


class StaticGreedyDecoder(GreedyDecoder):
    """Llama/Qwen2-style decoders driven layer by layer on preallocated buffers (module docstring)."""

    def __init__(
        self,
        lm: LanguageModel,
        rope: tuple[torch.Tensor, torch.Tensor],
        prompt: PromptState,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
    ) -> None:
        super().__init__(lm, prompt, max_new_tokens, eos_token_id, pad_token_id)
        attention_mask = prompt.attention_mask
        batch, prompt_len = attention_mask.shape
        device = attention_mask.device
        total = prompt_len + max_new_tokens
        self.decoder = lm.decoder
        self.prompt_len = prompt_len
        self.cache_kw = cache_keyword(type(self.decoder.layers[0]).forward)
        self.column = torch.full((1,), prompt_len, dtype=torch.long, device=device)
        self.cache = StaticKV(prompt.cache, len(self.decoder.layers), total, self.column)
        self.valid = torch.cat(
            [attention_mask.bool(), attention_mask.new_ones(batch, max_new_tokens, dtype=torch.bool)], 1
        )
        self.cols = torch.arange(total, device=device)
        self.cos, self.sin = rope  # [B, max_new_tokens, D]: new token t sits at position next_pos + t

    @classmethod
    def create(
        cls, lm: LanguageModel, prompt: PromptState, max_new_tokens: int, eos_token_id: int, pad_token_id: int
    ) -> StaticGreedyDecoder | None:
        """A decoder for this prompt, or None where the layers cannot be driven directly."""
        if not drivable(lm.decoder):
            return None
        positions = prompt.next_pos[:, None] + torch.arange(max_new_tokens, device=prompt.next_pos.device)
        like = lm.embed_tokens(prompt.logits.argmax(-1)[:, None])  # the embeddings' dtype and device
        rope = rope_table(lm.decoder, like, positions)
        if rope is None:
            return None
        return cls(lm, rope, prompt, max_new_tokens, eos_token_id, pad_token_id)

    def step(self) -> None:
        t = self.column - self.prompt_len  # index of the token fed in
        hidden = self.lm.embed_tokens(self.tokens.index_select(1, t))
        rope = (self.cos.index_select(1, t), self.sin.index_select(1, t))
        mask = (self.valid & (self.cols <= self.column))[:, None, None, :]
        with grouped_attention(self.decoder.config):
            hidden = run_layers(self.decoder, hidden, rope, mask, self.cache, self.cache_kw)
        self._emit(self.lm.head(hidden[:, -1]), t + 1)
        self.column.add_(1)


def capture_cuda_graph(decoder: StaticGreedyDecoder) -> None:
    """Replace decoder.step by the replay of one captured CUDA graph of it.

    The step is shape- and address-stable and never syncs, so replaying the recorded kernels is the
    same computation with no per-op host work. One warm-up step on a side stream (cuBLAS and
    allocator set-up must not happen during capture) runs first; the state it advanced is restored.
    Autocast's weight-cast cache would hand the graph tensors that are freed after capture, so the
    capture runs with that cache off.
    """
    saved = [buf.clone() for buf in (decoder.tokens, decoder.finished, decoder.column)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decoder.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    cast = (
        torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        if torch.is_autocast_enabled("cuda")
        else contextlib.nullcontext()
    )
    # thread_local: a DataLoader's pin-memory thread may use CUDA while this thread captures
    with torch.cuda.graph(graph, capture_error_mode="thread_local"), cast:
        decoder.step()
    for buf, value in zip((decoder.tokens, decoder.finished, decoder.column), saved):
        buf.copy_(value)
    decoder.step = graph.replay  # type: ignore[method-assign]
