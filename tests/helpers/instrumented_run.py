"""run.py with test instrumentation: `python -m tests.helpers.instrumented_run CONFIG` (or under torchrun).

FAULT="STEP:RANK:ACTION[,...]" acts on rank RANK right after its optimizer step STEP (counted as
TrainState.step): ACTION is a signal name (SIGTERM, SIGUSR1, SIGINT) the process sends itself, or
`exit` for os._exit(9) there (what kill -9 leaves: no cleanup, no flush).

RECORD=PATH makes rank 0 save {"clipped": [...], "unclipped": [...], "losses": [...]} to PATH at
the end: per optimizer step, every trainable parameter's full gradient before and after clipping
(the run must clip: max_grad_norm > 0), and the loss each step logged.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch

import run
from training import reporter, trainer


def install_faults(spec: str) -> None:
    faults = [tuple(part.split(":")) for part in spec.split(",") if part]
    step = trainer.Trainer.optimizer_step

    def step_then_fault(self, *args, **kwargs):
        step(self, *args, **kwargs)
        for at, rank, action in faults:
            if self.state.step == int(at) and self.info.rank == int(rank):
                if action == "exit":
                    os._exit(9)
                os.kill(os.getpid(), signal.Signals[action])

    trainer.Trainer.optimizer_step = step_then_fault


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every rank calls it), or a copy."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def install_recorder(record: dict[str, list[Any]]) -> None:
    """Fill record with each step's gradients before and after clipping, and its logged loss."""
    clip, step = torch.nn.utils.clip_grad_norm_, torch.optim.AdamW.step

    def recording_clip(params, *args, **kwargs):
        params = list(params)
        record["unclipped"].append([full(p.grad) for p in params])
        return clip(params, *args, **kwargs)

    def recording_step(self, *args, **kwargs):
        record["clipped"].append([full(p.grad) for group in self.param_groups for p in group["params"]])
        return step(self, *args, **kwargs)

    class Logger:
        def log(self, entry: dict[str, Any], step: int) -> None:
            if "train/loss" in entry:
                record["losses"].append(entry["train/loss"])

        def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
            pass

        def close(self) -> None:
            pass

    torch.nn.utils.clip_grad_norm_, torch.optim.AdamW.step = recording_clip, recording_step
    reporter._init_wandb = lambda config, info, save_dir: Logger()


if __name__ == "__main__":
    install_faults(os.environ.get("FAULT", ""))
    record: dict[str, list[Any]] = {"clipped": [], "unclipped": [], "losses": []}
    if os.environ.get("RECORD"):
        install_recorder(record)
    status = run.main(sys.argv[1:])
    if os.environ.get("RECORD") and os.environ.get("RANK", "0") == "0":
        torch.save(record, os.environ["RECORD"])
    sys.exit(status)
