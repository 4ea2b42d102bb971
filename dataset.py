"""Text data path: records → tokens → stage-scheduled samples → latent-aligned batches.

Semantics follow the original COCONUT dataset.py (get_dataset, get_cot_latent_dataset,
get_question_latent_dataset, MyCollator); see docs/design.md §1 and §3.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import random
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from utils import (
    Config,
    DataError,  # defined there so that run.py refuses bad input before torch loads
)

IGNORE_INDEX = -100


class LatentLayoutError(ValueError):
    """Latent tokens that are not one contiguous run starting at a shared column."""


@dataclasses.dataclass
class Batch:
    """One collated batch: what Coconut.forward, generate and encode_prompt take.

    B samples of L columns, T image tiles in all (each S x S pixels):

    - input_ids: (B, L) long; latents of every sample start in one column (left padding)
    - attention_mask: (B, L) long, 0 on padding
    - position_ids: (B, L) long, restarting at 0 after each sample's left padding
    - labels: (B, L) long, IGNORE_INDEX where no loss is taken; None for generation prompts
    - idx: (B,) long, the records' indices (predictions name their record by it)
    - pixel_values: (T, 3, S, S) float, every sample's tiles in batch order; None when no sample has images
    - num_patches: (B,) long, tiles per sample (0 for a sample without images); the sample key of the same name
    - latent_column: the first latent column, shared by every sample with latents (host int)
    - latent_counts: latents per sample (host ints)

    latent_column and latent_counts are set by the collator, which aligned the latents on the host:
    with them the model places its passes without reading the device. A hand-built Batch leaves them
    None; the model then finds the latents on the device (one host sync) and checks that they are
    aligned (LatentLayoutError).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    num_patches: torch.Tensor | None = None
    latent_column: int | None = None
    latent_counts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids.shape)
        for name in ("attention_mask", "position_ids", "labels"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"Batch: {name} has shape {tuple(value.shape)}, input_ids {shape}")
        if self.latent_counts is not None:
            if len(self.latent_counts) != shape[0]:
                raise LatentLayoutError(f"Batch: {len(self.latent_counts)} latent counts for {shape[0]} samples")
            if max(self.latent_counts, default=0) and (
                self.latent_column is None or self.latent_column + max(self.latent_counts) > shape[1]
            ):
                raise LatentLayoutError(
                    f"Batch: latents from column {self.latent_column} do not fit {shape[1]} columns"
                )

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """The batch with its tensors on device, except idx, which stays on the host.

        idx is only read on the host (to name each prediction's record): moving it would cost a
        copy there and a device sync to read it back. Copies from the host need not block: a
        pinned batch copies asynchronously, a pageable one is staged before the call returns.
        """
        return self._map(lambda t: t.to(device, non_blocking=non_blocking), skip=("idx",))

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory (DataLoader(pin_memory=True) calls this)."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn: Any, skip: tuple[str, ...] = ()) -> Batch:
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return dataclasses.replace(self, **{k: fn(v) for k, v in tensors.items() if isinstance(v, torch.Tensor)})


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a COCONUT data file: a JSON list of {question, steps, answer[, image|video]}, or
    the same records as JSON lines (a .jsonl file, or a .json file holding one object per line), the
    format most fine-tuning tools write."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a JSON data file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    records = _json_lines(text, path) if path.suffix == ".jsonl" else _json_list(text, path)
    _warn_unscorable(records, path)
    _warn_ignored_keys(records, path)
    return records


