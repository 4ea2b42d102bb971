"""Optimisation as the original COCONUT runs it, and as this project documents where it differs:
the reset_optimizer rule, the learning-rate schedule over the epochs a run trains, and a loss
that is token-weighted across ranks and accumulation steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

import run
from storage import checkpoints as ckpt
from tests.helpers.recorded_run import assert_same_steps, recorded_run
from tests.helpers.runs import demo_config
from training import trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # identical arithmetic in every run (tests/conftest.py)


@pytest.mark.slow
def test_reset_optimizer_starts_a_fresh_adamw_every_epoch_as_the_original_code_does(
    tmp_path, tiny_model_dir, monkeypatch
):
    """The original's rule (facebookresearch/coconut, run.py): inside the epoch loop (L242,
    `for epoch in range(configs.resume, configs.num_epochs):`), L312-319 `if configs.reset_optimizer:
    del optimizer; optimizer = optim.AdamW(...)` builds a new AdamW at the start of every epoch,
    whatever the stage. Its README says "when switching stages"; its code, which produced the
    paper's numbers, resets every epoch. So with epochs_per_stage 2 (two epochs of one stage),
    epoch 2's first step must meet an empty AdamW state with reset_optimizer, and epoch 1's state
    without it. Epoch checkpoints of a resetting run hold no optimizer state, and say so."""
    state_at_first_step = {}
    step = trainer.Trainer.optimizer_step

    def recording(self, optimizer, lr):
        state_at_first_step.setdefault((self.config.reset_optimizer, self.state.epoch), len(optimizer.state))
        step(self, optimizer, lr)

    monkeypatch.setattr(trainer.Trainer, "optimizer_step", recording)
    for reset in (True, False):
        config = demo_config(
            tmp_path,
            tiny_model_dir,
            name=f"reset_{reset}",
            num_epochs=2,
            epochs_per_stage=2,
            batch_size_training=8,
            reset_optimizer=reset,
        )
        assert run.main([str(config)]) == 0
        first = tmp_path / "checkpoints" / f"reset_{reset}" / "checkpoint_1"
        assert (first / ckpt.OPTIMIZER_FILE).exists() == (not reset)
        assert json.loads((first / ckpt.STATE_FILE).read_text())["optimizer_saved"] == (not reset)
    trained = state_at_first_step[(False, 1)]  # AdamW's state: one entry per trainable parameter
    assert trained > 0
    assert state_at_first_step == {(True, 0): 0, (True, 1): 0, (False, 0): 0, (False, 1): trained}


def test_the_cosine_schedule_spans_the_epochs_this_run_trains_and_ends_at_zero(tmp_path, tiny_model_dir, monkeypatch):
    """resume: 2 of num_epochs 4 trains epochs 3 and 4: 2 x 6 steps. The schedule spans those 12
    steps (warmup 25%: 3 steps), so the cosine would reach 0 at step 12. Before, it spanned all 4
    epochs from step 0 and ended near half of lr. Resumed runs continue the same curve
    (tests/integration/test_preemption.py runs it, and ends with the uninterrupted run's weights)."""
    lrs = []
    step = trainer.Trainer.optimizer_step

    def recording(self, optimizer, lr):
        lrs.append(lr)
        step(self, optimizer, lr)

    monkeypatch.setattr(trainer.Trainer, "optimizer_step", recording)
    config = demo_config(
        tmp_path,
        tiny_model_dir,
        name="schedule",
        resume=2,
        num_epochs=4,
        epochs_per_stage=1,
        batch_size_training=8,
        lr=1e-3,
        lr_scheduler="cosine",
        warmup_ratio=0.25,
    )
    assert run.main([str(config)]) == 0
    total, warmup = 12, 3
    expected = [1e-3 * (k + 1) / warmup for k in range(warmup)]
    expected += [1e-3 * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) for k in range(warmup, total)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert 1e-3 * 0.5 * (1 + math.cos(math.pi * (total - warmup) / (total - warmup))) == 0  # where the curve ends


# --- gradient accumulation -----------------------------------------------------------------------


def test_accumulation_2_x_batch_4_equals_batch_8_in_gradients_and_logged_loss(tmp_path, tiny_model_dir, monkeypatch):
    """The loss of an optimizer step is the token mean over all its micro-batches: the summed token
    CE divided by the label count of the whole step (not each micro-batch's mean, then averaged).
    Both runs see the same 8 samples per step in the same order; with lr 0 every step starts from
    the same weights. Clipping (max_grad_norm 0.5) is active: the recorded norms after it are 0.5.
    (2 ranks x batch 2 x accumulation 2 against this: tests/integration/test_preemption.py's 2-rank test.)"""
    one = recorded_run(tmp_path, tiny_model_dir, monkeypatch, "batch_8", batch_size_training=8)
    two = recorded_run(
        tmp_path, tiny_model_dir, monkeypatch, "accum_2", batch_size_training=4, gradient_accumulation_steps=2
    )
    assert len(one["unclipped"]) == len(two["unclipped"]) == 6
    assert_same_steps(two, one, steps=6)
    for grads in one["clipped"]:
        assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) == pytest.approx(0.5)
