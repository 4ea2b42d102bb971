"""The demo (demo.py, args/demo.yaml, preprocessing/make_demo.py) as a user meets it: README's first command
in a fresh directory builds the tiny model and the data, trains, prints the text-only baseline beside the
final accuracy, and ends with an --infer example; re-running it resumes instead of starting over.

The full demo (9 epochs on 2000 records) is tests/test_learning.py's real run; here it runs for 2 epochs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from preprocessing.easy_vqa import text_only_accuracy
from preprocessing.make_demo import DEMO_DIR, DEMO_LIMITS, SAMPLE_DIR, build_into
from tests.run_helpers import REPO, subprocess_env

BASELINE = "0.287"  # the demo set's text-only baseline: 43 of its 150 val records


def run_demo(cwd: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python demo.py [KEY=VALUE ...]` with cwd as the user's directory (relative paths land there)."""
    return subprocess.run([sys.executable, str(REPO / "demo.py"), *overrides], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def parse_demo(stdout: str) -> dict:
    """The demo's own lines: commands run, baseline, per-epoch evals, the summary, the --infer reply."""
    lines = stdout.splitlines()
    summary = re.search(r"^demo: val accuracy ([\d.]+) after epoch (\d+) \(stage (\d+)\); text-only baseline ([\d.]+)$",
                        stdout, re.M)
    assert summary, stdout[-3000:]
    infer = next(shlex.split(line[2:]) for line in lines if line.startswith("$ python run.py --infer "))
    reply_start = lines.index(next(line for line in lines if line.startswith("question: ")))
    keys = re.compile(r"^(question|latents|output|answer|gold answer): ")
    reply = dict(line.split(": ", 1) for line in lines[reply_start:] if keys.match(line))
    return {
        "commands": [line[2:] for line in lines if line.startswith("$ ")],
        "built": [line for line in lines if line.startswith("built ")],
        "baseline_line": next(line for line in lines if line.startswith("text-only baseline: ")),
        "evals": [line for line in lines if line.startswith("[eval] ")],
        "accuracy": summary[1], "epoch": int(summary[2]), "stage": int(summary[3]), "baseline": summary[4],
        "infer": dict(zip(infer[2::2], infer[3::2])),  # python run.py --infer CKPT --image P --question Q --top-k K
        "thoughts": [line for line in lines[reply_start:] if line.startswith("thought ")],
        "reply": reply,
    }


def check_infer_example(out: dict, cwd: Path, save_dir: Path) -> None:
    """The example is val's first "what color" question, asked of the newest checkpoint; its answer is the
    one that checkpoint's evaluation wrote for the same record."""
    val = json.loads((cwd / DEMO_DIR / "val.json").read_text())
    idx = next(i for i, r in enumerate(val) if r["question"].startswith("what color"))
    infer, reply = out["infer"], out["reply"]
    assert infer["--infer"] == str(Path("checkpoints") / "demo" / f"checkpoint_{out['epoch']}")
    assert infer["--image"] == str(DEMO_DIR / "images" / val[idx]["image"]) and (cwd / infer["--image"]).is_file()
    assert infer["--question"] == reply["question"] == val[idx]["question"]
    assert int(reply["latents"]) == min(out["stage"], 2) == len(out["thoughts"])
    assert all(len(re.findall(r" \d\.\d{3}(?=  |$)", t)) == 3 for t in out["thoughts"])  # --top-k 3
    predictions = (save_dir / "predictions" / f"epoch_{out['epoch']}.jsonl").read_text().splitlines()
    predicted = json.loads(predictions[idx])
    assert (predicted["idx"], predicted["gold"]) == (idx, reply["gold answer"])
    assert reply["answer"] == predicted["answer"] and reply["output"] == repr(predicted["output"])


def test_text_only_accuracy_is_each_question_texts_most_frequent_train_answer():
    train = [{"question": "what color is the shape?", "answer": a} for a in ("red", "red", "blue")]
    train += [{"question": "what shape is this?", "answer": a} for a in ("circle", "triangle", "triangle")]
    train += [{"question": "is there a red shape?", "answer": "no"}]
    val = [
        {"question": "what color is the shape?", "answer": "red"},     # right: red is its text's majority
        {"question": "what color is the shape?", "answer": "blue"},    # wrong
        {"question": "what shape is this?", "answer": "triangle"},     # right
        {"question": "what color is the circle?", "answer": "red"},    # unseen text: its type's (colour) majority
        {"question": "is there a blue shape?", "answer": "yes"},       # unseen text: yes/no majority is "no"
    ]
    assert text_only_accuracy(train, val) == 3 / 5


def test_demo_set_is_built_deterministically_and_holds_the_committed_sample(tmp_path):
    config = yaml.safe_load((REPO / "args" / "demo.yaml").read_text())
    assert (config["train_path"], config["val_path"], config["image_dir"]) == (
        f"{DEMO_DIR}/train.json", f"{DEMO_DIR}/val.json", f"{DEMO_DIR}/images")
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
        assert all((REPO / SAMPLE_DIR / "images" / r["image"]).read_bytes()
                   == (first / "images" / r["image"]).read_bytes() for r in sample)
    train = json.loads((first / "train.json").read_text())
    val = json.loads((first / "val.json").read_text())
    assert not {r["image"].split("/", 1)[1] for r in train} & {r["image"].split("/", 1)[1] for r in val}
    assert f"{text_only_accuracy(train, val):.3f}" == BASELINE


def test_a_bad_override_is_refused_before_anything_is_built(tmp_path):
    result = run_demo(tmp_path, "lr=fast", timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {os.path.relpath(REPO / 'args' / 'demo.yaml', tmp_path)}: override 'lr=fast': "
        "key 'lr': expected a number, got 'fast'"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_demo_command_in_a_fresh_directory_then_rerun(tmp_path):
    """Two epochs (stage 0, then 1) instead of nine: the printed lines, not the learning, are checked here."""
    short = ("num_epochs=2", "epochs_per_stage=1")
    result = run_demo(tmp_path, *short)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = parse_demo(result.stdout)
    config = os.path.relpath(REPO / "args" / "demo.yaml", tmp_path)  # demo.py names it as the user would
    assert out["commands"][:2] == ["python -m preprocessing.make_demo",
                                   shlex.join(["python", "run.py", config, *short])]
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
