"""Latent loop on the tiny InternVL: exact against recomputing from scratch, vision once, generation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from coconut import ImageFeatureMismatch
from modeling.activation_checkpointing import enable_latent_checkpointing
from multimodal.collator_mm import MultimodalCollator
from tests.helpers.latent_reference import reference_forward
from tests.helpers.text_lm import assert_close_grads, grads
from tests.helpers.tiny_vl import mixed, prompt

pytestmark = pytest.mark.transformers  # exercises transformers' model code (with_transformers.sh)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_forward_equals_reference(setup, checkpointing):
    model, coconut, ids, tok, image_tokens = setup
    batch = MultimodalCollator(tok.pad_token_id, ids.latent)(mixed(tok, ids, image_tokens)).to(model.device)
    ref_loss, _ = reference_forward(
        model,
        ids.latent,
        batch.input_ids,
        batch.attention_mask,
        batch.position_ids,
        batch.labels,
        batch.pixel_values,
    )
    ref_loss.backward()
    ref = grads(model)
    model.zero_grad()
    if checkpointing:
        enable_latent_checkpointing(model.model.language_model.layers)
    vision_calls = []
    model.model.vision_tower.register_forward_hook(lambda *a: vision_calls.append(1))
    out = coconut(batch)
    out.loss.backward()
    assert len(vision_calls) == 1  # image features computed once, not once per latent pass
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    got = grads(model)
    assert any("vision_tower" in n for n in got)  # gradients reach the vision tower through the loop
    assert_close_grads(got, ref)


def test_placeholder_mismatch_raises(setup):
    model, coconut, ids, tok, image_tokens = setup
    batch = MultimodalCollator(tok.pad_token_id, ids.latent)(mixed(tok, ids, image_tokens)).to(model.device)
    wrong = batch.num_patches.clone()
    wrong[0], wrong[1] = wrong[1], wrong[0]  # same total tiles, assigned to the wrong samples
    with pytest.raises(ImageFeatureMismatch):
        coconut(dataclasses.replace(batch, num_patches=wrong))
    with pytest.raises(ImageFeatureMismatch):
        coconut(dataclasses.replace(batch, pixel_values=batch.pixel_values[:-1]))
    big = torch.nn.functional.interpolate(batch.pixel_values, scale_factor=2)  # tiles of 112 px, not 56
    with pytest.raises(ImageFeatureMismatch, match="features per tile"):
        coconut(dataclasses.replace(batch, pixel_values=big))


def test_batched_generation_equals_one_by_one(setup):
    model, coconut, ids, tok, image_tokens = setup
    feats = [
        prompt(tok, ids, image_tokens, 1, 3, "what shape"),
        prompt(tok, ids, image_tokens, 5, 1, "what colour is the shape in the image"),
        prompt(tok, ids, image_tokens, 0, 2, "no image here"),
        prompt(tok, ids, image_tokens, 3, 0, "is it blue", markers=False),
    ]
    collate = MultimodalCollator(tok.pad_token_id, ids.latent)
    batched = coconut.generate(collate(feats).to(model.device), max_new_tokens=8)
    for i, f in enumerate(feats):
        alone = coconut.generate(collate([f]).to(model.device), max_new_tokens=8)
        n = alone.shape[1]
        assert batched[i, :n].tolist() == alone[0].tolist(), i
        assert (batched[i, n:] == tok.pad_token_id).all()


def test_bf16_autocast_tracks_fp32(setup):
    """Mixed precision (as one process trains with bf16: true) stays close to the exact fp32 loss."""
    model, coconut, ids, tok, image_tokens = setup
    batch = MultimodalCollator(tok.pad_token_id, ids.latent)(mixed(tok, ids, image_tokens)).to(model.device)
    exact = coconut(batch).loss
    with torch.autocast(model.device.type, dtype=torch.bfloat16):
        mixed_loss = coconut(batch).loss
    mixed_loss.backward()
    assert mixed_loss.dtype == torch.float32  # cross-entropy is computed on fp32 logits
    assert abs(mixed_loss.item() - exact.item()) <= 0.02 * exact.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
