"""COCONUT samples and prompts for the tiny InternVL: images of several tiles, with and without latents."""

from __future__ import annotations

import torch

from dataset import IGNORE_INDEX


def make_sample(tok, ids, image_tokens, n_tiles: int, n_latent: int, question: str, answer: str, markers=True):
    q = (image_tokens.block(n_tiles) if n_tiles else []) + tok.encode(question + "\n")
    latent = ([ids.start] if markers else []) + [ids.latent] * n_latent + ([ids.end] if markers else [])
    rest = tok.encode("### " + answer) + [tok.eos_token_id]
    seq = q + latent + rest
    sample = {
        "input_ids": seq,
        "labels": [IGNORE_INDEX] * (len(q) + len(latent)) + rest,
        "attention_mask": [1] * len(seq),
        "position_ids": list(range(len(seq))),
        "idx": 0,
        "num_patches": n_tiles,
    }
    if n_tiles:
        sample["pixel_values"] = torch.randn(n_tiles, 3, 56, 56)
    return sample


def mixed(tok, ids, image_tokens):
    """1 and several tiles, a sample without an image, different latent counts, one without latents."""
    return [
        make_sample(tok, ids, image_tokens, 1, 3, "what shape", "circle"),
        make_sample(tok, ids, image_tokens, 5, 1, "what colour is the shape in the image", "red"),
        make_sample(tok, ids, image_tokens, 0, 2, "no image here", "yes"),
        make_sample(tok, ids, image_tokens, 3, 0, "is it blue", "no", markers=False),
    ]


def prompt(tok, ids, image_tokens, n_tiles, n_latent, question, markers=True):
    s = make_sample(tok, ids, image_tokens, n_tiles, n_latent, question, "x", markers)
    cut = s["labels"].index(next(label for label in s["labels"] if label != IGNORE_INDEX))
    for key in ("input_ids", "attention_mask", "position_ids"):
        s[key] = s[key][:cut]
    del s["labels"]
    return s