def _json_list(text: str, path: Path) -> list[dict[str, Any]]:
    """A JSON list of records (or JSON lines under a .json name, which most fine-tuning tools write)."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines under a .json name
            return _json_lines(text, path)
        raise DataError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:
        raise DataError(f"{path}: not a list of records: its JSON nests too deeply to read") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: no records: the file holds an empty list")
    for i, record in enumerate(records):
        validate_record(record, f"{path}: record {i}")
    return records


def _json_lines(text: str, path: Path) -> list[dict[str, Any]]:
    """One record per non-blank line; errors name the line (and the record number later errors use)."""
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {n} (record {len(records)})"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON: {e}") from None
        except RecursionError:
            raise DataError(f"{where}: its JSON nests too deeply to read") from None
        validate_record(record, where)
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records: the file holds no JSON lines")
    return records


RECORD_KEYS = ("question", "steps", "answer", "image", "video", "num_frames")


def _warn_unscorable(records: list[dict[str, Any]], path: Path) -> None:
    """Answers holding '#' can never be scored correct: the original's scoring takes a generation's
    text after its last '#' (training/scoring.py), so it cannot reproduce such an answer."""
    hashed = [i for i, r in enumerate(records) if "#" in r["answer"]]
    if hashed:
        warnings.warn(
            f"{path}: {len(hashed)} of {len(records)} answers contain '#' (records {hashed[:10]}): the scoring "
            "takes the text after a generation's last '#', so these can never be counted correct",
            stacklevel=3,
        )


def _warn_ignored_keys(records: list[dict[str, Any]], path: Path) -> None:
    """Keys no record key resembles (a data set's own metadata, e.g. ProsQA's `edges`) are kept and not
    read: said once per file, so a key meant as input never goes unnoticed."""
    ignored = sorted({key for record in records for key in record} - set(RECORD_KEYS))
    if ignored:
        counts = {key: sum(key in r for r in records) for key in ignored}
        listed = ", ".join(f"'{k}' ({n} records)" for k, n in counts.items())
        warnings.warn(f"{path}: keys not read (a record holds {', '.join(RECORD_KEYS)}): {listed}", stacklevel=3)


def validate_record(record: Any, where: str) -> None:
    """Refuse a record that is not {question, steps, answer[, image|video][, num_frames]}, naming where."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    for key in record:
        meant = difflib.get_close_matches(key.lower(), RECORD_KEYS, n=1, cutoff=0.75)
        if key not in RECORD_KEYS and meant:  # other keys (a data set's own metadata) are ignored
            raise DataError(f"{where}: unknown key '{key}'; did you mean '{meant[0]}'?")
    for key in ("question", "steps", "answer"):
        if key not in record:
            raise DataError(f"{where}: missing key '{key}'")
    if not isinstance(record["question"], str) or not record["question"].strip():
        raise DataError(f"{where}: key 'question': expected a non-empty string")
    steps = record["steps"]
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise DataError(f"{where}: key 'steps': expected a list of strings")
    if not isinstance(record["answer"], str):
        raise DataError(f"{where}: key 'answer': expected a string, got {type(record['answer']).__name__}")
    image = record.get("image")
    if image is not None and not (
        isinstance(image, str) or (isinstance(image, list) and image and all(isinstance(p, str) for p in image))
    ):
        raise DataError(f"{where}: key 'image': expected a path or a non-empty list of paths")
    video = record.get("video")
    if video is not None and not isinstance(video, str):
        raise DataError(f"{where}: key 'video': expected a path")
    for key, paths in (("image", image), ("video", video)):
        if any(not p or "\0" in p for p in ([paths] if isinstance(paths, str) else paths or [])):
            raise DataError(f"{where}: key '{key}': a path is empty or holds a NUL byte")
    if image is not None and video is not None:
        raise DataError(f"{where}: keys 'image' and 'video': a record carries one or the other")
    frames = record.get("num_frames", 1)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise DataError(f"{where}: key 'num_frames': expected a positive integer")


def tokenize_sample(
    record: dict[str, Any], idx: int, tokenizer: Any, question_ids: list[int] | None = None
) -> dict[str, Any]:
    """Tokenize one record piecewise exactly as COCONUT does.

    question_ids, when given, replaces the question's tokens (the multimodal path puts the
    expanded image block and prompt template there).
    """
    if question_ids is None:
        question_ids = tokenizer.encode(record["question"] + "\n", add_special_tokens=True)
    return {
        "question_tokenized": list(question_ids),
        "steps_tokenized": [tokenizer.encode(s + "\n", add_special_tokens=False) for s in record["steps"]],
        "answer_tokenized": tokenizer.encode("### " + record["answer"], add_special_tokens=False)
        + [tokenizer.eos_token_id],
        "idx": idx,
    }


