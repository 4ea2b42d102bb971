"""What a run keeps on disk: retention (save_total_limit), the resolved config, each checkpoint's run record."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer

import run
from storage import checkpoints as ckpt
from storage.saved_run import read_saved_run
from tests.helpers.runs import demo_config
from utils import config_from_dict, load_config


def _checkpoint(save_dir: Path, name: str, **state) -> None:
    """A checkpoint directory as complete as missing_parts() asks, with the given state."""
    model = save_dir / name / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    (save_dir / name / ckpt.STATE_FILE).write_text(json.dumps({"step": 0, "optimizer_saved": False, **state}))


def _names(save_dir: Path) -> list[str]:
    return sorted(p.name for p in save_dir.iterdir())


def test_pruning_keeps_the_newest_epoch_checkpoints_the_best_one_and_no_older_step_checkpoint(tmp_path):
    accuracies = {1: 0.2, 2: 0.5, 3: 0.3, 4: 0.1, 5: 0.4}
    for epoch, accuracy in accuracies.items():
        _checkpoint(tmp_path, f"checkpoint_{epoch}", epoch=epoch, accuracy=accuracy)
    _checkpoint(tmp_path, "step_20", epoch=3, batch=4, ranks=0)  # in epoch 4, older than checkpoint_5
    _checkpoint(tmp_path, "step_31", epoch=5, batch=2, ranks=0)  # newer than checkpoint_5: kept
    (tmp_path / "metrics.jsonl").write_text("")

    ckpt.prune(tmp_path, tmp_path / "checkpoint_5", keep_last=0)  # 0: keep every epoch checkpoint
    assert _names(tmp_path) == [f"checkpoint_{e}" for e in accuracies] + ["metrics.jsonl", "step_31"]
    ckpt.prune(tmp_path, tmp_path / "checkpoint_5", keep_last=2)  # the newest two, and the best (epoch 2)
    assert _names(tmp_path) == ["checkpoint_2", "checkpoint_4", "checkpoint_5", "metrics.jsonl", "step_31"]


def test_the_newest_checkpoint_is_the_most_progress_not_the_latest_name(tmp_path):
    """Progress orders checkpoints: epoch, then micro-batches into the next epoch; names sort otherwise
    (checkpoint_10 < checkpoint_9 < step_95 as text)."""
    _checkpoint(tmp_path, "checkpoint_9", epoch=9)
    _checkpoint(tmp_path, "checkpoint_10", epoch=10)
    _checkpoint(tmp_path, "step_95", epoch=9, batch=4, ranks=0)  # in epoch 10: older than checkpoint_10
    assert ckpt.newest_checkpoint(tmp_path)[0] == tmp_path / "checkpoint_10"
    _checkpoint(tmp_path, "step_102", epoch=10, batch=2, ranks=0)  # in epoch 11
    _checkpoint(tmp_path, "step_101", epoch=10, batch=1, ranks=0)
    assert ckpt.newest_checkpoint(tmp_path)[0] == tmp_path / "step_102"
    assert [p.name for p, _ in ckpt.find_checkpoints(tmp_path)] == [
        "checkpoint_9",
        "step_95",
        "checkpoint_10",
        "step_101",
        "step_102",
    ]


def test_a_run_saves_its_resolved_config_a_record_in_each_checkpoint_and_keeps_save_total_limit(
    tmp_path, tiny_model_dir
):
    torch.set_num_threads(1)
    path = demo_config(
        tmp_path,
        tiny_model_dir,
        name="kept",
        num_epochs=3,
        epochs_per_stage=1,
        max_latent_stage=2,
        save_total_limit=2,
        num_workers=0,
    )
    assert run.main([str(path)]) == 0
    save_dir = tmp_path / "checkpoints" / "kept"
    assert _names(save_dir) == [
        "checkpoint_2",
        "checkpoint_3",
        "config.yaml",
        "curves.png",
        "metrics.jsonl",
        "predictions",
        "train_log.jsonl",
    ]
    config = load_config(path)
    assert config_from_dict(yaml.safe_load((save_dir / "config.yaml").read_text())) == config
    for epoch in (2, 3):
        model_dir = save_dir / f"checkpoint_{epoch}" / "model"
        record = read_saved_run(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        assert record.config == config and record.epoch == epoch and record.stage == epoch - 1
        tokens = {"start": "<|start-latent|>", "latent": "<|latent|>", "end": "<|end-latent|>"}
        assert record.latent_token_ids == {k: tokenizer.convert_tokens_to_ids(t) for k, t in tokens.items()}
