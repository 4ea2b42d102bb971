"""Helpers for tests that drive the real CLI on the demo data with the tiny model, and read what it wrote."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer

from modeling.loading import END_LATENT, LATENT, START_LATENT
from storage.checkpoints import PREFIX
from storage.saved_run import SavedRun, read_saved_run, write_saved_run
from training.reporter import METRICS_FILE
from utils import Config, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]

TIMEOUT_SCALE_ENV = "COCONUT_TEST_TIMEOUT_SCALE"


def scaled_timeout(idle_s: float) -> float:
    """A subprocess time limit for this machine as it is now: idle_s (ample on an idle machine) times
    COCONUT_TEST_TIMEOUT_SCALE where set, else times the load per core (the highest of the 1, 5 and 15
    minute load averages over the core count, at least 1). A 2-core machine running other work at load 8
    gets 4 times the idle limit, so a limit means "hung", not "shared"."""
    override = os.environ.get(TIMEOUT_SCALE_ENV)
    if override:
        return idle_s * float(override)
    return idle_s * max(1.0, max(os.getloadavg()) / (os.cpu_count() or 1))


def subprocess_env() -> dict[str, str]:
    """Environment for a CLI subprocess: this repo importable, ahead of (not instead of) PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def save_text_model(path: Path, tiny_model_dir: Path) -> Path:
    """A one-layer Qwen2 causal LM (a class transformers has) saved at path with the tiny model's tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=1031,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        eos_token_id=1026,
        pad_token_id=1024,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, path / name)
    return path


def launch(
    *program: object, nproc: int = 2, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node nproc PROGRAM...` (gloo on CPU), output captured. PROGRAM is a
    script and its arguments, or "-m", a module and its arguments. timeout is for an idle machine
    (scaled_timeout)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        + [str(x) for x in program],
        cwd=REPO,
        env={**subprocess_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=scaled_timeout(timeout),
    )


def torchrun(
    config: Path, nproc: int, timeout: int = 600, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """run.py CONFIG [ARGS] under torchrun (launch; timeout for an idle machine)."""
    return launch(REPO / "run.py", config, *args, nproc=nproc, timeout=timeout, env=env)


def forked_ranks(rank_main: Callable[[int], int], world: int = 2, timeout: float = 120) -> None:
    """rank_main(rank) in `world` processes forked from this one, with the environment torchrun gives its
    ranks (gloo then joins them): a multi-rank run without importing anything again. Each must return 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                ranks = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world}
                os.environ.update({k: str(v) for k, v in ranks.items()}, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                status = rank_main(rank)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        pids.append(pid)
    deadline, statuses = time.monotonic() + scaled_timeout(timeout), {}
    while len(statuses) < world and time.monotonic() < deadline:
        for pid in pids:
            if pid not in statuses and (done := os.waitpid(pid, os.WNOHANG))[0]:
                statuses[pid] = os.waitstatus_to_exitcode(done[1])
        time.sleep(0.05)
    for pid in set(pids) - set(statuses):  # past the timeout: a hang
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert [statuses.get(pid) for pid in pids] == [0] * world, statuses


def demo_config(tmp_path: Path, tiny_model_dir: Path, name: str = "run", **overrides) -> Path:
    """args/demo.yaml with absolute paths, a private save_path and the given keys changed."""
    config = yaml.safe_load((REPO / "args" / "demo.yaml").read_text())
    config.update(
        model_id=str(tiny_model_dir),
        image_dir=str(REPO / "data" / "demo" / "images"),
        train_path=str(REPO / "data" / "demo" / "train.json"),
        val_path=str(REPO / "data" / "demo" / "val.json"),
        save_path=str(tmp_path / "checkpoints"),
        name=name,
    )
    config.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def mm_config(image_dir: Path, **keys) -> Config:
    """A multimodal Config for data-path tests: tiny-model tiles (56 px, up to 6), given image_dir."""
    return config_from_dict(
        {
            "multimodal": True,
            "model_id": "m",
            "train_path": "t",
            "val_path": "v",
            "image_dir": str(image_dir),
            "image_size": 56,
            "max_tiles": 6,
            **keys,
        }
    )


def metrics(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / METRICS_FILE).read_text().splitlines()]


def weights(checkpoint: Path) -> dict:
    return load_file(checkpoint / "model" / "model.safetensors")


def ensure_saved_run(checkpoint: Path, config_path: Path) -> None:
    """Give a checkpoint's model/ its coconut_config.yaml where the trainer did not write one."""
    model_dir = checkpoint / "model"
    if read_saved_run(model_dir) is not None:
        return
    config = load_config(config_path)
    epoch = int(checkpoint.name.removeprefix(PREFIX))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    names = {"start": START_LATENT, "latent": LATENT, "end": END_LATENT}
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in names.items()}
    write_saved_run(model_dir, SavedRun(config, epoch, config.stage(epoch - 1), ids))