def get_dataset(path: str | Path, tokenizer: Any, max_size: int | None = None) -> list[dict[str, Any]]:
    """Load and tokenize a text-only data file (the original get_dataset)."""
    return tokenize_records(load_records(path)[:max_size], tokenizer, str(path))


def tokenize_records(
    records: Sequence[dict[str, Any]], tokenizer: Any, source: str | None = None
) -> list[dict[str, Any]]:
    """Tokenize text-only records; record 0 gets the original's self-check (see check_tokenization).

    source: the data file, named in the check's error.
    """
    control = control_text(tokenizer)
    for i, record in enumerate(records):
        check_user_text(record, control, f"{source}: record {i}" if source else f"record {i}")
    samples = [tokenize_sample(r, i, tokenizer) for i, r in enumerate(records)]
    if samples:
        where = f"{source}: record 0" if source else "record 0"
        check_tokenization(samples[0], records[0]["question"] + "\n", records[0], tokenizer, where)
    return samples


def control_text(tokenizer: Any, reserved: Sequence[str] = ()) -> re.Pattern[str]:
    """Text that would become a control id: every added token of the tokenizer (eos/pad, the chat
    template's role tokens, <img>, </img>, <IMG_CONTEXT>, the latent markers once added), its special
    tokens, and `reserved` strings (the `<image>` placeholder of multimodal prompts). Longest first, so
    the error names the whole token."""
    strings = {t.content for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens)
    strings |= set(reserved)
    return re.compile("|".join(re.escape(t) for t in sorted(strings, key=len, reverse=True) if t))


def check_user_text(record: dict[str, Any], control: re.Pattern[str], where: str) -> None:
    """Refuse a record whose question, steps or answer holds a control token's text (see control_text).

    User text is text: tokenized as it is, `<|latent|>` in a question would be fed back as a thought,
    `<IMG_CONTEXT>` would take an image feature, `<|im_end|>` would end the turn. Refusing the record
    (rather than tokenizing such text piecewise) keeps the tokens of every accepted record those of its
    whole text, which the tokenization self-check and the latent steps rely on.
    """
    texts = [("question", record["question"]), ("answer", record["answer"])]
    texts += [(f"steps[{j}]", step) for j, step in enumerate(record["steps"])]
    for key, text in texts:
        found = control.search(text)
        if found:
            raise DataError(
                f"{where}: key '{key}': holds '{found.group()}', which the model would read as a control token "
                "(or image placeholder), not as text: remove or rewrite it"
            )


@dataclasses.dataclass(frozen=True)
class LatentIds:
    """Ids of the three tokens COCONUT adds to the vocabulary."""

    start: int
    latent: int
    end: int


def _latent_block(n_latent: int, ids: LatentIds, markers: bool) -> list[int]:
    if not markers:
        return [ids.latent] * n_latent
    return [ids.start] + [ids.latent] * n_latent + [ids.end]


def training_latents(n_steps: int, stage: int, config: Config) -> tuple[int, int]:
    """(steps dropped from the text, latent tokens) of a training sample at a stage: the original's rule.

    Up to max_latent_stage, `stage` steps become `stage` latent steps (even past the sample's own
    step count); beyond it every step is dropped and the latents stay at max_latent_stage (or the
    sample's step count without pad_latent_to_max). no_cot drops every step and has no latents.
    The dropped count is at most n_steps; latent tokens are latent steps × c_thought.
    """
    if config.method == "no_cot":
        return n_steps, 0
    if stage > config.max_latent_stage:
        n_latent = config.max_latent_stage if config.pad_latent_to_max else min(n_steps, config.max_latent_stage)
        return n_steps, n_latent * config.thoughts_per_step
    return min(stage, n_steps), stage * config.thoughts_per_step


def prompt_latents(n_steps: int, stage: int, config: Config) -> int:
    """Latent tokens of an evaluation prompt at a stage (the original's get_question_latent_dataset).

    Capped at the sample's step count unless pad_latent_to_max; none under no_cot.
    """
    if config.method == "no_cot":
        return 0
    max_stage = config.max_latent_stage if config.pad_latent_to_max else min(config.max_latent_stage, n_steps)
    return min(max_stage, stage) * config.thoughts_per_step


