"""The offline demo: the tiny InternVL learns easy-vqa colours from the pixels through Coconut's stages, on CPU.

    python demo.py [KEY=VALUE ...]      # KEY=VALUE: overrides for args/demo.yaml, as run.py takes them

It runs what a user would type, in one process, and prints each command before its output:
1. builds data/easy_vqa_demo from the easy-vqa package on first use (python -m preprocessing.make_demo)
   and prints the text-only baseline: the val accuracy of the best guess from the question text alone;
2. python run.py args/demo.yaml: builds the tiny model on first use, trains and evaluates every epoch;
3. prints the final val accuracy beside that baseline;
4. python run.py --infer on the last epoch's checkpoint, for the first "what color" question of val: the
   decoded continuous thoughts and the answer (and the record's gold answer).
Re-running resumes as run.py does, so a finished demo goes straight to 3 and 4; delete checkpoints/demo
(or set name=...) to train again.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import run
from preprocessing.make_demo import DEMO_DIR, ensure_demo_data
from utils import load_config

CONFIG = Path(__file__).resolve().parent / "args" / "demo.yaml"
EXAMPLE_PREFIX = "what color"  # colour is what the tiny model learns from the pixels within the demo's budget


def main(argv: list[str] | None = None) -> int:
    """The demo's steps; the exit status of the first that fails (2 for what a user can fix), else 0."""
    # The tiny model's operations are too small to gain from a second thread, which only contends for the
    # other core: its training and evaluation took 73 s on one thread, 91 s on two (a shared 2-core host).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    overrides = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(overrides):
        print(__doc__)
        return 0
    start = time.perf_counter()
    config_arg = os.path.relpath(CONFIG)
    try:
        config = load_config(config_arg, overrides)
        if not DEMO_DIR.is_dir():
            say("python", "-m", "preprocessing.make_demo")
            ensure_demo_data()
        from preprocessing.easy_vqa import text_only_accuracy

        train, val = (json.loads(Path(p).read_text()) for p in (config.train_path, config.val_path))
        baseline = text_only_accuracy(train, val)
    except ModuleNotFoundError as e:
        if e.name != "easy_vqa":
            raise
        print("error: the demo builds its data from the easy-vqa package: pip install easy-vqa", file=sys.stderr)
        return 2
    except run.USER_ERRORS as e:
        print(f"error: {run.one_line(e)}", file=sys.stderr)
        return 2
    print(f"text-only baseline: {baseline:.3f} (val accuracy of each question text's most frequent train answer)")

    say("python", "run.py", config_arg, *overrides)
    status = run.main([config_arg, *overrides])
    if status != 0:
        return status

    from training.reporter import METRICS_FILE, read_metrics  # loaded by now

    save_dir = Path(config.save_path) / config.name
    history = read_metrics(save_dir / METRICS_FILE)
    if not history:  # eval-only and debug overrides write none
        print(f"demo: {save_dir} holds no metrics; nothing to compare or ask")
        return 0
    last = history[-1]
    print(
        f"demo: val accuracy {last['accuracy']:.3f} after epoch {last['epoch']} (stage {last['stage']}); "
        f"text-only baseline {baseline:.3f}"
    )
    checkpoint = save_dir / f"checkpoint_{last['epoch']}"  # the model that scored it
    if not checkpoint.is_dir():  # overrides such as save_only_improve may not keep it
        print(f"demo: no {checkpoint} to ask")
        return 0
    record = next((r for r in val if r["question"].startswith(EXAMPLE_PREFIX)), val[0])
    image = Path(config.image_dir) / record["image"]
    args = ["--infer", str(checkpoint), "--image", str(image), "--question", record["question"], "--top-k", "3"]
    say("python", "run.py", *args)
    status = run.main(args)
    print(f"gold answer: {record['answer']}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return status


def say(*command: str) -> None:
    """Print a command as a shell would take it, before its output."""
    print(f"$ {shlex.join(command)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
