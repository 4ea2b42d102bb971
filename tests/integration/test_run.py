"""The CLI end to end on the demo data: stages, checkpoints, resume, eval-only, CoT → Coconut, errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

import run
from modeling import assembly as model_setup
from multimodal.collator_mm import MultimodalCollator
from storage.checkpoints import complete_checkpoints
from tests.helpers.runs import demo_config, metrics, weights
from training import trainer


def test_demo_trains_all_stages_resumes_and_eval_only_matches(tmp_path, tiny_model_dir):
    config = demo_config(tmp_path, tiny_model_dir, num_epochs=2, epochs_per_stage=1, max_latent_stage=2)
    assert run.main([str(config)]) == 0
    save_dir = tmp_path / "checkpoints" / "run"
    assert [e for e, _ in complete_checkpoints(save_dir)] == [1, 2]

    # the same command with more epochs continues from checkpoint_2 (stage 2 is new)
    raw = yaml.safe_load(config.read_text())
    raw["num_epochs"] = 3
    config.write_text(yaml.safe_dump(raw))
    assert run.main([str(config)]) == 0
    history = metrics(save_dir)
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert [m["stage"] for m in history] == [0, 1, 2]
    assert all(m["val_loss"] > 0 and 0 <= m["accuracy"] <= 1 for m in history)

    # eval-only on the last checkpoint, at the same stage, reproduces the end-of-training eval
    eval_config = demo_config(
        tmp_path,
        tiny_model_dir,
        name="eval",
        only_eval=True,
        resume=2,
        epochs_per_stage=1,
        max_latent_stage=2,
        load_model_path=str(save_dir / "checkpoint_3"),
    )
    result = trainer.train(run.load_config(eval_config))
    (only,) = result["epochs"]
    assert only["stage"] == 2
    assert only["accuracy"] == history[-1]["accuracy"] and only["correct"] == history[-1]["correct"]
    assert abs(only["val_loss"] - history[-1]["val_loss"]) < 1e-6


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(tmp_path, tiny_model_dir):
    """Stopping after epoch 2 and rerunning gives the same final weights as one run of 3 epochs."""
    keys = dict(num_epochs=3, epochs_per_stage=1, max_latent_stage=2, reset_optimizer=False)
    straight = demo_config(tmp_path, tiny_model_dir, name="straight", **keys)
    assert run.main([str(straight)]) == 0
    split = demo_config(tmp_path, tiny_model_dir, name="split", **{**keys, "num_epochs": 2})
    assert run.main([str(split)]) == 0
    raw = yaml.safe_load(split.read_text())
    raw["num_epochs"] = 3
    split.write_text(yaml.safe_dump(raw))
    assert run.main([str(split)]) == 0
    a = weights(tmp_path / "checkpoints" / "straight" / "checkpoint_3")
    b = weights(tmp_path / "checkpoints" / "split" / "checkpoint_3")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_cot_checkpoint_initialises_coconut(tmp_path, tiny_model_dir):
    """The paper's recipe: a CoT run's checkpoint starts a Coconut run at a later epoch (resume)."""
    cot = demo_config(tmp_path, tiny_model_dir, name="cot", cot=True, coconut=False, num_epochs=1)
    assert run.main([str(cot)]) == 0
    cot_ckpt = tmp_path / "checkpoints" / "cot" / "checkpoint_1"
    # lr 0: the Coconut run's weights after one epoch must be exactly the CoT checkpoint's
    cases = (
        ("from_dir", cot_ckpt),
        ("from_file", tmp_path / "cot_state.pt"),
        ("from_weights_file", cot_ckpt / "model" / "model.safetensors"),
    )  # the file inside a checkpoint
    for name, path in cases:
        if name == "from_file":  # a plain state dict as the original COCONUT saves it: wrapper prefix, torch.save
            model = AutoModelForImageTextToText.from_pretrained(cot_ckpt / "model")
            torch.save({f"base_causallm.{k}": v for k, v in model.state_dict().items()}, path)
        coconut = demo_config(
            tmp_path,
            tiny_model_dir,
            name=name,
            load_model_path=str(path),
            resume=1,
            num_epochs=2,
            epochs_per_stage=1,
            lr=0.0,
        )
        assert run.main([str(coconut)]) == 0
        history = metrics(tmp_path / "checkpoints" / name)
        assert [(m["epoch"], m["stage"]) for m in history] == [(2, 1)]
        got = weights(tmp_path / "checkpoints" / name / "checkpoint_2")
        expected = weights(cot_ckpt)
        for k in expected:  # plus the three latent rows the Coconut run adds (tests/integration/test_latent_rows.py)
            rows = 3 if k in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight") else 0
            assert got[k].shape[0] == expected[k].shape[0] + rows, k
            torch.testing.assert_close(got[k][: expected[k].shape[0]], expected[k], rtol=0, atol=0, msg=k)


def test_config_errors_surface_before_model_loading(tmp_path, tiny_model_dir, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded despite a bad config")

    monkeypatch.setattr(model_setup, "load_base_model", fail)
    cases = {
        "lrr": ({"lrr": 0.1}, "unknown key 'lrr' (did you mean 'lr'?)"),
        "type": ({"batch_size_training": "8"}, "key 'batch_size_training': expected an integer"),
        "methods": ({"cot": True}, "choose at most one method"),
        "precision": ({"bf16": True, "fp16": True}, "choose one precision"),
        "path": ({"train_path": str(tmp_path / "nope.json")}, "key 'train_path': path does not exist"),
        "tiles": ({"max_tiles": 0}, "key 'max_tiles': must be > 0"),
    }
    for name, (keys, message) in cases.items():
        config = demo_config(tmp_path, tiny_model_dir, name=name, **keys)
        assert run.main([str(config)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(config) in err, (name, err)


@pytest.mark.slow
def test_latent_column_multiple_pads_the_training_batches_and_keeps_the_results(tmp_path, tiny_model_dir, monkeypatch):
    """latent_column_multiple reaches the collator (columns become multiples of it); the padding is
    masked, so validation loss and accuracy stay those of the unpadded run."""
    columns = []
    collate = MultimodalCollator.__call__

    def recording(self, features):
        batch = collate(self, features)
        latent = (batch.input_ids == self.latent_id).nonzero()
        if len(latent):
            columns.append(int(latent[:, 1].min()))
        return batch

    monkeypatch.setattr(MultimodalCollator, "__call__", recording)
    keys = dict(num_epochs=2, epochs_per_stage=1, max_latent_stage=1, num_workers=0)
    results = {}
    for multiple in (1, 64):
        columns.clear()
        config = demo_config(tmp_path, tiny_model_dir, name=f"m{multiple}", latent_column_multiple=multiple, **keys)
        assert run.main([str(config)]) == 0
        results[multiple] = (metrics(tmp_path / "checkpoints" / f"m{multiple}"), list(columns))
    (plain, plain_columns), (padded, padded_columns) = results[1], results[64]
    assert plain_columns and any(c % 64 for c in plain_columns)
    assert padded_columns and all(c % 64 == 0 for c in padded_columns)
    for a, b in zip(plain, padded, strict=True):
        assert a["accuracy"] == b["accuracy"]
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4 * a["val_loss"]