def cot_latent_sample(sample: dict[str, Any], stage: int, config: Config, ids: LatentIds) -> dict[str, Any]:
    """One training sample at a curriculum stage: first `stage` steps → latents (original semantics)."""
    n_skip, n_latent = training_latents(len(sample["steps_tokenized"]), stage, config)
    prefix = sample["question_tokenized"] + _latent_block(n_latent, ids, config.uses_markers)
    steps = list(itertools.chain.from_iterable(sample["steps_tokenized"][n_skip:]))
    tokens = prefix + steps + sample["answer_tokenized"]
    return {
        "input_ids": tokens,
        "labels": [IGNORE_INDEX] * len(prefix) + tokens[len(prefix) :],
        "attention_mask": [1] * len(tokens),
        "position_ids": list(range(len(tokens))),
        "idx": sample["idx"],
    }


def get_cot_latent_dataset(
    scheduled_stage: int,
    base_dataset: Sequence[dict[str, Any]],
    config: Config,
    ids: LatentIds,
    rng: random.Random | None = None,
) -> list[dict[str, Any]]:
    """Training samples for a stage; uniform_prob mixes in samples of a random other stage."""
    rng = rng or random.Random(config.seed)
    out = []
    for sample in base_dataset:
        stage = scheduled_stage
        if config.uniform_prob > 0 and rng.random() < config.uniform_prob:
            stage = rng.choice(range(len(sample["steps_tokenized"]) + 1))
        out.append(cot_latent_sample(sample, stage, config, ids))
    return out


def question_latent_sample(sample: dict[str, Any], stage: int, config: Config, ids: LatentIds) -> dict[str, Any]:
    """Generation prompt for a stage: question + latents (+ markers), nothing of the answer."""
    n_latent = prompt_latents(len(sample["steps_tokenized"]), stage, config)
    tokens = sample["question_tokenized"] + _latent_block(n_latent, ids, config.uses_markers)
    return {
        "input_ids": tokens,
        "attention_mask": [1] * len(tokens),
        "position_ids": list(range(len(tokens))),
        "idx": sample["idx"],
    }


def get_question_latent_dataset(
    scheduled_stage: int, base_dataset: Sequence[dict[str, Any]], config: Config, ids: LatentIds
) -> list[dict[str, Any]]:
    """Evaluation prompts for a stage (the original get_question_latent_dataset)."""
    return [question_latent_sample(s, scheduled_stage, config, ids) for s in base_dataset]


