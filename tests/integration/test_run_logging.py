"""What a run says and writes about itself, on the demo data with the tiny model: the start-up and
end-of-run summaries, the progress bar over the whole run, train_log.jsonl (across a resume too),
the grad norm against a naive recomputation, curves.png, wandb (fake module, and the real one
offline), transformers' own bars silenced, and the same numbers from 2 FSDP2 ranks as from one process."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModelForImageTextToText

import run
from tests.helpers.fake_wandb import FakeWandb
from tests.helpers.runs import demo_config, metrics, torchrun
from training import reporter
from training.metric_logger import read_jsonl

# the in-repo demo data: 48 train records, 16 val records, batch 4: 12 optimizer steps per epoch
STEPS_PER_EPOCH = 12


def logs_config(tmp_path: Path, tiny_model_dir: Path, **keys) -> Path:
    """demo_config at batch 4 (the step counts above) and lr 2e-3 (the bar's text below), whatever args/demo.yaml
    ships."""
    return demo_config(tmp_path, tiny_model_dir, **{"batch_size_training": 4, "lr": 2e-3, **keys})


STEP_KEYS = [
    "step",
    "epoch",
    "stage",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "samples_per_s",
    "token_embedding_norm",
]  # + "thought_norm" where thoughts are fed back


pytestmark = pytest.mark.usefixtures("one_thread")  # identical arithmetic in every run (tests/conftest.py)


@pytest.fixture
def bars(monkeypatch) -> list:
    """Every progress bar the trainer opens, kept for inspection after it closed."""
    opened = []

    class Recorded(reporter.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.kwargs = kwargs
            opened.append(self)

    monkeypatch.setattr(reporter, "tqdm", Recorded)
    return opened


def summary(out: str, first: str) -> list[str]:
    """The block of lines starting with `first` in the captured stdout."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block


def test_a_run_summarises_itself_logs_every_step_and_draws_its_curves(tmp_path, tiny_model_dir, capsys, bars):
    config = logs_config(
        tmp_path,
        tiny_model_dir,
        name="logs",
        num_epochs=2,
        epochs_per_stage=1,
        max_latent_stage=1,
        freeze_backbone=True,
    )
    assert run.main([str(config)]) == 0
    save_dir = tmp_path / "checkpoints" / "logs"
    out, err = capsys.readouterr()

    # start-up: counts recomputed naively from the saved model (vision tower frozen)
    model = AutoModelForImageTextToText.from_pretrained(save_dir / "checkpoint_2" / "model")
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.model.vision_tower.parameters())
    trainable = total - frozen
    start = summary(out, "logs: ")
    assert start == [
        "logs: coconut, 1 process on cpu, fp32 (weights float32)",
        f"  parameters  {total / 1e3:.2f}k, {trainable / 1e3:.2f}k trainable ({100 * trainable / total:.2f}%)",
        "  records     train 48, val 16",
        "  batch       4 per rank x 1 rank x 1 accumulation = 4 samples per optimizer step",
        "  steps       12 per epoch, 24 in all",
        "  epochs      1: stage 0 (no latents); 2: stage 1 (up to 1 latent)",
        f"  save dir    {save_dir}",
    ]
    assert 0 < trainable < total

    # one line per optimizer step
    steps = read_jsonl(save_dir / "train_log.jsonl")
    assert [s["step"] for s in steps] == list(range(1, 25))
    assert [s["epoch"] for s in steps] == pytest.approx([k / STEPS_PER_EPOCH for k in range(1, 25)])
    assert [s["stage"] for s in steps] == [0] * 12 + [1] * 12
    assert [list(s) for s in steps] == [STEP_KEYS] * 12 + [STEP_KEYS + ["thought_norm"]] * 12
    assert all(s["lr"] == 2e-3 and s["tokens_per_s"] > 0 and s["samples_per_s"] > 0 for s in steps)
    history = metrics(save_dir)
    for epoch in (1, 2):  # the epoch's train_loss is the token mean of its steps: near the mean of step losses
        losses = [s["loss"] for s in steps if math.ceil(s["epoch"]) == epoch]
        assert min(losses) <= history[epoch - 1]["train_loss"] <= max(losses)

    # the progress bar: the whole run in optimizer steps, loss, lr, grad norm and tokens/s beside it
    (bar,) = bars
    assert (bar.total, bar.n, bar.kwargs["initial"], bar.unit) == (24, 24, 0, "step")
    assert bar.smoothing == 0  # its rate (so its ETA): the mean since the launch began, evaluations included
    assert re.fullmatch(r"loss=[\d.]+, lr=2\.00e-03, grad_norm=[\d.e+-]+, tok/s=\d+", bar.postfix), bar.postfix

    # the end: best epoch (the first of equals) and accuracy, where things are
    best = max(history, key=lambda m: m["accuracy"])
    end = summary(out, "done in ")
    assert re.fullmatch(
        rf"done in 0:\d\d:\d\d: best accuracy {best['accuracy']:.4f} at epoch {best['epoch']} "
        rf"\(stage {best['stage']}\)(; last epoch 2: [\d.]+)?",
        end[0],
    ), end[0]
    assert end[1:] == [
        f"  checkpoints {save_dir}/ (2: checkpoint_1, checkpoint_2)",
        f"  results     metrics.jsonl, train_log.jsonl, curves.png, predictions/ in {save_dir}/",
    ]
    with Image.open(save_dir / "curves.png") as image:
        assert image.format == "PNG"
    assert "Loading weights" not in err and "Writing model shards" not in err  # transformers' own bars


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_the_logged_grad_norm_is_the_norm_before_clipping(tmp_path, tiny_model_dir, monkeypatch, max_grad_norm):
    """Recomputed naively (fp64, every gradient) before clip_grad_norm_ runs and at AdamW.step: with
    max_grad_norm 0 nothing clips and the norm is still logged; with 0.5 the log has the norm before it."""
    before, at_step = [], []
    clip, step = torch.nn.utils.clip_grad_norm_, torch.optim.AdamW.step

    def naive(params) -> float:
        return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None))

    def recording_clip(params, *args, **kwargs):
        params = list(params)
        before.append(naive(params))
        return clip(params, *args, **kwargs)

    def recording_step(self, *args, **kwargs):
        at_step.append(naive([p for group in self.param_groups for p in group["params"]]))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    config = logs_config(tmp_path, tiny_model_dir, num_epochs=1, max_grad_norm=max_grad_norm)
    assert run.main([str(config)]) == 0
    logged = [s["grad_norm"] for s in read_jsonl(tmp_path / "checkpoints" / "run" / "train_log.jsonl")]
    assert len(logged) == len(at_step) == STEPS_PER_EPOCH
    if max_grad_norm:
        assert logged == pytest.approx(before, rel=1e-5)
        assert all(n > 0.5 for n in before)  # so each step was clipped, to 0.5
        assert at_step == pytest.approx([0.5] * STEPS_PER_EPOCH, rel=1e-5)
    else:
        assert before == []
        assert logged == pytest.approx(at_step, rel=1e-5)


