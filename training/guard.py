"""Stop a diverging run before it saves: a non-finite loss or gradient norm ends it with one line.

There is no option to skip such a step and train on. The step's loss says nothing about the data it
was computed on, so skipping it trains on a different set than the config says, silently; and a run
that produced one non-finite value almost always produces more (a learning rate too high, a bad
record), so skipping hides the problem rather than solving it. fp16 runs are the one exception, by
design: their loss scaler skips steps whose gradients overflow and lowers the scale, so there only a
non-finite loss stops the run.

The test costs no device sync per step: each step's verdict is folded into one device tensor, which is
read (one sync) only where the run logs a step, saves a checkpoint or ends an epoch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from storage import checkpoints as ckpt
from training.distributed import all_reduce_max
from utils import TrainingDiverged


class NonFiniteGuard:
    """Watches each optimizer step's loss (and gradient norm) and raises TrainingDiverged once one is not finite."""

    def __init__(self, device: torch.device, check_grad_norm: bool, save_dir: Path | None) -> None:
        self.device, self.check_grad_norm, self.save_dir = device, check_grad_norm, save_dir
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # optimizer step, -1: none yet
        self.last_loss: tuple[int, float] | None = None  # the last logged finite loss and its step

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Fold in one optimizer step's loss (any scale) and gradient norm, on the device: no sync."""
        bad = ~torch.isfinite(loss)
        if self.check_grad_norm and grad_norm is not None:
            # a DTensor's local part: non-finite where the full norm is, with no collective; check() agrees over ranks
            norm = grad_norm.to_local() if hasattr(grad_norm, "to_local") else grad_norm
            bad = bad | ~torch.isfinite(norm.to(self.device))
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def logged(self, step: int, loss: float) -> None:
        """A logged step's loss (host value), named in the error as the last finite one."""
        if math.isfinite(loss):
            self.last_loss = (step, loss)

    def check(self) -> None:
        """Raise TrainingDiverged if any step so far was not finite (one sync; a collective on every rank)."""
        step = all_reduce_max(int(self.first_bad), self.device)
        if step < 0:
            return
        last = (
            f"last finite loss {self.last_loss[1]:.4g} at step {self.last_loss[0]}"
            if self.last_loss
            else "no finite loss logged"
        )
        found = ckpt.newest_checkpoint(self.save_dir) if self.save_dir is not None else None
        kept = (
            f"{found[0]} is the last checkpoint, untouched: lower lr (or check the data) and run again to resume"
            if found
            else "no checkpoint was saved: lower lr (or check the data) and run again"
        )
        what = "loss" if not self.check_grad_norm else "loss or gradient norm"
        raise TrainingDiverged(f"training diverged: non-finite {what} at optimizer step {step} ({last}); {kept}")
