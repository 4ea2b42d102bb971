"""Validation loss and generation accuracy, sharded over ranks with every rank in step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from distributed import DistInfo, all_reduce_max, all_reduce_sum


@dataclasses.dataclass
class GenerationResult:
    accuracy: float
    cot_match: float
    correct: int
    total: int
    examples: list[dict[str, str]]


def extract_answer(text: str) -> str:
    """The original's rule: text after the last '#', commas removed, stripped."""
    return text.split("#")[-1].replace(",", "").strip()


def extract_cot(text: str) -> str:
    """Generated reasoning: everything before the first '#'."""
    return text.split("#")[0].strip()


def sharded_loader(dataset: Dataset, batch_size: int, collate: Callable, info: DistInfo, num_workers: int) -> tuple[DataLoader, list[bool]]:
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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "idx"}


@torch.no_grad()
def validation_loss(
    model: nn.Module, dataset: Dataset, collate: Callable, info: DistInfo, batch_size: int, num_workers: int, autocast: Callable
) -> float:
    """Token-weighted mean cross-entropy over the whole validation set (all ranks)."""
    model.eval()
    loader, counted = sharded_loader(dataset, batch_size, collate, info, num_workers)
    totals = torch.zeros(2, dtype=torch.float64, device=info.device)
    for batch, count in zip(loader, counted):
        with autocast():
            out = model(**to_device(batch, info.device), num_items_in_batch=1.0)  # loss = summed CE
        if count:
            totals += torch.stack([out.loss.detach().double(), out.num_label_tokens.double()])
    all_reduce_sum(totals)
    return float(totals[0] / totals[1].clamp(min=1))


@torch.no_grad()
def generation_accuracy(
    model: nn.Module,
    dataset: Dataset,
    collate: Callable,
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    info: DistInfo,
    batch_size: int,
    max_new_tokens: int,
    num_workers: int,
    autocast: Callable,
    n_examples: int = 3,
) -> GenerationResult:
    """Greedy answers after the latent passes, scored as the original (string match after '#')."""
    model.eval()
    loader, counted = sharded_loader(dataset, batch_size, collate, info, num_workers)
    counts = torch.zeros(3, dtype=torch.long, device=info.device)  # correct, cot match, total
    examples: list[dict[str, str]] = []
    with tqdm(total=len(counted), desc="generate", disable=not info.is_main, dynamic_ncols=True, leave=False) as bar:
        for batch, count in zip(loader, counted):
            ids = batch["idx"].tolist()
            with autocast():
                tokens = model.generate(**to_device(batch, info.device), max_new_tokens=max_new_tokens,
                                        synced_gpus=info.distributed)
            bar.update(1)
            if not count:
                continue
            for idx, text in zip(ids, tokenizer.batch_decode(tokens, skip_special_tokens=True)):
                record = records[idx]
                answer = record["answer"].replace(",", "").strip()
                predicted = extract_answer(text)
                counts[0] += int(predicted == answer)
                counts[1] += int(extract_cot(text) == "\n".join(record["steps"]).strip())
                counts[2] += 1
                if len(examples) < n_examples:
                    examples.append({"question": record["question"], "answer": answer, "output": text, "extracted": predicted})
    all_reduce_sum(counts)
    correct, cot, total = counts.tolist()
    return GenerationResult(correct / max(total, 1), cot / max(total, 1), correct, total, examples)
