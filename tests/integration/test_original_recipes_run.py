"""The original's GSM8K recipes (tests/helpers/original_recipes.py) run in a row, shrunk only in size: gsm_cot
(c_thought: 0, load_model_path: None), then gsm_coconut from a CoT model, then gsm_coconut_eval on its checkpoint."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers.original_recipes import RECIPES
from tests.helpers.runs import REPO, save_text_model
from training import trainer
from utils import load_config


@pytest.mark.slow
def test_the_originals_gsm_recipes_run_shrunk(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the recipes log to wandb, as the original's
    model = save_text_model(tmp_path / "gpt2_stand_in", tiny_model_dir)
    records = [
        {k: v for k, v in r.items() if k != "image"} for r in json.loads((REPO / "data/demo/val.json").read_text())
    ]
    data = {}
    for split, part in (("train", records[:8]), ("valid", records[8:12]), ("test", records[12:])):
        data[split] = tmp_path / f"gsm_{split}.json"  # "gsm" in val_path: the original's 64 new tokens
        data[split].write_text(json.dumps(part))
    save_path = tmp_path / "checkpoints"

    def run(name: str, **size) -> list[dict]:
        raw = yaml.safe_load(RECIPES[name])
        raw.update(
            model_id=str(model),
            save_path=str(save_path),
            train_path=str(data["train"]),
            val_path=str(data[raw["val_path"].removesuffix(".json").split("_")[-1]]),
            batch_size_training=4,
            **size,
        )
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        return trainer.train(load_config(path))["epochs"]

    cot = run("gsm_cot.yaml", num_epochs=2)
    assert [e["stage"] for e in cot] == [0, 0]
    coconut = run("gsm_coconut.yaml", num_epochs=4, load_model_path=str(model))  # the CoT model's stand-in
    assert [(e["epoch"], e["stage"]) for e in coconut] == [(4, 1)]  # resume: 3 skips stage 0
    (evaluated,) = run("gsm_coconut_eval.yaml", load_model_path=str(save_path / "gsm-coconut" / "checkpoint_4"))
    assert (evaluated["epoch"], evaluated["stage"], evaluated["total"]) == (16, 5, 4)
