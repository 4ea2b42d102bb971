"""The shipped GSM8K recipes' data end to end: the builder command written in args/cot_vl3_1b.yaml, run on a small
stand-in for the original's data/gsm_{train,valid,test}.json, writes what the three recipes read, and the CoT recipe
(shrunk in size only) trains on it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from preprocessing import gsm8k_mm
from tests.helpers.runs import REPO
from training import trainer
from utils import config_from_dict, load_config

RECIPES = ("cot_vl3_1b.yaml", "coconut_vl3_1b.yaml", "coconut_vl3_1b_eval.yaml")
BUILD = "python -m preprocessing.gsm8k_mm "


def documented_build() -> list[str]:
    """The builder's arguments as the recipe's header comment gives them."""
    lines = [line.lstrip("# ") for line in (REPO / "args" / RECIPES[0]).read_text().splitlines()]
    (command,) = [line for line in lines if line.startswith(BUILD)]
    return shlex.split(command.removeprefix(BUILD))


def stand_in(n: int, offset: int) -> list[dict]:
    """Records in the original's format (question, steps, answer), GSM8K-like."""
    return [
        {
            "question": f"Ann has {i + 3} apples and buys {i + 4} more. How many apples does she have?",
            "steps": [f"<<{i + 3}+{i + 4}={2 * i + 7}>>"],
            "answer": str(2 * i + 7),
        }
        for i in range(offset, offset + n)
    ]


@pytest.mark.slow
def test_the_documented_commands_build_what_the_recipes_read_and_the_cot_recipe_starts(
    tmp_path, tiny_model_dir, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    original = Path("coconut/data")
    original.mkdir(parents=True)
    for split, n, offset in (("train", 8, 0), ("valid", 4, 100), ("test", 4, 200)):
        (original / f"gsm_{split}.json").write_text(json.dumps(stand_in(n, offset)))

    assert gsm8k_mm.main(documented_build()) == {"train": 8, "val": 4, "test": 4}
    for name in RECIPES:
        config = load_config(REPO / "args" / name)
        for key in ("train_path", "val_path", "image_dir"):
            path = getattr(config, key)
            assert path is None or Path(path).exists(), (name, key, path)

    raw = yaml.safe_load((REPO / "args" / RECIPES[0]).read_text())
    raw.update(
        model_id=str(tiny_model_dir),
        image_size=56,
        max_tiles=6,
        num_epochs=1,
        batch_size_training=1,
        batch_size_eval=4,
        num_workers=0,  # the machine's cores, not the recipe's
    )
    (epoch,) = trainer.train(config_from_dict(raw, RECIPES[0]))["epochs"]
    assert epoch["total"] == 4 and epoch["train_loss"] > 0
    assert (Path("checkpoints") / raw["name"] / "checkpoint_1").is_dir()
