"""run.py's one parser: every mode in --help, config overrides as key=value, --key value or --key=value
(the last of a key wins), options checked against their mode, and the applied overrides in the start summary."""

from __future__ import annotations

import pytest

import run
from tests.helpers.runs import REPO, demo_config
from training.summary import start_lines
from utils import ConfigError, load_config

DEMO = REPO / "args" / "demo.yaml"


def test_help_lists_every_mode_its_options_and_the_override_forms(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name, mode in run.MODES.items():
        assert f"--{name} mode:" in text, name
        for flags, _ in mode.options:
            assert all(flag in text for flag in flags), flags
    assert "CONFIG" in text and "KEY=VALUE" in text
    assert "key=value, --key value and --key=value" in text and "the last one wins" in text


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["c.yaml", "lr=1e-4"], ["c.yaml", "lr=1e-4"]),
        (["c.yaml", "--lr", "1e-4"], ["c.yaml", "lr=1e-4"]),
        (["c.yaml", "--lr=1e-4"], ["c.yaml", "lr=1e-4"]),
        (["c.yaml", "--max-latent-stage", "3", "--name=a=b"], ["c.yaml", "max_latent_stage=3", "name=a=b"]),
        (["c.yaml", "--lr", "-1", "--lrr", "2"], ["c.yaml", "lr=-1", "lrr=2"]),  # a misspelt key too
        (["c.yaml", "--image-dir", "imgs"], ["c.yaml", "image_dir=imgs"]),  # a config key before an --infer option
        (["c.yaml", "--question", "q"], ["c.yaml", "--question", "q"]),  # an --infer option: left to the parser
        (["--export", "a", "b", "--lr", "1"], ["--export", "a", "b", "--lr", "1"]),  # a mode takes no overrides
    ],
)
def test_the_three_override_forms_become_key_value(argv, expected):
    assert run.as_overrides(argv) == expected


def test_the_forms_set_the_same_config_and_the_last_of_a_key_wins(tmp_path):
    config = demo_config(tmp_path, tmp_path)
    given = [["lr=1e-4", "num_epochs=2"], ["--lr", "1e-4", "--num_epochs", "2"], ["--lr=1e-4", "--num-epochs=2"]]
    loaded = [load_config(config, run.as_overrides(argv)) for argv in given]
    assert all(c == loaded[0] for c in loaded) and loaded[0].lr == 1e-4 and loaded[0].num_epochs == 2
    assert load_config(config, run.as_overrides(["lr=1", "--lr", "2"])).lr == 2.0
    assert load_config(config, run.as_overrides(["--lr", "2", "lr=1"])).lr == 1.0
    assert load_config(config, ["lr=.nan", "lr=1"]).lr == 1.0  # the overridden value is never read
    with pytest.raises(ConfigError) as error:
        load_config(config, ["lr=1", "lr=.nan"])
    assert f"{config}: override 'lr=.nan': key 'lr'" in str(error.value) and "'lr=1'" not in str(error.value)


def test_the_run_gets_the_config_and_the_overrides_that_applied(tmp_path, tiny_model_dir, monkeypatch):
    from training import trainer

    got = []
    monkeypatch.setattr(trainer, "train", lambda config, overrides: got.append((config, overrides)))
    config = demo_config(tmp_path, tiny_model_dir)
    assert run.main([str(config), "--lr", "1e-3", "num_epochs=2", "--lr=2e-3"]) == 0
    ((loaded, overrides),) = got
    assert loaded.lr == 2e-3 and loaded.num_epochs == 2
    assert overrides == ("num_epochs=2", "lr=2e-3")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([str(DEMO), "--question", "q"], "--question goes with --infer"),
        ([str(DEMO), "--dtype", "bf16"], "--dtype goes with --export"),
        ([str(DEMO), "--lr"], "--lr: give it a value"),
        (["--infer", "ckpt", "--question", "q", "--export", "a", "b"], "choose one of --infer, --export"),
        (["--infer", "ckpt"], "give --question TEXT (with --image/--video) or --data FILE.json"),
        (["--infer", "ckpt", "--question", "q", "--top-k", "0"], "--top-k must be >= 1"),
        ([], "give a config file, or one of --infer, --export"),
    ],
)
def test_options_outside_their_mode_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_start_summary_names_the_overrides_that_applied(tmp_path):
    config = load_config(demo_config(tmp_path, tmp_path), ["lr=1e-3"])
    keys = dict(
        world_size=1,
        device="cpu",
        weights_dtype="float32",
        parameters=(10, 10),
        records={"train": (4, 4), "val": (2, 2)},
        steps_per_epoch=1,
        first_epoch=0,
        steps_done=0,
        save_dir=tmp_path,
        writes=True,
    )
    assert not any("overrides" in line for line in start_lines(config, **keys))
    assert start_lines(config, **keys, overrides=("lr=1e-3", "name=b"))[-1] == "  overrides   lr=1e-3 name=b"
