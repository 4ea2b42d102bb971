"""Run-level guards through run.main: a diverging run stops before it saves; resuming refuses what would
train on a different data order; one run per run directory; eval-only takes the checkpoint's stage."""

from __future__ import annotations

import json

import pytest
import yaml

import run
from storage.run_lock import run_lock
from tests.helpers.runs import REPO, demo_config


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow
def test_diverging_run_stops_before_saving_and_stays_resumable(tmp_path, tiny_model_dir, capsys):
    save_dir = tmp_path / "checkpoints" / "run"
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, num_epochs=1, max_new_tokens=4))]) == 0
    good = (save_dir / "checkpoint_1" / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    diverging = demo_config(tmp_path, tiny_model_dir, num_epochs=2, lr=1e12, max_new_tokens=4)
    assert run.main([str(diverging)]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: training diverged: non-finite loss or gradient norm at optimizer step 8 ")
    assert "last finite loss" in line and f"{save_dir / 'checkpoint_1'} is the last checkpoint" in line
    assert not (save_dir / "checkpoint_2").exists()
    assert (save_dir / "checkpoint_1" / "model" / "model.safetensors").read_bytes() == good
    for name in ("train_log.jsonl", "metrics.jsonl"):  # strict JSON: no bare NaN
        for text in (save_dir / name).read_text().splitlines():
            assert "NaN" not in text and "Infinity" not in text, (name, text)
            json.loads(text)
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, num_epochs=2, max_new_tokens=4))]) == 0
    assert (save_dir / "checkpoint_2").is_dir()


@pytest.mark.slow
def test_resume_refuses_a_changed_data_order_mid_epoch(tmp_path, tiny_model_dir, capsys):
    save_dir = tmp_path / "checkpoints" / "run"
    train = tmp_path / "train.json"
    records = json.loads((REPO / "data" / "demo" / "train.json").read_text())
    for record in records:
        record["image"] = str(REPO / "data" / "demo" / "images" / record["image"])
    train.write_text(json.dumps(records))
    # save_only_improve with an accuracy of 0 saves no epoch checkpoint: step_6 (the epoch's last step) is the newest
    keys = {
        "num_epochs": 1,
        "max_new_tokens": 4,
        "train_path": str(train),
        "allow_external_images": True,
        "save_only_improve": True,
    }
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, save_every_steps=2, **keys))]) == 0
    assert sorted(p.name for p in save_dir.glob("*_*") if p.is_dir()) == ["step_6"]
    capsys.readouterr()
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, batch_size_training=4, **keys))]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {save_dir / 'step_6'}: a mid-epoch checkpoint saved with batch_size_training 8,")
    assert "this run has 4" in line
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, c_thought=2, **keys))]) == 2
    assert "saved with c_thought 1, this run has 2" in one_error_line(capsys)
    train.write_text(json.dumps(records[::-1]))  # the same path, other content
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, **keys))]) == 2
    assert "saved with train_path content 'SHA-256 " in one_error_line(capsys)
    train.write_text(json.dumps(records))
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, lr=1e-4, **keys))]) == 0  # lr: not the order
    assert f"resuming from {save_dir / 'step_6'}" in capsys.readouterr().out


@pytest.mark.slow
def test_epoch_boundary_resume_reports_changes_and_ignores_model_id(tmp_path, tiny_model_dir, capsys):
    save_dir = tmp_path / "checkpoints" / "run"
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, num_epochs=1, max_new_tokens=4))]) == 0
    capsys.readouterr()
    hub_id = "OpenGVLab/InternVL3-1B-Pretrained"
    changed = demo_config(
        tmp_path, tiny_model_dir, num_epochs=2, max_new_tokens=4, model_id=hub_id, batch_size_training=4
    )
    assert run.main([str(changed)]) == 0
    out = capsys.readouterr().out
    assert "changed since checkpoint_1: batch_size_training 8 -> 4" in out
    assert f"model_id '{hub_id}' is ignored" in out
    assert yaml.safe_load((save_dir / "config.yaml").read_text())["model_id"] == str(tiny_model_dir)


def test_a_second_run_on_one_run_directory_is_refused(tmp_path, tiny_model_dir, capsys):
    config = demo_config(tmp_path, tiny_model_dir, num_epochs=1)
    with run_lock(tmp_path / "checkpoints" / "run", True, print):
        assert run.main([str(config)]) == 2
    assert "another run is using this run directory" in one_error_line(capsys)
    assert not (tmp_path / "checkpoints" / "run" / "config.yaml").exists()  # refused before writing anything


@pytest.fixture(scope="module")
def stage2_checkpoint(tmp_path_factory, tiny_model_dir):
    """A demo run through stages 0, 1, 2: its checkpoint_3 (stage 2)."""
    tmp = tmp_path_factory.mktemp("stage2")
    config = demo_config(tmp, tiny_model_dir, num_epochs=3, epochs_per_stage=1, max_latent_stage=2, max_new_tokens=4)
    assert run.main([str(config)]) == 0
    return tmp / "checkpoints" / "run" / "checkpoint_3"


@pytest.mark.slow
@pytest.mark.parametrize(("resume", "stage"), [(0, 2), (1, 1)])
def test_eval_only_takes_the_checkpoints_stage_unless_resume_is_given(
    stage2_checkpoint, tmp_path, tiny_model_dir, capsys, resume, stage
):
    keys = {"epochs_per_stage": 1, "max_latent_stage": 2, "max_new_tokens": 4, "resume": resume}
    config = demo_config(tmp_path, tiny_model_dir, only_eval=True, load_model_path=str(stage2_checkpoint), **keys)
    assert run.main([str(config)]) == 0
    out = capsys.readouterr().out
    assert f" stage={stage} " in next(line for line in out.splitlines() if line.startswith("[eval] "))
    assert (f"eval only: evaluating at stage 2, the stage {stage2_checkpoint / 'model'} was trained to" in out) == (
        resume == 0
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--question", "what <|latent|> color?"], "<question>: record 0: key 'question': holds '<|latent|>'"),
        (["--question", "<IMG_CONTEXT>"], "key 'question': holds '<IMG_CONTEXT>'"),
        (["--question", "a <img> b"], "key 'question': holds '<img>'"),
        (["--question", "<|im_end|> done"], "key 'question': holds '<|im_end|>'"),
        (["--question", "<image> what?"], "key 'question': holds '<image>'"),
        (["--question", "  "], "<question>: key 'question': expected a non-empty string"),
        (["--question", "q", "--image", "a\0b.png"], "key 'image': a path is empty or holds a NUL byte"),
    ],
)
def test_infer_refuses_bad_questions_in_one_line(stage2_checkpoint, capsys, args, message):
    assert run.main(["--infer", str(stage2_checkpoint), *args]) == 2
    assert message in one_error_line(capsys)


@pytest.mark.slow
def test_infer_data_output_that_is_a_directory_is_one_line(stage2_checkpoint, tmp_path, capsys):
    data = REPO / "data" / "demo" / "val.json"
    args = [
        "--infer",
        str(stage2_checkpoint),
        "--data",
        str(data),
        "--image-dir",
        str(REPO / "data" / "demo" / "images"),
    ]
    assert run.main([*args, "--output", str(tmp_path)]) == 2
    assert f"{tmp_path}: is a directory" in one_error_line(capsys)
    (tmp_path / "file").write_text("")
    assert run.main([*args, "--output", str(tmp_path / "file" / "p.jsonl")]) == 2
    assert "could not write predictions" in one_error_line(capsys)
