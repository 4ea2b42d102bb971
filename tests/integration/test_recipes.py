"""The shipped recipes (args/*.yaml) as shipped, under torchrun with 2 processes on CPU.

Only size keys change (model, data, image size, tiles, epochs, batch, where to save); every training key
(method, stages, reset_optimizer, freeze flags, activation checkpointing, schedule, warmup, clipping,
accumulation, workers, precision) stays as the file has it. Recipes that start from another recipe's checkpoint
(`load_model_path: checkpoints/NAME/checkpoint_N`) run after it, on its last checkpoint, so the chain
cot_vl3_1b -> coconut_vl3_1b -> coconut_vl3_1b_eval runs as a user runs it. A recipe added to args/ joins
this test by itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers.runs import REPO, metrics, torchrun

RECIPES = sorted((REPO / "args").glob("*.yaml"))
DEMO = REPO / "data" / "demo"
# The keys a size change may touch; anything else stays as shipped.
SIZE_KEYS = {
    "model_id",
    "train_path",
    "val_path",
    "image_dir",
    "image_size",
    "max_tiles",
    "num_epochs",
    "batch_size_training",
    "batch_size_eval",
    "save_path",
    "load_model_path",
}
CHAIN_LINK = re.compile(r"^checkpoints/(?P<name>[^/]+)/checkpoint_(?P<epoch>\d+)$")


def shipped(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def small_epochs(config: dict) -> int:
    """Enough epochs to cross one stage boundary after the skipped ones (Coconut), or two (others)."""
    start = config.get("resume", 0)
    if config.get("only_eval"):
        return config.get("num_epochs", 1)
    span = config.get("epochs_per_stage", 1) + 1 if config.get("coconut") else 2
    return min(config.get("num_epochs", 1), start + span)


def run_order() -> list[Path]:
    """Recipes ordered so that each runs after the recipe whose checkpoint it loads."""
    by_name = {shipped(p)["name"]: p for p in RECIPES}
    ordered: list[Path] = []

    def visit(path: Path) -> None:
        link = CHAIN_LINK.match(str(shipped(path).get("load_model_path") or ""))
        if link and by_name.get(link["name"]) not in ordered:
            visit(by_name[link["name"]])
        if path not in ordered:
            ordered.append(path)

    for path in RECIPES:
        visit(path)
    return ordered


def test_recipe_chain_is_consistent_as_shipped():
    """A recipe that loads checkpoint_N of another loads that recipe's last checkpoint (N = its num_epochs)."""
    by_name = {shipped(p)["name"]: shipped(p) for p in RECIPES}
    links = 0
    for path in RECIPES:
        link = CHAIN_LINK.match(str(shipped(path).get("load_model_path") or ""))
        if link:
            assert link["name"] in by_name, (path, link["name"])
            assert int(link["epoch"]) == by_name[link["name"]]["num_epochs"], path
            links += 1
    assert links >= 2  # cot -> coconut -> eval


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """16 train / 8 val demo records (real easy-vqa images)."""
    tmp = tmp_path_factory.mktemp("recipe_data")
    files = {}
    for split, n in (("train", 16), ("val", 8)):
        records = json.loads((DEMO / f"{split}.json").read_text())[:n]
        files[split] = tmp / f"{split}.json"
        files[split].write_text(json.dumps(records))
    return files


@pytest.mark.slow
def test_shipped_recipes_run_as_shipped_under_torchrun(tmp_path, tiny_model_dir, small_data):
    save_path = tmp_path / "checkpoints"
    last_epoch: dict[str, int] = {}
    for path in run_order():
        config = shipped(path)
        resized = {
            "model_id": str(tiny_model_dir),
            "image_dir": str(DEMO / "images"),
            "image_size": 56,
            "max_tiles": min(config.get("max_tiles", 12), 6),
            "num_epochs": small_epochs(config),
            "batch_size_training": 1,
            "batch_size_eval": 4,
            "save_path": str(save_path),
            "train_path": str(small_data["train"]),
            "val_path": str(small_data["val"]),
        }
        link = CHAIN_LINK.match(str(config.get("load_model_path") or ""))
        if link:
            resized["load_model_path"] = str(save_path / link["name"] / f"checkpoint_{last_epoch[link['name']]}")
        assert set(resized) <= SIZE_KEYS
        file = tmp_path / path.name
        file.write_text(yaml.safe_dump({**config, **resized}))

        result = torchrun(file, nproc=2, env={"WANDB_MODE": "disabled"})
        out = result.stdout + result.stderr
        assert result.returncode == 0, f"{path.name}:\n{out[-4000:]}"
        assert "Traceback" not in out, f"{path.name}:\n{out[-4000:]}"
        evals = [line for line in result.stdout.splitlines() if line.startswith("[eval] ")]
        first, last = config.get("resume", 0), resized["num_epochs"]
        if config.get("only_eval"):
            assert len(evals) == 1, f"{path.name}: {evals}"
            continue
        history = metrics(save_path / config["name"])
        assert [m["epoch"] for m in history] == list(range(first + 1, last + 1)), path.name
        stages = [
            0 if config.get("cot") or config.get("no_cot") else e // config.get("epochs_per_stage", 1)
            for e in range(first, last)
        ]
        assert [m["stage"] for m in history] == stages, path.name
        if config.get("coconut"):
            assert len(set(stages)) > 1, f"{path.name}: the resized run must cross a stage boundary"
        last_epoch[config["name"]] = last
