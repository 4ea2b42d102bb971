"""Ask a trained model: the image, the latent passes and decoding, with the continuous thoughts made visible.

    from deploy.inference import Inference

    model = Inference.load("checkpoints/demo/checkpoint_9")        # a checkpoint, its model/, or an export
    reply = model.ask("what color is the shape?", images=["shape.png"])
    reply["answer"], reply["output"], reply["latents"], reply["thoughts"]

Everything comes from the model directory's coconut_config.yaml (storage/saved_run.py): prompt format,
stage, c_thought, max_latent_stage, tiling and image size, latent token ids and precision. A question
goes through the same code as evaluation (tokenization, the PIL tiling, the collator,
Coconut.generate, evaluation.batch_predictions), so its answer equals the predictions file's for the
same record, checkpoint and stage. A question asked alone has no steps: it gets the stage's full
count of latents, min(stage, max_latent_stage) × c_thought, as evaluation gives a record with enough
steps. `--data FILE.json` answers records (with their steps) in batches, exactly as evaluation does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dataset import DataError, get_question_latent_dataset, load_records, tokenize_records, validate_record
from modeling.assembly import Assembly, assemble
from multimodal.dataset_mm import ImageTokens, MultimodalDataset, tokenize_mm_records
from storage.checkpoints import CheckpointError, model_dir_of, reading
from storage.saved_run import SAVED_RUN_FILE, SavedRun, read_saved_run
from training.distributed import DistInfo
from training.evaluation import THOUGHT_TOP_K, GenerationResult, generation_accuracy, write_predictions
from utils import Config

REPLY_KEYS = (
    "question",
    "answer",
    "output",
    "latents",
    "thoughts",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
)


@dataclasses.dataclass(frozen=True)
class Question:
    """One question to ask: its text and the images (paths) or the video it is about."""

    question: str
    images: tuple[str | Path, ...] = ()
    video: str | Path | None = None

    def record(self) -> dict[str, Any]:
        """As a data record without steps, its media as absolute paths."""
        record: dict[str, Any] = {"question": self.question, "steps": [], "answer": ""}
        if self.images:
            record["image"] = [str(p) for p in self.images]
        if self.video is not None:
            record["video"] = str(self.video)
        validate_record(record, "<question>")  # before any path is resolved: a NUL byte is named, not raised
        record.update({k: _absolute(record[k]) for k in ("image", "video") if k in record})
        return record


class Inference:
    """A trained model directory, loaded once, answering questions as evaluation does."""

    def __init__(self, parts: Assembly, run: SavedRun, stage: int, device: torch.device) -> None:
        self.model, self.processor, self.tokenizer = parts.model, parts.processor, parts.tokenizer
        self.run, self.config, self.stage = run, run.config, stage
        self.ids, self.collate, self.autocast = parts.ids, parts.collate, parts.autocast
        self.info = DistInfo(0, 1, 0, device)  # one process

    @classmethod
    def load(cls, path: str | Path, stage: int | None = None, device: str | torch.device | None = None) -> Inference:
        """Load a checkpoint (checkpoint_N/, its model/) or an export; stage defaults to the one it was trained to."""
        model_dir = model_dir_of(path)
        if model_dir is None:
            raise CheckpointError(f"{path}: not a checkpoint, model or export directory (no config.json)")
        run = read_saved_run(model_dir)
        if run is None:
            raise CheckpointError(
                f"{model_dir}: no {SAVED_RUN_FILE}: not a model directory this project wrote "
                "(inference needs the run's prompt format, stage and latent tokens)"
            )
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        parts = assemble(run.config, model_dir, device, restore=True)
        parts.model.eval()
        return cls(parts, run, run.stage if stage is None else stage, device)

    def ask(
        self,
        question: str,
        images: Sequence[str | Path] = (),
        video: str | Path | None = None,
        top_k: int = THOUGHT_TOP_K,
    ) -> dict[str, Any]:
        """Answer one question about images (paths) or a video: answer, output, latents, thoughts."""
        return self.ask_many([Question(question, tuple(images), video)], top_k)[0]

    def ask_many(self, questions: Sequence[Question], top_k: int = THOUGHT_TOP_K) -> list[dict[str, Any]]:
        """Answer several questions in one generate batch (the server's dynamic batches); each answer is
        the one the question gets alone, as evaluation's batches equal its single records."""
        records = [q.record() for q in questions]
        # Paths given here are the user's own: absolute, outside any image_dir.
        config = dataclasses.replace(
            self.config,
            allow_external_images=True,
            image_dir=str(Path.cwd()),
            num_workers=0,
            batch_size_eval=max(len(records), 1),
        )
        records, base, media = self._tokenized(records, config, "<question>")
        for sample in base:  # steps unknown: as many as the curriculum can turn into latents, the stage's full count
            sample["steps_tokenized"] = [[]] * self.config.max_latent_stage
        replies = self._generate(records, base, media, config, top_k, "<question>").predictions
        return [{k: reply[k] for k in REPLY_KEYS} for reply in replies]

    def answer_file(
        self, path: str | Path, image_dir: str | Path | None = None, top_k: int = THOUGHT_TOP_K
    ) -> GenerationResult:
        """Answer every record of a data file (as training data: question, steps, answer, media) in batches."""
        config = self.config if image_dir is None else dataclasses.replace(self.config, image_dir=str(image_dir))
        records, base, media = self._tokenized(load_records(path), config, str(path))
        return self._generate(records, base, media, config, top_k, str(path))

    def _tokenized(self, records: list[dict[str, Any]], config: Config, source: str) -> tuple[list, list, dict]:
        if config.multimodal:
            image_tokens = ImageTokens.from_processor(self.processor)
            return (records, *tokenize_mm_records(records, source, self.tokenizer, image_tokens, config))
        if any("image" in r or "video" in r for r in records):
            raise DataError(f"{source}: this model is text-only (multimodal: false): it takes no images or video")
        return records, tokenize_records(records, self.tokenizer, source), {}

    def _generate(
        self,
        records: list[dict[str, Any]],
        base: list[dict[str, Any]],
        media: dict,
        config: Config,
        top_k: int,
        source: str,
    ) -> GenerationResult:
        questions = get_question_latent_dataset(self.stage, base, config, self.ids)
        dataset = MultimodalDataset(questions, media, config, source) if config.multimodal else questions
        return generation_accuracy(
            self.model,
            dataset,
            self.collate,
            records,
            self.tokenizer,
            self.info,
            config,
            self.stage,
            self.autocast,
            top_k,
        )


def answer(args: argparse.Namespace) -> str:
    """`run.py --infer CHECKPOINT ...` (run.py's parser has checked the options): the text to print."""
    with reading(args.infer):
        model = Inference.load(args.infer, stage=args.stage)
    top_k = THOUGHT_TOP_K if args.top_k is None else args.top_k
    if args.data:
        result = model.answer_file(args.data, args.image_dir, top_k)
        out = write_predictions(args.output or f"{Path(args.data).stem}.predictions.jsonl", result.predictions)
        summary = {
            "predictions": str(out),
            "accuracy": result.accuracy,
            "correct": result.correct,
            "total": result.total,
            "stage": model.stage,
        }
        return json.dumps(summary) if args.json else " ".join(f"{k}={v}" for k, v in summary.items())
    reply = model.ask(args.question, args.image or (), args.video, top_k)
    return json.dumps(reply, ensure_ascii=False) if args.json else _readable(reply)


def _absolute(paths: str | list[str]) -> str | list[str]:
    """Paths given to `ask` are the user's own: absolute, outside any image_dir."""
    return str(Path(paths).resolve()) if isinstance(paths, str) else [str(Path(p).resolve()) for p in paths]


def _readable(reply: dict[str, Any]) -> str:
    lines = [f"question: {reply['question']}", f"latents: {reply['latents']}"]
    for i, thought in enumerate(reply["thoughts"], 1):
        lines.append(f"thought {i}: " + "  ".join(f"{t['token']!r} {t['p']:.3f}" for t in thought))
    lines += [f"output: {reply['output']!r}", f"answer: {reply['answer']}"]
    return "\n".join(lines)
