"""Text data path: tokenization, stage schedule per method, latent-aligned collation, record errors."""

from __future__ import annotations

import json
import random

import pytest

from dataset import (
    DataError,
    LatentIds,
    LatentLayoutError,
    MyCollator,
    check_tokenization,
    get_cot_latent_dataset,
    get_dataset,
    get_question_latent_dataset,
    load_records,
)
from utils import config_from_dict

RECORDS = [
    {"question": "What is 2 plus 3, times 4?", "steps": ["<<2+3=5>>", "<<5*4=20>>"], "answer": "20"},
    {"question": "Is the sky blue?", "steps": ["The sky is blue."], "answer": "yes"},
    {"question": "No steps at all?", "steps": [], "answer": "1,000"},
    {"question": "Three steps here.", "steps": ["a b", "c d", "e f"], "answer": "x"},
]


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(RECORDS))
    return path


@pytest.fixture()
def tok(internvl3_tokenizer):
    return internvl3_tokenizer


def cfg(**kw):
    base = {"model_id": "m", "train_path": "t", "val_path": "v"}
    return config_from_dict({**base, **kw})


IDS = LatentIds(start=151674, latent=151675, end=151676)


def test_piecewise_tokenization_equals_whole_string(tok, data_file):
    """The original's own self-check, with the real InternVL3 (Qwen2.5) tokenizer, on every record."""
    for sample, record in zip(get_dataset(data_file, tok), RECORDS):
        check_tokenization(sample, record["question"] + "\n", record, tok, "here")
        assert sample["answer_tokenized"][-1] == tok.eos_token_id == 151645


def test_loading_checks_tokenization_of_record_0(tok, tmp_path):
    """The original's rule (facebookresearch/coconut dataset.py, get_dataset's "verify" block, lines
    63-74): after tokenizing a file, take record 0, tokenize the whole string question + "\n" + the
    steps joined by "\n" + "\n### " + answer (with special tokens) + eos, and assert it equals the
    question's, the steps' and the answer's tokens concatenated. Here loading a file does the same and
    fails with one error naming the file and record 0. An empty step breaks the rule with the Qwen2.5
    tokenizer: after the question's "\n", its "\n" makes "\n\n", one token (271) in the whole string
    and two (198, 198) in the pieces.
    Like the original, only record 0 is checked.
    """
    assert tok.encode("a\n\n") == [64, 271] and tok.encode("a\n") + tok.encode("\n") == [64, 198, 198]
    bad = {"question": "Is the sky blue?", "steps": ["", "The sky is blue."], "answer": "yes"}
    path = tmp_path / "train.json"
    path.write_text(json.dumps([bad] + RECORDS))
    with pytest.raises(DataError, match=rf"^{path}: record 0: tokenizing question, steps and answer apart differs"):
        get_dataset(path, tok)
    path.write_text(json.dumps(RECORDS[:1] + [bad]))
    assert len(get_dataset(path, tok)) == 2  # record 1 is not checked, as in the original


def test_record_0_without_steps_passes_the_check(tok, tmp_path):
    """With no steps, the original's whole string is question + "\n" + "" + "\n### " + answer: one "\n"
    more than the pieces carry, so its assert would reject a correct record 0. Here the whole string
    is what the pieces spell: question + "\n### " + answer."""
    path = tmp_path / "train.json"
    path.write_text(json.dumps([RECORDS[2]]))
    sample = get_dataset(path, tok)[0]
    whole = tok.encode("No steps at all?\n### 1,000") + [151645]
    assert sample["question_tokenized"] + sample["answer_tokenized"] == whole


