"""Answer and CoT scoring pinned to the original COCONUT's rules, written out literally.

The original (facebookresearch/coconut, run.py, main(), the "val generation accuracy" loop):

    answers_val = [d["answer"].replace(",", "").strip() for d in json.load(open(configs.val_path))]
    cot_val = ["\\n".join(d["steps"]) for d in json.load(open(configs.val_path))]
    ...
    text_output = tokenizer.decode(outputs[0], skip_special_tokens=True)   # outputs[0]: prompt + generation
    answer_output = text_output.split("#")[-1].replace(",", "").strip()
    cot_output = ("\\n".join(text_output.split("\\n")[1:])).split("#")[0].strip()
    cor += answer_output == answer
    cor_cot += cot_output == answer_cot

and its latent markers are `tokenizer.add_tokens("<|start-latent|>")` etc.: ordinary added tokens,
which `skip_special_tokens=True` keeps. Every expected value below is spelled out by hand.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from coconut import Thoughts
from dataset import LatentIds, MyCollator, cot_latent_sample, get_question_latent_dataset, tokenize_records
from modeling.loading import add_latent_tokens
from training.distributed import DistInfo
from training.evaluation import generation_accuracy
from training.scoring import (
    decode_as_original,
    extract_answer,
    gold_answer,
    gold_cot,
    original_cot,
    written_cot,
    written_cot_gold,
)
from utils import config_from_dict


# --- the rules on text ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("The sum is 5.\n### 5", "5"),
        ("### 1,234,567", "1234567"),  # commas removed
        ("# 3 ## 4 ### 5", "5"),  # several '#': the text after the last one
        ("###   7  \n", "7"),  # whitespace stripped
        ("### Red", "Red"),  # case kept
        ("How many?\n5", "How many?\n5"),  # no '#': the whole text (prompt included), stripped
        ("What is 2 # 3?\n5", "3?\n5"),  # a '#' in the prompt: the text after it
        ("5 ###", ""),
    ],
)
def test_answer_is_the_text_after_the_last_hash_without_commas(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("answer, expected", [("1,234", "1234"), ("  red \n", "red"), ("Red", "Red")])
def test_gold_answer_loses_commas_and_outer_whitespace_only(answer, expected):
    assert gold_answer({"answer": answer}) == expected


def test_original_cot_drops_the_first_line_and_stops_at_the_first_hash():
    text = "How many?\n2 + 3 = 5\n5 - 1 = 4\n### 4 # x"
    assert original_cot(text) == "2 + 3 = 5\n5 - 1 = 4"
    # Coconut stage 0: the markers survive decoding and precede the steps, so the original never matches
    text = "How many?\n<|start-latent|><|end-latent|>2 + 3 = 5\n### 5"
    assert original_cot(text) == "<|start-latent|><|end-latent|>2 + 3 = 5"
    # a multimodal prompt decodes to an empty first line (the image block is special): the question stays in
    assert original_cot("\nWhat colour?\nThe shape is red.\n### red") == "What colour?\nThe shape is red."
    assert gold_cot({"steps": ["a ", "b"]}) == "a \nb"  # joined, not stripped
    assert written_cot("The shape is red.\n### red") == "The shape is red."


def test_decoding_keeps_the_latent_markers_and_skips_other_special_tokens(tiny_model_dir):
    tokenizer, ids = _tokenizer_with_markers(tiny_model_dir)
    t = tokenizer.convert_tokens_to_ids
    prompt = (
        [t("<|im_start|>"), t("<img>"), t("<IMG_CONTEXT>"), t("</img>")]
        + tokenizer.encode("Q?\n")
        + [ids.start, ids.latent, ids.latent, ids.end]
    )
    new = tokenizer.encode("a\n### 5") + [tokenizer.eos_token_id] + tokenizer.encode("after eos")
    text = decode_as_original(tokenizer, prompt, new, tokenizer.eos_token_id, {ids.start, ids.latent, ids.end})
    assert text == "Q?\n<|start-latent|><|latent|><|latent|><|end-latent|>a\n### 5"
    assert tokenizer.decode(prompt, skip_special_tokens=True) == "Q?\n"  # they are special tokens here


def test_the_written_cot_reference_is_what_the_training_sample_writes():
    """The corrected CoT's reference (the steps written out) is what cot_latent_sample trains to write."""
    ids = LatentIds(900, 901, 902)
    steps = [[10, 11], [12], [13, 14, 15]]
    names = {10: "s0", 12: "s1", 13: "s2"}  # each step's first token names its text
    record = {"question": "q", "steps": ["s0", "s1", "s2"], "answer": "a"}
    sample = {"question_tokenized": [1, 2], "steps_tokenized": steps, "answer_tokenized": [7, 8], "idx": 0}
    for method in ("coconut", "cot", "no_cot", "no_thoughts"):
        for pad in (False, True):
            config = _config(**{method: True, "max_latent_stage": 2, "pad_latent_to_max": pad})
            for stage in range(5):
                labels = [x for x in cot_latent_sample(sample, stage, config, ids)["labels"] if x != -100]
                written = "\n".join(names[x] for x in labels if x in names)
                assert written_cot_gold(record, stage, config) == written, (method, pad, stage)


