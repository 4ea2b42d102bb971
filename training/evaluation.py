"""Validation loss, and generation with per-record predictions, sharded over ranks with every rank in step."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from coconut import Thoughts
from dataset import Batch
from storage import atomic
from training.distributed import DistInfo, all_reduce_max, all_reduce_sum
from training.scoring import (
    decode_as_original,
    decode_generation,
    extract_answer,
    gold_answer,
    gold_cot,
    original_cot,
    written_cot,
    written_cot_gold,
)
from utils import PREDICTIONS_DIR, CheckpointError, Config  # noqa: F401 (PREDICTIONS_DIR: re-exported for the trainer)

THOUGHT_TOP_K = 5  # tokens kept per continuous thought in a predictions file


def sharded_loader(
    dataset: Dataset, batch_size: int, collate: Callable, info: DistInfo, num_workers: int
) -> tuple[DataLoader, list[bool]]:
    """This rank's share (every world_size-th item, no duplicates) in batches.

    Every rank gets the same number of batches, because each generate/forward under FSDP is a
    series of collectives: ranks that run out repeat a batch whose results are not counted.
    """
    mine = list(range(info.rank, len(dataset), info.world_size))
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    n = all_reduce_max(len(batches), info.device)
    filler = batches[0] if batches else [0]
    counted = [True] * len(batches) + [False] * (n - len(batches))
    batches += [filler] * (n - len(batches))
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers)
    return loader, counted


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    dataset: Dataset,
    collate: Callable,
    info: DistInfo,
    batch_size: int,
    num_workers: int,
    autocast: Callable,
) -> float:
    """Token-weighted mean cross-entropy over the whole validation set (all ranks)."""
    model.eval()
    loader, counted = sharded_loader(dataset, batch_size, collate, info, num_workers)
    totals = torch.zeros(2, dtype=torch.float64, device=info.device)
    for batch, count in zip(loader, counted):
        with autocast():
            out = model(batch.to(info.device), num_items_in_batch=1.0)  # loss = summed CE
        if count:
            totals += torch.stack([out.loss.detach().double(), out.num_label_tokens.double()])
    all_reduce_sum(totals)
    return float(totals[0] / totals[1].clamp(min=1))


@dataclasses.dataclass
class GenerationResult:
    """Scores over every rank; predictions (one dict per record, in record order) on the main rank only."""

    accuracy: float
    cot_match: float  # the original's CoT match (scoring.original_cot: an artefact, see scoring.py)
    written_cot_match: float  # the corrected one (scoring.written_cot)
    correct: int
    total: int
    predictions: list[dict[str, Any]]

    def examples(self, n: int) -> list[dict[str, str]]:
        """The first n predictions' question, gold answer, generated text and extracted answer: a table's rows."""
        return [{key: p[key] for key in ("question", "gold", "output", "answer")} for p in self.predictions[:n]]


@torch.no_grad()
def generation_accuracy(
    model: nn.Module,
    dataset: Dataset,
    collate: Callable,
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    info: DistInfo,
    config: Config,
    stage: int,
    autocast: Callable,
    top_k: int = THOUGHT_TOP_K,
) -> GenerationResult:
    """Greedy answers after the latent passes for every sample of dataset, scored as the original.

    dataset holds question samples (dataset.get_question_latent_dataset) whose idx index records.
    Batches of config.batch_size_eval, up to config.max_new_tokens new tokens each.
    """
    model.eval()
    loader, counted = sharded_loader(dataset, config.batch_size_eval, collate, info, config.num_workers)
    mine: list[dict[str, Any]] = []
    with tqdm(total=len(counted), desc="generate", disable=not info.is_main, dynamic_ncols=True, leave=False) as bar:
        for batch, count in zip(loader, counted):
            with autocast():
                tokens, thoughts = model.generate(
                    batch.to(info.device), max_new_tokens=config.max_new_tokens, thought_top_k=top_k
                )
            bar.update(1)
            if count:
                mine += batch_predictions(model, batch, tokens, thoughts, records, tokenizer, config, stage)
    sums = [sum(p[key] for p in mine) for key in ("correct", "cot_match", "written_cot_match")] + [len(mine)]
    counts = all_reduce_sum(torch.tensor(sums, dtype=torch.long, device=info.device))
    correct, cot, written, total = counts.tolist()
    n = max(total, 1)
    return GenerationResult(correct / n, cot / n, written / n, correct, total, _merged(mine, info))


def batch_predictions(
    model: nn.Module,
    batch: Batch,
    tokens: torch.Tensor,
    thoughts: Thoughts,
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    config: Config,
    stage: int,
) -> list[dict[str, Any]]:
    """One prediction per sample of a generated batch (batch: the collated prompts, on the host)."""
    eos = model.eos_token_id
    markers = {model.start_latent_id, model.latent_token_id, model.end_latent_id}
    tokens, top_ids, top_probs = tokens.tolist(), thoughts.top_ids.tolist(), thoughts.top_probs.tolist()
    out = []
    for row, idx in enumerate(batch.idx.tolist()):
        record = records[idx]
        prompt = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()  # without padding
        text = decode_as_original(tokenizer, prompt, tokens[row], eos, markers)
        output = decode_generation(tokenizer, tokens[row], eos)
        answer, gold = extract_answer(text), gold_answer(record)
        n_thoughts = int(thoughts.counts[row])
        stopped = eos in tokens[row]
        out.append(
            {
                "idx": idx,
                "question": record["question"],
                "gold": gold,
                "output": output,
                "answer": answer,
                "correct": answer == gold,
                "cot_match": original_cot(text) == gold_cot(record),
                "written_cot_match": written_cot(output) == written_cot_gold(record, stage, config),
                "latents": prompt.count(model.latent_token_id),  # pause as thought: latents, but no thoughts
                "prompt_tokens": len(prompt),  # latents and image tokens included
                "completion_tokens": tokens[row].index(eos) + 1 if stopped else len(tokens[row]),
                "finish_reason": "stop" if stopped else "length",  # "length": cut at max_new_tokens
                "thoughts": [
                    [
                        {"token": tokenizer.decode([i]), "id": i, "p": p}
                        for i, p in zip(top_ids[row][t], top_probs[row][t])
                    ]
                    for t in range(n_thoughts)
                ],
            }
        )
    return out


def _merged(mine: list[dict[str, Any]], info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's predictions on the main rank, once, in record order (empty on the other ranks)."""
    if info.distributed:
        gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
        dist.gather_object(mine, gathered, dst=0)
        if not info.is_main:
            return []
        mine = [p for part in gathered for p in part]
    return sorted(mine, key=lambda p: p["idx"])


def write_predictions(path: str | Path, predictions: Sequence[dict[str, Any]]) -> Path:
    """Write predictions as JSON lines, atomically: a reader sees the previous file or the whole new one."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; the predictions file must be a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    except OSError as e:  # e.g. a file where a parent directory should be
        raise CheckpointError(f"could not write predictions {path}: {e.strerror or e}") from None
    return path
