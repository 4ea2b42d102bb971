"""What a trained model directory records about the run that produced it.

Every checkpoint's `model/` directory, and every export, holds `coconut_config.yaml`: the resolved
run config plus what it was trained to: epoch, curriculum stage, method and the latent token ids.
Inference, export and later runs (which must know whether the latent token rows were trained) read
it instead of asking the user to repeat the recipe. It lives in the model directory so that
anything that copies that directory carries it along.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from utils import Config, ConfigError, config_from_dict

SAVED_RUN_FILE = "coconut_config.yaml"


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """The run config of a model directory and the point of training it was saved at."""

    config: Config
    epoch: int  # epochs completed
    stage: int  # curriculum stage of the last completed epoch
    latent_token_ids: dict[str, int]  # {"start": .., "latent": .., "end": ..}
    # what a checkpoint's data order was made of (resume_check.data_order); None in records written before it
    data_order: dict[str, Any] | None = None

    @property
    def method(self) -> str:
        return self.config.method

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "stage": self.stage,
            "method": self.method,
            "latent_token_ids": dict(self.latent_token_ids),
        } | ({"data_order": self.data_order} if self.data_order is not None else {})


def write_saved_run(model_dir: str | Path, run: SavedRun) -> Path:
    """Write the record into model_dir (which the caller writes atomically as a whole)."""
    path = Path(model_dir) / SAVED_RUN_FILE
    path.write_text(yaml.safe_dump(run.to_dict(), sort_keys=False, allow_unicode=True))
    return path


def read_saved_run(model_dir: str | Path) -> SavedRun | None:
    """The record of model_dir, or None for a directory this project did not write (a hub model)."""
    path = Path(model_dir) / SAVED_RUN_FILE
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        config = config_from_dict(raw["config"], f"{path}: config")
        ids = {k: int(raw["latent_token_ids"][k]) for k in ("start", "latent", "end")}
        epoch, stage = raw["epoch"], raw["stage"]
        if not (isinstance(epoch, int) and isinstance(stage, int)) or epoch < 0 or stage < 0:
            raise ValueError(f"epoch and stage must be integers >= 0, got {epoch!r}, {stage!r}")
        order = raw.get("data_order")
        if order is not None and not isinstance(order, dict):
            raise ValueError(f"data_order must be a mapping, got {order!r}")
        return SavedRun(config, epoch, stage, ids, order)
    except ConfigError:
        raise
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable saved run record: {type(e).__name__}: {e}") from None
