"""Checkpoints: HF-format model + processor, plus what resuming needs, written atomically.

save_dir holds two kinds of checkpoint:
  checkpoint_{E}/   after epoch E (the original's name)
  step_{S}/         after optimizer step S, mid-epoch (save_every_steps, or a stop signal)
Each is a directory with
  model/               save_pretrained (safetensors) + processor + coconut_config.yaml: loads with
                       from_pretrained; saved_run.py reads the record of the run. A LoRA run's
                       adapters are in model/adapter/ (peft's format, lora.py); model/ holds the
                       weights they adapt
  optimizer.pt         full (unsharded) optimizer state, tensors only (loaded with weights_only=True);
                       absent where trainer_state.json says optimizer_saved: false (reset_optimizer
                       runs' epoch checkpoints: the next epoch starts a fresh AdamW anyway)
  rank_{r}.pt          step checkpoints: rank r's RNG states, running loss sums and loss scaler
  trainer_state.json   progress (TrainState); written last
Every rank writes its parts into one temporary directory (atomic.py's, named with rank 0's pid); rank 0
writes the state file and renames the directory into place only once every rank has reported its parts
written. A kill at any moment therefore leaves either the previous checkpoints or the new one,
never a half one that looks complete; the next start removes the leftovers (atomic.remove_leftovers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dataset import LatentIds
from modeling.loading import grow_embeddings
from modeling.lora import save_adapter, split_state
from storage import atomic
from training.distributed import all_reduce_host
from utils import CheckpointError  # defined there so that run.py refuses bad input before torch loads

PREFIX = "checkpoint_"
STEP_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
MODEL_DIR = "model"
WRAPPER_PREFIX = "base_causallm."
_NAME = re.compile(rf"({PREFIX}|{STEP_PREFIX})(\d+)")


@dataclasses.dataclass
class TrainState:
    """Progress that resuming restores. At an epoch boundary the RNG streams are re-derived from
    (seed, epoch); a step checkpoint also carries every rank's RNG states (rank_{r}.pt)."""

    epoch: int = 0  # epochs completed
    # micro-batches of epoch `epoch` already trained (step checkpoints; 0 at an epoch boundary). Always
    # at an optimizer-step boundary: no gradient is half accumulated, so this is the whole accumulation phase
    batch: int = 0
    step: int = 0  # optimizer steps taken since the run's first launch
    first_epoch: int = 0  # where the LR schedule starts: the first launch's `resume`
    best_acc: float = 0.0
    train_loss: float | None = None  # of the last completed epoch, for its metrics line
    accuracy: float | None = None  # this checkpoint's accuracy where known when saving (save_only_improve)
    optimizer_saved: bool = True  # False: no optimizer.pt by design (reset_optimizer epoch checkpoints)
    ranks: int = 0  # rank_{r}.pt parts: the world size that wrote a step checkpoint; 0 for epoch checkpoints


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_STATE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epoch": (_count, "an integer >= 0"),
    "batch": (_count, "an integer >= 0"),
    "step": (_count, "an integer >= 0"),
    "first_epoch": (_count, "an integer >= 0"),
    "best_acc": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "train_loss": (lambda v: v is None or _number(v), "a finite number or null"),
    "accuracy": (lambda v: v is None or (_number(v) and 0 <= v <= 1), "a number in [0, 1] or null"),
    "optimizer_saved": (lambda v: isinstance(v, bool), "true or false"),
    "ranks": (_count, "an integer >= 0"),
}


def read_state(checkpoint: Path) -> TrainState:
    """The checkpoint's TrainState, every value checked: a bad one is named with its file and key."""
    path = Path(checkpoint) / STATE_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable trainer state: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    for key in ("epoch", "step"):
        if key not in raw:
            raise CheckpointError(f"{path}: missing key '{key}'")
    for key, value in raw.items():
        if key not in _STATE_CHECKS:
            raise CheckpointError(f"{path}: unknown key '{key}'")
        check, expected = _STATE_CHECKS[key]
        if not check(value):
            raise CheckpointError(f"{path}: key '{key}': expected {expected}, got {value!r}")
    state = TrainState(**raw)
    if state.first_epoch > state.epoch:
        raise CheckpointError(f"{path}: key 'first_epoch': {state.first_epoch} is past key 'epoch' ({state.epoch})")
    return state


# --- finding checkpoints ------------------------------------------------------------------------


