"""Latent loop on a text-only causal LM: exact against recomputing from scratch, batched generation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from coconut import Coconut, LatentLayoutError
from dataset import Batch, MyCollator
from modeling.activation_checkpointing import enable_latent_checkpointing
from tests.helpers.latent_reference import reference_forward
from tests.helpers.text_lm import (
    END,
    EOS,
    LATENT,
    PAD,
    START,
    assert_batched_equals_one_by_one,
    assert_close_grads,
    grads,
    mixed_batch,
    prompts,
    sample,
    strip,
    tiny_lm,
)

pytestmark = pytest.mark.transformers  # exercises transformers' model code (with_transformers.sh)


@pytest.mark.parametrize(
    "compile_mode,checkpointing",
    [
        (None, False),
        (None, True),
        pytest.param("default", False, marks=pytest.mark.slow),  # compiling takes seconds
        pytest.param("reduce-overhead", False, marks=pytest.mark.slow),
        pytest.param("default", True, marks=pytest.mark.slow),
    ],
)
def test_forward_loss_and_grads_equal_reference(compile_mode, checkpointing):
    """Loss, logits and every gradient equal recomputing from scratch, eager or compiled
    (compile_latent_passes: the first pass's graph and one for every later pass and batch; on the CPU, reduce-overhead
    compiles the same graph without CUDA graphs)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]  # the counters outlive reset()
    model = tiny_lm()
    batch = mixed_batch()
    ref_loss, ref_logits = reference_forward(
        model, LATENT, batch.input_ids, batch.attention_mask, batch.position_ids, batch.labels
    )
    ref_loss.backward()
    ref_grads = grads(model)
    model.zero_grad()

    if checkpointing:
        enable_latent_checkpointing(model.model.layers)
        model.train()  # checkpointing only acts with grad enabled; dropout is 0 in this config
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD, compile_latent_passes=compile_mode)
    out = coconut(batch, return_logits=True)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(out.logits[mask], ref_logits[mask], rtol=1e-4, atol=1e-5)
    assert_close_grads(grads(model), ref_grads)
    assert coconut.gen_forward_cnt == 4  # 3 latents → 4 passes
    assert out.thought_norm is not None and out.thought_norm > 0
    graphs = counters["stats"]["unique_graphs"]
    assert (graphs > graphs_before) == (compile_mode is not None)  # the passes ran compiled exactly when asked
    if compile_mode:
        other = MyCollator(PAD, LATENT)([sample([5, 6], 2, [10, EOS]), sample([7, 8, 9, 13, 14], 4, [11, 12, EOS])])
        coconut(other).loss.backward()
        assert counters["stats"]["unique_graphs"] == graphs  # other lengths and latent counts: no recompile


def test_latent_column_multiple_leaves_loss_and_grads_unchanged():
    """Rounding the latent column up (latent_column_multiple: more left padding, masked) is exact."""
    feats = [sample([5, 6, 7], 3, [10, 11, EOS]), sample([8, 9], 2, [12, EOS])]
    model = tiny_lm()
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    runs = []
    for multiple in (1, 8):
        batch = MyCollator(PAD, LATENT, column_multiple=multiple)(feats)
        model.zero_grad()
        loss = coconut(batch).loss
        loss.backward()
        runs.append((int((batch.input_ids[0] == LATENT).nonzero()[0]), loss.detach(), grads(model)))
    (column, loss, grad), (padded_column, padded_loss, padded_grad) = runs
    assert (column, padded_column) == (4, 8)
    torch.testing.assert_close(padded_loss, loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(padded_grad, grad)


def test_checkpointing_recomputes_in_backward():
    """The checkpointed path really drops activations: backward re-runs each layer's forward."""
    model = tiny_lm()
    enable_latent_checkpointing(model.model.layers)
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # pre: recompute stops early
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    batch = mixed_batch()
    out = coconut(batch)
    n_forward = len(calls)
    out.loss.backward()
    assert n_forward == 4 and len(calls) == 2 * n_forward


def test_zero_latent_batch_is_plain_forward():
    model = tiny_lm()
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    batch = MyCollator(PAD, LATENT)([sample([1, 2, 3], 0, [4, 5, EOS], False), sample([7, 8], 0, [9, EOS], False)])
    out = coconut(batch)
    plain = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        labels=batch.labels,
    )
    torch.testing.assert_close(out.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert coconut.gen_forward_cnt == 1 and out.thought_norm is None


def test_misaligned_latents_raise():
    model = tiny_lm()
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    ids = torch.tensor([[1, START, LATENT, LATENT, END, 4], [1, 2, START, LATENT, END, 4]])
    ones = torch.ones_like(ids)
    with pytest.raises(LatentLayoutError):
        coconut(Batch(input_ids=ids, attention_mask=ones, position_ids=torch.arange(6).expand(2, 6), labels=ids))


def test_hand_built_batch_finds_the_collators_latent_layout():
    """The collator hands over the latent column and counts (no device read); a Batch without them
    gets them found on the device: the same numbers, the same loss."""
    model = tiny_lm()
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    batch = mixed_batch()
    assert (batch.latent_column, batch.latent_counts) == (7, (3, 1, 2, 0))
    bare = dataclasses.replace(batch, latent_column=None, latent_counts=None)
    with torch.no_grad():
        torch.testing.assert_close(coconut(bare).loss, coconut(batch).loss, rtol=0, atol=0)
    assert coconut.gen_forward_cnt == 8  # 3 latents → 4 passes, twice


def test_filled_embeds_only_on_request_and_equal_naive_filling():
    """return_filled_embeds gives the input embeddings with every latent replaced by its thought, as
    filling the latents one at a time with full forwards gives them; without it none are built."""
    model = tiny_lm()
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    batch = mixed_batch()
    mask, positions = batch.attention_mask, batch.position_ids
    with torch.no_grad():
        assert coconut(batch).inputs_embeds is None
        filled = coconut(batch, return_filled_embeds=True).inputs_embeds
        embeds = model.get_input_embeddings()(batch.input_ids)
        latents = [(row == LATENT).nonzero().flatten().tolist() for row in batch.input_ids]
        for i in range(max(map(len, latents))):
            hidden = model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_hidden_states=True
            ).hidden_states[-1]
            for b, pos in enumerate(latents):
                if len(pos) > i:
                    embeds[b, pos[i]] = hidden[b, pos[i] - 1]
    torch.testing.assert_close(filled[mask.bool()], embeds[mask.bool()], rtol=1e-4, atol=1e-5)


