"""set_seed pins what the original's set_seed pins."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from utils import set_seed


def test_set_seed_seeds_every_generator_and_pins_hashing_and_cudnn(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    set_seed(7)
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    assert os.environ["PYTHONHASHSEED"] == "7"
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
    set_seed(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == drawn
