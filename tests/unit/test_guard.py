"""The non-finite guard: folds each step's verdict on the device, names the first bad step; JSON lines stay JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch

from training.guard import NonFiniteGuard
from training.metric_logger import json_line
from utils import TrainingDiverged

CPU = torch.device("cpu")


def test_first_non_finite_step_is_named_with_the_last_finite_loss(tmp_path):
    guard = NonFiniteGuard(CPU, check_grad_norm=True, save_dir=tmp_path)
    guard.observe(1, torch.tensor(2.0), torch.tensor(1.0))
    guard.logged(1, 2.0)
    guard.check()
    guard.observe(2, torch.tensor(3.0), torch.tensor(math.inf))
    guard.observe(3, torch.tensor(math.nan), torch.tensor(math.nan))
    guard.logged(3, math.nan)
    with pytest.raises(TrainingDiverged, match=r"at optimizer step 2 \(last finite loss 2 at step 1\); no checkpoint"):
        guard.check()


def test_fp16_overflowing_gradients_are_the_scalers_to_skip():
    guard = NonFiniteGuard(CPU, check_grad_norm=False, save_dir=None)
    guard.observe(1, torch.tensor(2.0), torch.tensor(math.inf))
    guard.check()
    guard.observe(2, torch.tensor(math.inf), torch.tensor(1.0))
    with pytest.raises(TrainingDiverged, match="non-finite loss at optimizer step 2"):
        guard.check()


def test_json_line_writes_null_for_non_finite_numbers():
    line = json_line({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-4})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {
        "step": 1,
        "loss": None,
        "grad_norm": None,
        "lr": 1e-4,
    }
