"""`python demo.py` as a user runs it, and what its output says."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from preprocessing.make_demo import DEMO_DIR
from tests.helpers.runs import REPO, scaled_timeout, subprocess_env

BASELINE = "0.287"  # the demo set's text-only baseline: 43 of its 150 val records


def run_demo(cwd: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python demo.py [KEY=VALUE ...]` with cwd as the user's directory (relative paths land there);
    timeout for an idle machine (scaled_timeout)."""
    return subprocess.run(
        [sys.executable, str(REPO / "demo.py"), *overrides],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=scaled_timeout(timeout),
    )


def parse_demo(stdout: str) -> dict:
    """The demo's own lines: commands run, baseline, per-epoch evals, the summary, the --infer reply."""
    lines = stdout.splitlines()
    summary = re.search(
        r"^demo: val accuracy ([\d.]+) after epoch (\d+) \(stage (\d+)\); text-only baseline ([\d.]+)$", stdout, re.M
    )
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
        "accuracy": summary[1],
        "epoch": int(summary[2]),
        "stage": int(summary[3]),
        "baseline": summary[4],
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
