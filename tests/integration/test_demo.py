"""The demo (demo.py, args/demo.yaml, preprocessing/make_demo.py) as a user meets it: README's first command
in a fresh directory builds the tiny model and the data, trains, prints the text-only baseline beside the
final accuracy, and ends with an --infer example; re-running it resumes instead of starting over.

The full demo (9 epochs on 2000 records) is tests/integration/test_learning.py's real run; here it runs for 2 epochs.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import yaml

from preprocessing.easy_vqa import text_only_accuracy
from preprocessing.make_demo import DEMO_DIR, DEMO_LIMITS, SAMPLE_DIR, build_into
from tests.helpers.demo import BASELINE, check_infer_example, parse_demo, run_demo
from tests.helpers.runs import REPO


def test_text_only_accuracy_is_each_question_texts_most_frequent_train_answer():
    train = [{"question": "what color is the shape?", "answer": a} for a in ("red", "red", "blue")]
    train += [{"question": "what shape is this?", "answer": a} for a in ("circle", "triangle", "triangle")]
    train += [{"question": "is there a red shape?", "answer": "no"}]
    val = [
        {"question": "what color is the shape?", "answer": "red"},  # right: red is its text's majority
        {"question": "what color is the shape?", "answer": "blue"},  # wrong
        {"question": "what shape is this?", "answer": "triangle"},  # right
        {"question": "what color is the circle?", "answer": "red"},  # unseen text: its type's (colour) majority
        {"question": "is there a blue shape?", "answer": "yes"},  # unseen text: yes/no majority is "no"
    ]
    assert text_only_accuracy(train, val) == 3 / 5


def test_demo_set_is_built_deterministically_and_holds_the_committed_sample(tmp_path):
    config = yaml.safe_load((REPO / "args" / "demo.yaml").read_text())
    assert (config["train_path"], config["val_path"], config["image_dir"]) == (
        f"{DEMO_DIR}/train.json",
        f"{DEMO_DIR}/val.json",
        f"{DEMO_DIR}/images",
    )
    first, second = tmp_path / "a", tmp_path / "b"
    assert build_into(first, DEMO_LIMITS) == build_into(second, DEMO_LIMITS) == {"train": 2000, "val": 150}
    for split in ("train", "val"):
        built = json.loads((first / f"{split}.json").read_text())
        assert built == json.loads((second / f"{split}.json").read_text())
        images = {r["image"] for r in built}
        assert all((first / "images" / i).read_bytes() == (second / "images" / i).read_bytes() for i in images)
        # the committed sample is a part of it (its images the same files), so the rest is what a build adds
        sample = json.loads((REPO / SAMPLE_DIR / f"{split}.json").read_text())
        assert all(r in built for r in sample), split
        assert all(
            (REPO / SAMPLE_DIR / "images" / r["image"]).read_bytes() == (first / "images" / r["image"]).read_bytes()
            for r in sample
        )
    train = json.loads((first / "train.json").read_text())
    val = json.loads((first / "val.json").read_text())
    assert not {r["image"].split("/", 1)[1] for r in train} & {r["image"].split("/", 1)[1] for r in val}
    assert f"{text_only_accuracy(train, val):.3f}" == BASELINE


def test_a_bad_override_is_refused_before_anything_is_built(tmp_path):
    result = run_demo(tmp_path, "lr=fast", timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {os.path.relpath(REPO / 'args' / 'demo.yaml', tmp_path)}: override 'lr=fast': "
        "key 'lr': expected a number, got 'fast'"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_demo_command_in_a_fresh_directory_then_rerun(tmp_path):
    """Two epochs (stage 0, then 1) instead of nine: the printed lines, not the learning, are checked here."""
    short = ("num_epochs=2", "epochs_per_stage=1")
    result = run_demo(tmp_path, *short)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = parse_demo(result.stdout)
    config = os.path.relpath(REPO / "args" / "demo.yaml", tmp_path)  # demo.py names it as the user would
    assert out["commands"][:2] == [
        "python -m preprocessing.make_demo",
        shlex.join(["python", "run.py", config, *short]),
    ]
    assert out["built"] == [f"built {DEMO_DIR}: 2000 train, 150 val records"]
    assert (tmp_path / "data" / "tiny_internvl" / "config.json").is_file()  # model_id tiny:DIR, built on first use
    assert out["baseline_line"].startswith(f"text-only baseline: {BASELINE} ")
    assert out["baseline"] == BASELINE
    save_dir = tmp_path / "checkpoints" / "demo"
    metrics = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == [0, 1] and len(out["evals"]) == 2
    assert (out["epoch"], out["stage"], out["accuracy"]) == (2, 1, f"{metrics[-1]['accuracy']:.3f}")
    check_infer_example(out, tmp_path, save_dir)

    again = run_demo(tmp_path, *short)  # a finished demo: no build, no training, the same summary and answer
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    rerun = parse_demo(again.stdout)
    assert rerun["built"] == [] and rerun["evals"] == [] and len(rerun["commands"]) == 2
    assert f"resuming from {Path('checkpoints') / 'demo' / 'checkpoint_2'}" in again.stdout
    for key in ("accuracy", "epoch", "stage", "baseline", "infer", "reply", "thoughts"):
        assert rerun[key] == out[key], key
