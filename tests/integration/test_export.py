"""--export writes a plain HF model + processor faithful to its run: weights, prompt, tiling, precision, record."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import run
from deploy.export import chat_template
from multimodal.dataset_mm import ImageTokens, tokenize_mm_records
from multimodal.transforms import ImageTransform
from storage import atomic
from storage.saved_run import SAVED_RUN_FILE, read_saved_run
from tests.helpers.runs import REPO, demo_config, ensure_saved_run, scaled_timeout, subprocess_env

pytestmark = pytest.mark.transformers  # exercises transformers' model code (with_transformers.sh)

SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A one-epoch demo checkpoint (plain prompts, max_tiles 6, 56 px tiles, fp32) with its run record."""
    tmp = tmp_path_factory.mktemp("export")
    config = demo_config(tmp, tiny_model_dir, num_epochs=1)
    assert run.main([str(config)]) == 0
    checkpoint = tmp / "checkpoints" / "run" / "checkpoint_1"
    ensure_saved_run(checkpoint, config)
    return checkpoint


def variant(checkpoint: Path, tmp_path: Path, **keys) -> Path:
    """A copy of checkpoint whose run record has config keys changed (e.g. another prompt format)."""
    copy = tmp_path / f"variant_{'_'.join(map(str, keys.values()))}"
    shutil.copytree(checkpoint, copy)
    path = copy / "model" / SAVED_RUN_FILE
    raw = yaml.safe_load(path.read_text())
    raw["config"].update(keys)
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return copy


def user(question: str, images: int = 0, video: bool = False) -> list[dict]:
    """One user message with image (or video) parts before the question, as chat clients send it."""
    media = [{"type": "image"}] * images + ([{"type": "video"}] if video else [])
    return [{"role": "user", "content": media + [{"type": "text", "text": question}]}]


def images(tmp_path: Path) -> list[Path]:
    """A wide image (many tiles: the tile limit decides its count) and two small squares (one tile each)."""
    paths = []
    for name, size, colour in (
        ("wide.png", (560, 56), (200, 30, 30)),
        ("a.png", (40, 40), (0, 90, 200)),
        ("b.png", (48, 48), (20, 160, 20)),
    ):
        image = Image.new("RGB", size, colour)
        image.putpixel((3, 3), (255, 255, 255))
        image.save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def test_export_loads_with_auto_classes_and_keeps_weights(trained, tmp_path, capsys):
    out = tmp_path / "export"
    assert run.main(["--export", str(trained), str(out)]) == 0
    exported = AutoModelForImageTextToText.from_pretrained(out)
    reference = AutoModelForImageTextToText.from_pretrained(trained / "model")
    processor = AutoProcessor.from_pretrained(out)
    ids = torch.tensor([processor.tokenizer.encode("What shape is it?\n")])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    assert "<|latent|>" in processor.tokenizer.get_vocab()
    assert read_saved_run(out) == read_saved_run(trained / "model")  # the run record travels
    readme = (out / "README.md").read_text()
    assert "--infer" in readme and "Coconut.generate" in readme and "vLLM" in readme and "lmdeploy" in readme

    assert run.main(["--export", str(trained), str(out)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(trained / "model", bare)
    (bare / SAVED_RUN_FILE).unlink()
    assert run.main(["--export", str(bare), str(tmp_path / "x")]) == 2
    assert "no coconut_config.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("prompt_format", ["plain", "internvl2_5"])
def test_template_and_processor_give_the_training_prompt_and_tiles(trained, tmp_path, prompt_format):
    """processor(apply_chat_template(one user message), images) == the training data path's tokens and pixels."""
    source = variant(trained, tmp_path, prompt_format=prompt_format)
    out = tmp_path / "export"
    assert run.main(["--export", str(source), str(out)]) == 0
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_processor.max_patches == 6  # the run's max_tiles (the tiny model's own says 12)
    assert processor.image_processor.size["height"] == processor.image_processor.size["width"] == 56
    config = dataclasses.replace(read_saved_run(out).config, image_dir=str(tmp_path))
    tokens = ImageTokens.from_processor(processor)
    wide, a, b = images(tmp_path)
    question = "What colour is the shape?"
    for paths in ([wide], [a, b], []):
        record = {"question": question, "steps": [], "answer": ""}
        if paths:
            record["image"] = [p.name for p in paths]
        (sample,), _ = tokenize_mm_records([record], "test", processor.tokenizer, tokens, config)
        expected = sample["question_tokenized"]
        text = processor.apply_chat_template(user(question, images=len(paths)), add_generation_prompt=True)
        pil = [Image.open(p) for p in paths] or None
        got = processor(text=text, images=pil, return_tensors="pt")["input_ids"][0].tolist()
        assert got == expected, (paths, text)
    # the prompt itself, written out: the training prompt's text with the image token
    text = processor.apply_chat_template(user("Q?", images=1), add_generation_prompt=True)
    assert (
        text
        == {
            "plain": "<IMG_CONTEXT>\nQ?\n",
            "internvl2_5": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\nQ?"
            "<|im_end|>\n<|im_start|>assistant\n",
        }[prompt_format]
    )
    two = processor.apply_chat_template(user("Q?", images=2))
    assert "Image-1: <IMG_CONTEXT>\nImage-2: <IMG_CONTEXT>\nQ?" in two
    video = processor.apply_chat_template(user("Q?", video=True))
    assert f"{processor.video_token}\nQ?" in video
    # the PIL backend gives the training pixels, tile for tile
    pil_backend = AutoImageProcessor.from_pretrained(out, backend="pil")
    pixels = pil_backend(images=Image.open(wide), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels.float(), ImageTransform(56, 6).load_pixel_values(wide), rtol=0, atol=0)
    with pytest.raises(Exception, match="one user message"):
        processor.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "Q?"}])


