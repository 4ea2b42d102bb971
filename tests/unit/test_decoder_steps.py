"""Greedy decoding: the static-buffer path equals the decoder's own forward with a DynamicCache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from coconut import Coconut
from dataset import Batch, MyCollator
from modeling.activation_checkpointing import enable_latent_checkpointing
from modeling.decoder_steps import CacheGreedyDecoder, StaticGreedyDecoder, drivable
from modeling.hf_compat import GROUPED_SDPA, KVSplit, grouped_rows_mask
from tests.helpers.latent_reference import reference_forward
from tests.helpers.text_lm import (
    END,
    EOS,
    LATENT,
    PAD,
    START,
    VOCAB,
    assert_batched_equals_one_by_one,
    prompts,
    sample,
    tiny_lm,
)

pytestmark = pytest.mark.transformers  # exercises transformers' model code (with_transformers.sh)

# Operators that hand a tensor value to the host: on a GPU each one waits for the queue to drain.
HOST_READS = {"_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero", "masked_select"}


class HostReads(TorchDispatchMode):
    """Counts the operators in HOST_READS run inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] in HOST_READS
        return func(*args, **(kwargs or {}))


class RepeatedKV(TorchDispatchMode):
    """Counts K/V repeated per query head (repeat_kv's expand to [B, kv heads, groups, L > 1, D])."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += func.__name__.startswith("expand") and out.dim() == 5 and out.shape[3] > 1
        return out


def dynamic_rope_lm(seed: int):
    """tiny_lm with InternVL3-1B's dynamic RoPE, whose per-call path reads the length back to the host."""
    model = tiny_lm(seed)
    model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    return type(model)(model.config).eval()


def padded_prompts() -> Batch:
    return MyCollator(PAD, LATENT)(prompts())


def run(decoder, steps: int) -> None:
    for _ in range(steps):
        decoder.step()


@pytest.mark.parametrize("rope", ["default", "dynamic"])
def test_static_decoder_equals_cache_decoder(rope):
    """Same tokens, and the K/V each step writes equal the DynamicCache's, on a left-padded batch."""
    model = dynamic_rope_lm(seed=5) if rope == "dynamic" else tiny_lm(seed=5)
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    adapter = coconut.adapter
    assert drivable(adapter.decoder)
    batch = padded_prompts()
    steps, new = 10, 11
    with torch.no_grad():
        static = adapter.greedy_decoder(coconut.encode_prompt(batch), new, EOS, PAD)
        assert isinstance(static, StaticGreedyDecoder)
        run(static, steps)
        prompt = coconut.encode_prompt(batch)
        general = CacheGreedyDecoder(adapter, prompt, new, EOS, PAD)
        run(general, steps)
    assert torch.equal(static.tokens, general.tokens)
    assert torch.equal(static.finished, general.finished)
    start = batch.input_ids.shape[1]
    for idx, layer in enumerate(general.prompt.cache.layers):
        for ours, theirs in ((static.cache.keys[idx], layer.keys), (static.cache.values[idx], layer.values)):
            # fp32 rounding only: the static steps' attention reads the K/V heads grouped
            torch.testing.assert_close(ours[:, :, : start + steps], theirs, rtol=1e-5, atol=1e-5)


def test_static_decoder_pads_after_eos_and_stops_writing():
    """A sample that emitted eos gets pad from then on; finished is never cleared."""
    model = tiny_lm(seed=6)
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    with torch.no_grad():
        prompt = coconut.encode_prompt(padded_prompts())
        prompt.logits[1] = 0
        prompt.logits[1, EOS] = 1  # sample 1 ends at once
        decoder = coconut.adapter.greedy_decoder(prompt, 6, EOS, PAD)
        run(decoder, 5)
    assert decoder.tokens[1].tolist() == [EOS, PAD, PAD, PAD, PAD, PAD]
    assert bool(decoder.finished[1])


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(7)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


