"""--export writes a plain HF model + processor that the Auto classes load, for serving."""

from __future__ import annotations

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import run
from tests.run_helpers import demo_config


def test_export_loads_with_auto_classes_and_keeps_weights(tmp_path, tiny_model_dir, capsys):
    config = demo_config(tmp_path, tiny_model_dir, num_epochs=1)
    assert run.main([str(config)]) == 0
    checkpoint = tmp_path / "checkpoints" / "run" / "checkpoint_1"
    out = tmp_path / "export"
    assert run.main(["--export", str(checkpoint), str(out)]) == 0

    exported = AutoModelForImageTextToText.from_pretrained(out)
    trained = AutoModelForImageTextToText.from_pretrained(checkpoint / "model")
    processor = AutoProcessor.from_pretrained(out)
    ids = torch.tensor([processor.tokenizer.encode("What shape is it?\n")])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n<IMG_CONTEXT>\nWhat shape?<|im_end|>\n<|im_start|>assistant\n"
    from PIL import Image

    inputs = processor(text=prompt, images=Image.new("RGB", (56, 56)), return_tensors="pt")
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert text.startswith("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nWhat shape?")
    assert "<|latent|>" in processor.tokenizer.get_vocab()

    assert run.main(["--export", str(checkpoint), str(out)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
