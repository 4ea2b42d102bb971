"""What the run's own reporting costs: `python -m bench.logging_overhead [CONFIG] [KEY=VALUE ...]`.

Runs the CLI in this process (default: args/demo.yaml into a temporary save_path) and times, with
perf_counter, the optimizer steps and the reporting inside them: Reporter.log_step (the loss / grad
norm / throughput gathering, train_log.jsonl, the bar's postfix, wandb when on), and the drawing
of curves.png per evaluation. Prints one JSON line. On a GPU, log_step's one host sync per
logged step is part of what it measures (it waits for the step's kernels).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import run
from training import plots, reporter, trainer


def timed(owner: Any, name: str, into: list[float]) -> None:
    real: Callable = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)

    setattr(owner, name, wrapper)


def main(argv: list[str]) -> None:
    logs: list[float] = []
    curves: list[float] = []
    step_ends: list[tuple[int, float]] = []  # (epochs done, when the step ended)
    real_step = trainer.Trainer.optimizer_step

    def marking(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        step_ends.append((self.state.epoch, time.perf_counter()))

    trainer.Trainer.optimizer_step = marking
    timed(reporter.Reporter, "log_step", logs)
    timed(plots.Curves, "update", curves)
    config, overrides = (argv[0], argv[1:]) if argv and "=" not in argv[0] else ("args/demo.yaml", argv)
    with tempfile.TemporaryDirectory() as save_path:
        assert run.main([config, f"save_path={save_path}", *overrides]) == 0
    # step time: between consecutive optimizer steps of one epoch (not across a save and an evaluation)
    steps = [b - a for (ea, a), (eb, b) in zip(step_ends, step_ends[1:]) if ea == eb]
    print(
        json.dumps(
            {
                "steps": len(step_ends),
                "median_step_ms": 1e3 * statistics.median(steps),
                "median_log_step_ms": 1e3 * statistics.median(logs),
                "mean_log_step_ms": 1e3 * statistics.fmean(logs),
                "log_share_of_step": statistics.median(logs) / statistics.median(steps),
                "evaluations": len(curves),
                "mean_curves_ms": 1e3 * statistics.fmean(curves) if curves else None,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
