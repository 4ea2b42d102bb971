"""Run-level guards through run.main: a diverging run stops before it saves; resuming refuses what would
train on a different data order; one run per run directory; eval-only takes the checkpoint's stage."""

from __future__ import annotations

import json

import pytest
import yaml

import run
from tests.helpers.runs import REPO, demo_config


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow
def test_diverging_run_stops_before_saving_and_stays_resumable(tmp_path, tiny_model_dir, capsys):
    save_dir = tmp_path / "checkpoints" / "run"
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, num_epochs=1, max_new_tokens=4))]) == 0
    good = (save_dir / "checkpoint_1" / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    diverging = demo_config(tmp_path, tiny_model_dir, num_epochs=2, lr=1e12, max_new_tokens=4)
    assert run.main([str(diverging)]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: training diverged: non-finite loss or gradient norm at optimizer step 8 ")
    assert "last finite loss" in line and f"{save_dir / 'checkpoint_1'} is the last checkpoint" in line
    assert not (save_dir / "checkpoint_2").exists()
    assert (save_dir / "checkpoint_1" / "model" / "model.safetensors").read_bytes() == good
    for name in ("train_log.jsonl", "metrics.jsonl"):  # strict JSON: no bare NaN
        for text in (save_dir / name).read_text().splitlines():
            assert "NaN" not in text and "Infinity" not in text, (name, text)
            json.loads(text)
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, num_epochs=2, max_new_tokens=4))]) == 0
    assert (save_dir / "checkpoint_2").is_dir()


@pytest.mark.slow
def test_resume_refuses_a_changed_data_order_mid_epoch(tmp_path, tiny_model_dir, capsys):
    save_dir = tmp_path / "checkpoints" / "run"
    train = tmp_path / "train.json"
    records = json.loads((REPO / "data" / "demo" / "train.json").read_text())
    for record in records:
        record["image"] = str(REPO / "data" / "demo" / "images" / record["image"])
    train.write_text(json.dumps(records))
    # save_only_improve with an accuracy of 0 saves no epoch checkpoint: step_6 (the epoch's last step) is the newest
    keys = {
        "num_epochs": 1,
        "max_new_tokens": 4,
        "train_path": str(train),
        "allow_external_images": True,
        "save_only_improve": True,
    }
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, save_every_steps=2, **keys))]) == 0
    assert sorted(p.name for p in save_dir.glob("*_*") if p.is_dir()) == ["step_6"]
    capsys.readouterr()
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, batch_size_training=4, **keys))]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {save_dir / 'step_6'}: a mid-epoch checkpoint saved with batch_size_training 8,")
    assert "this run has 4" in line
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, c_thought=2, **keys))]) == 2
    assert "saved with c_thought 1, this run has 2" in one_error_line(capsys)
    train.write_text(json.dumps(records[::-1]))  # the same path, other content
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, **keys))]) == 2
    assert "saved with train_path content 'SHA-256 " in one_error_line(capsys)
    train.write_text(json.dumps(records))
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, lr=1e-4, **keys))]) == 0  # lr: not the order
    assert f"resuming from {save_dir / 'step_6'}" in capsys.readouterr().out


@pytest.mark.slow
def test_epoch_boundary_resume_reports_changes_and_ignores_model_id(tmp_path, tiny_model_dir, capsys):
    save_dir = tmp_path / "checkpoints" / "run"
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, num_epochs=1, max_new_tokens=4))]) == 0
    capsys.readouterr()
    hub_id = "OpenGVLab/InternVL3-1B-Pretrained"
    changed = demo_config(
        tmp_path, tiny_model_dir, num_epochs=2, max_new_tokens=4, model_id=hub_id, batch_size_training=4
    )
    assert run.main([str(changed)]) == 0
    out = capsys.readouterr().out
    assert "changed since checkpoint_1: batch_size_training 8 -> 4" in out
    assert f"model_id '{hub_id}' is ignored" in out
    assert yaml.safe_load((save_dir / "config.yaml").read_text())["model_id"] == str(tiny_model_dir)
