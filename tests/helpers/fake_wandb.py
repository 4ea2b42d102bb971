"""A stand-in wandb module: no network, no wandb process, every call recorded."""

from __future__ import annotations

import types


class FakeWandb(types.ModuleType):
    """What WandbLogger uses of wandb, recorded: init's arguments, each log call, finish."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        wandb = self

        class Table:
            def __init__(self, columns, data):
                self.columns, self.data = columns, data

        class Run:
            step = 0

            def log(self, record, step):
                wandb.logged.append((step, record))
                self.step = step

            def finish(self):
                wandb.finished += 1

        self.Table, self.Run = Table, Run

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self.Run()
