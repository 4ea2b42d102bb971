"""The summary lines' formatting: the stage plan per method, counts, durations, the end line."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from training.summary import duration, end_lines, human, media_line, parameter_counts, stage_plan
from utils import config_from_dict

BASE = {"train_path": "t", "val_path": "v", "model_id": "m"}


def test_the_stage_plan_groups_the_epochs_this_run_trains():
    coconut = config_from_dict(
        {**BASE, "coconut": True, "num_epochs": 7, "epochs_per_stage": 2, "max_latent_stage": 2, "c_thought": 2}
    )
    assert stage_plan(coconut, 0) == (
        "1-2: stage 0 (no latents); 3-4: stage 1 (up to 2 latents); "
        "5-6: stage 2 (up to 4 latents); 7: stage 3 (up to 4 latents)"
    )
    assert stage_plan(coconut, 3) == (
        "4: stage 1 (up to 2 latents); 5-6: stage 2 (up to 4 latents); 7: stage 3 (up to 4 latents)"
    )
    cot = config_from_dict({**BASE, "cot": True, "num_epochs": 3})
    assert stage_plan(cot, 0) == "1-3: stage 0 (no latents)"
    no_cot = config_from_dict({**BASE, "no_cot": True, "num_epochs": 2})
    assert stage_plan(no_cot, 0) == "1-2: stage 0 (no latents)"
    pause = config_from_dict({**BASE, "num_epochs": 2})  # every method key off: pause as thought
    assert stage_plan(pause, 0) == "1: stage 0 (no latents); 2: stage 1 (up to 1 latent)"
    no_thoughts = config_from_dict({**BASE, "no_thoughts": True, "num_epochs": 2})
    assert stage_plan(no_thoughts, 0) == "1: stage 0 (no latents); 2: stage 1 (no latents)"


def test_counts_and_durations():
    assert [human(n) for n in (999, 1000, 333_824, 938_193_024, 2_500_000_000)] == [
        "999",
        "1.00k",
        "333.82k",
        "938.19M",
        "2.50B",
    ]
    assert [duration(s) for s in (0.4, 59.6, 3725.4, 90061)] == ["0:00:00", "0:01:00", "1:02:05", "25:01:01"]


def test_parameter_counts_count_shared_parameters_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False), nn.Linear(10, 3))
    model[1].weight = model[0].weight  # tied, as an untied head is not
    model[2].requires_grad_(False)
    assert parameter_counts(model) == (40 + 33, 40)


def test_the_end_line_names_the_best_epoch_first_of_equals():
    metrics = [
        {"epoch": 1, "stage": 0, "accuracy": 0.25},
        {"epoch": 2, "stage": 1, "accuracy": 0.5},
        {"epoch": 3, "stage": 2, "accuracy": 0.5},
        {"epoch": 4, "stage": 2, "accuracy": 0.375},
    ]
    lines = end_lines(metrics, 75.2, Path("/runs/x"), [f"checkpoint_{e}" for e in range(1, 5)], ["metrics.jsonl"])
    assert lines == [
        "done in 0:01:15: best accuracy 0.5000 at epoch 2 (stage 1); last epoch 4: 0.3750",
        "  checkpoints /runs/x/ (4: checkpoint_1 ... checkpoint_4)",
        "  results     metrics.jsonl in /runs/x/",
    ]
    only = end_lines(metrics[:1], 5, Path("/runs/x"), [], [])
    assert only == ["done in 0:00:05: accuracy 0.2500 at epoch 1 (stage 0)"]


def test_media_line_counts_images_videos_and_none_per_split():
    records = [{"image": "a.png"}, {"image": ["a.png", "b.png"]}, {"video": "v.mp4"}, {}]
    config = config_from_dict(
        {"model_id": "m", "train_path": "t", "val_path": "v", "multimodal": True, "image_dir": "i"}
    )
    line = media_line(config, {"train": records, "val": records[3:]})
    assert line == (
        "media: train 2 with images, 1 with a video, 1 neither; val 0 with images, 0 with a video, 1 neither"
    )
    text_only = config_from_dict({"model_id": "m", "train_path": "t", "val_path": "v"})
    assert media_line(text_only, {"train": records}).endswith("(multimodal: false: images and videos are not read)")
