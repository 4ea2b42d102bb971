"""Shared fixtures: the offline tiny InternVL checkpoint and the exact InternVL3 tokenizer."""

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from multimodal.tiny_model import build_internvl3_tokenizer, ensure_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """Tiny checkpoint cached in data/tiny_internvl (gitignored), rebuilt only when missing or stale."""
    return ensure_tiny_model(REPO_ROOT / "data" / "tiny_internvl")


@pytest.fixture(scope="session")
def internvl3_tokenizer() -> PreTrainedTokenizerFast:
    """The real 151674-token InternVL3 tokenizer, built once per session (about 2 s)."""
    return build_internvl3_tokenizer()
