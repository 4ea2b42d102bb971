"""COCONUT's latent loop: continuous thoughts fed back as input embeddings.

The i-th latent position receives the final-layer (post-norm) hidden state of the position just
before it, computed with latents 1..i-1 already in place (docs/design.md §1). With latents aligned to
one column by the collator, n latents take n+1 passes over the language model; a DynamicCache
makes each token processed once. Images are encoded once per forward, before the loop.

The module knows nothing about InternVL: a ModelAdapter (embed text + images, run the decoder on
embeddings with a cache, project to logits) hides the model. Text-only causal LMs use the same
code with no images.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from dataset import IGNORE_INDEX, Batch, LatentLayoutError
from modeling.decoder_steps import (
    CacheGreedyDecoder,
    GreedyDecoder,
    LatentStepper,
    PromptState,
    StaticGreedyDecoder,
    capture_cuda_graph,
)
from modeling.hf_compat import cache_keyword


class ImageFeatureMismatch(ValueError):
    """A sample's <IMG_CONTEXT> placeholders do not match its image tiles."""


@dataclasses.dataclass
class Thoughts:
    """A generate call's continuous thoughts and what the LM head reads in each (latent decoding).

    Row b holds sample b's thoughts in order; entries past counts[b] are padding (a batch pads every
    sample to its most latents, or to more when synced ranks run more passes).
    """

    hidden: torch.Tensor  # (B, n, H) last hidden states fed back as the latents' input embeddings
    counts: torch.Tensor  # (B,) thoughts per sample
    top_ids: torch.Tensor  # (B, n, k) token ids, most probable first
    top_probs: torch.Tensor  # (B, n, k) their probabilities under the LM head (fp32 softmax)


@dataclasses.dataclass
class Outputs:
    """What forward returns. logits (B, L, V) only when return_logits=True; inputs_embeds (B, L, H), the
    input embeddings with every latent replaced by its thought, only when return_filled_embeds=True."""

    loss: torch.Tensor
    inputs_embeds: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_label_tokens: torch.Tensor | None = None
    thought_norm: torch.Tensor | None = None
    token_norm: torch.Tensor | None = None


class CausalLMAdapter:
    """Text-only HF causal LM: embeddings, decoder with a cache, output head."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.decoder = model.get_decoder()
        self.cache_kw = cache_keyword(self.decoder.forward)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        num_patches: torch.Tensor | None = None,
        synced_gpus: bool = False,
    ) -> torch.Tensor:
        if pixel_values is not None:
            raise ValueError("this model takes no images (pixel_values given to a text-only model)")
        return self.embed_tokens(input_ids)

    def decode(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """Run the decoder on new positions; returns their post-norm last hidden states."""
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kw: cache},
        )
        return out.last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)

    def latent_stepper(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        compile_mode: str | None = None,
    ) -> LatentStepper | None:
        """The latent passes' fast path for this batch, where the decoder allows (decoder_steps.py)."""
        return LatentStepper.create(self.decoder, embeds, attention_mask, position_ids, cache, compile_mode)

    def greedy_decoder(
        self,
        prompt: PromptState,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
    ) -> GreedyDecoder:
        """Decoding state after the prompt: static buffers where the decoder allows (decoder_steps.py)."""
        static = StaticGreedyDecoder.create(self, prompt, max_new_tokens, eos_token_id, pad_token_id)
        if static is not None:
            return static
        return CacheGreedyDecoder(self, prompt, max_new_tokens, eos_token_id, pad_token_id)


