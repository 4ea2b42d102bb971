"""Keys checked against the launch (utils.check_launch) before any model loads."""

from __future__ import annotations

import pytest

from utils import ConfigError, check_launch, config_from_dict

BASE = {"model_id": "m", "train_path": "t", "val_path": "v"}


@pytest.mark.parametrize("shard_size, ranks, ok", [(0, 4, True), (2, 4, True), (4, 4, True), (3, 4, False)])
def test_fsdp_shard_size_must_divide_the_ranks(monkeypatch, shard_size, ranks, ok):
    monkeypatch.setenv("WORLD_SIZE", str(ranks))
    config = config_from_dict({**BASE, "fsdp_shard_size": shard_size}, "my.yaml")
    if ok:
        check_launch(config, "my.yaml")
        return
    with pytest.raises(ConfigError, match=r"^my.yaml: key 'fsdp_shard_size': 3 does not divide the 4 ranks"):
        check_launch(config, "my.yaml")


def test_fsdp_shard_size_is_not_negative():
    with pytest.raises(ConfigError, match="key 'fsdp_shard_size': must be >= 0"):
        config_from_dict({**BASE, "fsdp_shard_size": -1})
