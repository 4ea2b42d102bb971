"""Shared fixtures: the offline tiny InternVL checkpoint, the exact InternVL3 tokenizer, the tiny InternVL
wrapped in Coconut on each device."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedTokenizerFast

from coconut import Coconut
from modeling.loading import add_latent_tokens
from multimodal.dataset_mm import ImageTokens
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


# CUDA is added where present (bench/gpu_check.sh runs the tests that use `setup` there); CPU always runs.
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def setup(tiny_model_dir, request):
    """(model, coconut, latent ids, tokenizer, image tokens): the tiny InternVL with sharpened attention."""
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.to(request.param)
    ids = add_latent_tokens(processor.tokenizer, model)
    with torch.no_grad():  # sharpen attention so that a wrong position or order changes the result
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    tok = processor.tokenizer
    coconut = Coconut(model, ids.latent, ids.start, ids.end, tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model, coconut, ids, tok, ImageTokens.from_processor(processor)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's runs (and OMP_NUM_THREADS=1 in their subprocesses): identical
    arithmetic in every run, forked children need no thread pool, and on a shared machine no pool spins
    against other processes. Modules that compare runs tensor for tensor use it (pytestmark)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