def test_text_only_template_is_the_question_and_a_newline(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = chat_template("internvl2_5", multimodal=False)  # text-only runs ignore the format
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False)
    assert text == "What is 2+3?\n"
    with pytest.raises(Exception, match="text-only"):
        tokenizer.apply_chat_template(user("Q", images=1), tokenize=False)


def test_dtype_defaults_to_the_training_precision(trained, tmp_path):
    def dtypes(out: Path) -> set[torch.dtype]:
        return {t.dtype for t in load_file(out / "model.safetensors").values() if t.is_floating_point()}

    assert run.main(["--export", str(trained), str(tmp_path / "fp32")]) == 0
    assert dtypes(tmp_path / "fp32") == {torch.float32}
    assert run.main(["--export", str(trained), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert dtypes(tmp_path / "bf16") == {torch.bfloat16}
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16
    source = variant(trained, tmp_path, bf16=True)
    assert run.main(["--export", str(source), str(tmp_path / "default_bf16")]) == 0
    assert dtypes(tmp_path / "default_bf16") == {torch.bfloat16}


def test_an_fp16_run_exports_fp16_by_default_and_fp32_on_request(trained, tmp_path):
    source = variant(trained, tmp_path, fp16=True)
    assert run.main(["--export", str(source), str(tmp_path / "default_fp16")]) == 0
    saved = load_file(tmp_path / "default_fp16" / "model.safetensors")
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.float16}
    assert run.main(["--export", str(source), str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    saved = load_file(tmp_path / "fp32" / "model.safetensors")
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.float32}


def test_infer_on_the_export_equals_infer_on_the_checkpoint(trained, tmp_path, capsys):
    out = tmp_path / "export"
    assert run.main(["--export", str(trained), str(out)]) == 0
    capsys.readouterr()
    record = json.loads((REPO / "data" / "demo" / "val.json").read_text())[0]
    image = REPO / "data" / "demo" / "images" / record["image"]
    replies = []
    for model in (trained, out):
        argv = ["--infer", str(model), "--image", str(image), "--question", "what shape is it?", "--json"]
        assert run.main(argv) == 0
        replies.append(json.loads(capsys.readouterr().out))
    assert replies[0] == replies[1]


@pytest.mark.slow
def test_a_kill_at_any_write_of_the_export_leaves_no_export(trained, tmp_path):
    """os._exit(9) just before each file write of the export in turn (tests/helpers/kill_writes.py)."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "tests.helpers.kill_writes", "export", str(trained), str(out)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=scaled_timeout(600),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads(line) for line in result.stdout.splitlines()]
    *killed, finished = runs
    assert all(r["status"] == 9 and r["out_files"] is None for r in killed), killed  # never an export at `out`
    assert finished["status"] == 0 and finished["write"] is None
    written = sorted(r["write"].split("/", 1)[1] for r in killed if not r["write"].startswith("rename"))
    assert written == finished["out_files"]  # every file of the export was a kill point, and the rename
    assert killed[-1]["write"].startswith("rename ")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(atomic.TMP_PREFIX)] == []  # leftovers removed
    reference = tmp_path / "reference"
    assert run.main(["--export", str(trained), str(reference)]) == 0
    for name in finished["out_files"]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def answer_text(record: dict) -> str:
    """What a CoT sample trains the model to write after the prompt (dataset.tokenize_sample), before eos."""
    return "".join(step + "\n" for step in record["steps"]) + "### " + record["answer"]


@pytest.mark.parametrize("prompt_format", ["plain", "internvl2_5"])
def test_the_template_passes_lmdeploys_probe_and_a_user_assistant_pair_is_the_training_text(
    trained, tmp_path, prompt_format
):
    """lmdeploy takes an HF chat template only if a system, a user and an assistant message each render alone
    (its HFChatTemplate); a user + assistant pair then renders, and tokenizes to, the sample's training text."""
    source = variant(trained, tmp_path, prompt_format=prompt_format)
    out = tmp_path / "export"
    assert run.main(["--export", str(source), str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)  # what lmdeploy loads
    rendered = {
        role: tokenizer.apply_chat_template([{"role": role, "content": "sentinel"}], tokenize=False)
        for role in ("system", "user", "assistant")
    }
    assert rendered["system"] == ""
    assert rendered["assistant"] == "sentinel" + tokenizer.eos_token
    assert "sentinel" in rendered["user"]

    processor = AutoProcessor.from_pretrained(out)
    config = dataclasses.replace(read_saved_run(out).config, image_dir=str(tmp_path))
    tokens = ImageTokens.from_processor(processor)
    wide = images(tmp_path)[0]
    record = {"question": "What colour is it?", "steps": ["The shape is red.", "So: red."], "answer": "red"}
    for paths in ([], [wide]):
        sample_record = {**record, **({"image": [p.name for p in paths]} if paths else {})}
        (sample,), _ = tokenize_mm_records([sample_record], "test", processor.tokenizer, tokens, config)
        training = sample["question_tokenized"] + sum(sample["steps_tokenized"], []) + sample["answer_tokenized"]
        pair = user(record["question"], images=len(paths)) + [{"role": "assistant", "content": answer_text(record)}]
        text = processor.apply_chat_template(pair)
        pil = [Image.open(p) for p in paths] or None
        assert processor(text=text, images=pil, return_tensors="pt")["input_ids"][0].tolist() == training, text
    with pytest.raises(Exception, match="one user message"):
        processor.apply_chat_template(pair + pair)
