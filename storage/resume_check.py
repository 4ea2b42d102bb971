"""What a resumed run may change: a step checkpoint's data order and sample layout must be the run's own.

A step checkpoint saves how many micro-batches of its epoch were trained, and each rank's RNG states.
That position means the same samples only under the same data file, batch size, accumulation, ranks,
seed and sample layout (method, c_thought, stages, padding, uniform_prob, tiling, length policy): a
changed batch size would read the position in batches of the new size and repeat or skip samples.
So resuming one with any of these changed is refused, naming the key and both values. At an epoch
boundary the next epoch is derived afresh from (seed, epoch), so every key may change: the changes are
listed when the run starts. The model's weights always come from the checkpoint, so a changed model_id
or load_model_path is ignored; the config that `config.yaml` records then holds the checkpoint's.

The data file's content is fingerprinted (SHA-256) into each checkpoint's saved run record
(coconut_config.yaml's `data_order`): the same path with other records is a change too.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from storage.checkpoints import model_dir_of
from storage.saved_run import read_saved_run
from utils import CheckpointError, Config

# Keys that fix which samples a step checkpoint's position covers, and their layout
ORDER_KEYS = (
    "train_path",
    "batch_size_training",
    "gradient_accumulation_steps",
    "method",
    "c_thought",
    "epochs_per_stage",
    "max_latent_stage",
    "pad_latent_to_max",
    "uniform_prob",
    "seed",
    "debug",
    "max_length",
    "overlong",
    "multimodal",
    "prompt_format",
    "image_size",
    "max_tiles",
    "video_tiles",
    "num_frames",
    "model_id",
)
IGNORED_KEYS = ("model_id", "load_model_path")  # the checkpoint's weights are what a resumed run trains
NOT_COMPARED = ("resume", "num_epochs")  # said elsewhere (the `resume` note, the epoch count check)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: str | None) -> str | None:
    """The SHA-256 of a data file's content (computed once per file version), None without a file."""
    if path is None or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def _value(config: Config, key: str) -> Any:
    value = getattr(config, key)
    return str(Path(value).resolve()) if key == "train_path" and value else value


def data_order(config: Config, world_size: int) -> dict[str, Any]:
    """What a checkpoint's data order is made of, for its saved run record (see the module's docstring)."""
    record = {"world_size": world_size, "train_sha256": fingerprint(config.train_path)}
    return record | {key: _value(config, key) for key in ORDER_KEYS}


def check_resume(checkpoint: Path, model_dir: Path | None, step: bool, config: Config, world_size: int) -> list[str]:
    """Refuse resuming a step checkpoint whose data order this config changes; return the lines to print
    about an epoch checkpoint's changes and the keys ignored. `config` takes the checkpoint's model keys."""
    saved_run = read_saved_run(model_dir) if model_dir is not None else None
    if saved_run is None:
        return []  # not written by this project's trainer: nothing recorded to compare
    saved = saved_run.config
    order = saved_run.data_order or {}
    current = {"world_size": world_size, "train_sha256": fingerprint(config.train_path)}
    if step:
        if order.get("world_size") not in (None, world_size):
            raise _refused(checkpoint, "world size", order["world_size"], world_size)
        for key in ORDER_KEYS:
            was = order.get(key, _value(saved, key))
            if was != _value(config, key):
                raise _refused(checkpoint, key, was, _value(config, key))
        if order.get("train_sha256") not in (None, current["train_sha256"]):
            raise _refused(
                checkpoint,
                "train_path content",
                "SHA-256 " + order["train_sha256"][:12],
                "SHA-256 " + str(current["train_sha256"])[:12],
            )
    lines = []
    changed = [
        f"{key} {getattr(saved, key)!r} -> {getattr(config, key)!r}"
        for key in saved.to_dict()
        if key not in IGNORED_KEYS + NOT_COMPARED and getattr(saved, key) != getattr(config, key)
    ]
    if order.get("train_sha256") not in (None, current["train_sha256"]):
        changed.append(f"the content of {config.train_path}")
    if changed:
        lines.append(f"changed since {checkpoint.name}: " + ", ".join(changed))
    for key in IGNORED_KEYS:
        if getattr(saved, key) != getattr(config, key):
            lines.append(
                f"{key} {getattr(config, key)!r} is ignored: the run resumes {checkpoint.name}'s weights "
                f"(its {key}: {getattr(saved, key)!r}, which config.yaml records)"
            )
            setattr(config, key, getattr(saved, key))
    return lines


def _refused(checkpoint: Path, key: str, was: Any, now: Any) -> CheckpointError:
    return CheckpointError(
        f"{checkpoint}: a mid-epoch checkpoint saved with {key} {was!r}, this run has {now!r}: its position in the "
        f"epoch would cover other samples; resume with {key} {was!r}, or remove {checkpoint.name} to resume from "
        "the epoch checkpoint before it"
    )


def eval_only_stage(config: Config) -> str | None:
    """Eval-only of a checkpoint of this project, `resume` left at 0: evaluate at the stage it was trained to.

    The original evaluates at the stage of epoch `resume` (so stage 0 when it is not given), which for a
    later-stage checkpoint silently evaluates without its latents; --infer already takes the checkpoint's
    stage. `resume` > 0 keeps the original's meaning. Sets config.resume to the first epoch of that stage
    and returns the line saying so (None when nothing changes).
    """
    if not config.only_eval or config.resume or not config.load_model_path:
        return None
    model_dir = model_dir_of(config.load_model_path)
    saved = read_saved_run(model_dir) if model_dir is not None else None
    if saved is None or config.stage(saved.stage * config.epochs_per_stage) == 0:
        return None
    config.resume = saved.stage * config.epochs_per_stage
    return (
        f"eval only: evaluating at stage {saved.stage}, the stage {model_dir} was trained to "
        "(set resume to evaluate at another epoch's stage)"
    )
