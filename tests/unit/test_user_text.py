"""User text is text: no question, step or answer can reach a control token (latent markers, image tokens,
the chat template's role tokens, eos/pad); a record holding one's text is refused naming file, record, key, token."""

from __future__ import annotations

import json

import pytest
from transformers import AutoProcessor

from dataset import DataError, get_dataset
from modeling.loading import add_latent_tokens
from multimodal.dataset_mm import ImageTokens, get_mm_dataset
from tests.helpers.runs import mm_config

CONTROL = [
    "<|start-latent|>",
    "<|latent|>",
    "<|end-latent|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",  # eos and pad of the InternVL3 tokenizer
]
PLACES = {
    "question": lambda t: {"question": f"What is {t} here?", "steps": ["a"], "answer": "b"},
    "steps[1]": lambda t: {"question": "Q?", "steps": ["a", f"then {t} b"], "answer": "b"},
    "answer": lambda t: {"question": "Q?", "steps": ["a"], "answer": f"b{t}"},
}


@pytest.fixture(scope="module")
def tokenizer(internvl3_tokenizer):
    add_latent_tokens(internvl3_tokenizer)
    return internvl3_tokenizer


def write(tmp_path, records):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("key", PLACES)
@pytest.mark.parametrize("token", CONTROL)
def test_control_token_text_is_refused_naming_file_record_key_token(tmp_path, tokenizer, token, key):
    good = {"question": "Q?", "steps": ["a"], "answer": "b"}
    path = write(tmp_path, [good, PLACES[key](token)])
    with pytest.raises(DataError) as e:
        get_dataset(path, tokenizer)
    assert str(e.value).startswith(f"{path}: record 1: key '{key}': holds '{token}'")


def test_every_added_token_is_refused(tmp_path, tokenizer):
    for token in {t.content for t in tokenizer.added_tokens_decoder.values()}:
        path = write(tmp_path, [{"question": f"x {token} y", "steps": [], "answer": "a"}])
        with pytest.raises(DataError, match="record 0: key 'question'"):
            get_dataset(path, tokenizer)


def test_near_misses_are_text_and_give_no_control_id(tmp_path, tokenizer):
    near = ["<|latent", "latent|>", "< img>", "IMG_CONTEXT", "<|im_start", "<image>", "<|endoftext |>", "</ img>"]
    records = [{"question": f"Why {t}?", "steps": [f"s {t}"], "answer": f"{t}!"} for t in near]
    samples = get_dataset(write(tmp_path, records), tokenizer)
    control_ids = set(tokenizer.added_tokens_decoder) - {tokenizer.eos_token_id}
    for sample in samples:
        ids = sample["question_tokenized"] + sum(sample["steps_tokenized"], []) + sample["answer_tokenized"][:-1]
        assert not control_ids & set(ids)
        assert tokenizer.eos_token_id not in ids[:-1]


@pytest.mark.parametrize("token", [*CONTROL, "<image>"])
def test_multimodal_prompt_refuses_control_text_and_the_image_placeholder(tmp_path, tiny_model_dir, token):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    add_latent_tokens(processor.tokenizer)
    path = write(tmp_path, [{"question": f"{token} what?", "steps": ["a"], "answer": "b"}])
    with pytest.raises(DataError) as e:
        get_mm_dataset(path, processor.tokenizer, ImageTokens.from_processor(processor), mm_config(tmp_path))
    assert str(e.value).startswith(f"{path}: record 0: key 'question': holds '{token}'")