class MyCollator:
    """Pads a batch so that every sample's first latent sits in the same column.

    Samples with latents are left-padded (position_ids restart at 0 after the padding,
    attention_mask 0 on it); then everything is right-padded to the longest sample.
    column_multiple > 1 rounds that column up to a multiple of it, so that batches share the
    shapes of their one-token latent passes (CUDA graphs are recorded once per shape).
    The Batch carries that column and each sample's latent count, known here without a device read.
    """

    def __init__(
        self, pad_token_id: int, latent_id: int, label_pad_token_id: int = IGNORE_INDEX, column_multiple: int = 1
    ) -> None:
        self.pad_token_id = pad_token_id
        self.latent_id = latent_id
        self.label_pad_token_id = label_pad_token_id
        self.column_multiple = column_multiple

    def __call__(self, features: list[dict[str, Any]]) -> Batch:
        firsts = [_first_index(f["input_ids"], self.latent_id) for f in features]
        counts = tuple(f["input_ids"].count(self.latent_id) for f in features)
        for f, first, n in zip(features, firsts, counts):
            if n and f["input_ids"][first : first + n] != [self.latent_id] * n:
                raise LatentLayoutError(f"record {f['idx']}: its latent tokens are not one contiguous run")
        column = max((c for c in firsts if c is not None), default=None)
        if column is not None:
            column = -(-column // self.column_multiple) * self.column_multiple
        padded = []
        for f, first in zip(features, firsts):
            n_left = 0 if first is None else column - first
            padded.append(_pad_left(f, n_left, self.pad_token_id, self.label_pad_token_id))
        length = max(len(f["input_ids"]) for f in padded)
        return Batch(
            input_ids=_stack(padded, "input_ids", length, self.pad_token_id),
            attention_mask=_stack(padded, "attention_mask", length, 0),
            position_ids=_stack(padded, "position_ids", length, 0),
            labels=_stack(padded, "labels", length, self.label_pad_token_id) if "labels" in padded[0] else None,
            idx=torch.tensor([f["idx"] for f in padded]),
            latent_column=column,
            latent_counts=counts,
        )


def _first_index(ids: list[int], token: int) -> int | None:
    try:
        return ids.index(token)
    except ValueError:
        return None


def _pad_left(feature: dict[str, Any], n: int, pad_id: int, label_pad: int) -> dict[str, Any]:
    out = dict(feature)
    out["input_ids"] = [pad_id] * n + feature["input_ids"]
    out["attention_mask"] = [0] * n + feature["attention_mask"]
    out["position_ids"] = [0] * n + list(range(len(feature["input_ids"])))
    if "labels" in feature:
        out["labels"] = [label_pad] * n + feature["labels"]
    return out


def _stack(features: list[dict[str, Any]], key: str, length: int, pad: int) -> torch.Tensor:
    return torch.tensor([f[key] + [pad] * (length - len(f[key])) for f in features], dtype=torch.long)


def drop_overlong(
    base_dataset: list[dict[str, Any]], config: Config, ids: LatentIds, max_length: int, source: str
) -> list[dict[str, Any]]:
    """Apply the over-length policy before training: `error` (default) or `drop` with a count.

    A sample's length is its longest over every stage it can be trained at. Truncating instead
    would cut through image tokens or the answer, so it is never done.
    """
    stages = range(1) if config.method in ("cot", "no_cot") else range(config.max_latent_stage + 2)
    kept, dropped = [], []
    for sample in base_dataset:
        longest = max(len(cot_latent_sample(sample, k, config, ids)["input_ids"]) for k in stages)
        if longest <= max_length:
            kept.append(sample)
        elif config.overlong == "error":
            raise DataError(
                f"{source}: record {sample['idx']}: {longest} tokens exceed max_length {max_length} "
                "(set overlong: drop to skip such records, or raise max_length)"
            )
        else:
            dropped.append(sample["idx"])
    if dropped:
        warnings.warn(
            f"{source}: dropped {len(dropped)} records longer than {max_length} tokens: {dropped[:10]}", stacklevel=2
        )
    if not kept:
        raise DataError(f"{source}: no records left after dropping those longer than {max_length} tokens")
    return kept


def check_tokenization(
    sample: dict[str, Any], question: str, record: dict[str, Any], tokenizer: Any, where: str
) -> None:
    """The original's self-check: the pieces' tokens equal the tokens of the whole text at once.

    COCONUT replaces whole steps by latents, which is only sound when tokenizing the question, each
    step and the answer apart gives the tokens of the full text: no merge across a boundary, no
    extra BOS or prefix space per piece. The original asserts this on record 0 of each file
    (dataset.py, get_dataset's "verify" block). `question` is the text the question tokens were
    made from (`question + "\n"`, or the rendered prompt with its image blocks). With no steps the
    whole text is question + "### " + answer, as the pieces are; the original's string gets an
    extra "\n" there, so its assert would reject a correct record 0 that has no steps.
    """
    full = question + "".join(step + "\n" for step in record["steps"]) + "### " + record["answer"]
    expected = tokenizer.encode(full, add_special_tokens=True) + [tokenizer.eos_token_id]
    steps = list(itertools.chain.from_iterable(sample["steps_tokenized"]))
    got = sample["question_tokenized"] + steps + sample["answer_tokenized"]
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        pieces, whole = ([tokenizer.decode([t]) for t in ids[at : at + 3]] for ids in (got, expected))
        raise DataError(
            f"{where}: tokenizing question, steps and answer apart differs from tokenizing the whole text, "
            f"from token {at}: {pieces} apart, {whole} whole. Coconut replaces whole steps, so they must agree "
            "(the tokenizer merges across the pieces' boundaries, e.g. an empty step or one starting with a "
            "newline, or adds a prefix to each piece)"
        )
