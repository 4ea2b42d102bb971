"""Step and decode benchmark of COCONUT-VL on the full-size InternVL3-1B architecture (random weights).

`python -m bench.bench_step [--tiny | --host-proxy] [--device cuda|cpu] [--dtype bf16|fp32] [--batch 8]
[--tiles 5] [--question 64] [--latents 6] [--answer 64] [--iters 5] [--warmup 2] [--new-tokens 32]
[--ragged 0] [--shapes 1] [--column-multiple 1] [--modes vision,sft,coconut,...] [--freeze-backbone] [--profile]
[--out results.jsonl]`

Builds the model from its config in the target dtype (no download; --tiny loads the offline tiny
checkpoint instead, --host-proxy builds the full depth at toy width), collates a synthetic batch
with the training collator and times each mode:

- vision:       vision tower + projector, forward + backward.
- sft:          plain fine-tuning step over the same tokens (latents replaced by ordinary tokens):
                one forward, logits only at labelled positions, backward. The lower bound.
- coconut:      coconut.Coconut forward + backward (vision once, KV-cached latent passes).
- naive:        the seed's design: a full model forward (vision tower included) per latent pass
                and for the loss, no cache.
- decode:       batched Coconut.generate, eos unreachable so every run decodes --new-tokens.
- decode_step:  one eager decode step of that generation, timed alone after the prefill.
- naive_decode: batch-size-1 greedy decoding without a KV cache, every token a full forward.
- decode_graph: decode with each token step replayed as a captured CUDA graph (CUDA only).
- coconut_compiled, coconut_graphed: coconut with compile_latent_passes default / reduce-overhead
                (opt-in: each compiles first).

Writes one JSON line per measurement (plus a header and a summary line) to stdout and --out.
Step modes also report saved_gib, what autograd keeps for the backward (measurable on a CPU too).

FLOPs are counted by component (embedding lookups and norms left out):
  vision  = m·P_vit·V·tiles + 2m·L_vit·V²·d_vit·tiles  (V = patches + CLS per tile; full attention;
            m = 6 for forward + backward, 2 when --freeze-backbone leaves only the forward)
  proj    = 6·P_proj·I·tiles                            (I = image tokens per tile)
  lm      = 6·P_body·B·S + 6·L·S²·(heads·head_dim)·B    (B·S tokens; causal attention = half of 12)
  head    = 6·P_head·n_labels                           (lm_head on labelled positions only)
The sft count is the useful work of one step; coconut and naive rates use the same count.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, InternVLConfig

from coconut import Coconut
from dataset import IGNORE_INDEX, Batch, LatentIds
from modeling.assembly import coconut_of
from multimodal.collator_mm import MultimodalCollator
from multimodal.dataset_mm import ImageTokens
from multimodal.internvl import internvl3_config
from multimodal.tiny_model import QWEN25_SPECIAL_START_ID, TINY_BPE_VOCAB_SIZE, ensure_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_DIR = REPO_ROOT / "data" / "tiny_internvl"
MODES = (
    "vision",
    "sft",
    "coconut",
    "decode",
    "decode_step",
    "naive",
    "naive_decode",
    "decode_graph",
    "coconut_compiled",
    "coconut_graphed",
)
CUDA_ONLY_MODES = ("decode_graph",)
OPT_IN_MODES = ("coconut_compiled", "coconut_graphed")  # run only when --modes names them: each compiles
STEP_MODES = ("vision", "sft", "coconut", "naive", "coconut_compiled", "coconut_graphed")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# InternVL3-1B (docs/design.md §3): vocabulary and special-token ids of the real tokenizer.
VOCAB = 151674
PAD_ID, EOS_ID, IMG_START_ID, IMG_END_ID, IMG_CONTEXT_ID = 151643, 151645, 151665, 151666, 151667
# The host-overhead proxy's small vocabulary: ordinary text ids below PROXY_PAD.
PROXY_VOCAB, PROXY_PAD, PROXY_EOS, PROXY_IMAGE = 995, 990, 991, (992, 994, 993)  # image: start, context, end
# Parameter counts of the real model (docs/design.md §8, vocabulary 151674).
REFERENCE_PARAMS = {
    "vision_tower": 304_012_288,
    "projector": 4_482_816,
    "lm_body": 357_898_112,
    "lm_embed": 135_899_904,
    "lm_head": 135_899_904,
    "total": 938_193_024,
}
ROPE = {
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1_000_000.0},  # InternVL3-1B's
    "default": {"rope_type": "default", "rope_theta": 1_000_000.0},
}


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """Ids the synthetic batch uses; ordinary text ids are 0..n_text-1."""

    n_text: int
    pad: int
    eos: int
    image: ImageTokens
    start_latent: int
    latent: int
    end_latent: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """Per-sample token layout: image block, question, latent block, answer + eos."""

    batch: int
    tiles: int
    image_tokens: int
    question: int
    latents: int
    answer: int
    ragged: int = 0

    def question_of(self, idx: int) -> int:
        """Sample idx's question length: up to `ragged` tokens shorter, so the batch is left-padded."""
        return self.question - round(self.ragged * idx / max(self.batch - 1, 1))

    @property
    def first_latent(self) -> int:
        return 1 + self.image_tokens + 1 + self.question + 1  # <img> ... </img> question <|start-latent|>

    @property
    def prompt(self) -> int:
        """Tokens up to and including <|end-latent|>: what decoding starts from."""
        return self.first_latent + self.latents + 1

    @property
    def seq(self) -> int:
        return self.prompt + self.answer + 1