def test_decoders_without_rotary_layers_use_the_general_path():
    """GPT-2 (learned positions, no rotary_emb): batched generation still equals one by one."""
    model = tiny_gpt2()
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    assert not drivable(coconut.adapter.decoder)
    assert_batched_equals_one_by_one(coconut, max_new_tokens=8)


def test_cuda_graph_decoding_refuses_what_it_cannot_capture():
    model = tiny_lm(seed=8)
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="cuda_graph decoding needs one process"):
        coconut.generate(padded_prompts(), max_new_tokens=4, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/gpu_check.sh runs this)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_equals_eager(dtype):
    """Replaying the captured step gives the eager step's tokens (same kernels), under autocast too."""
    model = tiny_lm(seed=9).cuda()
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    batch = padded_prompts().to("cuda")
    cast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    with cast:
        eager = coconut.generate(batch, max_new_tokens=12)
        graphed = coconut.generate(batch, max_new_tokens=12, cuda_graph=True)
        again = coconut.generate(batch, max_new_tokens=12, cuda_graph=True)
    assert torch.equal(eager, graphed)
    assert torch.equal(graphed, again)


def test_generation_with_latent_checkpointing_equals_without():
    """Checkpointed layers (wrapped forward) still receive the cache in the direct layer calls."""
    batch = MyCollator(PAD, LATENT)(prompts())
    plain = Coconut(tiny_lm(seed=10), LATENT, START, END, EOS, pad_token_id=PAD)
    wrapped_model = tiny_lm(seed=10)
    enable_latent_checkpointing(wrapped_model.model.layers)
    wrapped = Coconut(wrapped_model, LATENT, START, END, EOS, pad_token_id=PAD)
    assert torch.equal(plain.generate(batch, max_new_tokens=8), wrapped.generate(batch, max_new_tokens=8))


def test_host_reads_per_step_do_not_grow_with_latents():
    """Latent passes and decode steps never wait for the device: the per-forward reads stay fixed."""
    model = dynamic_rope_lm(seed=11)
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    collate = MyCollator(PAD, LATENT)
    reads = []
    for n in (2, 5):
        batch = collate([sample([5, 6, 7], n, [10, 11, EOS]), sample([8, 9], n, [12, EOS])])
        with HostReads() as counter:
            coconut(batch).loss.backward()
        reads.append(counter.count)
    assert reads[0] == reads[1] > 0
    with torch.no_grad():
        decoder = coconut.adapter.greedy_decoder(coconut.encode_prompt(padded_prompts()), 6, EOS, PAD)
        with HostReads() as counter:
            run(decoder, 5)
    assert counter.count == 0


def test_unpadded_batch_runs_without_a_mask_and_equals_reference():
    """Nothing padded: the one-token passes pass no mask (as transformers does) and stay exact."""
    batch = MyCollator(PAD, LATENT)([sample([5, 6, 7], 3, [10, 11, EOS]), sample([8, 9, 4], 3, [12, 13, EOS])])
    assert bool(batch.attention_mask.all())
    model = dynamic_rope_lm(seed=12)
    ref_loss, _ = reference_forward(
        model, LATENT, batch.input_ids, batch.attention_mask, batch.position_ids, batch.labels
    )
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    embeds = model.get_input_embeddings()(batch.input_ids)
    stepper = coconut.adapter.latent_stepper(embeds, batch.attention_mask, batch.position_ids, DynamicCache())
    assert stepper is not None and stepper.mask is None
    torch.testing.assert_close(coconut(batch).loss, ref_loss, rtol=1e-5, atol=1e-6)


