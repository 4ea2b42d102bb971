"""Run-level guards through run.main: a diverging run stops before it saves; resuming refuses what would
train on a different data order; one run per run directory; eval-only takes the checkpoint's stage."""

from __future__ import annotations

import json

import pytest

import run
from tests.helpers.runs import demo_config


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
