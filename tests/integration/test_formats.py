"""The field's usual ways in and out: JSONL data files and TensorBoard event files.

A JSONL copy of the demo data trains to the same metrics and predictions as the JSON lists; the run
with `metrics_sinks: [tensorboard]` writes event files holding the train scalars of train_log.jsonl and
the eval scalars of metrics.jsonl, read back with TensorBoard's own event reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import run
from tests.helpers.runs import REPO, demo_config, metrics
from training.metric_logger import TENSORBOARD_DIR, read_jsonl

DEMO = REPO / "data" / "demo"


def jsonl_copy(src: Path, dst: Path) -> Path:
    dst.write_text("".join(json.dumps(r) + "\n" for r in json.loads(src.read_text())))
    return dst


def predictions(save_dir: Path) -> list[list[dict]]:
    return [read_jsonl(p) for p in sorted((save_dir / "predictions").glob("*.jsonl"))]


@pytest.mark.slow
def test_jsonl_data_trains_as_json_and_tensorboard_holds_train_and_eval_scalars(tmp_path, tiny_model_dir):
    keys = {"num_epochs": 2, "epochs_per_stage": 1, "max_latent_stage": 1}
    json_run = demo_config(tmp_path, tiny_model_dir, name="json", metrics_sinks=["tensorboard"], **keys)
    jsonl_run = demo_config(
        tmp_path,
        tiny_model_dir,
        name="jsonl",
        train_path=str(jsonl_copy(DEMO / "train.json", tmp_path / "train.jsonl")),
        val_path=str(jsonl_copy(DEMO / "val.json", tmp_path / "val.jsonl")),
        **keys,
    )
    assert run.main([str(json_run)]) == 0 and run.main([str(jsonl_run)]) == 0
    json_dir, jsonl_dir = tmp_path / "checkpoints" / "json", tmp_path / "checkpoints" / "jsonl"
    assert metrics(jsonl_dir) == metrics(json_dir) and len(metrics(json_dir)) == 2
    assert predictions(jsonl_dir) == predictions(json_dir) != []
    assert not (jsonl_dir / TENSORBOARD_DIR).exists()  # only where listed in metrics_sinks

    events = EventAccumulator(str(json_dir / TENSORBOARD_DIR))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    train_log = read_jsonl(json_dir / "train_log.jsonl")
    assert {"train/loss", "train/lr", "eval/accuracy", "eval/val_loss"} <= scalars
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [r["step"] for r in train_log]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in train_log], rel=1e-6)
    accuracy = events.Scalars("eval/accuracy")
    assert [e.value for e in accuracy] == pytest.approx([m["accuracy"] for m in metrics(json_dir)])
    assert [e.step for e in accuracy] == [train_log[-1]["step"] // 2, train_log[-1]["step"]]  # end of each epoch
    assert "eval/generations/text_summary" in events.Tags()["tensors"]  # the sample table, as text
