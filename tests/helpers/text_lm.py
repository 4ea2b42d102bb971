"""A tiny text-only causal LM (Qwen2, 64 tokens) and its COCONUT samples, batches and generation checks."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from coconut import Coconut
from dataset import IGNORE_INDEX, Batch, MyCollator

VOCAB, START, LATENT, END, EOS, PAD = 64, 60, 61, 62, 63, 0


def tiny_lm(seed: int = 0, layers: int = 2) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(cfg).float().eval()


def sample(question: list[int], n_latent: int, rest: list[int], markers: bool = True) -> dict:
    latent = ([START] if markers else []) + [LATENT] * n_latent + ([END] if markers else [])
    ids = question + latent + rest
    prefix = len(question) + len(latent)
    return {
        "input_ids": ids,
        "labels": [IGNORE_INDEX] * prefix + rest,
        "attention_mask": [1] * len(ids),
        "position_ids": list(range(len(ids))),
        "idx": 0,
    }


def mixed_batch() -> Batch:
    """Different latent counts (0..3), question lengths and answer lengths in one batch."""
    feats = [
        sample([5, 6, 7], 3, [10, 11, 12, EOS]),
        sample([5, 6, 7, 8, 9, 13], 1, [14, EOS]),
        sample([20, 21], 2, [22, 23, 24, 25, 26, EOS]),
        sample([30, 31, 32, 33], 0, [34, EOS], markers=False),
    ]
    return MyCollator(PAD, LATENT)(feats)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_grads(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-6, atol_of_max: float = 0.0) -> None:
    """Every gradient close; atol_of_max adds that fraction of each reference tensor's largest magnitude
    to atol (where fp32 rounding of another summation order scales with the tensor)."""
    assert a.keys() == b.keys()
    for name in a:
        tol = atol + atol_of_max * float(b[name].abs().max())
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=tol, msg=name)


def prompts() -> list[dict]:
    """Generation prompts: question + latents (+ end marker), with different latent counts."""
    out = []
    for q, n in (([5, 6, 7], 3), ([5, 6, 7, 8, 9, 13], 1), ([20, 21], 2), ([30, 31, 32, 33], 0)):
        latent = [START] + [LATENT] * n + [END] if n else []
        ids = q + latent
        out.append(
            {"input_ids": ids, "attention_mask": [1] * len(ids), "position_ids": list(range(len(ids))), "idx": 0}
        )
    return out


def strip(tokens: torch.Tensor) -> list[int]:
    out = []
    for t in tokens.tolist():
        if t == PAD:
            break
        out.append(t)
        if t == EOS:
            break
    return out


def assert_batched_equals_one_by_one(coconut: Coconut, max_new_tokens: int) -> None:
    """Each prompt's tokens from a left-padded batch equal generating it alone."""
    collate = MyCollator(PAD, LATENT)
    feats = prompts()
    batched = coconut.generate(collate(feats), max_new_tokens=max_new_tokens)
    for i, f in enumerate(feats):
        alone = coconut.generate(collate([f]), max_new_tokens=max_new_tokens)
        assert strip(batched[i]) == strip(alone[0]), i
