"""Inference (run.py --infer, inference.Inference) and the predictions file evaluation writes.

The reference for --infer is the predictions file of the training run's own evaluation: the same
checkpoint and stage must give the same answer, output and thoughts for every val record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import run
from deploy.inference import Inference
from multimodal.collator_mm import MultimodalCollator
from tests.helpers.latent_reference import reference_embeds
from tests.helpers.runs import REPO, demo_config, ensure_saved_run, torchrun
from tests.helpers.tiny_vl import prompt
from utils import load_config

pytestmark = pytest.mark.transformers  # exercises transformers' model code (with_transformers.sh)

VAL = REPO / "data" / "demo" / "val.json"
IMAGES = REPO / "data" / "demo" / "images"


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, tiny_model_dir):
    """A demo run through stages 0, 1, 2 (two epochs each): (config, its checkpoint_6, epoch 6's predictions).

    Six epochs make the answers and thoughts differ between records (three distinct outputs; every
    two records' thought probabilities differ by more than the tolerance below), so a mix-up shows.
    """
    tmp = tmp_path_factory.mktemp("stage2")
    config = demo_config(tmp, tiny_model_dir, num_epochs=6, epochs_per_stage=2, max_latent_stage=2)
    assert run.main([str(config)]) == 0
    save_dir = tmp / "checkpoints" / "run"
    checkpoint = save_dir / "checkpoint_6"
    ensure_saved_run(checkpoint, config)
    return config, checkpoint, read_jsonl(save_dir / "predictions" / "epoch_6.jsonl")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_thoughts(got: list, expected: list) -> None:
    """Token ids equal, probabilities equal up to the rounding of a differently padded batch."""
    assert [[t["id"] for t in thought] for thought in got] == [[t["id"] for t in thought] for thought in expected]
    assert [[t["token"] for t in thought] for thought in got] == [[t["token"] for t in thought] for thought in expected]
    for a, b in zip(got, expected):
        for x, y in zip(a, b):
            assert abs(x["p"] - y["p"]) <= 1e-5, (x, y)


@pytest.mark.slow
def test_predictions_file_has_one_line_per_val_record(stage2):
    _, _, predictions = stage2
    records = json.loads(VAL.read_text())
    assert [p["idx"] for p in predictions] == list(range(len(records)))
    for p, r in zip(predictions, records):
        assert p["question"] == r["question"] and p["gold"] == r["answer"]
        assert set(p) >= {"idx", "question", "gold", "output", "answer", "correct", "thoughts"}
        assert p["latents"] == 2 == len(p["thoughts"])  # stage 2, c_thought 1, every record has >= 2 steps
        assert all(len(t) == 5 and t[0]["p"] >= t[-1]["p"] for t in p["thoughts"])


@pytest.mark.slow
def test_infer_equals_the_predictions_file_on_every_val_record(stage2, capsys):
    _, checkpoint, predictions = stage2
    for record, expected in zip(json.loads(VAL.read_text()), predictions):
        argv = [
            "--infer",
            str(checkpoint),
            "--image",
            str(IMAGES / record["image"]),
            "--question",
            record["question"],
            "--json",
        ]
        assert run.main(argv) == 0
        reply = json.loads(capsys.readouterr().out)
        assert (reply["answer"], reply["output"], reply["latents"]) == (
            expected["answer"],
            expected["output"],
            expected["latents"],
        ), record
        assert_same_thoughts(reply["thoughts"], expected["thoughts"])


@pytest.mark.slow
def test_infer_on_a_data_file_writes_the_same_predictions(stage2, tmp_path, capsys):
    _, checkpoint, predictions = stage2
    out = tmp_path / "val.predictions.jsonl"
    argv = ["--infer", str(checkpoint), "--data", str(VAL), "--image-dir", str(IMAGES), "--output", str(out), "--json"]
    assert run.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total"] == 16 and summary["stage"] == 2
    assert read_jsonl(out) == predictions  # the same batches as the evaluation: identical


@pytest.mark.slow
def test_python_api_and_readable_output(stage2, capsys):
    _, checkpoint, predictions = stage2
    record = json.loads(VAL.read_text())[0]
    model = Inference.load(checkpoint / "model")
    assert model.stage == 2 and model.config.prompt_format == "plain"
    reply = model.ask(record["question"], images=[IMAGES / record["image"]], top_k=2)
    assert reply["answer"] == predictions[0]["answer"] and reply["latents"] == 2
    assert [len(t) for t in reply["thoughts"]] == [2, 2]
    at_stage_0 = Inference.load(checkpoint, stage=0).ask(record["question"], images=[IMAGES / record["image"]])
    assert at_stage_0["latents"] == 0
    argv = ["--infer", str(checkpoint), "--image", str(IMAGES / record["image"]), "--question", record["question"]]
    assert run.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"answer: {predictions[0]['answer']}"
    assert lines[1] == "latents: 2" and lines[2].startswith("thought 1: ")


@pytest.mark.slow
def test_infer_errors_are_one_line(stage2, tmp_path, capsys):
    _, checkpoint, _ = stage2
    assert run.main(["--infer", str(checkpoint), "--image", str(tmp_path / "none.png"), "--question", "q"]) == 2
    assert "image not found" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((checkpoint / "model" / "config.json").read_text())
    assert run.main(["--infer", str(bare), "--question", "q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no coconut_config.yaml" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        run.main(["--infer", str(checkpoint), "--data", str(VAL), "--question", "q"])


@pytest.mark.slow
def test_two_rank_evaluation_merges_the_predictions_once_in_record_order(stage2, tmp_path):
    config, checkpoint, predictions = stage2
    eval_config = demo_config(
        tmp_path,
        Path(load_config(config).model_id),
        name="eval",
        only_eval=True,
        resume=5,
        epochs_per_stage=2,
        max_latent_stage=2,
        load_model_path=str(checkpoint),
    )
    result = torchrun(eval_config, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = read_jsonl(tmp_path / "checkpoints" / "eval" / "predictions" / "epoch_6.jsonl")
    assert [p["idx"] for p in merged] == list(range(16))
    for got, expected in zip(merged, predictions):
        got_thoughts, expected_thoughts = got.pop("thoughts"), expected.pop("thoughts")
        assert got == expected
        assert_same_thoughts(got_thoughts, expected_thoughts)


def naive_thoughts(model, latent_id: int, feature: dict) -> torch.Tensor:
    """Each latent's thought by full forwards from scratch, one latent at a time: (n, H)."""
    input_ids = torch.tensor([feature["input_ids"]], device=model.device)
    pixels = feature.get("pixel_values")
    embeds = reference_embeds(model, input_ids, None if pixels is None else pixels.to(model.device))
    thoughts = []
    for pos in (input_ids[0] == latent_id).nonzero().flatten().tolist():
        hidden = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
        thoughts.append(hidden[0, pos - 1])
        embeds = torch.cat([embeds[:, :pos], hidden[:, pos - 1 : pos], embeds[:, pos + 1 :]], dim=1)
    return torch.stack(thoughts) if thoughts else embeds.new_zeros(0, embeds.shape[-1])


@torch.no_grad()
def test_generate_hands_back_the_thoughts_it_fed_back(setup):
    model, coconut, ids, tok, image_tokens = setup
    feats = [
        prompt(tok, ids, image_tokens, 1, 3, "what shape"),
        prompt(tok, ids, image_tokens, 5, 1, "what colour is the shape in the image"),
        prompt(tok, ids, image_tokens, 0, 2, "no image here"),
        prompt(tok, ids, image_tokens, 3, 0, "is it blue", markers=False),
    ]
    batch = MultimodalCollator(tok.pad_token_id, ids.latent)(feats).to(model.device)
    tokens, thoughts = coconut.generate(batch, max_new_tokens=4, thought_top_k=3)
    assert torch.equal(tokens, coconut.generate(batch, max_new_tokens=4))
    assert thoughts.counts.tolist() == [3, 1, 2, 0]
    for row, feature in enumerate(feats):
        expected = naive_thoughts(model, ids.latent, feature)
        n = expected.shape[0]
        torch.testing.assert_close(thoughts.hidden[row, :n], expected, rtol=1e-4, atol=1e-5)
        top = model.lm_head(expected).float().softmax(-1).topk(3)
        assert thoughts.top_ids[row, :n].tolist() == top.indices.tolist()
        torch.testing.assert_close(thoughts.top_probs[row, :n], top.values, rtol=1e-4, atol=1e-6)