def test_logged_norms_are_the_mean_thought_and_text_token_embedding_norms():
    """thought_norm: the mean norm of the batch's thoughts (the hidden states that fill the latents, filled one
    at a time by full forwards here); token_norm: the mean input-embedding norm over real text tokens, neither
    padding nor latent placeholders (whose embedding is a learned row no sample sees)."""
    model = tiny_lm()
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    batch = mixed_batch()
    mask = batch.attention_mask.bool()
    with torch.no_grad():
        out = coconut(batch)
        embeds = model.get_input_embeddings()(batch.input_ids)
        text = mask & (batch.input_ids != LATENT)
        assert text.sum() < mask.sum()  # the batch has latents: counting them would change the mean
        latents = [(row == LATENT).nonzero().flatten().tolist() for row in batch.input_ids]
        thoughts = []
        for i in range(max(map(len, latents))):
            hidden = model(
                inputs_embeds=embeds,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                output_hidden_states=True,
            ).hidden_states[-1]
            for b, pos in enumerate(latents):
                if len(pos) > i:
                    embeds[b, pos[i]] = hidden[b, pos[i] - 1]
                    thoughts.append(float(hidden[b, pos[i] - 1].norm()))
        token_norms = model.get_input_embeddings()(batch.input_ids).norm(dim=-1)
    assert len(thoughts) == 6
    assert float(out.thought_norm) == pytest.approx(sum(thoughts) / len(thoughts), rel=1e-5)
    assert float(out.token_norm) == pytest.approx(float(token_norms[text].mean()), rel=1e-6)


def test_global_normalisation_divides_by_given_count():
    model = tiny_lm()
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    batch = mixed_batch()
    mean = coconut(batch)
    scaled = coconut(batch, num_items_in_batch=torch.tensor(100.0))
    torch.testing.assert_close(scaled.loss * 100, mean.loss * mean.num_label_tokens, rtol=1e-5, atol=1e-5)


def test_batched_generation_equals_one_by_one():
    assert_batched_equals_one_by_one(
        Coconut(tiny_lm(seed=3), LATENT, START, END, EOS, pad_token_id=PAD), max_new_tokens=12
    )


def test_generation_equals_naive_greedy_without_cache():
    """Batch-of-one generation equals the original's method: recompute the whole prefix per token."""
    model = tiny_lm(seed=4)
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    feat = prompts()[0]
    batch = MyCollator(PAD, LATENT)([feat])
    fast = strip(coconut.generate(batch, max_new_tokens=10)[0])

    ids = batch.input_ids
    n = int((ids == LATENT).sum())
    labels = torch.full_like(ids, -100)
    from tests.helpers.latent_reference import reference_embeds

    with torch.no_grad():
        embeds = reference_embeds(model, ids, None)
        pos = (ids[0] == LATENT).nonzero().flatten().tolist()
        for i in range(n):
            h = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
            embeds = torch.cat([embeds[:, : pos[i]], h[:, pos[i] - 1 : pos[i]], embeds[:, pos[i] + 1 :]], 1)
        naive = []
        for _ in range(10):
            token = model(inputs_embeds=embeds).logits[0, -1].argmax()
            naive.append(int(token))
            if token == EOS:
                break
            embeds = torch.cat([embeds, model.get_input_embeddings()(token.view(1, 1))], 1)
    del labels
    assert fast == naive
