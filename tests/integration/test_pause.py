"""Pause as thought: all four method keys false, as the original runs it.

The original (facebookresearch/coconut run.py) wraps the model in `Coconut` only `if configs.coconut`;
with coconut, cot, no_thoughts and no_cot all false it trains the plain causal LM,
`parallel_model(**batch)` with input_ids, attention_mask, labels and position_ids, on the sequences its
dataset builds with the markers (`no_special_marker=configs.cot or configs.no_cot or configs.no_thoughts`)
and `k * c_thought` `<|latent|>` tokens: ordinary input tokens, never replaced by hidden states. Its
loss is the HF model's own (mean cross-entropy over the labels), and it evaluates with the HF model's
greedy `generate`. The references below are exactly those HF calls.
"""

from __future__ import annotations

import json

import torch

import run
from coconut import Coconut
from dataset import Batch
from storage.saved_run import read_saved_run
from tests.helpers.runs import demo_config, metrics
from tests.helpers.text_lm import END, EOS, LATENT, PAD, START, grads, mixed_batch, tiny_lm
from utils import config_from_dict


def test_all_method_keys_false_is_pause_with_markers_and_latents():
    config = config_from_dict({"model_id": "m", "train_path": "t", "val_path": "v", "c_thought": 2})
    assert config.method == "pause"
    assert config.uses_markers and not config.feeds_thoughts and config.thoughts_per_step == 2
    assert config.stage(4) == 4 // config.epochs_per_stage


def test_pause_loss_and_gradients_are_the_plain_lm_on_latent_tokens():
    model = tiny_lm()
    batch = mixed_batch()
    reference = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=batch.labels,
        position_ids=batch.position_ids,
    )  # the original's pause mode: the plain LM, labels and all
    reference.loss.backward()
    expected = grads(model)
    model.zero_grad()

    pause = Coconut(model, LATENT, START, END, EOS, PAD, feed_thoughts=False)
    out = pause(batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-6, atol=1e-7)
    got = grads(model)
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    model.zero_grad()
    # Coconut on the same batch feeds thoughts back: another loss
    coconut = Coconut(model, LATENT, START, END, EOS, PAD)(batch).loss.detach()
    assert abs(float(coconut) - float(reference.loss.detach())) > 1e-4


@torch.no_grad()
def test_pause_generation_is_the_plain_lms_greedy_generate():
    model = tiny_lm(seed=1)
    pause = Coconut(model, LATENT, START, END, EOS, PAD, feed_thoughts=False).eval()
    prompts = [[5, 6, 7, START, LATENT, LATENT, END], [20, 21, START, LATENT, END], [30, 31, 32, 33]]
    for prompt in prompts:  # the original generates one question at a time
        ids = torch.tensor([prompt])
        mask = torch.ones_like(ids)
        expected = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=EOS, pad_token_id=PAD
        )[0, len(prompt) :].tolist()
        got = pause.generate(Batch(ids, mask, torch.arange(len(prompt))[None]), max_new_tokens=12)[0].tolist()
        assert got[: len(expected)] == expected, prompt


def test_pause_trains_and_evaluates_through_the_cli(tmp_path, tiny_model_dir):
    config = demo_config(
        tmp_path, tiny_model_dir, coconut=False, num_epochs=2, epochs_per_stage=1, batch_size_training=8
    )
    assert run.main([str(config)]) == 0
    save_dir = tmp_path / "checkpoints" / "run"
    assert [m["stage"] for m in metrics(save_dir)] == [0, 1]
    assert read_saved_run(save_dir / "checkpoint_2" / "model").method == "pause"
    # stage 1 prompts carry <|start-latent|><|latent|><|end-latent|> as ordinary tokens
    rows = [json.loads(line) for line in (save_dir / "predictions" / "epoch_2.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(row["latents"] == 1 for row in rows)