def test_the_step_log_and_the_bar_continue_a_resumed_run(tmp_path, tiny_model_dir, capsys, bars):
    """Lines a killed run logged after its newest checkpoint are dropped; the re-run steps are logged
    once; the bar counts the whole run from the resumed step, and the summary says what is left."""
    config = logs_config(tmp_path, tiny_model_dir, num_epochs=1, epochs_per_stage=1)
    assert run.main([str(config)]) == 0
    path = tmp_path / "checkpoints" / "run" / "train_log.jsonl"
    first = path.read_text()
    with open(path, "a") as f:  # steps 13 and 14 of epoch 2, logged before a kill that saved nothing more
        f.write('{"step": 13, "epoch": 1.08, "stage": 1, "loss": 99.0}\n{"step": 14, "epoch": 1.1')
    raw = yaml.safe_load(config.read_text())
    raw["num_epochs"] = 2
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert run.main([str(config)]) == 0
    assert path.read_text().startswith(first)
    steps = read_jsonl(path)
    assert [s["step"] for s in steps] == list(range(1, 25)) and all(s["loss"] < 99 for s in steps)
    assert bars[-1].kwargs["initial"] == 12 and (bars[-1].total, bars[-1].n) == (24, 24)
    assert "  steps       12 per epoch, 24 in all, 12 to go" in capsys.readouterr().out.splitlines()


