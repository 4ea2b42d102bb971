"""Learning-rate schedule: optional linear warmup, then constant or cosine decay to 0.

The schedule spans the optimizer steps this run trains: the epochs from where its first launch
started (`resume`, or 0) to num_epochs. A run started with `resume: 3` therefore decays to 0 over
its own epochs 3..num_epochs (the original has no schedule), and a run stopped and resumed
continues the same curve. The position is (epoch - first epoch) x steps per epoch + steps taken in
the epoch: a pure function of the progress a checkpoint records, so resuming needs no state.
"""

from __future__ import annotations

import dataclasses
import math

from utils import Config


@dataclasses.dataclass(frozen=True)
class Schedule:
    config: Config
    first_epoch: int  # where this run's schedule starts
    steps_per_epoch: int

    @property
    def total(self) -> int:
        return self.steps_per_epoch * (self.config.num_epochs - self.first_epoch)

    def position(self, epoch: int, steps_in_epoch: int) -> int:
        return (epoch - self.first_epoch) * self.steps_per_epoch + steps_in_epoch

    def lr(self, position: int) -> float:
        """The lr of the optimizer step at `position` (0-based); cosine reaches 0 at `total`."""
        config = self.config
        warmup = int(config.warmup_ratio * self.total)
        if position < warmup:
            return config.lr * (position + 1) / warmup
        if config.lr_scheduler == "cosine":
            progress = (position - warmup) / max(1, self.total - warmup)
            return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return config.lr


def steps_per_epoch(n_batches: int, accumulation: int) -> int:
    """Optimizer steps of an epoch of n_batches micro-batches; a last short window still steps."""
    return math.ceil(n_batches / accumulation)
