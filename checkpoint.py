"""Checkpoints: HF-format model + processor, plus what resuming needs, written atomically.

A checkpoint is save_dir/checkpoint_{epoch}/ with
  model/               save_pretrained (safetensors) + processor/tokenizer: loads with from_pretrained
  optimizer.pt         full (unsharded) optimizer state, tensors only (loaded with weights_only=True)
  trainer_state.json   epoch, global step, best accuracy
It is written into a hidden temporary directory and renamed into place only when complete, so a
kill at any moment leaves either the previous checkpoints or the new one — never a half one that
looks complete. Temporary leftovers are ignored and removed on the next start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from errors import CheckpointError  # defined there so that run.py refuses bad input before torch loads

PREFIX = "checkpoint_"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
MODEL_DIR = "model"
WRAPPER_PREFIX = "base_causallm."


@dataclasses.dataclass
class TrainState:
    """Progress that resuming restores; RNG streams are re-derived from (seed, epoch)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_acc: float = 0.0
    train_loss: float | None = None  # of the last completed epoch, for its metrics line


def complete_checkpoints(save_dir: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every complete checkpoint, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = []
    for path in save_dir.iterdir():
        suffix = path.name[len(PREFIX):]
        if path.name.startswith(PREFIX) and suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    found = complete_checkpoints(save_dir)
    return found[-1][1] if found else None


def remove_partial(save_dir: str | Path) -> None:
    """Delete temporary directories that a killed save left behind."""
    save_dir = Path(save_dir)
    if save_dir.is_dir():
        for path in save_dir.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    save_dir: str | Path,
    epoch: int,
    base_model: nn.Module,
    model_state: dict[str, torch.Tensor],
    processor: Any,
    optimizer_state: dict[str, Any] | None,
    state: TrainState,
) -> Path:
    """Write checkpoint_{epoch} atomically; on any error the previous checkpoints stay as they were."""
    save_dir = Path(save_dir)
    final = save_dir / f"{PREFIX}{epoch}"
    tmp = save_dir / f"{TMP_PREFIX}{PREFIX}{epoch}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        base_model.save_pretrained(tmp / MODEL_DIR, state_dict=model_state)
        processor.save_pretrained(tmp / MODEL_DIR)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        # the state file marks completeness, so it is written last
        (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
        _fsync_tree(tmp)
        if final.exists():  # saving the same epoch again (e.g. a rerun): swap, then drop the old one
            old = save_dir / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {e} (earlier checkpoints are intact)") from e
    return final


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename makes the checkpoint visible (power loss, not just kill)."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def read_state(checkpoint: Path) -> TrainState:
    try:
        return TrainState(**json.loads((checkpoint / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{checkpoint / STATE_FILE}: unreadable trainer state: {e}") from None


def read_optimizer_state(checkpoint: Path) -> dict[str, Any] | None:
    path = checkpoint / OPTIMIZER_FILE
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable optimizer state: {_reason(e)}") from None


def _reason(error: Exception) -> str:
    """One line. torch.load's weights_only refusal is a page of advice (including turning the
    protection off); keep what it refused."""
    text = str(error).strip()
    refused = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\.\s|\n|$)", text)
    if refused:
        return f"weights_only=True refused it: {refused.group(1)}"
    return text.splitlines()[0] if text else type(error).__name__


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
        raise CheckpointError(f"{path}: refused or corrupt checkpoint (only tensors are loaded): {_reason(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a full state dict (optionally with the Coconut wrapper's prefix) with exact checks."""
    state = {k.removeprefix(WRAPPER_PREFIX): v for k, v in state.items()}
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
