"""Export a trained model directory as a plain HF model + processor directory, faithful to its run.

The result loads with AutoModelForImageTextToText / AutoProcessor (AutoModelForCausalLM /
AutoTokenizer for text-only runs), and lmdeploy / vLLM can serve it for ordinary generation. It
keeps what the run trained on: the chat template renders exactly the training prompt
(multimodal/prompts.py), the image processor tiles to the run's max_tiles and image_size, the
weights default to the training precision, and coconut_config.yaml travels along, so
`run.py --infer` works on the export. A LoRA run's adapters are merged into the weights (peft's
merge; the export loads without peft), and its record then says use_llm_lora / use_backbone_lora 0.
Latent decoding needs `run.py --infer` or Coconut.generate; the export's README.md says what plain
servers do instead.

The directory is written under a hidden temporary name and renamed into place when complete, so a
kill at any moment never leaves a directory at the export's path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch

from dataset import prompt_latents
from modeling.assembly import assemble
from modeling.lora import has_adapter
from multimodal.prompts import PROMPT_TEMPLATES
from storage import atomic
from storage.checkpoints import CheckpointError, model_dir_of, reading
from storage.saved_run import SAVED_RUN_FILE, SavedRun, read_saved_run, write_saved_run
from utils import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
README_FILE = "README.md"

# One user turn (what training saw), and optionally the answer after it, as a Jinja chat template. The media
# lines are those of multimodal.dataset_mm.media_prompt with the processor's own tokens, which it expands into
# image blocks: one image `<IMG_CONTEXT>\n`, several `Image-1: <IMG_CONTEXT>\n`..., a video `<video>\n`
# (InternVLProcessor writes `Frame1: <img>…</img>\n…` for it). PROMPT is the prompt format's text with {media}
# and {question} as Jinja expressions; it ends where the answer starts, so an assistant turn is its text and
# EOS_TOKEN: a user + assistant pair renders the training text of that sample. lmdeploy probes a template with
# a system, a user and an assistant message each alone (and takes it only if all three render): a system
# message alone renders nothing (the prompt format's own system turn comes with the user turn); beside
# other messages it is refused, as training never saw one. The empty expression at the end keeps a final
# newline (Jinja drops a template's trailing newline).
_CHAT_TEMPLATE = r"""{%- set roles = messages | map(attribute='role') | list -%}
{%- if roles | reject('equalto', 'system') | list | length == 0 -%}
{%- elif roles not in [['user'], ['user', 'assistant'], ['assistant']] -%}
{{- raise_exception('This model was trained on one user message (no system or earlier turns), then its answer.') -}}
{%- else -%}
{%- for message in messages -%}
{%- set content = message['content'] -%}
{%- set ns = namespace(images=0, videos=0, text='', media='') -%}
{%- if content is string -%}
{%- set ns.text = content -%}
{%- else -%}
{%- for part in content -%}
{%- if part['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}
{%- elif part['type'] == 'video' -%}{%- set ns.videos = ns.videos + 1 -%}
{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- if message['role'] == 'assistant' -%}
{%- if ns.images + ns.videos > 0 -%}{{- raise_exception('An answer is text only.') -}}{%- endif -%}
{{- ns.text -}}EOS_TOKEN
{%- else -%}
{%- if MULTIMODAL == 0 and ns.images + ns.videos > 0 -%}
{{- raise_exception('This model is text-only: it takes no images or video.') -}}
{%- elif ns.videos > 1 or (ns.videos == 1 and ns.images > 0) -%}
{{- raise_exception('This model takes images or one video per prompt, not both.') -}}
{%- elif ns.videos == 1 -%}{%- set ns.media = 'VIDEO_TOKEN\n' -%}
{%- elif ns.images == 1 -%}{%- set ns.media = 'IMAGE_TOKEN\n' -%}
{%- else -%}
{%- for i in range(ns.images) -%}{%- set ns.media = ns.media + 'Image-' ~ (i + 1) ~ ': IMAGE_TOKEN\n' -%}{%- endfor -%}
{%- endif -%}
PROMPT{{ '' }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}"""


def chat_template(
    prompt_format: str, multimodal: bool, image_token: str = "", video_token: str = "", eos_token: str = ""
) -> str:
    """The Jinja template that renders a run's training prompt for one user message, and with its
    answer (an assistant message) the training text: the answer then eos_token."""
    # Text-only runs tokenize `question + "\n"` (dataset.tokenize_sample): the plain format without media.
    prompt = PROMPT_TEMPLATES[prompt_format if multimodal else "plain"]
    body = prompt.format(media="{{ ns.media }}", question="{{ ns.text }}")
    return (
        _CHAT_TEMPLATE.replace("MULTIMODAL", str(int(multimodal)))
        .replace("IMAGE_TOKEN", image_token)
        .replace("VIDEO_TOKEN", video_token)
        .replace("EOS_TOKEN", eos_token)
        .replace("PROMPT", body)
    )


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, dtype: Literal["bf16", "fp16", "fp32"] | None = None
) -> Path:
    """Write checkpoint's model and processor to out_dir, atomically; dtype defaults to the training precision."""
    source = model_dir_of(checkpoint)
    if source is None:
        raise CheckpointError(f"{checkpoint}: not a checkpoint or HF model directory")
    run = read_saved_run(source)
    if run is None:
        raise CheckpointError(f"{source}: no {SAVED_RUN_FILE}: cannot tell the run's prompt format and tiling")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir}: already exists; choose a new export directory")
    config = run.config
    dtype = dtype or ("bf16" if config.bf16 else "fp16" if config.fp16 else "fp32")
    if dtype not in DTYPES:
        raise ConfigError(f"export dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    if has_adapter(source):  # a LoRA run: its adapters merged into the weights, a plain model without peft
        run = dataclasses.replace(run, config=dataclasses.replace(config, use_llm_lora=0, use_backbone_lora=0))
    with reading(source):
        parts = assemble(run.config, source, torch.device("cpu"))  # not restored: adapters merged
    model, processor = parts.base.to(DTYPES[dtype]), parts.processor
    configure_processor(processor, run)
    try:
        atomic.remove_leftovers(out_dir.parent, [out_dir.name])  # killed exports to out_dir (their process is gone)
        with atomic.atomic_dir(out_dir, replace=False) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            write_saved_run(tmp, run)
            (tmp / README_FILE).write_text(export_readme(run, dtype), encoding="utf-8")
    except FileExistsError:
        raise CheckpointError(
            f"{out_dir}: written by another export meanwhile; choose a new export directory"
        ) from None
    except OSError as e:
        raise CheckpointError(f"could not write {out_dir}: {e.strerror or e}") from None
    return out_dir


def configure_processor(processor: Any, run: SavedRun) -> None:
    """The run's prompt as chat template; for InternVL, its tiling (max_tiles, image_size) in the image processor."""
    config = run.config
    if not config.multimodal:
        processor.chat_template = chat_template(config.prompt_format, False, eos_token=processor.eos_token)
        return
    tokens = (processor.image_token, processor.video_token, processor.tokenizer.eos_token)
    processor.chat_template = chat_template(config.prompt_format, True, *tokens)
    size = {"height": config.image_size, "width": config.image_size}
    image_processor = processor.image_processor
    image_processor.max_patches, image_processor.size = config.max_tiles, size
    if getattr(processor, "video_processor", None) is not None:
        processor.video_processor.size = size


def export_readme(run: SavedRun, dtype: str) -> str:
    """What the export is, what it keeps from the run, and what serving it without the latent loop does."""
    config = run.config
    # a question of unknown steps gets the stage's full count (inference.Inference.ask does the same)
    stage_latents = prompt_latents(config.max_latent_stage, run.stage, config)
    tiling = (
        f"images tiled to at most {config.max_tiles} tiles of {config.image_size} px (plus a thumbnail)"
        if config.multimodal
        else "text only"
    )
    return f"""# COCONUT-VL export

Trained with method `{config.method}` to epoch {run.epoch} (curriculum stage {run.stage}); prompt
format `{config.prompt_format if config.multimodal else "plain"}` (the chat template renders exactly
that prompt, for one user message); {tiling}; weights in {dtype}. `{SAVED_RUN_FILE}` holds the
resolved run config and the latent token ids.

## Latent decoding

At stage {run.stage} the model reasons in {stage_latents} continuous thought(s): after the question
it expects `<|start-latent|>`, then for each thought its own last hidden state fed back as the next
input embedding (not a token), then `<|end-latent|>`, and only then decodes text. That loop needs
this project:

    python run.py --infer THIS_DIR --image IMG.png --question "..." [--json]

or `inference.Inference.load(THIS_DIR).ask(...)`, or `coconut.Coconut.generate` in Python.

## Plain servers (lmdeploy, vLLM, transformers' generate)

They load and serve this directory, but decode tokens only: they never feed hidden states back,
so the model answers without its continuous thoughts. After a CoT run that is the prompt it was
trained on; after Coconut stages (even stage 0, whose prompts carry the two markers) it sees a
prompt without the latent block it was trained with. vLLM uses the chat template here; so does
lmdeploy (`lmdeploy serve api_server THIS_DIR`), which takes a model's own template when a system, a
user and an assistant message each render with it, unless one of its built-in templates matches the
directory's path first (keep model family names such as internvl or qwen out of it). The template
renders one user message as training's prompt (a system message is refused: training had none).
`AutoProcessor` tiles with the torchvision backend, whose resize differs slightly from training's;
the exact pixels come from `AutoImageProcessor.from_pretrained(THIS_DIR, backend="pil")`.
"""
