"""COCONUT-VL command line.

    torchrun --nproc_per_node N run.py args/coconut_vl3_1b.yaml   # train (FSDP2 when N > 1)
    python run.py args/demo.yaml                                   # one process, CPU or one GPU
    python run.py --export CHECKPOINT_DIR OUT_DIR                  # plain HF model + processor
    python run.py --infer CHECKPOINT --image PATH --question TEXT  # answer, with the thoughts (inference.py)
"""

from __future__ import annotations

import argparse
import sys

from checkpoint import CheckpointError
from dataset import DataError
from model_setup import ModelSetupError
from utils import Config, ConfigError, check_launch, check_paths, load_config

TINY_PREFIX = "tiny:"

# Errors a user can fix from the message alone: printed as one line, exit status 2.
USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelSetupError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--infer" in argv:  # inference has options of its own
        from inference import cli

        return cli(argv)
    parser = argparse.ArgumentParser(description="COCONUT continuous-thought training for InternVL3 and causal LMs")
    parser.add_argument("config_file", nargs="?", help="YAML run configuration")
    parser.add_argument("--export", nargs=2, metavar=("CHECKPOINT", "OUT_DIR"),
                        help="write a checkpoint's model + processor as a plain HF directory and exit")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                        help="with --export: weights (default: training's)")
    args = parser.parse_args(argv)
    if (args.config_file is None) == (args.export is None):
        parser.error("give a config file, or --export CHECKPOINT OUT_DIR")
    try:
        if args.export:
            from export import export_checkpoint

            print(export_checkpoint(*args.export, dtype=args.dtype))
            return 0
        config = load_config(args.config_file)
        check_paths(config, args.config_file)
        check_launch(config, args.config_file)
        maybe_build_demo_model(config)
        from trainer import run  # heavy imports only after the config is known to be good

        run(config)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def one_line(error: Exception) -> str:
    """The error's own message. A DataLoader worker's error is re-raised in the main process with
    the worker's traceback as its message ("Caught ... Original Traceback ..."); the original
    message is that traceback's last line, after the exception's name."""
    text = str(error).strip()
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text


def maybe_build_demo_model(config: Config) -> None:
    """model_id "tiny:DIR" names the offline tiny InternVL, built into DIR on first use."""
    if config.model_id and config.model_id.startswith(TINY_PREFIX):
        from multimodal.tiny_model import ensure_tiny_model

        config.model_id = str(ensure_tiny_model(config.model_id.removeprefix(TINY_PREFIX)))


if __name__ == "__main__":
    sys.exit(main())