@dataclasses.dataclass
class Bench:
    """Everything the modes share."""

    args: argparse.Namespace
    model: nn.Module
    coconut: Coconut
    ids: TokenIds
    layout: Layout
    batches: list[Batch]  # the step modes cycle through them (--shapes)
    sft_ids: list[torch.Tensor]  # each batch's ids for the plain step
    prompts: Batch
    n_labels: int
    flops: dict[str, float]

    @property
    def batch(self) -> Batch:
        return self.batches[0]


# ---------------------------------------------------------------------------------------------
# Model
def internvl3_1b_config(rope: str) -> InternVLConfig:
    """The native InternVLConfig of InternVL3-1B (InternViT-300M + Qwen2.5-0.5B shape, untied head)."""
    return internvl3_config(
        vision=dict(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=448
        ),
        text=dict(
            vocab_size=VOCAB,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_parameters=dict(ROPE[rope]),
            bos_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        ),
        image_token_id=IMG_CONTEXT_ID,
        image_seq_length=256,
    )


def host_proxy_config(rope: str) -> InternVLConfig:
    """InternVL3-1B's depth and op sequence at toy width (24 vision + 24 decoder layers, 1 token per tile).

    Its compute is negligible, so on a CPU its step and decode times are the per-op host work
    (Python, dispatch) that bounds the one-token latent passes and decoding on a GPU.
    """
    return internvl3_config(
        vision=dict(hidden_size=32, num_hidden_layers=24, num_attention_heads=2, intermediate_size=64, image_size=28),
        text=dict(
            vocab_size=PROXY_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=24,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_parameters=dict(ROPE[rope]),
            bos_token_id=PROXY_PAD,
            eos_token_id=PROXY_EOS,
            pad_token_id=PROXY_PAD,
        ),
        image_token_id=PROXY_IMAGE[1],
        image_seq_length=1,
    )


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameters by component, named as in docs/design.md §8."""

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    inner = model.model
    counts = {
        "vision_tower": count(inner.vision_tower),
        "projector": count(inner.multi_modal_projector),
        "lm_embed": count(inner.language_model.embed_tokens),
        "lm_head": count(model.lm_head),
    }
    counts["lm_body"] = count(inner.language_model) - counts["lm_embed"]
    counts["total"] = count(model)
    return counts


def build_model(args: argparse.Namespace) -> tuple[nn.Module, TokenIds, dict[str, Any]]:
    """The model in the target dtype on the target device, with three latent tokens appended.

    Returns the model, the token ids and the parameter counts (before and after the latent rows).
    """
    dtype = DTYPES[args.dtype]
    if args.tiny:
        model_dir = ensure_tiny_model(TINY_DIR)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        model = model.to(args.device)
        processor = AutoProcessor.from_pretrained(model_dir)
        n_text, pad, eos = TINY_BPE_VOCAB_SIZE, processor.tokenizer.pad_token_id, processor.tokenizer.eos_token_id
        image = ImageTokens.from_processor(processor)
    else:
        config = host_proxy_config(args.rope) if args.host_proxy else internvl3_1b_config(args.rope)
        # Built in place in the target dtype: RoPE buffers stay fp32 (model.to(bf16) would cast them).
        with torch.device(args.device):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
        if args.host_proxy:
            n_text, pad, eos, image_ids = PROXY_PAD, PROXY_PAD, PROXY_EOS, PROXY_IMAGE
        else:
            n_text, pad, eos, image_ids = (
                QWEN25_SPECIAL_START_ID,
                PAD_ID,
                EOS_ID,
                (IMG_START_ID, IMG_CONTEXT_ID, IMG_END_ID),
            )
        image = ImageTokens(*image_ids, model.config.image_seq_length)
    counts = param_counts(model)
    if not (args.tiny or args.host_proxy) and counts != REFERENCE_PARAMS:
        raise RuntimeError(f"full-size parameter counts {counts} differ from docs/design.md §8 {REFERENCE_PARAMS}")
    vocab = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab + 3, mean_resizing=False)  # start, latent, end (add_latent_tokens' order)
    ids = TokenIds(n_text, pad, eos, image, vocab, vocab + 1, vocab + 2)
    params = {**counts, "total_with_latents": param_counts(model)["total"]}
    if args.freeze_backbone:
        model.model.vision_tower.requires_grad_(False)
    return model, ids, params


# ---------------------------------------------------------------------------------------------
# Synthetic batch
def _side(size: int | Sequence[int]) -> int:
    return size[0] if isinstance(size, (list, tuple)) else size


def make_features(layout: Layout, ids: TokenIds, image_size: int, seed: int, shift: int = 0) -> list[dict[str, Any]]:
    """Random samples in the training layout; labels on the answer and eos only.

    shift moves `shift` tokens from the question to the answer: the same length, the latents earlier.
    """
    gen = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(0, ids.n_text, (n,), generator=gen).tolist()

    features = []
    for idx in range(layout.batch):
        latents = [ids.start_latent] + [ids.latent] * layout.latents + [ids.end_latent]
        prompt = ids.image.block(layout.tiles) + text(layout.question_of(idx) - shift) + latents
        answer = text(layout.answer + shift) + [ids.eos]
        input_ids = prompt + answer
        features.append(
            {
                "input_ids": input_ids,
                "labels": [IGNORE_INDEX] * len(prompt) + answer,
                "attention_mask": [1] * len(input_ids),
                "idx": idx,
                "pixel_values": torch.randn(layout.tiles, 3, image_size, image_size, generator=gen),
                "num_patches": layout.tiles,
            }
        )
    return features


def collate(
    features: list[dict[str, Any]], ids: TokenIds, device: str, dtype: torch.dtype, column_multiple: int = 1
) -> Batch:
    """The training collator's batch (latent-aligned, tiles concatenated) on the device."""
    batch = MultimodalCollator(ids.pad, ids.latent, column_multiple=column_multiple)(features).to(device)
    return dataclasses.replace(batch, pixel_values=batch.pixel_values.to(dtype))


