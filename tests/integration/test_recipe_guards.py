"""The recipe around the latent loop, in short runs of the CLI on a slice of the demo data: sample order
across epochs and resumes, the torch RNG a resume restores, uniform_prob's per-epoch draws,
reset_optimizer, save_only_improve, relaunching a finished run, the inference stage, and two ranks
against one (the loss denominator, an odd record count at evaluation, the predictions' order).

What each training epoch is fed is read at trainer.DataLoader: the sampler's indices (this rank's
order, after a resume's skip) and, through its collate_fn, each sample's record index and latent count.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import run
from storage import checkpoints as ckpt
from tests.helpers.instrumented_run import install_recorder
from tests.helpers.recorded_run import assert_same_steps, recorded_run
from tests.helpers.runs import REPO, demo_config, forked_ranks, metrics, weights
from training import preemption, trainer

DEMO = REPO / "data" / "demo"
LATENT_TOKEN = "<|latent|>"


pytestmark = pytest.mark.usefixtures("one_thread")  # identical arithmetic in every run (tests/conftest.py)


def data_slice(tmp_path: Path, train: int | range, n_val: int) -> dict[str, str]:
    """Config keys for the first `train` demo train records (or those of a range) and the first n_val val
    records (their images stay where they are)."""
    keys = {}
    for split, chosen in (("train", train), ("val", range(n_val))):
        chosen = range(chosen) if isinstance(chosen, int) else chosen
        records = json.loads((DEMO / f"{split}.json").read_text())
        path = tmp_path / f"{split}_{chosen.start}_{chosen.stop}.json"
        path.write_text(json.dumps([records[i] for i in chosen]))
        keys[f"{split}_path"] = str(path)
    return keys


class Feed:
    """What each training epoch's DataLoader got: `orders` (sampler indices) and `samples` ((record
    index, latent tokens) per sample, in the order trained). `stop_after` batches collated in all, a
    SIGTERM is sent (the run stops at the next step boundary, as a preemption would)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.orders: list[list[int]] = []
        self.samples: list[list[tuple[int, int]]] = []
        self.stop_after, self.batches = stop_after, 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[Feed]:
        real = trainer.DataLoader

        def loader(dataset, *, collate_fn, sampler, **kwargs):
            latent = collate_fn.latent_id
            self.orders.append(list(sampler))
            self.samples.append([])

            def collate(features):
                self.samples[-1] += [(f["idx"], f["input_ids"].count(latent)) for f in features]
                self.batches += 1
                if self.batches == self.stop_after:
                    os.kill(os.getpid(), signal.SIGTERM)
                return collate_fn(features)

            return real(dataset, collate_fn=collate, sampler=sampler, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(trainer, "DataLoader", loader)
            yield self


# 16 records, 4 per step: 4 steps an epoch; stage 0 then 1. LoRA adapters with dropout 0.1: every
# training forward draws from torch's RNG, so a resume must restore it to end as the uninterrupted run.
KEYS = dict(
    num_epochs=2,
    epochs_per_stage=1,
    max_latent_stage=1,
    batch_size_training=4,
    use_llm_lora=4,
    lora_dropout=0.1,
    lr=1e-2,
    num_workers=0,
    max_new_tokens=8,
)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir) -> tuple[Path, Feed]:
    """The uninterrupted run (its save_dir) and what each epoch was fed."""
    tmp = tmp_path_factory.mktemp("straight")
    config = demo_config(tmp, tiny_model_dir, name="straight", **KEYS, **data_slice(tmp, 16, 5))
    with Feed().installed() as feed:
        assert run.main([str(config)]) == 0
    return tmp / "checkpoints" / "straight", feed


def test_every_epoch_draws_a_new_order_of_all_samples(straight):
    _, feed = straight
    first, second = feed.orders
    assert sorted(first) == sorted(second) == list(range(16))
    assert first != second  # DistributedSampler.set_epoch: a new permutation each epoch
    assert [idx for idx, _ in feed.samples[0]] == first  # trained in the sampler's order