@pytest.mark.parametrize(
    "method, stage, expected_latents, expected_markers",
    [
        ("coconut", 0, [0, 0, 0, 0], True),
        ("coconut", 1, [1, 1, 1, 1], True),
        ("coconut", 2, [2, 2, 2, 2], True),
        ("coconut", 4, [2, 1, 0, 3], True),  # beyond max_latent_stage 3: all steps go, capped latents
        ("cot", 2, [0, 0, 0, 0], False),
        ("no_cot", 2, [0, 0, 0, 0], False),
        ("no_thoughts", 2, [0, 0, 0, 0], False),
    ],
)
def test_latents_per_stage_and_method(tok, data_file, method, stage, expected_latents, expected_markers):
    config = cfg(**{method: True, "max_latent_stage": 3})
    base = get_dataset(data_file, tok)
    train = get_cot_latent_dataset(config.stage(stage), base, config, IDS)
    for sample, base_sample, n in zip(train, base, expected_latents):
        assert sample["input_ids"].count(IDS.latent) == n
        assert (IDS.start in sample["input_ids"]) == expected_markers
        # labels: -100 over question, markers and latents; the rest is supervised unchanged
        n_prefix = len(base_sample["question_tokenized"]) + n + (2 if expected_markers else 0)
        assert sample["labels"][:n_prefix] == [-100] * n_prefix
        assert sample["labels"][n_prefix:] == sample["input_ids"][n_prefix:]
        assert sample["labels"][-1] == tok.eos_token_id
    if method in ("no_cot",):
        for s, b in zip(train, base):
            assert len(s["input_ids"]) == len(b["question_tokenized"]) + len(b["answer_tokenized"])
    if method == "no_thoughts" and stage == 2:  # curriculum without thoughts: first 2 steps dropped
        b = base[3]
        assert train[3]["input_ids"] == b["question_tokenized"] + b["steps_tokenized"][2] + b["answer_tokenized"]


def test_c_thought_and_pad_latent_to_max(tok, data_file):
    base = get_dataset(data_file, tok)
    config = cfg(c_thought=2, max_latent_stage=3, pad_latent_to_max=True)
    train = get_cot_latent_dataset(5, base, config, IDS)
    assert [s["input_ids"].count(IDS.latent) for s in train] == [6, 6, 6, 6]
    questions = get_question_latent_dataset(1, base, config, IDS)
    assert [q["input_ids"].count(IDS.latent) for q in questions] == [2, 2, 2, 2]
    config = cfg(c_thought=2, max_latent_stage=3)
    questions = get_question_latent_dataset(3, base, config, IDS)
    assert [q["input_ids"].count(IDS.latent) for q in questions] == [4, 2, 0, 6]
    assert all(q["input_ids"][-1] == IDS.end for q in questions)


def test_uniform_prob_mixes_stages_deterministically(tok, data_file):
    base = get_dataset(data_file, tok) * 25
    config = cfg(uniform_prob=1.0, max_latent_stage=3)
    a = get_cot_latent_dataset(0, base, config, IDS, random.Random(1))
    b = get_cot_latent_dataset(0, base, config, IDS, random.Random(1))
    assert a == b
    counts = {s["input_ids"].count(IDS.latent) for s in a}
    assert counts == {0, 1, 2, 3}


def test_collator_aligns_first_latent_column(tok, data_file):
    base = get_dataset(data_file, tok)
    config = cfg(max_latent_stage=3)
    feats = get_cot_latent_dataset(2, base, config, IDS)
    feats.append(get_cot_latent_dataset(0, base[:1], cfg(cot=True), IDS)[0])  # no latents at all
    batch = MyCollator(tok.pad_token_id, IDS.latent)(feats)
    ids, mask, pos, labels = batch.input_ids, batch.attention_mask, batch.position_ids, batch.labels
    columns = {row.tolist().index(IDS.latent) for row in ids[:4]}
    assert len(columns) == 1  # every sample's first latent in one column
    for row, f in enumerate(feats):
        n = len(f["input_ids"])
        real = mask[row].nonzero().flatten()
        assert ids[row, real].tolist() == f["input_ids"]  # content unchanged, only padding added
        assert pos[row, real].tolist() == list(range(n))  # positions restart at 0 after left padding
        assert labels[row, real].tolist() == f["labels"]
        assert (labels[row][mask[row] == 0] == -100).all()
    assert ids[4].tolist()[: len(feats[4]["input_ids"])] == feats[4]["input_ids"]  # no latents: no left pad


def _feature(input_ids: list[int], idx: int = 0) -> dict:
    n = len(input_ids)
    return {
        "input_ids": input_ids,
        "labels": input_ids,
        "attention_mask": [1] * n,
        "position_ids": list(range(n)),
        "idx": idx,
    }