# --- end to end through the evaluation function -----------------------------------------------
class EmittingModel(nn.Module):
    """Stands in for Coconut: for each prompt it emits a known text's tokens, eos, then padding."""

    def __init__(self, tokenizer, ids: LatentIds, outputs: dict[tuple[int, ...], str]) -> None:
        super().__init__()
        self.tokenizer, self.outputs = tokenizer, outputs
        self.eos_token_id, self.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.start_latent_id, self.latent_token_id, self.end_latent_id = ids.start, ids.latent, ids.end

    def generate(self, batch, max_new_tokens, thought_top_k):
        input_ids = batch.input_ids
        rows = [
            self.tokenizer.encode(self.outputs[tuple(i[m.bool()].tolist())]) + [self.eos_token_id]
            for i, m in zip(input_ids, batch.attention_mask)
        ]
        width = max(map(len, rows))
        tokens = torch.tensor([r + [self.pad_token_id] * (width - len(r)) for r in rows])
        counts = (input_ids == self.latent_token_id).sum(1)
        n, k = int(counts.max()), thought_top_k
        top_ids = torch.full((len(rows), n, k), self.tokenizer.encode("5")[0])
        thoughts = Thoughts(torch.zeros(len(rows), n, 1), counts, top_ids, torch.full((len(rows), n, k), 1.0 / k))
        return tokens, thoughts


def _tokenizer_with_markers(tiny_model_dir):
    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    ids = add_latent_tokens(tokenizer, AutoModelForImageTextToText.from_pretrained(tiny_model_dir))
    return tokenizer, ids


def _config(**keys):
    return config_from_dict(
        {
            "model_id": "m",
            "train_path": "t",
            "val_path": "v",
            "num_workers": 0,
            "batch_size_eval": 4,
            "max_new_tokens": 16,
            **keys,
        }
    )


def _evaluate(tiny_model_dir, records, emitted, stage, **keys):
    tokenizer, ids = _tokenizer_with_markers(tiny_model_dir)
    config = _config(**keys)
    questions = get_question_latent_dataset(stage, tokenize_records(records, tokenizer), config, ids)
    outputs = {tuple(q["input_ids"]): text for q, text in zip(questions, emitted)}
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    model, collate = EmittingModel(tokenizer, ids, outputs), MyCollator(tokenizer.pad_token_id, ids.latent)
    return generation_accuracy(
        model, questions, collate, records, tokenizer, info, config, stage, contextlib.nullcontext, top_k=2
    )


def test_generation_accuracy_scores_emitted_tokens_as_the_original(tiny_model_dir):
    records = [
        {"question": "How many apples?", "steps": ["2 + 3 = 5"], "answer": "5"},
        {"question": "How many pears?", "steps": ["1 + 1 = 2"], "answer": "1,234"},
        {"question": "How many plums?", "steps": ["x"], "answer": "1234"},
        {"question": "How many figs?", "steps": ["y"], "answer": "5"},  # no '#' in the output
        {"question": "Which colour?", "steps": ["z"], "answer": "red"},  # case differs
        {"question": "Which number?", "steps": ["w"], "answer": "3"},  # several '#'
        {"question": "Which one?", "steps": ["v"], "answer": " 7 "},  # whitespace
    ]
    emitted = ["2 + 3 = 5\n### 5", "### 1,234", "### 1,234", "5", "### Red", "# 3 ## 4 ### 5", "###   7  \n"]
    result = _evaluate(tiny_model_dir, records, emitted, stage=1, coconut=True)
    got = [(p["idx"], p["gold"], p["answer"], p["correct"]) for p in result.predictions]
    assert got == [
        (0, "5", "5", True),
        (1, "1234", "1234", True),
        (2, "1234", "1234", True),
        (3, "5", "How many figs?\n<|start-latent|><|latent|><|end-latent|>5", False),
        (4, "red", "Red", False),
        (5, "3", "5", False),
        (6, "7", "7", True),
    ]
    assert (result.correct, result.total) == (4, 7) and result.accuracy == 4 / 7
    first = result.predictions[0]
    assert first["output"] == "2 + 3 = 5\n### 5" and first["question"] == "How many apples?"
    assert first["latents"] == 1 and [t["token"] for t in first["thoughts"][0]] == ["5", "5"]
    # stage 1 turns the one step into a latent: the original's CoT never matches, the written one
    # (nothing before the first '#') does where the output starts with '#'
    assert result.cot_match == 0.0
    assert [p["written_cot_match"] for p in result.predictions] == [False, True, True, False, True, True, True]


@pytest.mark.parametrize("method, cot_match", [("coconut", False), ("cot", True)])
def test_original_cot_match_at_stage_0_depends_on_the_markers(tiny_model_dir, method, cot_match):
    """Coconut stage 0 keeps <|start-latent|><|end-latent|> in the decoded text; a CoT run has no markers."""
    records = [{"question": "How many apples?", "steps": ["2 + 3 = 5", "5 - 1 = 4"], "answer": "4"}]
    result = _evaluate(tiny_model_dir, records, ["2 + 3 = 5\n5 - 1 = 4\n### 4"], stage=0, **{method: True})
    (p,) = result.predictions
    assert p["correct"] and p["cot_match"] == cot_match and p["written_cot_match"]
    assert result.cot_match == float(cot_match) and result.written_cot_match == 1.0
