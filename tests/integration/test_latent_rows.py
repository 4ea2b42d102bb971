"""The rows of <|start-latent|>, <|latent|>, <|end-latent|> in the embeddings and the head, as the original gives them.

The original's run.py (facebookresearch/coconut, main()):
- lines 106-108: `tokenizer.add_tokens(...)` for the three tokens, in every run;
- lines 115-143: a checkpoint without the Coconut wrapper's `base_causallm` prefix (a CoT/SFT model)
  is loaded into the plain model first;
- lines 145-157: `if not (configs.cot or configs.no_thoughts or configs.no_cot)`, i.e. only in coconut
  and pause runs, `model.resize_token_embeddings(len(tokenizer))` and each new token's embedding and
  lm_head rows copied from `<<`'s, after that load: a Coconut run started from a CoT checkpoint copies the
  CoT-TRAINED `<<`, and a CoT run keeps the model's own vocabulary;
- lines 163-167: a checkpoint with the prefix (a Coconut checkpoint) is loaded after that, so its trained
  rows replace the copies.
Here a checkpoint's coconut_config.yaml tells which run wrote it: a coconut or pause run's rows are kept
(resuming a pause run too, where the original would re-copy them), anything else gets them from `<<`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import run
from modeling.loading import add_latent_tokens, latent_rows_trained
from storage import checkpoints as ckpt
from storage.saved_run import SavedRun
from tests.helpers.runs import demo_config, mm_config

pytestmark = pytest.mark.transformers  # exercises transformers' model code (with_transformers.sh)

ROWS = ("start", "latent", "end")


def _model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)


def _matrices(model) -> dict[str, torch.Tensor]:
    return {
        "embeddings": model.get_input_embeddings().weight.detach(),
        "head": model.get_output_embeddings().weight.detach(),
    }


def _ids(model_dir: Path) -> tuple[list[int], int]:
    """The three tokens' ids and `<<`'s first token id, from a model directory's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = add_latent_tokens(tokenizer)  # already there in a checkpoint's tokenizer: only looked up
    return [getattr(ids, r) for r in ROWS], tokenizer.encode("<<", add_special_tokens=False)[0]


@pytest.mark.parametrize(
    "method, trained", [("coconut", True), ("pause", True), ("cot", False), ("no_cot", False), ("no_thoughts", False)]
)
def test_rows_count_as_trained_only_after_a_coconut_or_pause_run(tmp_path, method, trained):
    """run.py 145-157: only those two methods give the tokens rows, so only their checkpoints have trained ones."""
    keys = {"coconut": False, **({} if method == "pause" else {method: True})}
    record = SavedRun(mm_config(tmp_path, **keys), 3, 1, {"start": 1, "latent": 2, "end": 3})
    assert record.method == method and latent_rows_trained(record) is trained
    assert latent_rows_trained(None) is False  # a model this project did not write (a hub model)


@pytest.mark.slow
def test_cot_keeps_the_vocabulary_and_coconut_copies_the_cot_trained_rows(tmp_path, tiny_model_dir):
    """Through the CLI: the CoT run's tokenizer has the three tokens (run.py 106-108) but its model keeps its
    own vocabulary, no extra rows nor logits (run.py 145: no resize for cot); the Coconut run started from that
    checkpoint (lr 0, so its checkpoint holds what it started with) has each new row equal to the CoT-trained
    `<<` row, |emb[latent] - emb[<<]| = 0 in embeddings and head (run.py 145-157 after the load at 143)."""
    vocab = _model(tiny_model_dir).get_input_embeddings().weight.shape[0]
    cot = demo_config(tmp_path, tiny_model_dir, name="cot", cot=True, coconut=False, num_epochs=1)
    assert run.main([str(cot)]) == 0
    cot_dir = tmp_path / "checkpoints" / "cot" / "checkpoint_1" / "model"
    cot_model = _model(cot_dir)
    assert len(AutoTokenizer.from_pretrained(cot_dir)) == vocab + 3
    assert {k: m.shape[0] for k, m in _matrices(cot_model).items()} == {"embeddings": vocab, "head": vocab}

    coconut = demo_config(
        tmp_path,
        tiny_model_dir,
        name="coconut",
        load_model_path=str(cot_dir.parent),
        resume=1,
        num_epochs=2,
        epochs_per_stage=1,
        lr=0.0,
    )
    assert run.main([str(coconut)]) == 0
    model_dir = tmp_path / "checkpoints" / "coconut" / "checkpoint_2" / "model"
    rows, source = _ids(model_dir)
    assert rows == [vocab, vocab + 1, vocab + 2]
    start = _matrices(_model(tiny_model_dir))
    trained = _matrices(cot_model)
    # CoT training moved "<<"'s head row (softmax feeds every row), so copying the hub's would differ
    assert not torch.equal(trained["head"][source], start["head"][source])
    for name, matrix in _matrices(_model(model_dir)).items():
        assert matrix.shape[0] == vocab + 3
        for row in rows:
            assert torch.equal(matrix[row], trained[name][source]), (name, row)


