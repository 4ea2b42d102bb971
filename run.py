"""COCONUT-VL command line: one parser for every mode.

    torchrun --nproc_per_node N run.py args/coconut_vl3_1b.yaml   # train (FSDP2 when N > 1)
    python run.py args/demo.yaml                                   # one process, CPU or one GPU
    python run.py args/demo.yaml num_epochs=2 --lr 1e-4            # overrides: key=value, --key value, --key=value
    python run.py --infer CHECKPOINT --image PATH --question TEXT  # answer, with the thoughts
    python run.py --export CHECKPOINT_DIR OUT_DIR [--dtype D]      # plain HF model + processor
    python run.py --serve CHECKPOINT [--host H] [--port P]         # OpenAI-compatible latent server

A mode other than training is one entry of MODES: its flag, its own options and the function that runs it.
Only light modules are imported at the top: a bad config, override or option is refused before torch and
transformers load (they take seconds), on every rank of a torchrun launch alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

from utils import (
    TINY_PREFIX,
    USER_ERRORS,
    Config,
    Origin,
    check_launch,
    check_paths,
    latest_overrides,
    load_config,
)

__all__ = ["MODES", "USER_ERRORS", "Mode", "build_parser", "load_config", "main", "one_line"]

CONFIG_KEYS = frozenset(field.name for field in dataclasses.fields(Config))
OVERRIDES_HELP = """\
config overrides (training):
  key=value, --key value and --key=value set a config key on top of the file, its value read as YAML
  (lr=1e-4 --name try2 --max_latent_stage=3; dashes in --key read as underscores). A key given twice:
  the last one wins. The start-up summary lists the overrides that applied."""


def option(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """A mode's own option: argparse's add_argument arguments."""
    return flags, kwargs


@dataclasses.dataclass(frozen=True)
class Mode:
    """A mode chosen by `--NAME ARG...` instead of a config file."""

    metavar: str | tuple[str, ...]  # the flag's arguments (a tuple: several)
    help: str
    run: Callable[[argparse.Namespace], int]  # imports what it needs (torch) only when it runs
    options: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = ()
    usage_error: Callable[[argparse.Namespace], str | None] = lambda args: None  # checked before anything loads


def train_mode(args: argparse.Namespace) -> int:
    """The default mode: validate the config (cheap, light imports), then train or evaluate."""
    overrides = latest_overrides(args.overrides)
    config = load_config(args.config_file, overrides)
    origin = Origin(args.config_file, overrides)
    check_paths(config, origin)
    check_launch(config, origin)
    maybe_build_demo_model(config)
    from training.trainer import train  # heavy imports only after the config is known to be good

    train(config, overrides)
    return 0


def infer_mode(args: argparse.Namespace) -> int:
    from deploy.inference import answer

    print(answer(args))
    return 0


def infer_usage_error(args: argparse.Namespace) -> str | None:
    if (args.question is None) == (args.data is None):
        return "give --question TEXT (with --image/--video) or --data FILE.json"
    if args.data and (args.image or args.video):
        return "--image/--video go with --question; a data file names its own media"
    if args.question and (args.image_dir or args.output):
        return "--image-dir/--output go with --data"
    if args.image and args.video:
        return "give --image or --video, not both"
    if (args.top_k is not None and args.top_k < 1) or (args.stage is not None and args.stage < 0):
        return "--top-k must be >= 1 and --stage >= 0"
    return None


def export_mode(args: argparse.Namespace) -> int:
    from deploy.export import export_checkpoint

    print(export_checkpoint(*args.export, dtype=args.dtype))
    return 0


def serve_mode(args: argparse.Namespace) -> int:
    from deploy.server import ServeOptions, main

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeOptions)}
    given = {name: value for name, value in options.items() if value is not None}
    return main(args.serve, args.host or "127.0.0.1", 8000 if args.port is None else args.port, **given)


def serve_usage_error(args: argparse.Namespace) -> str | None:
    counts = (args.max_batch, args.max_queue, args.max_images, args.max_image_bytes, args.max_prompt_tokens)
    if any(n is not None and n < 1 for n in counts):
        return "--max-batch, --max-queue, --max-images, --max-image-bytes and --max-prompt-tokens must be >= 1"
    if args.max_wait_ms is not None and args.max_wait_ms < 0:
        return "--max-wait-ms must be >= 0"
    return None


MODES: dict[str, Mode] = {
    "infer": Mode(
        "CHECKPOINT",
        "answer questions with a trained model (checkpoint_N/, its model/, or an export), its thoughts shown",
        infer_mode,
        (
            option("--question", help="the question to answer"),
            option("--image", action="append", metavar="PATH", help="an image (repeat for several)"),
            option("--video", metavar="PATH", help="a video (instead of images)"),
            option("--data", metavar="FILE.json", help="answer every record of a data file, in batches"),
            option("--image-dir", metavar="DIR", help="with --data: root of its image paths (default: the run's)"),
            option(
                "--output", metavar="FILE.jsonl", help="with --data: predictions file (default: FILE.predictions.jsonl)"
            ),
            option("--json", action="store_true", help="print one JSON object"),
            option(
                "--top-k",
                type=int,
                metavar="K",
                help="tokens shown per thought (default: as many as the predictions files keep)",
            ),
            option("--stage", type=int, metavar="N", help="curriculum stage (default: the checkpoint's)"),
        ),
        infer_usage_error,
    ),
    "export": Mode(
        ("CHECKPOINT", "OUT_DIR"),
        "write a checkpoint's model + processor as a plain HF directory",
        export_mode,
        (option("--dtype", choices=("bf16", "fp16", "fp32"), help="weights (default: training's)"),),
    ),
    "serve": Mode(
        "CHECKPOINT",
        "serve a checkpoint's latent loop with the OpenAI chat-completions API, batching concurrent requests",
        serve_mode,
        (
            option("--host", help="address to listen on (default: 127.0.0.1, loopback only)"),
            option("--port", type=int, help="port (default: 8000)"),
            option("--model-name", help="the model name clients ask for (default: the checkpoint's directory name)"),
            option("--max-batch", type=int, metavar="N", help="questions per generate batch (default: 16)"),
            option(
                "--max-wait-ms", type=float, metavar="MS", help="how long a batch waits for batch-mates (default: 0)"
            ),
            option("--max-queue", type=int, metavar="N", help="waiting requests before 503 (default: 64)"),
            option("--max-images", type=int, metavar="N", help="images per request (default: 8)"),
            option("--max-image-bytes", type=int, metavar="N", help="bytes per decoded image (default: 8 MiB)"),
            option("--max-prompt-tokens", type=int, metavar="N", help="question tokens (default: 2048)"),
            option("--allow-local-images", action="store_true", help="accept file paths: they read the server's files"),
            option("--allow-remote-images", action="store_true", help="fetch http(s) image URLs the clients name"),
        ),
        serve_usage_error,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="COCONUT continuous-thought training for InternVL3 and causal LMs",
        epilog=OVERRIDES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --lr is a config key, never an abbreviation of an option
    )
    parser.add_argument("config_file", nargs="?", metavar="CONFIG", help="train (or evaluate) with this YAML config")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config keys set on top of the file (see below)"
    )
    for name, mode in MODES.items():
        group = parser.add_argument_group(f"--{name} mode")
        nargs = len(mode.metavar) if isinstance(mode.metavar, tuple) else None
        group.add_argument(f"--{name}", nargs=nargs, metavar=mode.metavar, help=mode.help)
        for flags, kwargs in mode.options:
            group.add_argument(*flags, default=None, **kwargs)  # None: not given (checked against the mode)
    return parser


def as_overrides(argv: Sequence[str]) -> list[str]:
    """argv with `--key value` and `--key=value` of config keys turned into key=value overrides.

    Only when no mode flag is given (a mode takes no overrides): then every `--NAME` that is a config
    key, or no option at all (a misspelt key, which the config check names), is an override.
    """
    if any(arg.partition("=")[0] in {f"--{name}" for name in MODES} for arg in argv):
        return list(argv)
    options = {"-h", "--help"} | {flag for mode in MODES.values() for flags, _ in mode.options for flag in flags}
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        name, equals, value = arg.partition("=")
        key = name.removeprefix("--").replace("-", "_")
        if not arg.startswith("--") or arg == "--" or (name in options and key not in CONFIG_KEYS):
            out.append(arg)
            continue
        if not equals:
            value = next(args, None)
            if value is None:
                raise ValueError(f"{arg}: give it a value ({arg} VALUE, {arg}=VALUE or {key}=VALUE)")
        out.append(f"{key}={value}")
    return out


def chosen_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    """The mode the arguments ask for; a usage error (exit status 2) for options that do not go together."""
    flags = [name for name in MODES if getattr(args, name) is not None]
    if len(flags) > 1:
        parser.error(f"choose one of {', '.join('--' + f for f in flags)}")
    for name, mode in MODES.items():
        for flags_of_option, _ in mode.options:
            dest = flags_of_option[0].removeprefix("--").replace("-", "_")
            if getattr(args, dest) is not None and name not in flags:
                parser.error(f"{flags_of_option[0]} goes with --{name}")
    if not flags:
        if args.config_file is None:
            parser.error(f"give a config file, or one of {', '.join('--' + f for f in MODES)}")
        return train_mode
    if args.config_file is not None or args.overrides:
        parser.error(f"--{flags[0]} takes no config file or KEY=VALUE overrides")
    mode = MODES[flags[0]]
    problem = mode.usage_error(args)
    if problem:
        parser.error(problem)
    return mode.run


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        argv = as_overrides(argv)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(argv)
    mode = chosen_mode(parser, args)
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
