"""Typed, validated run configuration (YAML file + key=value overrides → Config) and small shared helpers.

Every key of the original COCONUT recipe keeps its name and meaning; the multimodal port adds
its own keys. All validation happens here, before any model is loaded, so a typo costs seconds.
This module imports neither torch nor numpy: run.py refuses a bad config before they load.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import random
import types
import typing
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported with the file (or override) and key it concerns."""


class DataError(ValueError):
    """A problem with an input file, reported with its path, record index and key."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read, named with its path."""


class ModelSetupError(ValueError):
    """A model, tokenizer or checkpoint that does not fit the run."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops before any checkpoint holds such weights."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelSetupError, TrainingDiverged)


DEFAULT_MULTIMODAL_MODEL = "OpenGVLab/InternVL3-1B-Pretrained"
METHOD_KEYS = ("coconut", "cot", "no_thoughts", "no_cot")
PREDICTIONS_DIR = "predictions"  # save_path/name/predictions/epoch_N.jsonl
TINY_PREFIX = "tiny:"  # model_id "tiny:DIR": the offline tiny InternVL, built into DIR on first use
# Upper bound of max_tiles and video_tiles (tiles of one image / one video frame). 128 InternVL3 tiles of 256
# tokens fill the language model's whole 32768-token context, so more can never train; and transformers' tile-grid
# search loops over max_tiles² grids (max_tiles: 100000 hangs it). InternVL itself trains with 12.
MAX_TILES = 128
# InternVL's LoRA targets (internvl_chat's wrap_llm_lora for Qwen2/Llama; wrap_backbone_lora for InternViT, whose
# fused attn.qkv and attn.proj are q_proj, k_proj, v_proj and projection_layer in transformers' native layout).
LLM_LORA_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.down_proj",
    "mlp.up_proj",
)
BACKBONE_LORA_TARGETS = (
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.projection_layer",
    "mlp.fc1",
    "mlp.fc2",
)
LORA_KEYS = (
    "use_llm_lora",
    "use_backbone_lora",
    "llm_lora_alpha",
    "backbone_lora_alpha",
    "lora_dropout",
    "llm_lora_target_modules",
    "backbone_lora_target_modules",
)


@dataclasses.dataclass
class Config:
    """One training / evaluation run. Field names are the YAML keys."""

    # --- original COCONUT keys -------------------------------------------------------------
    project: str = "coconut-vl"
    save_path: str = "checkpoints"
    name: str = "run"
    only_eval: bool = False
    coconut: bool = False
    cot: bool = False
    no_thoughts: bool = False
    no_cot: bool = False
    c_thought: int = 1
    epochs_per_stage: int = 1
    max_latent_stage: int = 3
    pad_latent_to_max: bool = False
    save_only_improve: bool = False
    uniform_prob: float = 0.0
    model_id: str | None = None
    load_model_path: str | None = None
    seed: int = 0
    resume: int = 0
    bf16: bool = False
    train_path: str | None = None
    val_path: str | None = None
    reset_optimizer: bool = False
    batch_size_training: int = 1
    debug: bool = False
    gradient_accumulation_steps: int = 1
    num_epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    # --- multimodal ------------------------------------------------------------------------
    multimodal: bool = False
    image_dir: str | None = None
    allow_external_images: bool = False
    max_tiles: int = 12
    image_size: int = 448
    video_tiles: int = 1
    num_frames: int = 8
    prompt_format: Literal["plain", "internvl2_5"] = "plain"
    max_length: int | None = None
    overlong: Literal["error", "drop"] = "error"
    # --- model set-up ----------------------------------------------------------------------
    fp16: bool = False
    trust_remote_code: bool = False
    model_cache_dir: str = "~/.cache/coconut_vl"
    freeze_backbone: bool = False
    freeze_mlp: bool = False
    freeze_llm: bool = False
    activation_checkpointing: bool = False
    compile_latent_passes: Literal["default", "reduce-overhead"] | None = None
    latent_column_multiple: int = 1
    # --- LoRA (peft), InternVL's keys and defaults -----------------------------------------
    use_llm_lora: int = 0  # rank of the language model's adapters; 0: off
    use_backbone_lora: int = 0  # rank of the vision backbone's adapters; 0: off
    llm_lora_alpha: int | None = None  # None: 2 × use_llm_lora, as InternVL
    backbone_lora_alpha: int | None = None  # None: 2 × use_backbone_lora
    lora_dropout: float = 0.05
    llm_lora_target_modules: list[str] = dataclasses.field(default_factory=lambda: list(LLM_LORA_TARGETS))
    backbone_lora_target_modules: list[str] = dataclasses.field(default_factory=lambda: list(BACKBONE_LORA_TARGETS))
    # --- optimisation and evaluation -------------------------------------------------------
    lr_scheduler: Literal["constant", "cosine"] = "constant"
    warmup_ratio: float = 0.0
    max_grad_norm: float = 0.0
    batch_size_eval: int = 8
    max_new_tokens: int | None = None  # None: the original's rule, 64 if "gsm" is in val_path, else 128
    decode_cuda_graph: bool = False
    num_workers: int = 1
    # --- checkpoints -----------------------------------------------------------------------
    save_every_steps: int = 0  # resumable mid-epoch checkpoints every N optimizer steps; 0: off
    save_total_limit: int = 0  # keep the newest N epoch checkpoints (+ the best); 0: keep all
    # --- logging and distributed -----------------------------------------------------------
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    # where metrics go besides metrics.jsonl / train_log.jsonl and the console (training/metric_logger.py)
    metrics_sinks: list[Literal["wandb", "tensorboard"]] = dataclasses.field(default_factory=lambda: ["wandb"])
    log_every: int = 1
    dist_timeout_s: int = 600
    # ranks one copy of the model is sharded over (FSDP2 on a replicate x shard mesh: hybrid sharding, e.g.
    # the GPUs of one node); 0: all ranks (plain FSDP2)
    fsdp_shard_size: int = 0

    def __post_init__(self) -> None:
        if self.multimodal and self.model_id is None:
            self.model_id = DEFAULT_MULTIMODAL_MODEL
        if self.load_model_path in ("None", ""):
            self.load_model_path = None
        if self.max_new_tokens is None:
            self.max_new_tokens = 64 if "gsm" in (self.val_path or "") else 128

    @property
    def method(self) -> str:
        """The method key that is on, or "pause" with all four off.

        "pause" is the paper's pause-as-thought baseline, as the original's run.py runs it with every
        method key false: the plain causal LM (no latent feedback) on the Coconut curriculum's sequences,
        whose <|latent|> tokens stay ordinary input tokens.
        """
        return next((k for k in METHOD_KEYS if getattr(self, k)), "pause")

    @property
    def uses_markers(self) -> bool:
        """<|start-latent|> / <|end-latent|> exist for coconut and pause (the original's no_special_marker
        is cot or no_cot or no_thoughts)."""
        return self.method in ("coconut", "pause")

    @property
    def feeds_thoughts(self) -> bool:
        """Only coconut feeds last hidden states back as the latents' input embeddings."""
        return self.method == "coconut"

    @property
    def thoughts_per_step(self) -> int:
        """no_thoughts keeps the curriculum but replaces each step by zero thoughts."""
        return 0 if self.method == "no_thoughts" else self.c_thought

    @property
    def uses_lora(self) -> bool:
        return bool(self.use_llm_lora or self.use_backbone_lora)

    def lora_settings(self) -> dict[str, Any]:
        """The keys that shape the adapters: a run resumes its own only with the same values."""
        return {k: getattr(self, k) for k in LORA_KEYS}

    def stage(self, epoch: int) -> int:
        """Curriculum stage of an epoch; cot and no_cot stay at stage 0."""
        return 0 if self.method in ("cot", "no_cot") else epoch // self.epochs_per_stage

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_POSITIVE = (
    "epochs_per_stage",
    "batch_size_training",
    "gradient_accumulation_steps",
    "num_epochs",
    "max_tiles",
    "image_size",
    "batch_size_eval",
    "max_new_tokens",
    "video_tiles",
    "num_frames",
    "log_every",
    "dist_timeout_s",
    "latent_column_multiple",
)
_NON_NEGATIVE = (
    "max_latent_stage",
    "resume",
    "num_workers",
    "save_every_steps",
    "save_total_limit",
    "fsdp_shard_size",
    "use_llm_lora",
    "use_backbone_lora",
)
_HINTS = typing.get_type_hints(Config)
# Every float key must be a finite number >= 0: `lr: .inf` trained to NaN weights, and `max_grad_norm: .nan`
# switched clipping off (NaN compares false with everything, so no range check catches it).
_FLOAT_KEYS = tuple(k for k, t in _HINTS.items() if t is float or float in typing.get_args(t))


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a config's keys come from, for error messages: the file, or a KEY=VALUE override on top of it."""

    file: str
    overrides: Sequence[str] = ()

    def of(self, *keys: object) -> str:
        """The file, followed by the overrides (if any) that set one of keys."""
        texts = [text for text in self.overrides if _override_key(text) in keys]
        return ": ".join([self.file, *(f"override '{text}'" for text in texts)])


