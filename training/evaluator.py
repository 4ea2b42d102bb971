"""The run's evaluation after each epoch: validation loss and generation accuracy at the epoch's stage,
the predictions file, and the report (training/evaluation.py has the functions it calls)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from dataset import get_cot_latent_dataset, get_question_latent_dataset
from modeling.assembly import Assembly
from storage.checkpoints import TrainState
from training.distributed import DistInfo, release_gathered
from training.evaluation import (
    PREDICTIONS_DIR,
    GenerationResult,
    generation_accuracy,
    validation_loss,
    write_predictions,
)
from training.reporter import Reporter
from training.setup import Split
from utils import Config

GENERATIONS_TABLE_ROWS = 32  # sample generations logged per evaluation (the first records of the val set)


class Evaluator:
    """Evaluates the run's model on its validation split; reports at the run's current step."""

    def __init__(
        self,
        config: Config,
        info: DistInfo,
        parts: Assembly,
        val: Split,
        reporter: Reporter,
        state: TrainState,
        save_dir: Path,
    ) -> None:
        self.config, self.info, self.parts, self.val = config, info, parts, val
        self.reporter, self.state, self.save_dir = reporter, state, save_dir

    def evaluate(self, record: dict[str, Any]) -> float:
        """Validation loss and generation accuracy at the record's stage, reported; returns the accuracy."""
        stage = record["stage"]
        record["val_loss"] = self.val_loss(stage)
        result = self.generate(stage)
        release_gathered(self.parts.model)  # no backward resharded what these forwards gathered
        record.update(
            accuracy=result.accuracy,
            cot_match=result.cot_match,
            written_cot_match=result.written_cot_match,
            correct=result.correct,
            total=result.total,
        )
        if self.info.is_main:  # eval-only and debug runs too
            write_predictions(self.save_dir / PREDICTIONS_DIR / f"epoch_{record['epoch']}.jsonl", result.predictions)
        self.reporter.report(record, result.examples(GENERATIONS_TABLE_ROWS), step=self.state.step)
        return result.accuracy

    def val_loss(self, stage: int) -> float:
        config, parts = self.config, self.parts
        samples = get_cot_latent_dataset(stage, self.val.base, config, parts.ids, random.Random(config.seed))
        return validation_loss(
            parts.model,
            self.val.wrap(samples, config),
            parts.collate,
            self.info,
            config.batch_size_eval,
            config.num_workers,
            parts.autocast,
        )

    def generate(self, stage: int) -> GenerationResult:
        config, parts = self.config, self.parts
        questions = get_question_latent_dataset(stage, self.val.base, config, parts.ids)
        return generation_accuracy(
            parts.model,
            self.val.wrap(questions, config),
            parts.collate,
            self.val.records,
            parts.tokenizer,
            self.info,
            config,
            stage,
            parts.autocast,
        )