class InternVLAdapter(CausalLMAdapter):
    """transformers' native InternVL: image features are scattered into <IMG_CONTEXT> positions once."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.config = model.config
        self.tokens_per_tile = _tokens_per_tile(model.config)

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        num_patches: torch.Tensor | None = None,
        synced_gpus: bool = False,
    ) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        placeholders = input_ids == self.config.image_token_id
        if pixel_values is None or pixel_values.shape[0] == 0:
            if synced_gpus:
                # Under FSDP every rank must call the vision tower (its all-gathers must match):
                # a rank without images runs one zero tile and adds 0 × its features.
                size = self.config.vision_config.image_size
                size = size[0] if isinstance(size, (list, tuple)) else size
                dummy = torch.zeros(1, 3, size, size, device=embeds.device, dtype=embeds.dtype)
                embeds = embeds + 0.0 * self._image_features(dummy).sum().to(embeds.dtype)
            expected = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
            _check_placeholders(placeholders, expected)
            return embeds
        if num_patches is None:
            if input_ids.shape[0] != 1:
                raise ValueError("num_patches is required for a batch of more than one sample with images")
            num_patches = torch.tensor([pixel_values.shape[0]])
        num_patches = torch.as_tensor(num_patches)
        if int(num_patches.sum()) != pixel_values.shape[0]:
            raise ImageFeatureMismatch(
                f"num_patches sums to {int(num_patches.sum())} tiles but pixel_values has {pixel_values.shape[0]}"
            )
        features = self._image_features(pixel_values)
        if features.shape[1] != self.tokens_per_tile:
            raise ImageFeatureMismatch(
                f"the vision tower gives {features.shape[1]} features per tile, the prompt has "
                f"{self.tokens_per_tile} <IMG_CONTEXT> per tile: pixel_values are not image_size tiles"
            )
        _check_placeholders(placeholders, num_patches.to(input_ids.device) * self.tokens_per_tile)
        # masked_scatter fills positions in row-major order: sample 0's placeholders first, which is
        # the order in which the collator concatenated the tiles.
        return embeds.masked_scatter(placeholders.unsqueeze(-1), features.to(embeds.dtype))


def _tokens_per_tile(config: Any) -> int:
    size = config.vision_config.image_size
    patch = config.vision_config.patch_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return int((size // patch) ** 2 * config.downsample_ratio**2)


def _check_placeholders(placeholders: torch.Tensor, expected: torch.Tensor) -> None:
    counts = placeholders.sum(1)
    if not torch.equal(counts, expected.to(counts.device)):
        raise ImageFeatureMismatch(
            f"<IMG_CONTEXT> placeholders per sample {counts.tolist()} != image tokens per sample {expected.tolist()}"
        )


def make_adapter(model: nn.Module) -> CausalLMAdapter:
    """The adapter for a model: InternVL if it has an image tower, else a plain causal LM."""
    if getattr(model.config, "model_type", None) == "internvl":
        return InternVLAdapter(model)
    return CausalLMAdapter(model)


@dataclasses.dataclass
class _Layout:
    """Where the latents are: host ints (from the collator, or one device sync per forward)."""

    column: int  # first latent column (shared by every sample that has latents)
    n_passes: int  # latent passes before the final one (= max latents, or more when ranks sync)
    counts: torch.Tensor  # (B,) latents per sample, on device


class Coconut(nn.Module):
    """Wraps a causal LM (or InternVL) with COCONUT's latent loop.

    The constructor keeps the original's positional arguments (base_causallm, latent_token_id,
    start_latent_id, end_latent_id, eos_token_id), then pad_token_id (default: eos); what the original
    has no word for comes after as keyword-only options, fixed at construction (nothing is set on the
    instance afterwards):

    - feed_thoughts: False runs pause as thought: <|latent|> tokens stay ordinary input tokens and
      one pass runs the plain causal LM over the whole sequence, as the original runs it without
      the Coconut wrapper.
    - synced_gpus: several ranks run FSDP: every rank runs as many latent passes and decode steps
      as the busiest one (the collectives must match). The original's generate takes it per call;
      here forward needs it too, so the model holds it.
    - compile_latent_passes: a torch.compile mode ("default", "reduce-overhead") for the one-token
      latent passes of training steps (decoder_steps.LatentStepper); None keeps them eager.
    - decode_cuda_graph: generate's default for cuda_graph.

    The original's forward(input_ids, attention_mask, labels, position_ids, **kwargs) and
    generate(input_ids, attention_mask, max_new_tokens, ...) take loose tensors and swallow
    unknown keys. Here forward(batch) and generate(batch, ...) take one dataset.Batch with the same
    tensors as named, shape-checked fields (plus the images and the latent layout the collator
    found): a batch of the wrong kind fails at once instead of a key being silently ignored.
    """

    def __init__(
        self,
        base_causallm: nn.Module,
        latent_token_id: int,
        start_latent_id: int,
        end_latent_id: int,
        eos_token_id: int,
        pad_token_id: int | None = None,
        *,
        feed_thoughts: bool = True,
        synced_gpus: bool = False,
        compile_latent_passes: str | None = None,
        decode_cuda_graph: bool = False,
    ) -> None:
        super().__init__()
        self.base_causallm = base_causallm
        self.feed_thoughts = feed_thoughts
        self.latent_token_id = latent_token_id
        self.start_latent_id = start_latent_id
        self.end_latent_id = end_latent_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        self.adapter = make_adapter(base_causallm)
        self.synced_gpus = synced_gpus
        self.compile_latent_passes = compile_latent_passes
        self.decode_cuda_graph = decode_cuda_graph
        self.gen_forward_cnt = 0

    # ------------------------------------------------------------------------------------------
    def _layout(self, batch: Batch, synced: bool) -> _Layout:
        input_ids = batch.input_ids
        length = input_ids.shape[1]
        if not self.feed_thoughts:
            return _Layout(column=length, n_passes=0, counts=input_ids.new_zeros(input_ids.shape[0]))
        if batch.latent_counts is None:  # a hand-built batch: find and check the latents on the device
            column, n_max, counts = self._find_latents(input_ids)
        else:  # the collator's host numbers: nothing to read back from the device
            n_max = max(batch.latent_counts, default=0)
            column = batch.latent_column if n_max else length
            counts = torch.tensor(batch.latent_counts, dtype=torch.long).to(input_ids.device, non_blocking=True)
        if synced and dist.is_available() and dist.is_initialized():
            n = torch.tensor([n_max], device=input_ids.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            n_max = int(n.item())
        if n_max == 0:
            return _Layout(column=length, n_passes=0, counts=counts)
        if column == length:  # no latents on this rank, but other ranks have some
            column = 1
        return _Layout(column=column, n_passes=n_max, counts=counts)

    def _find_latents(self, input_ids: torch.Tensor) -> tuple[int, int, torch.Tensor]:
        """(first latent column or L if none, most latents, (B,) latents per sample), with one host sync."""
        is_latent = input_ids == self.latent_token_id
        counts = is_latent.sum(1)
        length = input_ids.shape[1]
        has = counts > 0
        first = torch.where(has, is_latent.int().argmax(1), torch.full_like(counts, length))
        column = first.min()
        cols = torch.arange(length, device=input_ids.device)
        expected = (cols >= column) & (cols < column + counts[:, None])
        aligned = (expected == is_latent).all() & ((first == column) | ~has).all()
        n_max, column_host, aligned_host = torch.stack([counts.max(), column, aligned.long()]).tolist()
        if not aligned_host:
            raise LatentLayoutError(
                "latent tokens must be one contiguous run per sample starting at the same column "
                "(use dataset.MyCollator, which left-pads to align them)"
            )
        return column_host, n_max, counts

    def _latent_prefill(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        layout: _Layout,
    ) -> tuple[list[torch.Tensor], DynamicCache]:
        """Run all passes over the sequence; returns the per-pass hidden states and the cache.

        Pass 0 covers [0, column); pass p (1..n-1) the single column column+p-1; the last pass the rest.
        The column a pass starts with is latent p for samples with at least p latents: it is
        replaced (out of place, so autograd sees every use) by the previous pass's last hidden state.
        """
        cache = DynamicCache()
        hiddens: list[torch.Tensor] = []
        length = embeds.shape[1]
        # The passes after the first are driven layer by layer where the decoder allows.
        stepper = (
            self.adapter.latent_stepper(embeds, attention_mask, position_ids, cache, self.compile_latent_passes)
            if layout.n_passes
            else None
        )
        start = 0
        for p in range(layout.n_passes + 1):
            end = length if p == layout.n_passes else layout.column + p
            chunk = embeds[:, start:end]
            if p > 0:
                fill = (layout.counts >= p).view(-1, 1, 1)
                first = torch.where(fill, hiddens[-1][:, -1:], chunk[:, :1])
                chunk = torch.cat([first, chunk[:, 1:]], dim=1)
            if p == 0 or stepper is None:
                hiddens.append(self.adapter.decode(chunk, attention_mask[:, :end], position_ids[:, start:end], cache))
            elif p < layout.n_passes:
                hiddens.append(stepper(chunk, start))
            else:
                hiddens.append(stepper.finish(chunk, start))
            start = end
        self.gen_forward_cnt += layout.n_passes + 1
        return hiddens, cache

    @staticmethod
    def _pad_right(length_needed: int, *tensors_and_pads: tuple[torch.Tensor, int]) -> list[torch.Tensor]:
        out = []
        for t, pad in tensors_and_pads:
            extra = length_needed - t.shape[1]
            out.append(t if extra <= 0 else F.pad(t, (0, extra), value=pad))
        return out

    def _fit_layout(
        self, layout: _Layout, input_ids: torch.Tensor, *rest: tuple[torch.Tensor, int]
    ) -> list[torch.Tensor]:
        """Synced ranks may run more passes than this batch has columns for: pad on the right."""
        needed = layout.column + layout.n_passes if layout.n_passes else 0
        return self._pad_right(needed, (input_ids, self.pad_token_id), *rest)

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        batch: Batch,
        num_items_in_batch: torch.Tensor | float | None = None,
        return_logits: bool = False,
        return_filled_embeds: bool = False,
    ) -> Outputs:
        """Loss of a batch (with labels) with its latents filled in; see the module docstring.

        batch: input_ids, attention_mask, position_ids, labels (B, L); pixel_values (T, 3, S, S) for the
        T tiles of the batch's images, in sample order, num_patches (B,) tiles per sample. Returns Outputs:
        loss () (a mean, or a sum over num_items_in_batch), num_label_tokens (), logits (B, L, V) on request.

        num_items_in_batch, when given, divides the summed token loss instead of this batch's own
        label count (global normalisation across ranks and accumulation steps).
        """
        if batch.labels is None:
            raise ValueError("forward needs a Batch with labels (generation prompts have none: use generate)")
        synced = self.synced_gpus
        if self.compile_latent_passes == "reduce-overhead" and torch.is_grad_enabled():
            torch.compiler.cudagraph_mark_step_begin()  # a new step: earlier graph outputs may be reused
        layout = self._layout(batch, synced)
        input_ids, attention_mask, position_ids, labels = self._fit_layout(
            layout, batch.input_ids, (batch.attention_mask, 0), (batch.position_ids, 0), (batch.labels, IGNORE_INDEX)
        )
        embeds = self.adapter.embed(input_ids, batch.pixel_values, batch.num_patches, synced_gpus=synced)
        hiddens, _ = self._latent_prefill(embeds, attention_mask, position_ids, layout)
        hidden = torch.cat(hiddens, dim=1)  # (B, L, H)

        shift_labels = labels[:, 1:]
        selected = shift_labels != IGNORE_INDEX
        token_logits = self.adapter.head(hidden[:, :-1][selected]).float()
        loss_sum = F.cross_entropy(token_logits, shift_labels[selected], reduction="sum")
        n_tokens = selected.sum()
        denom = n_tokens.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = loss_sum / denom

        thoughts, is_thought = _thoughts(hiddens, layout)
        text = attention_mask.bool() & (input_ids != self.latent_token_id)
        return Outputs(
            loss=loss,
            inputs_embeds=_filled_embeds(embeds, thoughts, is_thought, layout) if return_filled_embeds else None,
            logits=self.adapter.head(hidden) if return_logits else None,
            num_label_tokens=n_tokens,
            thought_norm=_masked_mean(thoughts.detach().norm(dim=-1), is_thought) if layout.n_passes else None,
            token_norm=_masked_mean(embeds.detach().norm(dim=-1), text),
        )

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        batch: Batch,
        max_new_tokens: int = 16,
        stop_check_every: int = 4,
        cuda_graph: bool | None = None,
        thought_top_k: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, Thoughts]:
        """Batched greedy decoding of prompts after the latent passes; returns new tokens (B, T), pad after eos.

        thought_top_k > 0 also returns the continuous thoughts with their top-k tokens under the LM
        head: (tokens, Thoughts), as the original's output_embedding returns its embeddings.

        Each sample's tokens equal generating it alone. With synced_gpus every rank keeps stepping
        (dummy steps once done) until all ranks are finished, as FSDP needs. cuda_graph (default:
        decode_cuda_graph) replays each token step as one captured CUDA graph (one process,
        CUDA, a Llama/Qwen2-style decoder).
        """
        if cuda_graph is None:
            cuda_graph = self.decode_cuda_graph
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        synced = self.synced_gpus
        prompt = self.encode_prompt(batch, thought_top_k=thought_top_k)
        prompt, thoughts = prompt if thought_top_k else (prompt, None)
        decoder = self.adapter.greedy_decoder(prompt, max_new_tokens, self.eos_token_id, self.pad_token_id)
        device = batch.input_ids.device
        if cuda_graph and max_new_tokens > 1:
            if synced or not isinstance(decoder, StaticGreedyDecoder) or device.type != "cuda":
                raise ValueError(
                    "cuda_graph decoding needs one process (no FSDP), CUDA tensors and a decoder with "
                    f"rotary layers; got synced={synced}, device={device.type}, {type(decoder).__name__}"
                )
            capture_cuda_graph(decoder)
        steps = 1
        while steps < max_new_tokens:
            if steps % stop_check_every == 0 and self._all_done(decoder.finished, synced):
                break
            decoder.step()
            self.gen_forward_cnt += 1
            steps += 1
        tokens = decoder.tokens[:, :steps]
        return (tokens, thoughts) if thought_top_k else tokens

    def encode_prompt(self, batch: Batch, thought_top_k: int = 0) -> PromptState | tuple[PromptState, Thoughts]:
        """Images, latent passes and the whole prompt through the decoder: what decoding starts from.

        thought_top_k > 0 also returns the thoughts (see generate).
        """
        synced = self.synced_gpus
        layout = self._layout(batch, synced)
        input_ids, attention_mask, position_ids = self._fit_layout(
            layout, batch.input_ids, (batch.attention_mask, 0), (batch.position_ids, 0)
        )
        embeds = self.adapter.embed(input_ids, batch.pixel_values, batch.num_patches, synced_gpus=synced)
        hiddens, cache = self._latent_prefill(embeds, attention_mask, position_ids, layout)
        hidden = torch.cat(hiddens, dim=1)  # (B, L, H)
        cols = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (cols * attention_mask.bool()).argmax(1)  # last real position of each prompt
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        state = PromptState(cache, attention_mask, position_ids[rows, last] + 1, self.adapter.head(hidden[rows, last]))
        if not thought_top_k:
            return state
        # The head runs here, inside generate: under FSDP its weights are gathered only within the call.
        thoughts, _ = _thoughts(hiddens, layout)
        probs = self.adapter.head(thoughts).float().softmax(-1)  # (B, n, V)
        top = probs.topk(min(thought_top_k, probs.shape[-1]), dim=-1)
        return state, Thoughts(thoughts, layout.counts, top.indices, top.values)

    @staticmethod
    def _all_done(finished: torch.Tensor, synced: bool) -> bool:
        running = (~finished).sum()
        if synced and dist.is_available() and dist.is_initialized():
            dist.all_reduce(running)
        return int(running) == 0


def _thoughts(hiddens: list[torch.Tensor], layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous thoughts [B, n, H] (pass p's last hidden state is latent p+1) and which are real."""
    if layout.n_passes == 0:
        return hiddens[0][:, :0], layout.counts.new_zeros(layout.counts.shape[0], 0, dtype=torch.bool)
    thoughts = torch.cat([h[:, -1:] for h in hiddens[:-1]], dim=1)
    is_thought = torch.arange(layout.n_passes, device=thoughts.device)[None, :] < layout.counts[:, None]
    return thoughts, is_thought


def _filled_embeds(
    embeds: torch.Tensor, thoughts: torch.Tensor, is_thought: torch.Tensor, layout: _Layout
) -> torch.Tensor:
    """The input embeddings with every latent replaced by its thought (for inspection and logging)."""
    if layout.n_passes == 0:
        return embeds
    column, n = layout.column, layout.n_passes
    middle = torch.where(is_thought[..., None], thoughts.to(embeds.dtype), embeds[:, column : column + n])
    return torch.cat([embeds[:, :column], middle, embeds[:, column + n :]], dim=1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked entries without a host sync (no boolean indexing)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