def test_a_resume_mid_epoch_trains_the_rest_of_its_order_and_draws_the_same_random_numbers(
    straight, tmp_path, tiny_model_dir, capsys
):
    """SIGTERM while epoch 2's second batch is fetched: step_5 holds one step of epoch 2. The rerun
    trains the other 12 samples of the uninterrupted run's epoch-2 order, in that order, with the
    dropout masks of that run (torch's RNG restored): weights, metrics and predictions all equal."""
    straight_dir, straight_feed = straight
    config = demo_config(tmp_path, tiny_model_dir, name="resumed", **KEYS, **data_slice(tmp_path, 16, 5))
    save_dir = tmp_path / "checkpoints" / "resumed"
    with Feed(stop_after=6).installed() as feed, pytest.raises(SystemExit) as stop:
        run.main([str(config)])
    assert stop.value.code == preemption.EX_TEMPFAIL
    assert f"saved {save_dir / 'step_5'}" in capsys.readouterr().err
    assert feed.orders == straight_feed.orders  # both epochs' orders drawn as the uninterrupted run drew them
    with Feed().installed() as feed:
        assert run.main([str(config)]) == 0
    assert feed.orders == [straight_feed.orders[1][4:]]  # the rest of epoch 2, one batch of 4 skipped
    assert feed.samples == [straight_feed.samples[1][4:]]
    a, b = weights(save_dir / "checkpoint_2"), weights(straight_dir / "checkpoint_2")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert metrics(save_dir) == metrics(straight_dir)
    for name in ("epoch_1.jsonl", "epoch_2.jsonl"):
        assert (save_dir / "predictions" / name).read_text() == (straight_dir / "predictions" / name).read_text()