def prompt_of(feature: dict[str, Any], end_latent: int) -> dict[str, Any]:
    """A sample cut after <|end-latent|>, without labels: the decoding prompt."""
    stop = feature["input_ids"].index(end_latent) + 1
    cut = ("input_ids", "attention_mask")
    return {k: v[:stop] if k in cut else v for k, v in feature.items() if k != "labels"}


def rows(batch: Batch, start: int, stop: int, tiles: int) -> Batch:
    """Samples start..stop-1 of a prompt batch whose samples all have `tiles` tiles."""
    return Batch(
        input_ids=batch.input_ids[start:stop],
        attention_mask=batch.attention_mask[start:stop],
        position_ids=batch.position_ids[start:stop],
        pixel_values=batch.pixel_values[start * tiles : stop * tiles],
        num_patches=batch.num_patches[start:stop],
        latent_column=batch.latent_column,
        latent_counts=batch.latent_counts[start:stop],
    )


# ---------------------------------------------------------------------------------------------
# The computations measured
def image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Vision tower + projector: [tiles, tokens per tile, hidden]."""
    return model.model.get_image_features(pixel_values=pixel_values).pooler_output


def label_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy with the head applied only at labelled positions."""
    shift = labels[:, 1:]
    selected = shift != IGNORE_INDEX
    return F.cross_entropy(head(hidden[:, :-1][selected]).float(), shift[selected])


def sft_loss(model: nn.Module, input_ids: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Plain fine-tuning loss: one forward of the language model with the images merged once."""
    hidden = model.model(
        input_ids=input_ids,
        pixel_values=batch.pixel_values,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).last_hidden_state
    return label_loss(model.lm_head, hidden, batch.labels)


def full_forward(
    model: nn.Module,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    pixel_values: torch.Tensor,
    **kwargs: Any,
) -> Any:
    """The seed's per-pass call: the whole model (vision tower included) on the whole sequence, no cache."""
    return model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        pixel_values=pixel_values,
        use_cache=False,
        **kwargs,
    )


