"""run.py with a deterministic fault, for tests: `python -m tests.fault_wrapper CONFIG` (or under torchrun).

FAULT="STEP:RANK:ACTION" acts on rank RANK right after its optimizer step STEP (counted as
TrainState.step): ACTION is a signal name (SIGTERM, SIGUSR1, SIGINT) sent to the process itself,
or `exit` for os._exit(9) there (what kill -9 leaves: no cleanup, no flush). Several faults are
separated by commas.
"""

from __future__ import annotations

import os
import signal
import sys

import run
import trainer


def install(spec: str) -> None:
    faults = [tuple(part.split(":")) for part in spec.split(",") if part]
    step = trainer.Run._optimizer_step

    def step_then_fault(self, *args, **kwargs):
        lr = step(self, *args, **kwargs)
        for at, rank, action in faults:
            if self.state.step == int(at) and self.info.rank == int(rank):
                if action == "exit":
                    os._exit(9)
                os.kill(os.getpid(), signal.Signals[action])
        return lr

    trainer.Run._optimizer_step = step_then_fault


if __name__ == "__main__":
    install(os.environ.get("FAULT", ""))
    sys.exit(run.main(sys.argv[1:]))