def test_collator_hands_over_the_latent_layout_and_refuses_split_latents():
    """The Batch carries the shared latent column and the counts (found on the host); a sample whose
    latents are not one run is refused, naming its record."""
    latent = 9
    batch = MyCollator(0, latent)([_feature([1, 2, latent, latent, 3]), _feature([1, latent, 3]), _feature([4, 5])])
    assert (batch.latent_column, batch.latent_counts) == (2, (2, 1, 0))
    assert batch.input_ids[:, 2].tolist() == [latent, latent, 0]  # the sample without latents: right padding
    with pytest.raises(LatentLayoutError, match="record 7"):
        MyCollator(0, latent)([_feature([1, latent, 2, latent, 3], idx=7)])


def test_batch_to_a_device_leaves_idx_on_the_host():
    batch = MyCollator(0, 9)([_feature([1, 9, 3], idx=5)])
    moved = batch.to("meta")
    assert {moved.input_ids.device.type, moved.labels.device.type, moved.position_ids.device.type} == {"meta"}
    assert moved.idx.device.type == "cpu" and moved.idx.tolist() == [5]
    assert moved.latent_counts == (1,)


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not valid JSON"),
        ("[]", "no records: the file holds an empty list"),
        ('{"a": 1}', "expected a JSON list"),
        ('[{"steps": [], "answer": "1"}]', "record 0: missing key 'question'"),
        ('[{"question": "q", "steps": "s", "answer": "1"}]', "record 0: key 'steps'"),
        ('[{"question": "q", "steps": [1], "answer": "1"}]', "record 0: key 'steps'"),
        ('[{"question": " ", "steps": [], "answer": "1"}]', "record 0: key 'question'"),
        ('[{"question": "q", "steps": [], "answer": 3}]', "record 0: key 'answer'"),
        ('[{"question": "q", "steps": []}]', "record 0: missing key 'answer'"),
        ('[{"question": "q", "steps": [], "answer": "1"}, 5]', "record 1: expected an object"),
        ('[{"question": "q", "steps": [], "answer": "1", "image": 5}]', "record 0: key 'image'"),
    ],
)
def test_bad_records_name_file_record_and_key(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        load_records(path)
    assert str(path) in str(e.value)


def _jsonl(records: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


JSONL_RECORDS = [
    {"question": "q1", "steps": ["s"], "answer": "1"},
    {"question": "q2", "steps": [], "answer": "2", "image": "a.png"},
]


@pytest.mark.parametrize("name", ["data.jsonl", "data.json"])  # a .json name holding JSON lines too
def test_json_lines_read_as_the_json_list(tmp_path, name):
    path = tmp_path / name
    path.write_text(_jsonl(JSONL_RECORDS[:1]) + "\n" + _jsonl(JSONL_RECORDS[1:]))  # a blank line is skipped
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(JSONL_RECORDS))
    assert load_records(path) == load_records(listed) == JSONL_RECORDS


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "q", "steps": [], "answer": "1"}\n{"question": "q", "steps": []\n', "line 2 .*not valid JSON"),
        ('{"question": "q", "steps": [], "answer": "1"}\n\n{"steps": [], "answer": "1"}\n', r"line 3 \(record 1\)"),
        ('{"question": "q", "steps": [], "answer": "1"}\n[1, 2]\n', r"line 2 \(record 1\): expected an object"),
        ("\n\n", "no records"),
    ],
)
def test_bad_json_lines_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        load_records(path)
    assert str(path) in str(e.value)


def test_at_max_latent_stage_the_steps_past_the_cap_stay_text(tok, data_file):
    """Stage == max_latent_stage is still a stage (the original's `scheduled_stage > max_latent_stage` test):
    a record with more steps than the cap keeps its later steps as supervised text; only beyond it do all go."""
    base = get_dataset(data_file, tok)
    config = cfg(max_latent_stage=2)
    three = base[3]  # three steps
    at_max, beyond = (get_cot_latent_dataset(stage, base, config, IDS)[3] for stage in (2, 3))
    latents = [IDS.start, IDS.latent, IDS.latent, IDS.end]
    assert (
        at_max["input_ids"]
        == three["question_tokenized"] + latents + three["steps_tokenized"][2] + three["answer_tokenized"]
    )
    assert beyond["input_ids"] == three["question_tokenized"] + latents + three["answer_tokenized"]