def _override_key(text: str) -> str:
    return text.partition("=")[0].strip()


def latest_overrides(texts: Sequence[str]) -> tuple[str, ...]:
    """The KEY=VALUE overrides that apply: of a key given twice, the last (as HF, torchtune and ms-swift
    read a command line); texts without a key are kept, for the config check to refuse."""
    last = {_override_key(text): i for i, text in enumerate(texts) if "=" in text and _override_key(text)}
    return tuple(t for i, t in enumerate(texts) if last.get(_override_key(t), i) == i or "=" not in t)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then `key: ...` overrides on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice (first at line {first_line[key] + 1})", key_node.start_mark
                )
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:  # its own message spans lines (with a caret drawing): keep one
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML: {problem}{at}") from None


def _parse_overrides(origin: Origin) -> dict[str, Any]:
    """KEY=VALUE texts → {key: value}, each value read as YAML, as it would be in the file; a key given
    twice takes the last value."""
    values: dict[str, Any] = {}
    for text in origin.overrides:
        where = f"{origin.file}: override '{text}'"
        key, equals, value = text.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ConfigError(f"{where}: expected KEY=VALUE")
        values[key] = _read_yaml(value, where)
    return values


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return value coerced to the annotated type, or raise with the expected type named."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise errors[0] if len(errors) == 1 else ConfigError(f"expected one of {args}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"expected one of {list(args)}, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string: accept numeric strings for float keys.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}")
        return value
    if origin is list and len(args) == 1 and typing.get_origin(args[0]) is Literal:
        names = list(typing.get_args(args[0]))
        if not isinstance(value, list) or not all(v in names for v in value) or len(set(value)) < len(value):
            raise ConfigError(f"expected a list of distinct names from {names}, got {value!r}")
        return value
    if origin is list and args == (str,):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"expected a non-empty list of names, got {value!r}")
        return list(value)
    raise TypeError(f"unsupported annotation {annotation} for {key}")


