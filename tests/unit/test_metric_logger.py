"""The metric loggers on their own: the JSON-lines file across a resume, the console's bar and lines,
wandb (a fake module: no network, no wandb process) in the save directory with its run id kept."""

from __future__ import annotations

import io
import json
import sys

from tqdm import tqdm

from tests.helpers.fake_wandb import FakeWandb
from training.metric_logger import WANDB_ID_FILE, ConsoleLogger, JsonlLogger, MultiLogger, WandbLogger, read_jsonl


def test_jsonl_logger_keeps_its_namespace_and_drops_the_lines_after_the_resumed_step(tmp_path):
    path = tmp_path / "train_log.jsonl"
    old = [{"step": s, "loss": float(s)} for s in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in old) + '{"step": 6, "lo')  # a kill cut the last line
    logger = JsonlLogger(path, "train", resume_step=3)
    assert read_jsonl(path) == old[:3]
    logger.log({"train/loss": 0.5, "train/lr": 1e-3, "eval/accuracy": 1.0}, step=4)
    logger.log({"eval/accuracy": 1.0}, step=4)  # nothing of its namespace: no line
    logger.log_table("eval/generations", [{"question": "q"}], step=4)
    logger.close()
    assert path.read_text().splitlines()[3:] == ['{"step": 4, "loss": 0.5, "lr": 0.001}']


def test_a_fresh_run_starts_an_empty_log(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text('{"step": 1, "loss": 9.0}\n')  # of a run that never saved a checkpoint
    JsonlLogger(path, "train", resume_step=0).close()
    assert path.read_text() == ""


def test_console_shows_training_metrics_on_the_bar_and_prints_the_others(capsys):
    console = ConsoleLogger(rows=2)
    console.bar = tqdm(total=4, file=io.StringIO())
    console.log(
        {
            "train/loss": 1.234567,
            "train/lr": 0.002,
            "train/grad_norm": 0.51234,
            "train/tokens_per_s": 1234.4,
            "train/epoch": 0.25,
        },
        step=1,
    )
    assert console.bar.postfix == "loss=1.2346, lr=2.00e-03, grad_norm=0.512, tok/s=1234"
    assert capsys.readouterr().out == ""  # training metrics print no line
    console.log({"eval/epoch": 1, "eval/val_loss": 0.5, "eval/correct": 3}, step=4)
    console.log_table(
        "eval/generations",
        [{"question": "q1", "gold": "a"}, {"question": "q2", "gold": "b"}, {"question": "q3", "gold": "c"}],
        step=4,
    )
    assert capsys.readouterr().out.splitlines() == [
        "[eval] epoch=1 val_loss=0.5000 correct=3",
        "  question: 'q1'  gold: 'a'",
        "  question: 'q2'  gold: 'b'",
    ]


def test_wandb_runs_in_the_save_directory_and_keeps_its_id_for_the_resumed_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    save_dir = tmp_path / "run"
    for _launch in range(2):
        logger = WandbLogger(save_dir, "offline", "proj", "run", {"lr": 0.1})
        logger.log({"train/loss": 1.0}, step=5)
        logger.log({"train/loss": 2.0}, step=4)  # behind the run's step (re-run after a resume): skipped
        rows = [{"question": "q", "answer": "a"}, {"question": "r", "answer": "b"}]
        logger.log_table("eval/generations", rows, 5)
        logger.close()
    run_id = (save_dir / WANDB_ID_FILE).read_text().strip()
    assert len(run_id) == 16
    expected = {
        "project": "proj",
        "name": "run",
        "config": {"lr": 0.1},
        "mode": "offline",
        "dir": str(save_dir),
        "id": run_id,
        "resume": "allow",
    }
    assert fake.inits == [expected, expected]
    assert [(step, list(record)) for step, record in fake.logged] == [
        (5, ["train/loss"]),
        (5, ["eval/generations"]),
    ] * 2
    table = fake.logged[1][1]["eval/generations"]
    assert (table.columns, table.data) == (["question", "answer"], [["q", "a"], ["r", "b"]])
    assert fake.finished == 2


def test_multi_logger_calls_each_logger(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    both = MultiLogger([JsonlLogger(path, "train", 0), ConsoleLogger()])
    both.log({"train/loss": 1.5, "eval/accuracy": 0.25}, step=1)
    both.close()
    assert read_jsonl(path) == [{"step": 1, "loss": 1.5}]
    assert capsys.readouterr().out == "[eval] accuracy=0.2500\n"
