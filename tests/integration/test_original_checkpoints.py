"""The original's checkpoint files load with their rows following their tokens.

The original's run.py (facebookresearch/coconut, main()) adds `<|start-latent|>`, `<|end-latent|>`, `<|latent|>`
in that order, resizes to len(tokenizer), copies `<<` into the new rows, wraps the model in its Coconut (which
also holds the embeddings as `self.embedding`) and saves `torch.save(model.state_dict())`: every key prefixed
`base_causallm.`, plus `embedding.weight`. This project adds start, latent, end, so the same token has another id.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import run
from modeling.loading import END_LATENT, LATENT, START_LATENT, add_latent_tokens
from storage import checkpoints as ckpt
from storage.saved_run import SavedRun, write_saved_run
from tests.helpers.runs import demo_config
from training import trainer
from utils import load_config

ORIGINAL_ORDER = (START_LATENT, END_LATENT, LATENT)
NAMES = {START_LATENT: "start", LATENT: "latent", END_LATENT: "end"}


class OriginalCoconut(nn.Module):
    """The original Coconut's modules (its state dict's keys), nothing of its computation."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_causallm = base
        self.embedding = base.get_input_embeddings()


def _trained_original(tiny_model_dir: Path) -> tuple[nn.Module, dict[str, int]]:
    """The tiny model as the original's run.py sets it up, with distinct "trained" latent rows."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for token in ORIGINAL_ORDER:
        tokenizer.add_tokens(token)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ORIGINAL_ORDER}
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            for row in ids.values():
                weight[row] = torch.randn(weight.shape[1], generator=generator)
    return model, ids


def _eval(tmp_path: Path, tiny_model_dir: Path, name: str, load_model_path: Path) -> tuple[dict, list[dict]]:
    config = demo_config(
        tmp_path,
        tiny_model_dir,
        name=name,
        only_eval=True,
        resume=2,
        epochs_per_stage=1,
        max_latent_stage=2,
        load_model_path=str(load_model_path),
    )
    (record,) = trainer.train(run.load_config(config))["epochs"]
    lines = (tmp_path / "checkpoints" / name / "predictions" / "epoch_3.jsonl").read_text().splitlines()
    return record, [json.loads(line) for line in lines]


@pytest.mark.slow
def test_an_original_file_evaluates_as_the_same_weights_saved_by_this_project(tmp_path, tiny_model_dir):
    model, original_ids = _trained_original(tiny_model_dir)
    original_file = tmp_path / "checkpoint_6"
    torch.save(OriginalCoconut(model).state_dict(), original_file)
    assert "embedding.weight" in torch.load(original_file, weights_only=True)

    # the same weights in this project's format: a model directory whose tokenizer has this project's ids
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    ids = add_latent_tokens(processor.tokenizer)
    ours = {token: getattr(ids, NAMES[token]) for token in ORIGINAL_ORDER}
    assert ours != original_ids  # the same tokens, other ids: a load by id would swap two rows
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        key = next(k for k, v in model.state_dict(keep_vars=True).items() if v is weight)
        for token in ORIGINAL_ORDER:
            state[key][ours[token]] = weight[original_ids[token]].detach()
    model_dir = tmp_path / "ours" / "model"
    model.save_pretrained(model_dir, state_dict=state)
    processor.save_pretrained(model_dir)
    config = load_config(demo_config(tmp_path, tiny_model_dir, name="trained"))
    write_saved_run(model_dir, SavedRun(config, 6, 2, {NAMES[t]: i for t, i in ours.items()}))

    from_original, original_predictions = _eval(tmp_path, tiny_model_dir, "original", original_file)
    from_ours, our_predictions = _eval(tmp_path, tiny_model_dir, "ours", model_dir.parent)
    assert from_original["val_loss"] == from_ours["val_loss"]
    assert (from_original["correct"], from_original["total"]) == (from_ours["correct"], from_ours["total"])
    assert original_predictions == our_predictions


def test_load_weights_moves_the_originals_rows_to_this_tokenizers_ids_also_into_a_padded_vocabulary(tiny_model_dir):
    model, original_ids = _trained_original(tiny_model_dir)
    state = OriginalCoconut(model).state_dict()
    expected = {
        name: {t: w.detach()[original_ids[t]].clone() for t in ORIGINAL_ORDER}
        for name, w in (("embeddings", model.get_input_embeddings().weight), ("head", model.lm_head.weight))
    }
    ids = add_latent_tokens(AutoTokenizer.from_pretrained(tiny_model_dir))
    for padding in (0, 5):
        target = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
        vocab = target.get_input_embeddings().weight.shape[0]
        if padding:
            target.resize_token_embeddings(vocab + 3 + padding, mean_resizing=False)
        pad_rows = target.lm_head.weight.detach()[vocab + 3 :].clone()
        assert ckpt.load_weights(target, state, "checkpoint_6", ids) is True
        loaded = {"embeddings": target.get_input_embeddings().weight, "head": target.lm_head.weight}
        for name, matrix in loaded.items():
            assert matrix.shape[0] == vocab + 3 + padding
            for token in ORIGINAL_ORDER:
                assert torch.equal(matrix[getattr(ids, NAMES[token])], expected[name][token]), (name, token)
        assert torch.equal(target.lm_head.weight[vocab + 3 :], pad_rows)  # the model's own padding rows


def test_an_original_file_of_another_vocabulary_is_refused(tiny_model_dir):
    model, _ = _trained_original(tiny_model_dir)
    model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + 2, mean_resizing=False)
    state = OriginalCoconut(model).state_dict()
    target = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = add_latent_tokens(AutoTokenizer.from_pretrained(tiny_model_dir))
    with pytest.raises(ckpt.CheckpointError, match="another model"):
        ckpt.load_weights(target, state, "checkpoint_6", ids)