def is_step_checkpoint(path: Path) -> bool:
    return path.name.startswith(STEP_PREFIX)


def _progress(found: tuple[Path, TrainState]) -> tuple[int, int, bool]:
    """Order of training progress: epoch, then micro-batches into the next epoch."""
    path, state = found
    return state.epoch, state.batch, is_step_checkpoint(path)


def find_checkpoints(save_dir: str | Path) -> list[tuple[Path, TrainState]]:
    """Every directory named as a checkpoint that holds a state file (which claims it complete), with
    its state, oldest progress first. A directory without one is not a checkpoint of this project."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [
        (p, read_state(p))
        for p in save_dir.iterdir()
        if _NAME.fullmatch(p.name) and p.is_dir() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=_progress)


def missing_parts(checkpoint: Path, state: TrainState) -> list[str]:
    """What a checkpoint lacks of what its state file says it holds."""
    missing = []
    model = checkpoint / MODEL_DIR
    if not (model / "config.json").is_file() or not any(model.glob("*.safetensors")):
        missing.append(f"{MODEL_DIR}/ (config.json and weights)")
    if state.optimizer_saved and not (checkpoint / OPTIMIZER_FILE).is_file():
        missing.append(OPTIMIZER_FILE)
    missing += [rank_file(r) for r in range(state.ranks) if not (checkpoint / rank_file(r)).is_file()]
    return missing


def newest_checkpoint(save_dir: str | Path) -> tuple[Path, TrainState] | None:
    """The checkpoint with the most progress (epoch or step), checked complete.

    One that lacks a part its state file names (a file lost after the save: saves themselves are
    atomic) is refused, not skipped: resuming an older one, or with a fresh optimizer, would give
    other weights than the run it continues; the user decides.
    """
    found = find_checkpoints(save_dir)
    if not found:
        return None
    path, state = found[-1]
    missing = missing_parts(path, state)
    if missing:
        fallback = f"resume from {found[-2][0].name}" if len(found) > 1 else "start over"
        raise CheckpointError(
            f"{path}: incomplete checkpoint: {', '.join(missing)} missing although {STATE_FILE} "
            f"lists it; restore it, or remove {path.name} to {fallback}"
        )
    return path, state


def complete_checkpoints(save_dir: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every complete epoch checkpoint, oldest first."""
    return [
        (state.epoch, path)
        for path, state in find_checkpoints(save_dir)
        if not is_step_checkpoint(path) and not missing_parts(path, state)
    ]


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


# --- writing ------------------------------------------------------------------------------------


