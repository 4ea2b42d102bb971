"""fsdp_shard_size: FSDP2 on a replicate x shard mesh (hybrid sharding) gives one process's losses and weights, and
its checkpoints resume. 2 ranks, gloo on CPU: groups of 1 (two replicas, unsharded) and of 2 (plain FSDP2)."""

from __future__ import annotations

import pytest
import torch
import yaml

import run
from tests.helpers.runs import demo_config, metrics, torchrun, weights

# as tests/integration/test_distributed.py: parameters whose true gradient is zero get only rounding noise,
# which Adam turns into full-size random steps
ZERO_GRADIENT_SUFFIX = "k_proj.bias"
KEYS = dict(num_epochs=2, epochs_per_stage=1, max_latent_stage=2, lr=1e-3)


@pytest.mark.slow
def test_shard_groups_of_one_and_two_match_one_process_and_resume(tmp_path, tiny_model_dir):
    one = demo_config(tmp_path, tiny_model_dir, name="one", batch_size_training=8, **KEYS)
    assert run.main([str(one)]) == 0
    reference = metrics(tmp_path / "checkpoints" / "one")
    reference_weights = weights(tmp_path / "checkpoints" / "one" / "checkpoint_2")
    for shard_size in (1, 2):
        name = f"groups_of_{shard_size}"
        config = demo_config(
            tmp_path, tiny_model_dir, name=name, batch_size_training=4, fsdp_shard_size=shard_size, **KEYS
        )
        if shard_size == 1:  # first one epoch, then the same command resumes from its checkpoint for the second
            raw = yaml.safe_load(config.read_text())
            config.write_text(yaml.safe_dump({**raw, "num_epochs": 1}))
            result = torchrun(config, nproc=2)
            assert result.returncode == 0, result.stderr[-3000:]
            config.write_text(yaml.safe_dump(raw))
        result = torchrun(config, nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]
        if shard_size == 1:
            assert "resuming from" in result.stdout

        got = metrics(tmp_path / "checkpoints" / name)
        assert [m["epoch"] for m in got] == [1, 2]
        for ma, mb in zip(reference, got):
            for key in ("train_loss", "val_loss"):
                assert abs(ma[key] - mb[key]) <= 1e-5 * abs(ma[key]), (shard_size, key, ma, mb)
        got_weights = weights(tmp_path / "checkpoints" / name / "checkpoint_2")
        assert got_weights.keys() == reference_weights.keys()
        for k in reference_weights:
            if not k.endswith(ZERO_GRADIENT_SUFFIX):
                torch.testing.assert_close(got_weights[k], reference_weights[k], rtol=1e-3, atol=1e-5, msg=k)