class _Attention(torch.nn.Module):
    num_key_value_groups = 2


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("tokens,split", [(1, False), (1, True), (3, False)])
def test_grouped_attention_equals_repeated_heads(tokens, split, padded):
    """The grouped attention gives sdpa over K/V repeated per query head: output and grads, for one
    token (K/V whole or as prefix + tail) and for several (mask laid out per group)."""
    torch.manual_seed(13)
    query = torch.randn(3, 4, tokens, 8, requires_grad=True)
    key, value = (torch.randn(3, 2, 9, 8, requires_grad=True) for _ in range(2))
    allowed = torch.ones(3, 1, tokens, 9, dtype=torch.bool)
    allowed[..., 9 - tokens :] = torch.ones(tokens, tokens, dtype=torch.bool).tril()  # causal among the new tokens
    if padded:
        allowed[0, ..., :4] = False
    mask = allowed if padded or tokens > 1 else None
    if tokens > 1:
        mask = grouped_rows_mask(allowed, 2, torch.float32)
    k, v = (KVSplit(t[:, :, :6], t[:, :, 6:]) if split else t for t in (key, value))
    ours, _ = ALL_ATTENTION_FUNCTIONS[GROUPED_SDPA](_Attention(), query, k, v, mask, scaling=0.3)
    reference = F.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=allowed, scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(ours, reference)
    weights = torch.randn_like(ours)
    ours_grads = torch.autograd.grad((ours * weights).sum(), (query, key, value))
    reference_grads = torch.autograd.grad((reference * weights).sum(), (query, key, value))
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b)


def test_latent_and_decode_steps_keep_kv_heads_grouped():
    """On a padded batch, neither the latent passes after the prefix (their K/V are kept for the
    backward) nor the decode steps repeat K/V per query head; the prefix pass may (transformers'
    sdpa). transformers 5.24 keeps one token's heads grouped itself (eager), not several tokens'."""
    model = tiny_lm(seed=14)
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    batch = MyCollator(PAD, LATENT)([sample([5, 6, 7], 3, [10, 11, EOS]), sample([8, 9], 3, [12, EOS])])
    assert not bool(batch.attention_mask.all())
    embeds = model.get_input_embeddings()(batch.input_ids)
    cache = DynamicCache(config=model.config)
    stepper = coconut.adapter.latent_stepper(embeds, batch.attention_mask, batch.position_ids, cache)
    column = int((batch.input_ids[0] == LATENT).nonzero()[0])
    coconut.adapter.decode(embeds[:, :column], batch.attention_mask[:, :column], batch.position_ids[:, :column], cache)
    with RepeatedKV() as repeats:
        hidden = stepper(embeds[:, column : column + 1], column)
        hidden = stepper.finish(embeds[:, column + 1 :], column + 1)
        hidden.sum().backward()
    assert repeats.count == 0
    with torch.no_grad():
        decoder = coconut.adapter.greedy_decoder(coconut.encode_prompt(padded_prompts()), 6, EOS, PAD)
        with RepeatedKV() as repeats:
            run(decoder, 5)
    assert repeats.count == 0


def saved_bytes(loss_fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of loss_fn()."""
    sizes = {}

    def pack(tensor):
        sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn()
    return sum(sizes.values())


def test_latent_passes_keep_no_copy_of_the_cache():
    """A latent pass adds about one token's activations to what autograd keeps, not a copy of the
    cached K/V. Each concatenation that DynamicCache.update makes is kept by attention: one copy of
    the K and V of the whole prefix per layer and pass, which is what 4 more latents would add here."""
    model = tiny_lm(seed=15)
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    question = [(7 * i) % 50 + 1 for i in range(250)]
    saved = []
    for n in (2, 6):
        batch = MyCollator(PAD, LATENT)([sample(question, n, [10, 11, EOS]), sample(question[3:], n, [12, EOS])])
        saved.append(saved_bytes(lambda batch=batch: coconut(batch).loss))
    # one layer's K and V over the 253-token prefix: 2 tensors x 2 samples x 2 K/V heads x 253 x 8 x 4 bytes
    one_copy = 2 * 2 * 2 * 253 * 8 * 4
    assert 0 < saved[1] - saved[0] < 4 * one_copy  # 4 more passes over 2 layers: 8 copies and more before
