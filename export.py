"""Export a training checkpoint as a plain HF model + processor directory, for serving.

The result has no latent-loop wrapper: AutoModelForImageTextToText / AutoProcessor (or
AutoModelForCausalLM / AutoTokenizer for text-only runs) load it, and lmdeploy / vLLM can serve it
for ordinary generation. Latent decoding (feeding hidden states back as inputs) is not something
those servers do; use Coconut.generate for that.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from checkpoint import CheckpointError, model_dir_of
from model_setup import load_base_model, load_processor

# InternVL's chat template (internvl2_5). An image part becomes the processor's image token
# (<IMG_CONTEXT>), which InternVLProcessor expands into <img> + context tokens + </img>.
INTERNVL2_5_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}IMAGE_TOKEN\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write checkpoint's model and processor to out_dir (atomically: a temp dir, then rename)."""
    source = model_dir_of(checkpoint)
    if source is None:
        raise CheckpointError(f"{checkpoint}: not a checkpoint or HF model directory")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir}: already exists; choose a new export directory")
    multimodal = "vision_config" in (source / "config.json").read_text()
    model = load_base_model(source, multimodal)
    processor = load_processor(source, multimodal)
    if multimodal:
        processor.chat_template = INTERNVL2_5_CHAT_TEMPLATE.replace("IMAGE_TOKEN", processor.image_token)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