def test_wandb_lives_in_the_save_directory_with_one_run_id_and_a_generations_table(
    tmp_path, tiny_model_dir, monkeypatch
):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = logs_config(tmp_path, tiny_model_dir, num_epochs=1, wandb_mode="offline")
    save_dir = tmp_path / "checkpoints" / "run"
    assert run.main([str(config)]) == 0
    raw = yaml.safe_load(config.read_text())
    raw["num_epochs"] = 2
    config.write_text(yaml.safe_dump(raw))
    assert run.main([str(config)]) == 0  # resumed from checkpoint_1
    run_id = (save_dir / "wandb_run_id").read_text().strip()
    assert [(i["dir"], i["id"], i["resume"], i["mode"]) for i in fake.inits] == [
        (str(save_dir), run_id, "allow", "offline")
    ] * 2
    assert fake.finished == 2
    train = [step for step, record in fake.logged if "train/loss" in record]
    assert train == list(range(1, 25))
    tables = [(step, record["eval/generations"]) for step, record in fake.logged if "eval/generations" in record]
    assert [step for step, _ in tables] == [12, 24]
    for epoch, (_, table) in enumerate(tables, 1):
        predictions = [
            json.loads(line) for line in (save_dir / "predictions" / f"epoch_{epoch}.jsonl").read_text().splitlines()
        ]
        assert table.columns == ["question", "gold", "output", "answer"]
        assert table.data == [[p["question"], p["gold"], p["output"], p["answer"]] for p in predictions]  # 16 < 32

    # a debug run logs nothing: no wandb, no step log, no curves
    fake.inits.clear()
    debug = logs_config(tmp_path, tiny_model_dir, name="debug", num_epochs=1, wandb_mode="offline", debug=True)
    assert run.main([str(debug)]) == 0
    assert fake.inits == []
    assert not any(
        (tmp_path / "checkpoints" / "debug" / name).exists()
        for name in ("train_log.jsonl", "curves.png", "wandb", "wandb_run_id")
    )


@pytest.mark.slow
def test_the_real_wandb_offline_resumes_its_run(tmp_path, tiny_model_dir, monkeypatch):
    """wandb itself (its service process, offline: nothing leaves the machine): both launches write
    their offline run under save_dir/wandb/ with the id kept in save_dir."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = logs_config(tmp_path, tiny_model_dir, num_epochs=1, wandb_mode="offline")
    assert run.main([str(config)]) == 0
    raw = yaml.safe_load(config.read_text())
    raw["num_epochs"] = 2
    config.write_text(yaml.safe_dump(raw))
    assert run.main([str(config)]) == 0
    save_dir = tmp_path / "checkpoints" / "run"
    run_id = (save_dir / "wandb_run_id").read_text().strip()
    runs = sorted(p.name for p in (save_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith("-" + run_id) for name in runs), runs


@pytest.mark.slow
def test_two_fsdp2_ranks_report_the_numbers_of_one_process(tmp_path, tiny_model_dir, capsys):
    """2 ranks x batch 4 against 1 process x batch 8 (the same 8 samples per step): the same parameter
    counts (full sizes, not the shards), the same global grad norm (DTensor gradients) and loss."""
    keys = dict(num_epochs=1, lr=1e-3)
    one = demo_config(tmp_path, tiny_model_dir, name="one", batch_size_training=8, **keys)
    two = demo_config(tmp_path, tiny_model_dir, name="two", batch_size_training=4, **keys)
    assert run.main([str(one)]) == 0
    one_out = capsys.readouterr().out
    result = torchrun(two, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    parameters = [line for line in one_out.splitlines() if line.startswith("  parameters  ")]
    assert len(parameters) == 1 and parameters[0] in result.stdout.splitlines(), result.stdout[-3000:]
    assert "two: coconut, 2 processes on cpu" in result.stdout
    a = read_jsonl(tmp_path / "checkpoints" / "one" / "train_log.jsonl")
    b = read_jsonl(tmp_path / "checkpoints" / "two" / "train_log.jsonl")
    assert len(a) == len(b) == 6
    for key in ("loss", "grad_norm"):
        assert [s[key] for s in b] == pytest.approx([s[key] for s in a], rel=1e-4), key
    assert all(
        abs(sa["samples_per_s"] / sa["tokens_per_s"] - sb["samples_per_s"] / sb["tokens_per_s"]) < 1e-9
        for sa, sb in zip(a, b)
    )  # both count every rank's tokens and samples of the step
