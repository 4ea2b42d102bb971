"""2-process torchrun (FSDP2, gloo, CPU) against one process on the same global batch."""

from __future__ import annotations

import json

import pytest
import torch

import run
from tests.helpers import fsdp_worker
from tests.helpers.runs import demo_config, forked_ranks, launch, metrics, torchrun, weights

pytestmark = pytest.mark.transformers  # exercises transformers' model code (with_transformers.sh)

# Parameters whose true gradient is zero: softmax ignores a bias added to every key, so these
# receive only rounding noise, which Adam's normalisation turns into full-size random steps.
ZERO_GRADIENT_SUFFIX = "k_proj.bias"


@pytest.mark.slow
def test_two_ranks_match_one_rank_on_the_global_batch(tmp_path, tiny_model_dir):
    keys = dict(num_epochs=2, epochs_per_stage=1, max_latent_stage=2, lr=1e-3)
    one = demo_config(tmp_path, tiny_model_dir, name="one", batch_size_training=8, **keys)
    two = demo_config(tmp_path, tiny_model_dir, name="two", batch_size_training=4, **keys)
    assert run.main([str(one)]) == 0
    result = torchrun(two, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]

    a, b = metrics(tmp_path / "checkpoints" / "one"), metrics(tmp_path / "checkpoints" / "two")
    assert [m["stage"] for m in b] == [0, 1]
    for ma, mb in zip(a, b):  # losses agree to float rounding (tolerance 1e-5 relative)
        for key in ("train_loss", "val_loss"):
            assert abs(ma[key] - mb[key]) <= 1e-5 * abs(ma[key]), (key, ma, mb)
        assert ma["total"] == mb["total"] == 16  # every validation record counted once
    wa = weights(tmp_path / "checkpoints" / "one" / "checkpoint_2")
    wb = weights(tmp_path / "checkpoints" / "two" / "checkpoint_2")
    assert wa.keys() == wb.keys()
    for k in wa:
        if not k.endswith(ZERO_GRADIENT_SUFFIX):
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def worker() -> dict:
    """tests/helpers/fsdp_worker.py's checks in one 2-rank torchrun; their JSON results by check."""
    result = launch("-m", "tests.helpers.fsdp_worker", "collectives", "fresh_optimizer", "compiled", timeout=300)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_rank_without_latents_beside_one_with_them_equals_one_process(tmp_path):
    """Rank 1's batch has no latents while rank 0's has two per sample: rank 1 runs the same number of
    latent passes as dummies, which must leave its loss and every gradient as one unsharded process's on
    all four samples (2 ranks forked from this process: no imports to repeat)."""
    out = tmp_path / "result.json"

    def rank_main(rank: int) -> int:
        torch.manual_seed(0)
        torch.set_num_threads(1)
        result = fsdp_worker.run_checks(["uneven_latents"])
        if result is not None:
            out.write_text(json.dumps(result))
        return 0

    forked_ranks(rank_main)
    result = json.loads(out.read_text())["uneven_latents"]
    assert result["same_parameters"], result
    assert result["loss"][0] == pytest.approx(result["loss"][1], rel=1e-5), result
    assert result["max_grad_diff"] <= 1e-5 * result["max_grad"], result


@pytest.mark.slow
def test_fsdp_gathers_each_decoder_layer_once_per_step_whatever_the_latents(worker):
    """The n+1 latent passes run forward and backward without re-gathering the decoder layers."""
    calls = worker["collectives"]
    assert calls["0"] == calls["2"] == calls["5"], calls
    gathers = sum(v for k, v in calls["5"].items() if "all_gather" in k)
    assert gathers == 2 + 1  # two decoder layers and the root, once each


@pytest.mark.slow
def test_an_optimizer_built_after_evaluation_holds_the_sharded_parameters(worker):
    """After an evaluation forward the decoder layers (reshard_after_forward=False) and the root stay
    gathered, their parameters swapped for plain tensors: an AdamW built then (reset_optimizer at a
    new epoch) crashed its next step and its state could not be saved. The check refuses such an
    optimizer; after release_gathered a fresh one is the sharded model's, steps and saves."""
    result = worker["fresh_optimizer"]
    assert result["plain_after_eval"] > 0, result
    assert result["stale_refused"], result
    assert result["fresh_state_entries"] == result["trainable"] > 0, result


@pytest.mark.slow
def test_compiled_latent_passes_under_fsdp_equal_eager(worker):
    result = worker["compiled"]
    assert result["graphs"] >= 1, result  # the passes did run compiled
    eager, compiled = result["loss"]
    assert abs(compiled - eager) <= 1e-5 * abs(eager), result
    assert result["max_grad_diff"] <= 1e-4 * result["max_grad"] + 1e-6, result


@pytest.mark.slow
def test_cuda_graph_compile_is_refused_under_torchrun(tmp_path, tiny_model_dir):
    config = demo_config(tmp_path, tiny_model_dir, name="graphs", num_epochs=1, compile_latent_passes="reduce-overhead")
    result = torchrun(config, nproc=2)
    assert result.returncode != 0
    assert (
        "key 'compile_latent_passes': reduce-overhead (CUDA graphs) runs in one process only"
        in result.stdout + result.stderr
    )
