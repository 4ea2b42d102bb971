"""COCONUT-VL command line.

    torchrun --nproc_per_node N run.py args/coconut_vl3_1b.yaml   # train (FSDP2 when N > 1)
    python run.py args/demo.yaml                                   # one process, CPU or one GPU
    python run.py args/demo.yaml num_epochs=2 lr=1e-4              # KEY=VALUE overrides, values read as YAML
    python run.py --export CHECKPOINT_DIR OUT_DIR [--dtype D]      # plain HF model + processor
    python run.py --infer CHECKPOINT --image PATH --question TEXT  # answer, with the thoughts (inference.py)

Only light modules are imported at the top: a bad config or override is refused before torch and
transformers load (they take seconds), on every rank of a torchrun launch alike.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from utils import TINY_PREFIX, USER_ERRORS, Config, Origin, check_launch, check_paths, load_config

__all__ = ["USER_ERRORS", "load_config", "main", "one_line"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="COCONUT continuous-thought training for InternVL3 and causal LMs")
    parser.add_argument("config_file", nargs="?", help="YAML run configuration")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config keys set on top of the file, values read as YAML (e.g. lr=1e-4 name=try2)",
    )
    parser.add_argument(
        "--export",
        nargs=2,
        metavar=("CHECKPOINT", "OUT_DIR"),
        help="write a checkpoint's model + processor as a plain HF directory and exit",
    )
    parser.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), help="with --export: weights (default: training's)"
    )
    return parser


def train_mode(args: argparse.Namespace) -> int:
    """The default mode: validate the config (cheap, light imports), then train or evaluate."""
    config = load_config(args.config_file, args.overrides)
    origin = Origin(args.config_file, tuple(args.overrides))
    check_paths(config, origin)
    check_launch(config, origin)
    maybe_build_demo_model(config)
    from training.trainer import run  # heavy imports only after the config is known to be good

    run(config)
    return 0


def export_mode(args: argparse.Namespace) -> int:
    from deploy.export import export_checkpoint

    print(export_checkpoint(*args.export, dtype=args.dtype))
    return 0


# Modes chosen by a flag (`--NAME ...`) instead of a config file; a new mode is a parser argument plus an entry here.
FLAG_MODES: dict[str, Callable[[argparse.Namespace], int]] = {"export": export_mode}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--infer" in argv:  # inference has options of its own
        from deploy.inference import cli

        return cli(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dtype is not None and args.export is None:
        parser.error("--dtype goes with --export")
    flags = [name for name in FLAG_MODES if getattr(args, name) is not None]
    if len(flags) > 1:
        parser.error(f"choose one of {', '.join('--' + f for f in flags)}")
    if flags and (args.config_file is not None or args.overrides):
        parser.error(f"--{flags[0]} takes no config file or KEY=VALUE overrides")
    if not flags and args.config_file is None:
        parser.error(f"give a config file, or one of {', '.join('--' + f for f in FLAG_MODES)}")
    mode = FLAG_MODES[flags[0]] if flags else train_mode
    try:
        return mode(args)
    except USER_ERRORS as e:
        # One write for the whole line: under torchrun the ranks share one stderr, and print's two
        # writes (text, then newline; separate when unbuffered) let another rank's line in between.
        sys.stderr.write(f"error: {one_line(e)}\n")
        return 2


def one_line(error: Exception) -> str:
    """The error's own message on one line. A DataLoader worker's error is re-raised in the main process
    with the worker's traceback as its message ("Caught ... Original Traceback ..."); the original
    message is that traceback's last line, after the exception's name. Messages quoted from libraries
    (transformers, huggingface_hub) can span lines: their lines are joined."""
    text = str(error).strip()
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def maybe_build_demo_model(config: Config) -> None:
    """model_id "tiny:DIR" names the offline tiny InternVL, built into DIR on first use."""
    if config.model_id and config.model_id.startswith(TINY_PREFIX):
        from multimodal.tiny_model import ensure_tiny_model

        config.model_id = str(ensure_tiny_model(config.model_id.removeprefix(TINY_PREFIX)))


if __name__ == "__main__":
    sys.exit(main())
