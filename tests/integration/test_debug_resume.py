"""A debug run resumes, as the original's: its run.py looks for checkpoints in save_dir unless only_eval, whatever
`debug` says, and a debug run saves nothing. Here it continues from the newest checkpoint and writes nothing
beside its predictions."""

from __future__ import annotations

import pytest
import yaml

from storage.checkpoints import complete_checkpoints
from tests.helpers.runs import demo_config
from training import trainer
from utils import load_config


@pytest.mark.slow
def test_a_debug_run_continues_from_the_newest_checkpoint_and_saves_nothing(tmp_path, tiny_model_dir, monkeypatch):
    config = demo_config(tmp_path, tiny_model_dir, num_epochs=1, epochs_per_stage=1)
    first = trainer.train(load_config(config))["epochs"]
    save_dir = tmp_path / "checkpoints" / "run"
    before = {p.relative_to(save_dir): p.read_bytes() for p in save_dir.rglob("*") if p.is_file()}

    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "num_epochs": 2, "debug": True, "seed": 1}))
    epochs = trainer.train(load_config(config))["epochs"]
    # a fresh start (seed 1) would train another epoch 1
    assert epochs[:-1] == first and (epochs[-1]["epoch"], epochs[-1]["stage"]) == (2, 1)  # from checkpoint_1
    assert [epoch for epoch, _ in complete_checkpoints(save_dir)] == [1]
    after = {p.relative_to(save_dir): p.read_bytes() for p in save_dir.rglob("*") if p.is_file()}
    written = {p for p in after if before.get(p) != after[p]}
    assert {p.parts[0] for p in written} <= {"predictions"}, written
