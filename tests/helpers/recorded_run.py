"""Training runs in this process with every optimizer step's gradients and logged loss recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import run
from tests.helpers.instrumented_run import install_recorder
from tests.helpers.runs import demo_config
from training import reporter

ACCUMULATION = dict(num_epochs=1, epochs_per_stage=1, lr=0.0, max_grad_norm=0.5, num_workers=0)  # lr 0: fixed weights


def recorded_run(tmp_path: Path, tiny_model_dir: Path, monkeypatch, name: str, **keys) -> dict:
    """A run in this process with install_recorder's record: per step, gradients and logged loss."""
    record = {"clipped": [], "unclipped": [], "losses": []}
    with monkeypatch.context() as patch:
        for module, attribute in (
            (torch.nn.utils, "clip_grad_norm_"),
            (torch.optim.AdamW, "step"),
            (reporter, "_init_wandb"),
        ):
            patch.setattr(module, attribute, getattr(module, attribute))  # undone on leaving
        install_recorder(record)
        config = demo_config(tmp_path, tiny_model_dir, name=name, **{**ACCUMULATION, **keys})
        assert run.main([str(config)]) == 0
    return record


def assert_same_steps(got: dict, expected: dict, steps: int) -> None:
    """The first `steps` steps' gradients before and after clipping, and their logged losses, equal
    to float rounding."""
    assert min(len(got["unclipped"]), len(expected["unclipped"])) >= steps
    for kind in ("unclipped", "clipped"):
        for step, (a, b) in enumerate(zip(got[kind][:steps], expected[kind][:steps], strict=True)):
            for i, (ga, gb) in enumerate(zip(a, b, strict=True)):
                torch.testing.assert_close(ga, gb, rtol=2e-4, atol=2e-7, msg=f"{kind} step {step + 1} tensor {i}")
    assert got["losses"][:steps] == pytest.approx(expected["losses"][:steps], rel=1e-5)