def test_relaunching_a_finished_run_reports_it_done_and_changes_nothing(straight, tmp_path, tiny_model_dir, capsys):
    straight_dir, _ = straight
    config = demo_config(tmp_path, tiny_model_dir, name="finished", **KEYS, **data_slice(tmp_path, 16, 5))
    save_dir = tmp_path / "checkpoints" / "finished"
    shutil.copytree(straight_dir, save_dir)
    before = {p: p.read_bytes() for p in sorted(save_dir.rglob("*")) if p.is_file() and p.name != "config.yaml"}
    capsys.readouterr()
    with Feed().installed() as feed:
        assert run.main([str(config)]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {save_dir / 'checkpoint_2'} (epoch 2)" in out
    assert "8 in all, 0 to go" in out and "done in " in out and "last epoch 2: " in out
    assert feed.orders == []  # nothing trained
    after = {p: p.read_bytes() for p in sorted(save_dir.rglob("*")) if p.is_file() and p.name != "config.yaml"}
    assert after == before


def test_inference_defaults_to_the_checkpoints_stage_and_equals_its_evaluation(straight, tmp_path, capsys):
    """checkpoint_2 was trained at stage 1: --infer answers the val file as epoch 2's evaluation did,
    at stage 1 unless told otherwise (--stage 0 included)."""
    straight_dir, _ = straight
    val = tmp_path / "val.json"
    val.write_text(json.dumps(json.loads((DEMO / "val.json").read_text())[:5]))
    checkpoint, images = straight_dir / "checkpoint_2", DEMO / "images"
    for stage, expected in ((None, 1), (0, 0)):
        out = tmp_path / f"stage_{stage}.jsonl"
        argv = ["--infer", str(checkpoint), "--data", str(val), "--image-dir", str(images), "--output", str(out)]
        assert run.main([*argv, "--json"] + ([] if stage is None else ["--stage", str(stage)])) == 0
        assert json.loads(capsys.readouterr().out)["stage"] == expected
        answers = [json.loads(line) for line in out.read_text().splitlines()]
        assert [a["latents"] for a in answers] == [expected] * 5
    stage_1 = (tmp_path / "stage_None.jsonl").read_text().splitlines()
    evaluated = (straight_dir / "predictions" / "epoch_2.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in stage_1] == [json.loads(line) for line in evaluated]


# --- keys that change what an epoch does ----------------------------------------------------------------


def test_uniform_prob_draws_new_stages_every_epoch(tmp_path, tiny_model_dir):
    """uniform_prob 0.5 at stage 0 (epochs_per_stage 3): about half the samples get a random other stage,
    and which ones, and which stage, differ from epoch to epoch."""
    keys = dict(num_epochs=3, epochs_per_stage=3, max_latent_stage=3, batch_size_training=8, uniform_prob=0.5)
    data = data_slice(tmp_path, 24, 1)
    config = demo_config(
        tmp_path, tiny_model_dir, name="uniform", lr=0.0, num_workers=0, max_new_tokens=1, **keys, **data
    )
    with Feed().installed() as feed:
        assert run.main([str(config)]) == 0
    latents = [dict(epoch) for epoch in feed.samples]  # record index -> latent tokens, per epoch
    assert [sorted(epoch) for epoch in latents] == [list(range(24))] * 3
    for epoch in latents:
        assert 2 < sum(n > 0 for n in epoch.values()) < 22  # mixed: some at stage 0, some not
    assert latents[0] != latents[1] != latents[2] != latents[0]


def test_reset_optimizer_builds_a_fresh_adamw_every_epoch(tmp_path, tiny_model_dir, monkeypatch):
    """Fast counterpart of test_optimisation's reset test: AdamWs built, and checkpoint_1's optimizer file."""
    built = []

    class CountedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs) -> None:
            built.append(reset)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", CountedAdamW)
    keys = dict(num_epochs=2, epochs_per_stage=2, batch_size_training=8, num_workers=0, max_new_tokens=1)
    for reset in (True, False):
        config = demo_config(
            tmp_path, tiny_model_dir, name=f"reset_{reset}", reset_optimizer=reset, **keys, **data_slice(tmp_path, 8, 1)
        )
        assert run.main([str(config)]) == 0
        first = tmp_path / "checkpoints" / f"reset_{reset}" / "checkpoint_1"
        assert (first / ckpt.OPTIMIZER_FILE).exists() == (not reset)
    assert built == [True, True, False]


def test_save_only_improve_saves_only_a_strictly_better_accuracy(tmp_path, tiny_model_dir):
    """lr 0: the weights never change, so every epoch's accuracy ties the first; only an improvement on the
    best so far (0 before any evaluation) is saved."""
    keys = dict(num_epochs=3, epochs_per_stage=3, batch_size_training=8, lr=0.0, num_workers=0, max_new_tokens=8)
    data = data_slice(tmp_path, 8, 16)
    config = demo_config(tmp_path, tiny_model_dir, name="improve", save_only_improve=True, **keys, **data)
    assert run.main([str(config)]) == 0
    save_dir = tmp_path / "checkpoints" / "improve"
    accuracies = [m["accuracy"] for m in metrics(save_dir)]
    assert len(accuracies) == 3 and len(set(accuracies)) == 1  # ties
    expected = ["checkpoint_1"] if accuracies[0] > 0 else []
    assert sorted(p.name for p in save_dir.glob("checkpoint_*")) == expected
    if expected:
        assert ckpt.read_state(save_dir / "checkpoint_1").accuracy == accuracies[0]


# --- two ranks against one ------------------------------------------------------------------------------


def recorded_ranks(config: Path, record: Path) -> None:
    """run.py CONFIG on 2 forked ranks; rank 0 saves install_recorder's record at `record`."""

    def rank_main(rank: int) -> int:
        steps = {"clipped": [], "unclipped": [], "losses": []}
        install_recorder(steps)
        status = run.main([str(config)])
        if rank == 0:
            torch.save(steps, record)
        return status

    forked_ranks(rank_main)


def test_two_ranks_equal_one_in_gradients_loss_and_an_odd_evaluation(tmp_path, tiny_model_dir, monkeypatch):
    """2 ranks x 2 samples against 1 x 4, one optimizer step (lr 0): the step's gradients and logged loss
    are the same (the loss divides by the label count of all ranks). Evaluation over 5 records (rank 1
    gets a filler copy of record 0 that must not count): the same metrics and predictions, in record order."""
    keys = dict(num_epochs=1, epochs_per_stage=1, lr=0.0, max_grad_norm=1.0, num_workers=0, max_new_tokens=8)
    data = data_slice(tmp_path, range(4, 8), 5)  # 2 and 3 steps: the ranks' label counts differ
    two = demo_config(tmp_path, tiny_model_dir, name="two", batch_size_training=2, batch_size_eval=2, **keys, **data)
    recorded_ranks(two, tmp_path / "two.pt")
    one = recorded_run(tmp_path, tiny_model_dir, monkeypatch, "one", batch_size_training=4, **{**keys, **data})
    assert_same_steps(torch.load(tmp_path / "two.pt", weights_only=True), one, steps=1)
    a, b = tmp_path / "checkpoints" / "two", tmp_path / "checkpoints" / "one"
    (line_2,), (line_1,) = metrics(a), metrics(b)
    assert line_2["total"] == line_1["total"] == 5
    for key in ("accuracy", "correct", "cot_match", "written_cot_match"):
        assert line_2[key] == line_1[key], key
    assert line_2["val_loss"] == pytest.approx(line_1["val_loss"], rel=1e-5)
    predictions = [json.loads(line) for line in (a / "predictions" / "epoch_1.jsonl").read_text().splitlines()]
    assert [p["idx"] for p in predictions] == list(range(5))
    assert (a / "predictions" / "epoch_1.jsonl").read_text() == (b / "predictions" / "epoch_1.jsonl").read_text()
