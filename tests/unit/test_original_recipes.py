"""The original repository's recipes load unchanged, each key with the meaning it has there."""

from __future__ import annotations

import pytest
import yaml

from tests.helpers.original_recipes import RECIPES
from utils import ConfigError, config_from_dict, load_config


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_original_recipe_loads_unchanged_with_its_meaning(tmp_path, name):
    path = tmp_path / name
    path.write_text(RECIPES[name])
    raw = yaml.safe_load(RECIPES[name])
    config = load_config(path)
    for key, value in raw.items():
        expected = None if value == "None" else value  # the original's `load_model_path: None` is a string
        assert getattr(config, key) == expected, key
    method = "cot" if raw["cot"] else "coconut"
    assert config.method == method
    # run.py: max_new_tokens 64 when "gsm" is in val_path, else 128; cot stays at stage 0
    assert config.max_new_tokens == (64 if "gsm" in raw["val_path"] else 128)
    epoch = raw["num_epochs"] - 1
    assert config.stage(epoch) == (0 if method == "cot" else epoch // raw["epochs_per_stage"])


def test_c_thought_zero_means_no_thoughts_per_step_and_below_zero_is_refused():
    base = {"model_id": "m", "train_path": "t", "val_path": "v", "coconut": True}
    assert config_from_dict({**base, "c_thought": 0}).thoughts_per_step == 0
    with pytest.raises(ConfigError, match=r"my.yaml: key 'c_thought': must be > 0, or 0 for no thoughts, got -1"):
        config_from_dict({**base, "c_thought": -1}, "my.yaml")