def naive_fill(model: nn.Module, latent_id: int, batch: Batch) -> torch.Tensor:
    """Input embeddings with latent i set to the last hidden state before it, one full forward per latent."""
    input_ids = batch.input_ids
    embeds = model.get_input_embeddings()(input_ids)
    is_latent = input_ids == latent_id
    rank = is_latent.long().cumsum(1) * is_latent  # i at a sample's i-th latent, 0 elsewhere
    for i in range(1, int(rank.max()) + 1):
        out = full_forward(
            model,
            embeds,
            batch.attention_mask,
            batch.position_ids,
            batch.pixel_values,
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1]
        before = F.pad(hidden[:, :-1], (0, 0, 1, 0))  # position p holds the hidden state of p-1
        embeds = torch.where((rank == i).unsqueeze(-1), before.to(embeds.dtype), embeds)
    return embeds


def naive_loss(model: nn.Module, latent_id: int, batch: Batch) -> torch.Tensor:
    """COCONUT's loss the seed's way: n+1 full forwards, vision re-run in each, full-vocabulary logits."""
    embeds = naive_fill(model, latent_id, batch)
    logits = full_forward(model, embeds, batch.attention_mask, batch.position_ids, batch.pixel_values).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def naive_generate(model: nn.Module, latent_id: int, prompt: Batch, new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a KV cache: every token recomputes the whole prefix (the original's method)."""
    embeds = naive_fill(model, latent_id, prompt)
    mask, positions = prompt.attention_mask, prompt.position_ids
    tokens = []
    for _ in range(new_tokens):
        logits = full_forward(model, embeds, mask, positions, prompt.pixel_values).logits[:, -1]
        token = logits.argmax(-1)
        tokens.append(token)
        embeds = torch.cat([embeds, model.get_input_embeddings()(token)[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    return torch.stack(tokens, dim=1)


def step_flops(model: nn.Module, layout: Layout, n_labels: int, frozen_vision: bool) -> dict[str, float]:
    """FLOPs of one plain training step by component (formula in the module docstring)."""
    vc, tc = model.config.vision_config, model.config.text_config
    counts = param_counts(model)
    patches = (_side(vc.image_size) // _side(vc.patch_size)) ** 2 + 1  # + CLS
    tiles = layout.batch * layout.tiles
    mult = 2 if frozen_vision else 6
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    tokens, seq = layout.batch * layout.seq, layout.seq
    flops = {
        "vision": mult * counts["vision_tower"] * patches * tiles
        + 2 * mult * vc.num_hidden_layers * patches**2 * vc.hidden_size * tiles,
        "projector": 6 * counts["projector"] * layout.image_tokens * layout.batch,
        "lm": 6 * counts["lm_body"] * tokens
        + 6 * tc.num_hidden_layers * seq**2 * tc.num_attention_heads * head_dim * layout.batch,
        "head": 6 * counts["lm_head"] * n_labels,
    }
    flops["step"] = sum(flops.values())
    return {k: float(v) for k, v in flops.items()}


# ---------------------------------------------------------------------------------------------
# Measuring
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], args: argparse.Namespace, profile: bool = False) -> tuple[dict[str, Any], Any]:
    """Median/min/max wall ms of fn over --iters after --warmup runs, and fn's last result.

    cpu_ms_median is the process's CPU time per run (all threads): on a GPU the host work, on a
    CPU shared with other jobs a figure their load disturbs less than the wall clock.
    With profile (--profile), one more run under torch.profiler adds a "profile" entry.
    """
    times, cpu_times = [], []
    for i in range(args.warmup + args.iters):
        _sync(args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = fn()
        _sync(args.device)
        if i >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
            cpu_times.append((time.process_time() - cpu_start) * 1e3)
    timing: dict[str, Any] = {
        "ms_median": round(statistics.median(times), 3),
        "ms_min": round(min(times), 3),
        "ms_max": round(max(times), 3),
        "cpu_ms_median": round(statistics.median(cpu_times), 3),
    }
    if profile:
        timing["profile"] = profile_run(fn, args.device, args.profile_top)
    return timing, result


def profile_run(fn: Callable[[], Any], device: str, top: int) -> dict[str, Any]:
    """Where one run's time goes: operator and kernel-launch counts, busy GPU time, top ops.

    gpu_busy_ms well below the wall time means the run is bound by host work, not by the GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    wall = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()

    def device_us(event: Any) -> float:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)

    def ranked(key: Callable[[Any], float]) -> list[list[Any]]:
        best = sorted((e for e in events if key(e) > 0), key=key, reverse=True)[:top]
        return [[e.key, round(key(e) / 1e3, 3), e.count] for e in best]

    return {
        "wall_ms": round(wall, 3),
        "aten_ops": sum(e.count for e in events if e.key.startswith("aten::")),
        "kernel_launches": sum(e.count for e in events if "LaunchKernel" in e.key),
        "gpu_busy_ms": round(sum(device_us(e) for e in events) / 1e3, 3) if cuda else None,
        "top_cpu_ms": ranked(lambda e: e.self_cpu_time_total),
        "top_gpu_ms": ranked(device_us) if cuda else None,
    }


def rates(flops: float, ms: float, peak_tflops: float) -> dict[str, float]:
    tflops = flops / ms / 1e9
    return {"tflops": round(tflops, 3), "mfu": round(tflops / peak_tflops, 4)}


def saved_for_backward(loss_fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one loss (then freed).

    A memory figure a CPU can measure: the activations that peak_mem_gib (GPU only) mostly is.
    The hook keeps a detached alias: it holds the storage (so no address is reused and counted
    twice) without the tensor's grad_fn. Keeping the tensor itself would tie every saved output
    to its own node, a cycle that outlives the call and keeps the whole graph alive.
    """
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn()
    return sum(sizes.values())


def train_step(
    bench: Bench, loss_fn: Callable[[int], torch.Tensor], flops: float, count_saved: bool = True
) -> dict[str, Any]:
    """Time zero_grad + loss + backward, run i on batch i mod --shapes (loss_fn(i)); the loss of
    the last run is reported, then saved_gib is counted in one more forward of batch 0, untimed
    (count_saved False for compiled latent passes: under CUDA graphs a forward left without its backward
    holds the graph tree back, and what a compiled graph saves is the compiler's choice)."""
    runs = itertools.count()

    def step() -> torch.Tensor:
        bench.model.zero_grad(set_to_none=True)
        loss = loss_fn(next(runs) % len(bench.batches))
        loss.backward()
        return loss.detach()

    timing, loss = timed(step, bench.args, profile=bench.args.profile)
    saved_gib = round(saved_for_backward(lambda: loss_fn(0)) / 2**30, 6) if count_saved else None
    return {
        **timing,
        "loss": float(loss),
        "saved_gib": saved_gib,
        **rates(flops, timing["ms_median"], bench.args.peak_tflops),
    }


def decode_rates(
    bench: Bench, generate: Callable[[int], torch.Tensor], samples: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """Time generate(--new-tokens) and generate(1) (prefill: image, latents, first token)."""
    n = bench.args.new_tokens
    timing, tokens = timed(lambda: generate(n), bench.args, profile=bench.args.profile)
    if tokens.shape[1] != n:
        raise RuntimeError(f"decoded {tokens.shape[1]} tokens instead of {n}")
    prefill, _ = timed(lambda: generate(1), bench.args)
    ms = timing["ms_median"]
    line = {
        **timing,
        "prefill_ms": prefill["ms_median"],
        "ms_per_token": round((ms - prefill["ms_median"]) / (n - 1), 3),
        "samples": samples,
        "new_tokens": n,
        "samples_per_s": round(samples / ms * 1e3, 3),
        "tokens_per_s": round(samples * n / ms * 1e3, 2),
    }
    return line, tokens


def mode_vision(bench: Bench) -> dict[str, Any]:
    pixel_values = bench.batch.pixel_values  # every batch has the same tile count
    line = train_step(
        bench,
        lambda i: image_features(bench.model, pixel_values).float().square().mean(),
        bench.flops["vision"] + bench.flops["projector"],
    )
    return {**line, "tiles": pixel_values.shape[0]}


def mode_sft(bench: Bench) -> dict[str, Any]:
    line = train_step(bench, lambda i: sft_loss(bench.model, bench.sft_ids[i], bench.batches[i]), bench.flops["step"])
    return {**line, "tokens": bench.sft_ids[0].numel()}


def coconut_step(bench: Bench, coconut: Coconut) -> dict[str, Any]:
    line = train_step(
        bench,
        lambda i: coconut(bench.batches[i]).loss,
        bench.flops["step"],
        count_saved=not coconut.compile_latent_passes,
    )
    return {**line, "tokens": bench.batch.input_ids.numel(), "passes": bench.layout.latents + 1}


def mode_coconut(bench: Bench) -> dict[str, Any]:
    return coconut_step(bench, bench.coconut)


def compiled_coconut(mode: str) -> Callable[[Bench], dict[str, Any]]:
    """coconut with compile_latent_passes=mode; the first step (the compile) is timed on its own."""

    def measure(bench: Bench) -> dict[str, Any]:
        coconut = bench_coconut(bench.model, bench.ids, compile_latent_passes=mode)
        start = time.perf_counter()
        coconut(bench.batch).loss.backward()
        _sync(bench.args.device)
        first_step_s = time.perf_counter() - start
        return {**coconut_step(bench, coconut), "first_step_s": round(first_step_s, 2)}

    return measure


def bench_coconut(model: nn.Module, ids: TokenIds, **options: Any) -> Coconut:
    """The model's Coconut as the assembly wraps it; eos_token_id -1 is unreachable: every decode run
    generates exactly --new-tokens tokens."""
    latent_ids = LatentIds(ids.start_latent, ids.latent, ids.end_latent)
    return coconut_of(model, latent_ids, eos_token_id=-1, pad_token_id=ids.pad, **options)


def mode_naive(bench: Bench) -> dict[str, Any]:
    line = train_step(bench, lambda i: naive_loss(bench.model, bench.ids.latent, bench.batches[i]), bench.flops["step"])
    return {**line, "tokens": bench.batch.input_ids.numel(), "passes": bench.layout.latents + 1}


def mode_decode(bench: Bench) -> dict[str, Any]:
    line, _ = decode_rates(bench, lambda n: bench.coconut.generate(bench.prompts, max_new_tokens=n), bench.layout.batch)
    return line


def mode_decode_step(bench: Bench) -> dict[str, Any]:
    """One eager token step of decode, timed alone: what decode's ms_per_token estimates as a
    difference of two runs, which a slow prefill (a CPU) drowns in noise."""
    args = bench.args
    with torch.no_grad():
        prompt = bench.coconut.encode_prompt(bench.prompts)
        new_tokens = max(args.new_tokens, args.warmup + args.iters + 2)  # buffers for every step run (+ profile)
        decoder = bench.coconut.adapter.greedy_decoder(prompt, new_tokens, -1, bench.ids.pad)
        timing, _ = timed(decoder.step, args, profile=args.profile)
    return {
        **timing,
        "decoder": type(decoder).__name__,
        "cache_len": prompt.attention_mask.shape[1] + new_tokens,
        "samples": bench.layout.batch,
    }


def mode_decode_graph(bench: Bench) -> dict[str, Any]:
    """decode with every token step replayed as one captured CUDA graph (Coconut.generate(cuda_graph=True))."""
    line, tokens = decode_rates(
        bench, lambda n: bench.coconut.generate(bench.prompts, max_new_tokens=n, cuda_graph=True), bench.layout.batch
    )
    eager = bench.coconut.generate(bench.prompts, max_new_tokens=bench.args.new_tokens)
    return {**line, "match_vs_decode": round(float((tokens == eager).float().mean()), 4)}


def mode_naive_decode(bench: Bench) -> dict[str, Any]:
    """A few samples one at a time; match_vs_decode compares with batched Coconut.generate's tokens."""
    k = min(bench.args.naive_decode_samples, bench.layout.batch)
    tiles = bench.layout.tiles
    singles = [rows(bench.prompts, b, b + 1, tiles) for b in range(k)]

    def generate(n: int) -> torch.Tensor:
        return torch.cat([naive_generate(bench.model, bench.ids.latent, s, n) for s in singles])

    line, tokens = decode_rates(bench, generate, k)
    reference = bench.coconut.generate(rows(bench.prompts, 0, k, tiles), max_new_tokens=bench.args.new_tokens)
    return {**line, "match_vs_decode": round(float((tokens == reference).float().mean()), 4)}


MODE_FUNCTIONS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "vision": mode_vision,
    "sft": mode_sft,
    "coconut": mode_coconut,
    "decode": mode_decode,
    "decode_step": mode_decode_step,
    "naive": mode_naive,
    "naive_decode": mode_naive_decode,
    "decode_graph": mode_decode_graph,
    "coconut_compiled": compiled_coconut("default"),
    "coconut_graphed": compiled_coconut("reduce-overhead"),
}


def run_mode(bench: Bench, mode: str) -> dict[str, Any]:
    """One measurement line; out-of-memory becomes {"error": "OOM"} and the memory is released.

    Any other failure becomes {"error": its type} (traceback on stderr) and the next mode still
    runs: one broken experimental mode must not cost a one-shot GPU run its other measurements.
    """
    cuda = bench.args.device.startswith("cuda")
    bench.model.train(mode in STEP_MODES)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        line = {"mode": mode, **MODE_FUNCTIONS[mode](bench)}
    except torch.OutOfMemoryError as err:
        line = {"mode": mode, "error": "OOM", "msg": str(err)[:300]}
    except Exception as err:  # reported in the line and in the exit status
        traceback.print_exc()
        line = {"mode": mode, "error": type(err).__name__, "msg": str(err)[:500]}
    bench.model.zero_grad(set_to_none=True)
    gc.collect()
    line["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    if cuda:
        torch.cuda.empty_cache()
    return line


def summary(lines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios between the modes of this run (only those that ran without error)."""
    ok = {mode: line for mode, line in lines.items() if "error" not in line}
    out: dict[str, Any] = {"mode": "summary"}
    for slow, base, key, name in (
        ("coconut", "sft", "ms_median", "ms"),
        ("coconut_compiled", "sft", "ms_median", "ms"),
        ("coconut_graphed", "sft", "ms_median", "ms"),
        ("naive", "sft", "ms_median", "ms"),
        ("naive_decode", "decode", "ms_per_token", "ms_per_token"),
        ("decode_graph", "decode", "ms_per_token", "ms_per_token"),
    ):
        if slow in ok and base in ok:
            out[f"{slow}_over_{base}_{name}"] = round(ok[slow][key] / ok[base][key], 3)
            if key == "ms_median":
                out[f"{slow}_over_{base}_cpu_ms"] = round(ok[slow]["cpu_ms_median"] / ok[base]["cpu_ms_median"], 3)
            for mem in ("peak_mem_gib", "saved_gib"):
                if ok[slow].get(mem) is not None and ok[base].get(mem):
                    out[f"{slow}_over_{base}_{mem.removesuffix('_gib')}"] = round(ok[slow][mem] / ok[base][mem], 3)
    return out


def header(bench: Bench, argv: Sequence[str], params: dict[str, Any]) -> dict[str, Any]:
    args, model = bench.args, bench.model
    cuda = args.device.startswith("cuda")
    cfg = model.config
    return {
        "mode": "header",
        "device": torch.cuda.get_device_name(torch.device(args.device)) if cuda else f"cpu {platform.machine()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "command": " ".join(["python -m bench.bench_step", *argv]),
        "tiny": args.tiny,
        "attn": [c._attn_implementation for c in (cfg, cfg.vision_config, cfg.text_config)],
        "rope": cfg.text_config.rope_parameters,
        "freeze_backbone": args.freeze_backbone,
        "peak_tflops": args.peak_tflops,
        "weights_gib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 3),
        "params": params,
        "host_proxy": args.host_proxy,
        "params_match_design": None if args.tiny or args.host_proxy else True,  # build_model raises on a mismatch
        "layout": {
            **dataclasses.asdict(bench.layout),
            "first_latent": bench.layout.first_latent,
            "prompt": bench.layout.prompt,
            "seq": bench.layout.seq,
            "label_tokens": bench.n_labels,
            # first latent column of each step batch (--shapes; --column-multiple pads it up)
            "latent_columns": [int((b.input_ids[0] == bench.ids.latent).nonzero()[0]) for b in bench.batches],
        },
        "flops": bench.flops,
    }


def emit(line: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(text + "\n")


# ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    def modes(value: str) -> list[str]:
        names = [m.strip() for m in value.split(",") if m.strip()]
        unknown = sorted(set(names) - set(MODES))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"modes must be a comma list of {','.join(MODES)}; got {value!r}")
        return names

    def at_least(low: int) -> Callable[[str], int]:
        def parse(value: str) -> int:
            if int(value) < low:
                raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
            return int(value)

        return parse

    p = argparse.ArgumentParser(prog="python -m bench.bench_step", description=__doc__.split("\n\n")[0])
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--tiny", action="store_true", help="offline tiny InternVL instead of the full-size architecture")
    arch.add_argument(
        "--host-proxy",
        action="store_true",
        help="InternVL3-1B's depth at toy width: on a CPU, times the per-op host work (see host_proxy_config)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch", type=at_least(1), default=8)
    p.add_argument("--tiles", type=at_least(1), default=5, help="448px tiles per sample (256 image tokens each)")
    p.add_argument("--question", type=at_least(0), default=64, help="question tokens after the image")
    p.add_argument("--latents", type=at_least(0), default=6)
    p.add_argument("--answer", type=at_least(0), default=64, help="answer tokens before eos")
    p.add_argument(
        "--ragged",
        type=at_least(0),
        default=0,
        help="questions up to this many tokens shorter across the batch: left padding, as real data has",
    )
    p.add_argument(
        "--shapes",
        type=at_least(1),
        default=1,
        help="step modes cycle through this many batches, batch s with its latents s tokens earlier "
        "(question s shorter, answer s longer): a real run's mix of latent columns",
    )
    p.add_argument(
        "--column-multiple",
        type=at_least(1),
        default=1,
        help="the collator's column_multiple (config latent_column_multiple): latent column rounded up",
    )
    p.add_argument("--iters", type=at_least(1), default=5)
    p.add_argument("--warmup", type=at_least(0), default=2)
    p.add_argument("--new-tokens", type=at_least(2), default=32, help="tokens every decode run generates")
    p.add_argument("--naive-decode-samples", type=at_least(1), default=2)
    p.add_argument("--modes", type=modes, help="default: all but coconut_compiled/_graphed (decode_graph only on CUDA)")
    p.add_argument("--freeze-backbone", action="store_true", help="vision tower requires_grad False")
    p.add_argument("--rope", choices=sorted(ROPE), default="dynamic", help="dynamic = InternVL3-1B's own")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak for MFU (H100/H200 SXM bf16: 989)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="add a torch.profiler summary of one more run to each line (op/launch counts, busy GPU ms, top ops)",
    )
    p.add_argument("--profile-top", type=at_least(1), default=12, help="ops listed in each profile ranking")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="append the JSON lines here too")
    args = p.parse_args(argv)
    if args.ragged + args.shapes - 1 > args.question:
        p.error(
            f"--ragged {args.ragged} + --shapes {args.shapes} - 1 exceeds --question {args.question}: "
            "questions cannot be shorter than empty"
        )
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns the emitted lines (header, one per mode, summary)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.modes is None:
        cuda = args.device.startswith("cuda")
        args.modes = [m for m in MODES if m not in OPT_IN_MODES and (m not in CUDA_ONLY_MODES or cuda)]
    torch.manual_seed(args.seed)
    model, ids, params = build_model(args)
    coconut = bench_coconut(model, ids)
    layout = Layout(
        args.batch, args.tiles, ids.image.per_tile * args.tiles, args.question, args.latents, args.answer, args.ragged
    )
    dtype = DTYPES[args.dtype]
    batches, sft_ids = [], []
    for shift in range(args.shapes):
        features = make_features(layout, ids, _side(model.config.vision_config.image_size), args.seed, shift)
        batches.append(collate(features, ids, args.device, dtype, args.column_multiple))
        if shift == 0:
            prompts = collate([prompt_of(f, ids.end_latent) for f in features], ids, args.device, dtype)
        input_ids = batches[-1].input_ids
        filler = torch.randint(0, ids.n_text, input_ids.shape, generator=torch.Generator().manual_seed(args.seed))
        sft_ids.append(torch.where(input_ids == ids.latent, filler.to(args.device), input_ids))
    n_labels = int((batches[0].labels[:, 1:] != IGNORE_INDEX).sum())
    flops = step_flops(model, layout, n_labels, args.freeze_backbone)
    bench = Bench(args, model, coconut, ids, layout, batches, sft_ids, prompts, n_labels, flops)
    lines = [header(bench, argv, params)]
    emit(lines[0], args.out)
    results = {}
    for mode in args.modes:
        results[mode] = run_mode(bench, mode)
        lines.append(results[mode])
        emit(results[mode], args.out)
    lines.append(summary(results))
    emit(lines[-1], args.out)
    return lines


def failed(lines: list[dict[str, Any]]) -> bool:
    """Whether a mode failed for a reason other than running out of memory (expected for naive)."""
    return any(line.get("error") not in (None, "OOM") for line in lines)


if __name__ == "__main__":
    sys.exit(1 if failed(main()) else 0)