@pytest.mark.slow
def test_resuming_a_pause_run_keeps_its_trained_rows(tmp_path, tiny_model_dir):
    """A deliberate difference: the original loads a pause run's own checkpoint without the prefix (no Coconut
    wrapper in pause runs, run.py 140-143) and then re-copies `<<` into the rows (145-157), discarding what the
    run trained (in fact its load_state_dict fails first on the resized rows' shapes). Here the second launch
    (lr 0) ends with the rows the first trained."""
    config = demo_config(tmp_path, tiny_model_dir, name="pause", coconut=False, num_epochs=2, epochs_per_stage=1)
    assert run.main([str(config)]) == 0  # stage 1 in epoch 2: <|latent|> tokens in the inputs
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "num_epochs": 3, "lr": 0.0}))
    assert run.main([str(config)]) == 0
    first, second = (tmp_path / "checkpoints" / "pause" / f"checkpoint_{e}" / "model" for e in (2, 3))
    rows, source = _ids(first)
    before, after = _matrices(_model(first)), _matrices(_model(second))
    for name in before:
        for row in rows:
            assert torch.equal(after[name][row], before[name][row]), (name, row)
    # The markers and latents are inputs, so their embeddings trained away from "<<"'s; never labels, their head
    # rows got the same softmax gradient as "<<"'s (equal logits) and still equal it.
    for row in rows:
        assert not torch.equal(before["embeddings"][row], before["embeddings"][source]), row


def test_a_padded_vocabulary_gets_its_rows_from_the_source_and_is_not_shrunk(tmp_path, tiny_model_dir):
    """A model whose matrices have more rows than its tokenizer (padded for speed) already has rows at the new
    ids, untrained: a Coconut run (lr 0) copies `<<` into them as into new ones, and keeps the padding (the
    original's resize to len(tokenizer) would cut it: a deliberate difference)."""
    padded_dir = tmp_path / "padded"
    model = _model(tiny_model_dir)
    vocab = model.get_input_embeddings().weight.shape[0]
    torch.manual_seed(0)
    model.resize_token_embeddings(vocab + 13, mean_resizing=False)  # random rows past the tokenizer
    model.save_pretrained(padded_dir)
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(padded_dir)
    padded = _matrices(model)

    config = demo_config(tmp_path, tiny_model_dir, name="run", model_id=str(padded_dir), num_epochs=1, lr=0.0)
    assert run.main([str(config)]) == 0
    model_dir = tmp_path / "checkpoints" / "run" / "checkpoint_1" / "model"
    rows, source = _ids(model_dir)
    assert rows == [vocab, vocab + 1, vocab + 2]
    for name, matrix in _matrices(_model(model_dir)).items():
        assert matrix.shape[0] == vocab + 13
        for row in rows:
            assert not torch.equal(padded[name][row], padded[name][source])  # the row existed, untrained
            assert torch.equal(matrix[row], padded[name][source]), (name, row)
        assert torch.equal(matrix[vocab + 3 :], padded[name][vocab + 3 :])


def test_a_bare_state_dict_file_counts_as_trained_by_the_originals_own_test(tiny_model_dir):
    """run.py 120-138: weights with the `base_causallm` prefix are a Coconut checkpoint, loaded after the resize
    (163-167), so its rows are kept; without it, a CoT/SFT model of the model's own size, loaded before (126).
    load_weights says which, and grows the model to a prefixed file's rows."""
    model = _model(tiny_model_dir)
    vocab = model.get_input_embeddings().weight.shape[0]
    cot_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert ckpt.load_weights(model, cot_state, "cot.pt") is False
    assert model.get_input_embeddings().weight.shape[0] == vocab

    coconut = _model(tiny_model_dir)
    add_latent_tokens(AutoTokenizer.from_pretrained(tiny_model_dir), coconut)
    state = {f"base_causallm.{k}": v.clone() for k, v in coconut.state_dict().items()}
    assert ckpt.load_weights(model, state, "coconut.pt") is True
    for name, matrix in _matrices(model).items():
        assert matrix.shape[0] == vocab + 3
        assert torch.equal(matrix, _matrices(coconut)[name])
