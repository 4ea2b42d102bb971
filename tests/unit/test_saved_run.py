"""The run record a model directory carries (saved_run.py): it round-trips, and a damaged one is refused by name."""

from __future__ import annotations

import pytest

from storage.saved_run import SAVED_RUN_FILE, SavedRun, read_saved_run, write_saved_run
from utils import ConfigError, config_from_dict


def _config():
    return config_from_dict(
        {
            "model_id": "m",
            "train_path": "t",
            "val_path": "v",
            "coconut": True,
            "c_thought": 2,
            "prompt_format": "internvl2_5",
        }
    )


def test_round_trip(tmp_path):
    run = SavedRun(_config(), epoch=7, stage=2, latent_token_ids={"start": 10, "latent": 11, "end": 12})
    write_saved_run(tmp_path, run)
    back = read_saved_run(tmp_path)
    assert back == run
    assert back.method == "coconut" and back.config.c_thought == 2 and back.config.prompt_format == "internvl2_5"


def test_absent_is_none(tmp_path):
    assert read_saved_run(tmp_path) is None


@pytest.mark.parametrize(
    "text",
    [
        "config: [",
        "config: {}\n",
        "epoch: 1\n",
        "config: {model_id: m, val_path: v, only_eval: true, load_model_path: x}\n"
        "epoch: -1\nstage: 0\nlatent_token_ids: {start: 1, latent: 2, end: 3}\n",
    ],
)
def test_damaged_record_names_the_file(tmp_path, text):
    (tmp_path / SAVED_RUN_FILE).write_text(text)
    with pytest.raises(ConfigError, match=str(tmp_path / SAVED_RUN_FILE)):
        read_saved_run(tmp_path)