def config_from_dict(raw: dict[str, Any], source: str = "<config>", overrides: Sequence[str] = ()) -> Config:
    """Build and validate a Config from raw (read from `source`) with KEY=VALUE overrides on top.

    Overrides are checked exactly as keys of the file; every error names the source, the override if one
    set the key, and the key.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(raw).__name__}")
    origin = Origin(source, latest_overrides(overrides))
    values: dict[str, Any] = {}
    for key, value in {**raw, **_parse_overrides(origin)}.items():
        if key not in _HINTS:
            close = difflib.get_close_matches(str(key), _HINTS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{origin.of(key)}: unknown key '{key}'{hint}")
        try:
            values[key] = _check_type(key, value, _HINTS[key])
        except ConfigError as e:
            raise ConfigError(f"{origin.of(key)}: key '{key}': {e}") from None
    config = Config(**values)
    _check_values(config, origin)
    return config


def _check_values(config: Config, origin: Origin) -> None:
    at = origin.of
    on = [k for k in METHOD_KEYS if getattr(config, k)]
    if len(on) > 1:
        raise ConfigError(f"{at(*on)}: keys {on}: choose at most one method of {list(METHOD_KEYS)}")
    if config.bf16 and config.fp16:
        raise ConfigError(f"{at('bf16', 'fp16')}: keys 'bf16' and 'fp16': choose one precision")
    for key in _FLOAT_KEYS:
        value = getattr(config, key)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{at(key)}: key '{key}': must be a finite number >= 0, got {value}")
    for key in _POSITIVE:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{at(key)}: key '{key}': must be > 0, got {getattr(config, key)}")
    if config.c_thought < 0:  # 0 as in the original's gsm_cot.yaml: a step becomes no thoughts
        raise ConfigError(
            f"{at('c_thought')}: key 'c_thought': must be > 0, or 0 for no thoughts, got {config.c_thought}"
        )
    for key in _NON_NEGATIVE:
        if getattr(config, key) < 0:
            raise ConfigError(f"{at(key)}: key '{key}': must be >= 0, got {getattr(config, key)}")
    for key in ("max_tiles", "video_tiles"):
        if getattr(config, key) > MAX_TILES:
            raise ConfigError(
                f"{at(key)}: key '{key}': at most {MAX_TILES} (that many tiles of 256 tokens fill "
                f"InternVL3's whole context), got {getattr(config, key)}"
            )
    if not 0.0 <= config.uniform_prob <= 1.0:
        raise ConfigError(f"{at('uniform_prob')}: key 'uniform_prob': must be in [0, 1], got {config.uniform_prob}")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise ConfigError(f"{at('warmup_ratio')}: key 'warmup_ratio': must be in [0, 1), got {config.warmup_ratio}")
    for key in ("llm_lora_alpha", "backbone_lora_alpha"):
        if getattr(config, key) is not None and getattr(config, key) <= 0:
            raise ConfigError(f"{at(key)}: key '{key}': must be > 0, got {getattr(config, key)}")
    if config.lora_dropout >= 1.0:
        raise ConfigError(f"{at('lora_dropout')}: key 'lora_dropout': must be in [0, 1), got {config.lora_dropout}")
    if config.use_backbone_lora and not config.multimodal:
        raise ConfigError(
            f"{at('use_backbone_lora')}: key 'use_backbone_lora': only multimodal (InternVL) models "
            "have a vision backbone"
        )
    if config.max_length is not None and config.max_length <= 0:
        raise ConfigError(f"{at('max_length')}: key 'max_length': must be > 0, got {config.max_length}")
    name = PurePath(config.name)
    if not name.parts or name.is_absolute() or ".." in name.parts:  # checkpoints (and clean-up) stay in save_path
        raise ConfigError(
            f"{at('name')}: key 'name': must name a directory inside save_path (a relative path "
            f"without '..'), got {config.name!r}"
        )
    if config.model_id is None:
        raise ConfigError(f"{at('model_id')}: key 'model_id': required for text-only runs (multimodal: false)")
    if config.only_eval and config.load_model_path is None:
        raise ConfigError(f"{at('load_model_path')}: key 'load_model_path': only_eval needs a checkpoint to evaluate")
    if not config.only_eval and config.train_path is None:
        raise ConfigError(f"{at('train_path')}: key 'train_path': required unless only_eval is true")
    if config.val_path is None:
        raise ConfigError(f"{at('val_path')}: key 'val_path': required")
    if config.multimodal and config.image_dir is None:
        raise ConfigError(f"{at('image_dir')}: key 'image_dir': required when multimodal is true")


def is_local_model_path(model_id: str) -> bool:
    """A hub id is NAME or ORG/NAME; an absolute path, ./, ../, ~ or a deeper path can only be a local directory."""
    return Path(model_id).is_absolute() or model_id.startswith((".", "~")) or model_id.count("/") > 1


def _origin(source: str | Origin) -> Origin:
    return source if isinstance(source, Origin) else Origin(source)


def check_paths(config: Config, source: str | Origin = "<config>") -> None:
    """Check that inputs exist and save_path is writable — cheap, so it runs before model loading."""
    at = _origin(source).of
    needed = {"val_path": config.val_path, "load_model_path": config.load_model_path}
    if not config.only_eval:
        needed["train_path"] = config.train_path
    if config.multimodal:
        needed["image_dir"] = config.image_dir
    for key, path in needed.items():
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{at(key)}: key '{key}': path does not exist: {path}")
        if key in ("train_path", "val_path") and path is not None and Path(path).is_dir():
            raise ConfigError(f"{at(key)}: key '{key}': {path} is a directory, not a JSON data file")
    model_id = config.model_id
    if model_id is not None and not model_id.startswith(TINY_PREFIX):
        local = Path(model_id).expanduser()
        if (local.exists() or is_local_model_path(model_id)) and not local.is_dir():
            raise ConfigError(
                f"{at('model_id')}: key 'model_id': no model directory {model_id} (a local path, not a hub id)"
            )
    save_dir = Path(config.save_path)
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe = save_dir / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{at('save_path')}: key 'save_path': not writable: {save_dir} ({e})") from None
    run_dir = (save_dir / config.name).resolve()  # name has no '..': only a symlink can lead out
    if run_dir == save_dir.resolve() or not run_dir.is_relative_to(save_dir.resolve()):
        raise ConfigError(
            f"{at('name')}: key 'name': {save_dir / config.name} resolves to {run_dir}, outside save_path {save_dir}"
        )
    for directory in (run_dir, run_dir / PREDICTIONS_DIR):
        if directory.exists() and not directory.is_dir():
            raise ConfigError(
                f"{at('name')}: key 'name': {directory} is a file where the run writes a directory; move it, "
                "or give the run another save_path/name"
            )


def check_launch(config: Config, source: str | Origin = "<config>") -> None:
    """Keys that depend on how the run is launched (under torchrun, on a GPU), before model loading."""
    at = _origin(source).of
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if config.compile_latent_passes == "reduce-overhead" and ranks > 1:
        raise ConfigError(
            f"{at('compile_latent_passes')}: key 'compile_latent_passes': reduce-overhead (CUDA graphs) runs in "
            "one process only; under torchrun use 'default'"
        )
    lora = [k for k in ("use_llm_lora", "use_backbone_lora") if getattr(config, k)]
    if lora and importlib.util.find_spec("peft") is None:  # finds it without importing it (nor torch)
        raise ConfigError(f"{at(*lora)}: key '{lora[0]}': LoRA needs peft, which is not installed (pip install peft)")
    if config.fsdp_shard_size and ranks % config.fsdp_shard_size:
        raise ConfigError(
            f"{at('fsdp_shard_size')}: key 'fsdp_shard_size': {config.fsdp_shard_size} does not divide the "
            f"{ranks} ranks of this launch (each copy of the model is sharded over that many ranks)"
        )
    if config.decode_cuda_graph:
        import torch  # only for this key: the other checks stay light

        if ranks > 1 or not torch.cuda.is_available():
            raise ConfigError(
                f"{at('decode_cuda_graph')}: key 'decode_cuda_graph': CUDA graph decoding needs one process on a GPU"
            )


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config file, apply KEY=VALUE overrides (values read as YAML) and validate the result."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from None
    raw = _read_yaml(text, str(path))
    return config_from_dict({} if raw is None else raw, str(path), overrides)


def set_seed(seed: int) -> None:
    """Seed every RNG the run draws from, and pin what the original's set_seed pins: PYTHONHASHSEED (for the
    interpreters started after this, e.g. spawned data workers) and cuDNN's deterministic, non-benchmarked
    kernels. numpy and torch are imported here, not at the top: run.py reads this module to validate a
    config before they load."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device's generator too
    os.environ["PYTHONHASHSEED"] = str(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