def write_checkpoint(
    save_dir: str | Path,
    name: str,
    rank: int,
    state: TrainState,
    write_main: Callable[[Path], None],
    rank_part: dict[str, Any] | None,
) -> Path:
    """Write checkpoint `name` atomically; every rank calls this (it synchronises them).

    Rank 0 runs write_main(directory) (model, processor, optimizer); every rank with a rank_part
    saves it as rank_{rank}.pt. Only when all ranks report their parts written does rank 0 write
    the state file, flush everything and rename the directory into place. On any error on any
    rank, every rank raises CheckpointError and the earlier checkpoints stay as they were.
    """
    save_dir = Path(save_dir)
    final = save_dir / name
    # every rank writes into the same temporary directory: the one named with rank 0's pid
    pid = int(all_reduce_host([float(os.getpid() if rank == 0 else 0)])[0])
    tmp = atomic.temp_path(final, pid)

    def agree(action: Callable[[], None]) -> None:
        error = None
        try:
            action()
        except Exception as e:  # any failure must reach the other ranks, or they would wait forever
            error = e
        failed = all_reduce_host([float(error is not None)])[0]
        if failed:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            cause = f"{error}" if error is not None else f"{int(failed)} other rank(s) could not write their part"
            raise CheckpointError(
                f"could not write checkpoint {final}: {cause} (earlier checkpoints are intact)"
            ) from error

    def start() -> None:
        if rank == 0:
            atomic.start_dir(final, pid)

    def parts() -> None:
        if rank_part is not None:
            torch.save(rank_part, tmp / rank_file(rank))
            atomic.fsync_file(tmp / rank_file(rank))  # each rank flushes what it wrote (a shared file system)
        if rank == 0:
            write_main(tmp)

    def finish() -> None:
        if rank == 0:
            # the state file marks completeness, so it is written last, once every part is there
            (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
            atomic.commit_dir(final, pid=pid)  # replaces a directory of that name (e.g. one without a state file)

    agree(start)
    agree(parts)
    agree(finish)
    return final


def write_atomic(path: Path, text: str) -> None:
    """Replace a small file whole (atomic.write_text); a failure is one CheckpointError naming the file."""
    try:
        atomic.write_text(path, text)
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {e.strerror or e}") from None


def prune(save_dir: str | Path, landed: Path, keep_last: int) -> list[Path]:
    """After `landed` is in place: drop the step checkpoints older than it and, with keep_last > 0,
    the epoch checkpoints beyond the newest keep_last, except the best one (highest accuracy
    recorded when it was saved, under save_only_improve). Returns what was dropped."""
    found = find_checkpoints(save_dir)
    landed_at = next(_progress(f) for f in found if f[0] == landed)
    dropped = [p for p, s in found if is_step_checkpoint(p) and _progress((p, s)) < landed_at]
    epochs = [(p, s) for p, s in found if not is_step_checkpoint(p)]
    if keep_last > 0 and len(epochs) > keep_last:
        scored = [(s.accuracy, s.epoch, p) for p, s in epochs if s.accuracy is not None]
        best = max(scored)[2] if scored else None
        dropped += [p for p, _ in epochs[:-keep_last] if p != best]
    for path in dropped:
        atomic.remove_dir(path)
    return dropped


# --- what resuming mid-epoch needs ---------------------------------------------------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states, in types torch.load(weights_only=True) accepts."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(keys), gauss],
        "numpy": [name, np_keys.tolist(), pos, has_gauss, cached],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _load_tensors(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable {what}: {_reason(e)}") from None


def read_optimizer_state(checkpoint: Path) -> dict[str, Any] | None:
    path = checkpoint / OPTIMIZER_FILE
    return _load_tensors(path, "optimizer state") if path.exists() else None


def read_rank_part(checkpoint: Path, rank: int) -> dict[str, Any]:
    return _load_tensors(checkpoint / rank_file(rank), "resume state")


# torch.load's weights_only refusal wraps its reason in advice, including turning the protection off
_ADVICE = (
    "weights_only",
    "Weights only",
    "safe_globals",
    "trust",
    "documentation",
    "file an issue",
    "two options",
    "recommended steps",
    "arbitrary code",
)


def _reason(error: Exception) -> str:
    """One line: the error's own first line, or for a weights_only refusal the reason it gives
    (e.g. "Trying to load unsupported GLOBAL posix.system ..."), without torch's advice."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    if "Weights only load failed" not in text:
        return text.splitlines()[0] if text else type(error).__name__
    sentences = re.split(r"(?<=\.)\s+|\n+", text.replace("WeightsUnpickler error:", "\n"))
    kept = [s.strip().rstrip(".") for s in sentences if s.strip() and not any(a in s for a in _ADVICE)]
    return "weights_only=True refused it: " + (kept[0] if kept else "it holds more than tensors")


# --- model directories and weight files ----------------------------------------------------------


@contextlib.contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Read a checkpoint or model directory: a file that vanishes or cannot be read meanwhile is one
    CheckpointError naming it (a run may be pruning or replacing that checkpoint as it is read)."""
    try:
        yield
    except OSError as e:
        raise CheckpointError(
            f"{path}: could not read {e.filename or 'it'}: {e.strerror or e} (a run may be pruning or replacing "
            "this checkpoint: read a checkpoint that run keeps, or copy it first)"
        ) from None


def is_model_dir(path: str | Path) -> bool:
    """A directory from_pretrained can load (an HF model dir, or a checkpoint's model/)."""
    return (Path(path) / "config.json").is_file()


def model_dir_of(path: str | Path) -> Path | None:
    """The HF model directory inside a checkpoint, the path itself if it is one, or the directory
    of a weights file inside one (its keys are in the saved layout, which from_pretrained maps)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if is_model_dir(path / MODEL_DIR):
        return path / MODEL_DIR
    if is_model_dir(path):
        return path
    return None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state-dict file: safetensors, or a torch file loaded with weights_only=True (no pickle code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint: {_reason(e)}") from None
    except Exception as e:  # weights_only refuses pickled code with UnpicklingError
        raise CheckpointError(
            f"{path}: refused or corrupt checkpoint (only tensors are loaded): {_reason(e)}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    return state


# The original's run.py adds its tokens in this order and resizes to len(tokenizer), so its files hold their rows
# as the last three, in this order; this project adds start, latent, end (add_latent_tokens). Its Coconut module
# also keeps the embeddings as `self.embedding`, so its state dict names that matrix twice: this key tells its
# files from a state dict of this project's Coconut (same prefix, no such key, this project's ids).
ORIGINAL_TOKEN_ORDER = ("start", "end", "latent")
ORIGINAL_EMBEDDING_ALIAS = "embedding.weight"


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, ids: LatentIds | None = None) -> bool:
    """Load a full state dict (optionally with the Coconut wrapper's prefix) with exact checks.

    Returns whether it is a Coconut checkpoint (the original's test: the wrapper's prefix), whose
    latent token rows are trained. A file of the original's Coconut has its latent rows in its own
    token order: they are moved to this model's ids for the same tokens, in the embeddings and the
    head, so rows follow tokens. A file with more embedding rows than the model grows the model's
    embeddings and head to its size first; an original file with fewer, loaded into a padded
    vocabulary, keeps the model's own rows past its end (the original's resize cut them off).
    """
    coconut = any(k.startswith(WRAPPER_PREFIX) for k in state)
    state = {k.removeprefix(WRAPPER_PREFIX): v for k, v in state.items()}
    matrix = model.get_input_embeddings().weight
    embedding = next(k for k, v in model.state_dict(keep_vars=True).items() if v is matrix)
    alias = state.pop(ORIGINAL_EMBEDDING_ALIAS, None) if coconut else None
    if alias is not None and not (embedding in state and torch.equal(alias, state[embedding])):
        raise CheckpointError(f"{source}: '{WRAPPER_PREFIX}{ORIGINAL_EMBEDDING_ALIAS}' is not '{embedding}'")
    rows = state.get(embedding)
    if rows is not None and rows.dim() == 2 and rows.shape[1] == matrix.shape[1]:
        grow_embeddings(model, rows.shape[0])
        if alias is not None:
            if ids is None:
                raise ValueError("an original Coconut file needs the tokenizer's latent ids (ids=)")
            own = model.state_dict()
            heads = (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
            for key in [k for k, v in model.state_dict(keep_vars=True).items() if any(v is h for h in heads)]:
                if key in state:
                    state[key] = _original_rows(state[key], own[key], ids, source, key)
    own = model.state_dict()
    for name, tensor in state.items():
        if name not in own:
            raise CheckpointError(f"{source}: unexpected tensor '{name}' (a checkpoint of another model?)")
        if own[name].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}"
            )
    missing = [k for k in own if k not in state]
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} tensors, first '{missing[0]}'")
    model.load_state_dict(state)
    return coconut


def _original_rows(saved: torch.Tensor, own: torch.Tensor, ids: LatentIds, source: str, key: str) -> torch.Tensor:
    """An original file's embedding or head matrix in the model's layout: the latent tokens' rows at the
    model's ids for them, and past the file's last row the model's own (padding) rows."""
    if saved.dim() != 2 or saved.shape[1] != own.shape[1] or saved.shape[0] > own.shape[0]:
        return saved  # reported as a shape mismatch
    n = saved.shape[0]
    theirs = {name: n - len(ORIGINAL_TOKEN_ORDER) + i for i, name in enumerate(ORIGINAL_TOKEN_ORDER)}
    ours = {name: getattr(ids, name) for name in ORIGINAL_TOKEN_ORDER}
    if set(theirs.values()) != set(ours.values()):
        raise CheckpointError(
            f"{source}: tensor '{key}': the latent tokens' rows {sorted(theirs.values())} (the original's: the "
            f"last three) are not this tokenizer's ids for them {sorted(ours.values())}; "
            "was the file trained from another model?"
        )
    out = torch.cat([saved, own[n:].to(saved.dtype)])
    for name in ORIGINAL_TOKEN_ORDER:
        out[ours[name]] = saved[theirs[name]]
    return out


def save_model(model: nn.Module, model_dir: Path, state: dict[str, torch.Tensor]) -> None:
    """save_pretrained of a full state dict of `model`; a LoRA model's plain weights (from_pretrained's
    layout) there, and its adapters in peft's format in model_dir/adapter (lora.py)."""
    plain, adapter = split_state(model, state)
    model.save_pretrained(model_dir, state_dict=plain)
    if adapter:
        save_adapter(model, model_dir, adapter)
