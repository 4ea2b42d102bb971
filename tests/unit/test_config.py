"""Config: every shipped recipe loads; bad keys, types and combinations fail naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from utils import DEFAULT_MULTIMODAL_MODEL, ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]
BASE = {"model_id": "m", "train_path": "t.json", "val_path": "v.json"}


@pytest.mark.parametrize("path", sorted((REPO / "args").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    config = load_config(path)
    assert config.val_path


def test_original_keys_keep_their_meaning():
    config = config_from_dict({**BASE, "load_model_path": "None", "lr": "1e-4", "cot": True, "epochs_per_stage": 3})
    assert config.load_model_path is None  # the original writes the string "None"
    assert config.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert config.method == "cot" and config.stage(7) == 0 and not config.uses_markers
    coconut = config_from_dict({**BASE, "coconut": True, "epochs_per_stage": 3})
    assert coconut.method == "coconut" and coconut.stage(7) == 2 and coconut.uses_markers and coconut.feeds_thoughts
    pause = config_from_dict({**BASE, "epochs_per_stage": 3})  # every method key false: pause as thought
    assert pause.method == "pause" and pause.stage(7) == 2 and pause.uses_markers and not pause.feeds_thoughts
    assert config_from_dict({**BASE, "no_thoughts": True}).thoughts_per_step == 0


def test_max_new_tokens_defaults_to_the_originals_rule():
    """The original's run.py 213-216: 64 new tokens when "gsm" is in val_path, 128 otherwise; it has no key
    for it. A given value stays."""
    assert config_from_dict({**BASE, "val_path": "data/gsm_valid.json"}).max_new_tokens == 64
    assert config_from_dict({**BASE, "val_path": "data/prontoqa_valid.json"}).max_new_tokens == 128
    assert config_from_dict({**BASE, "val_path": "data/gsm_valid.json", "max_new_tokens": 200}).max_new_tokens == 200


def test_multimodal_defaults_to_internvl3_pretrained():
    config = config_from_dict({"multimodal": True, "image_dir": "i", "train_path": "t", "val_path": "v"})
    assert config.model_id == DEFAULT_MULTIMODAL_MODEL == "OpenGVLab/InternVL3-1B-Pretrained"


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"lrr": 0.1}, "unknown key 'lrr' (did you mean 'lr'?)"),
        ({"bf16": "yes"}, "key 'bf16': expected true/false"),
        ({"batch_size_training": 2.5}, "key 'batch_size_training': expected an integer"),
        ({"lr": "fast"}, "key 'lr': expected a number"),
        ({"coconut": True, "cot": True}, "choose at most one method"),
        ({"bf16": True, "fp16": True}, "choose one precision"),
        ({"num_epochs": 0}, "key 'num_epochs': must be > 0"),
        ({"c_thought": -1}, "key 'c_thought': must be > 0"),
        ({"max_tiles": 0}, "key 'max_tiles': must be > 0"),
        ({"latent_column_multiple": 0}, "key 'latent_column_multiple': must be > 0"),
        ({"uniform_prob": 1.5}, "key 'uniform_prob'"),
        ({"prompt_format": "chatml"}, "key 'prompt_format': expected one of"),
        ({"multimodal": True}, "key 'image_dir': required"),
        ({"train_path": None}, "key 'train_path': required"),
        ({"only_eval": True}, "key 'load_model_path': only_eval needs a checkpoint"),
        ({"lr": float("nan")}, "key 'lr': must be a finite number >= 0, got nan"),
        ({"max_grad_norm": "nan"}, "key 'max_grad_norm': must be a finite number >= 0, got nan"),
        ({"weight_decay": -0.1}, "key 'weight_decay': must be a finite number >= 0, got -0.1"),
        ({"max_tiles": 100_000}, "key 'max_tiles': at most 128"),
        ({"video_tiles": 129}, "key 'video_tiles': at most 128"),
        ({"name": "/tmp/elsewhere"}, "key 'name': must name a directory inside save_path"),
        ({"name": "a/../.."}, "key 'name': must name a directory inside save_path"),
    ],
)
def test_bad_config_names_source_and_key(keys, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict({**BASE, **keys}, "my.yaml")
    assert message in str(e.value) and str(e.value).startswith("my.yaml:")


def test_overrides_are_checked_like_file_keys_and_named():
    config = config_from_dict(BASE, "my.yaml", ["lr=2e-5", "name=exp/a", "cot=true"])
    assert (config.lr, config.name, config.method) == (2e-5, "exp/a", "cot")
    with pytest.raises(ConfigError, match=r"^my\.yaml: override 'num_epoch=3': unknown key 'num_epoch' \(did you mean"):
        config_from_dict(BASE, "my.yaml", ["num_epoch=3"])
    with pytest.raises(ConfigError, match=r"^my\.yaml: override 'bf16=true': keys 'bf16' and 'fp16'"):
        config_from_dict({**BASE, "fp16": True}, "my.yaml", ["bf16=true"])


def test_a_key_given_twice_names_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("model_id: m\nlr: 1e-4\ntrain_path: t\nval_path: v\nlr: 1e-3\n")
    message = r"twice\.yaml: not valid YAML: key 'lr' given twice \(first at line 2\) at line 5,"
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_metrics_sinks_lists_known_sinks_once():
    base = {"model_id": "m", "train_path": "t", "val_path": "v"}
    assert config_from_dict(base).metrics_sinks == ["wandb"]
    both = ["tensorboard", "wandb"]
    assert config_from_dict({**base, "metrics_sinks": both}).metrics_sinks == both
    assert config_from_dict({**base, "metrics_sinks": []}).metrics_sinks == []
    for bad in (["mlflow"], ["wandb", "wandb"], "tensorboard"):
        with pytest.raises(ConfigError, match="metrics_sinks"):
            config_from_dict({**base, "metrics_sinks": bad})


@pytest.mark.parametrize("ratio", [1.0, 1.5])
def test_warmup_ratio_is_refused_outside_0_to_1_exclusive(ratio):
    """warmup_ratio 1.0 would warm up over the whole run: the schedule would never reach its peak lr or decay."""
    with pytest.raises(ConfigError, match=f"key 'warmup_ratio': must be in \\[0, 1\\), got {ratio}"):
        config_from_dict({**BASE, "warmup_ratio": ratio}, "my.yaml")
    assert config_from_dict({**BASE, "warmup_ratio": 0.999}, "my.yaml").warmup_ratio == 0.999
