"""The validation loss: a token mean over the whole validation set, where the original averages batch means."""

from __future__ import annotations

import contextlib

import pytest
import torch

from coconut import Coconut
from dataset import MyCollator
from tests.helpers.latent_reference import reference_forward
from tests.helpers.text_lm import END, EOS, LATENT, PAD, START, sample, tiny_lm
from training.distributed import DistInfo
from training.evaluation import validation_loss


def test_validation_loss_is_the_token_mean_over_the_whole_set():
    """The original's run.py (main, the block under `# val loss` after each epoch's training) adds each batch's mean
    loss, all-reduced and divided by the world size, and divides by the number of batches: a mean of batch
    means. Here every label token weighs the same, whatever batch it falls in. Three samples with 2, 6 and
    3 label tokens in batches of 2 tell the two apart; the reference recomputes each sample alone from
    scratch (latents filled one full forward at a time)."""
    model = tiny_lm()
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    feats = [
        sample([5, 6, 7], 2, [10, EOS]),
        sample([8, 9], 1, [11, 12, 13, 14, 15, EOS]),
        sample([20, 21, 22, 23], 0, [24, 25, EOS], markers=False),
    ]
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    got = validation_loss(coconut, feats, MyCollator(PAD, LATENT), info, 2, 0, contextlib.nullcontext)

    sums, counts = [], []
    with torch.no_grad():
        for f in feats:
            one = MyCollator(PAD, LATENT)([f])
            mean, _ = reference_forward(model, LATENT, one.input_ids, one.attention_mask, one.position_ids, one.labels)
            count = sum(label != -100 for label in f["labels"][1:])
            sums.append(float(mean) * count)
            counts.append(count)
    assert counts == [2, 6, 3]
    assert got == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    batch_means = [(sums[0] + sums[1]) / (counts[0] + counts[1]), sums[2] / counts[2]]
    assert got != pytest.approx(sum(batch_means) / len(batch_means), rel=1e-3)  # the original's figure differs
