"""Preemption at step granularity: stop signals, step checkpoints, hard kills at chosen points.

Every interrupted run is rerun with the same command and must end exactly (tensor for tensor, and
metrics.jsonl line for line) as the uninterrupted run. Kill points are deterministic: the process
signals itself, or os._exit()s, at a chosen optimizer step, evaluation or file write of a save,
never after a random sleep. Hard kills run in a forked copy of this process (no imports to repeat).
"""

from __future__ import annotations

import builtins
import functools
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from safetensors.torch import load_file

import run
from storage import checkpoints as ckpt
from tests.helpers.recorded_run import assert_same_steps, recorded_run
from tests.helpers.runs import REPO, demo_config, launch, metrics, scaled_timeout, subprocess_env, weights
from training import evaluator, preemption, trainer

# 48 records, 4 per micro-batch, 2 micro-batches per optimizer step: 6 steps per epoch. Step
# checkpoints every 2 steps (2, 4, 8, 10, 14, 16: a step that ends an epoch is its epoch checkpoint).
# The cosine schedule, warmup, clipping and reset_optimizer all carry state a resume must get right.
KEYS = dict(
    num_epochs=3,
    epochs_per_stage=1,
    max_latent_stage=2,
    batch_size_training=4,
    gradient_accumulation_steps=2,
    save_every_steps=2,
    lr_scheduler="cosine",
    warmup_ratio=0.1,
    max_grad_norm=1.0,
    reset_optimizer=True,
    num_workers=0,
)
STEPS_PER_EPOCH = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # identical arithmetic in every run (tests/conftest.py)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir) -> Path:
    """The uninterrupted run every interrupted one must end as."""
    tmp = tmp_path_factory.mktemp("straight")
    assert run.main([str(demo_config(tmp, tiny_model_dir, name="straight", **KEYS))]) == 0
    return tmp / "checkpoints" / "straight"


def logged_steps(save_dir: Path) -> list[dict]:
    """train_log.jsonl without its throughput, which depends on the machine's speed."""
    return [
        {k: v for k, v in line.items() if not k.endswith("_per_s")}
        for line in map(json.loads, (save_dir / "train_log.jsonl").read_text().splitlines())
    ]


def assert_same_run(save_dir: Path, straight: Path) -> None:
    a, b = weights(save_dir / "checkpoint_3"), weights(straight / "checkpoint_3")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert metrics(save_dir) == metrics(straight)  # every epoch's line once, train_loss of resumed epochs included
    assert logged_steps(save_dir) == logged_steps(straight)  # every step's line once, as the straight run logged it
    assert sorted(p.name for p in save_dir.iterdir()) == [
        "checkpoint_1",
        "checkpoint_2",
        "checkpoint_3",
        "config.yaml",
        "curves.png",
        "metrics.jsonl",
        "predictions",
        "train_log.jsonl",
    ]
    predictions = sorted(p.name for p in (straight / "predictions").iterdir())
    assert sorted(p.name for p in (save_dir / "predictions").iterdir()) == predictions
    for name in predictions:  # every evaluation's answers, as the uninterrupted run gave them
        assert (save_dir / "predictions" / name).read_text() == (straight / "predictions" / name).read_text(), name


def stop_at(step: int, sig: signal.Signals) -> Callable:
    """_optimizer_step that sends `sig` to this process after optimizer step `step`."""
    real = trainer.Trainer.optimizer_step

    def step_then_signal(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.state.step == step:
            os.kill(os.getpid(), sig)

    return step_then_signal


def stopped(capsys, config: Path) -> str:
    """Run the CLI, which must stop with status 75 and print one line and no traceback; that line."""
    with pytest.raises(SystemExit) as exit_info:
        run.main([str(config)])
    assert exit_info.value.code == preemption.EX_TEMPFAIL
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("stopped by ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    if lines[0].split(": ")[1].startswith("saved "):  # its save is announced by that line alone
        assert lines[0].split(": ")[1].split(";")[0] not in out, out[-3000:]
    return lines[0]


def rerun(capsys, config: Path) -> str:
    assert run.main([str(config)]) == 0
    return capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "step"),
    [(signal.SIGTERM, 3), (signal.SIGUSR1, 9), (signal.SIGINT, 15)],
    ids=["SIGTERM", "SIGUSR1", "SIGINT"],
)
def test_a_stop_signal_saves_a_step_checkpoint_and_the_rerun_equals_the_uninterrupted_run(
    tmp_path, tiny_model_dir, straight, monkeypatch, capsys, sig, step
):
    config = demo_config(tmp_path, tiny_model_dir, name="stopped", **KEYS)
    save_dir = tmp_path / "checkpoints" / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "optimizer_step", stop_at(step, sig))
        line = stopped(capsys, config)
    assert line == (
        f"stopped by {sig.name} after optimizer step {step}: saved {save_dir / f'step_{step}'}; "
        "run the same command again to resume from it"
    )
    # the step checkpoint replaced the older one; epoch checkpoints stay
    epochs_done = step // STEPS_PER_EPOCH
    assert sorted(p.name for p in save_dir.iterdir() if p.is_dir() and p.name != "predictions") == (
        [f"checkpoint_{e}" for e in range(1, epochs_done + 1)] + [f"step_{step}"]
    )
    state = json.loads((save_dir / f"step_{step}" / ckpt.STATE_FILE).read_text())
    assert (state["epoch"], state["batch"], state["step"]) == (epochs_done, 2 * (step % STEPS_PER_EPOCH), step)

    out = rerun(capsys, config)
    where = f"in epoch {epochs_done + 1} after {state['batch']} micro-batches"
    assert f"resuming from {save_dir / f'step_{step}'} ({where})" in out
    assert_same_run(save_dir, straight)


def in_child(action: Callable[[], object], log: Path) -> int:
    """Run action() in a forked copy of this process (output to log); its exit status. A child
    that os._exit()s leaves what a kill -9 leaves: files as they were, nothing cleaned up."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1)
            action()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def hard_kill_at_step(step: int) -> None:
    real = trainer.Trainer.optimizer_step

    def step_then_die(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.state.step == step:
            os._exit(9)

    trainer.Trainer.optimizer_step = step_then_die


def hard_kill_in_evaluation(epoch: int) -> None:
    real = evaluator.Evaluator.generate

    def generate_then_die(self, stage):
        if self.state.epoch == epoch:
            os._exit(9)
        return real(self, stage)

    evaluator.Evaluator.generate = generate_then_die


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill", "resumed_from"),
    [
        (functools.partial(hard_kill_at_step, 11), "step_10"),  # loses one step (save_every_steps 2)
        (functools.partial(hard_kill_at_step, 13), "checkpoint_2"),  # the first step after an epoch checkpoint
        (functools.partial(hard_kill_in_evaluation, 2), "checkpoint_2"),  # saved, never evaluated: evaluated first
    ],
    ids=["mid_epoch", "after_epoch_checkpoint", "in_evaluation"],
)
def test_a_hard_kill_loses_at_most_save_every_steps_and_the_rerun_equals_the_uninterrupted_run(
    tmp_path, tiny_model_dir, straight, capsys, kill, resumed_from
):
    config = demo_config(tmp_path, tiny_model_dir, name="killed", **KEYS)
    save_dir = tmp_path / "checkpoints" / "killed"
    log = tmp_path / "killed.log"
    status = in_child(lambda: (kill(), run.main([str(config)])), log)
    assert status == 9, log.read_text()[-3000:]
    assert ckpt.newest_checkpoint(save_dir)[0] == save_dir / resumed_from
    out = rerun(capsys, config)
    assert f"resuming from {save_dir / resumed_from} " in out
    assert_same_run(save_dir, straight)


@pytest.mark.slow
def test_a_signal_during_evaluation_lets_it_finish_then_stops_with_nothing_new_to_save(
    tmp_path, tiny_model_dir, straight, monkeypatch, capsys
):
    config = demo_config(tmp_path, tiny_model_dir, name="in_eval", **KEYS)
    save_dir = tmp_path / "checkpoints" / "in_eval"
    real = evaluator.Evaluator.generate

    def signal_then_generate(self, stage):
        if self.state.epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, stage)

    with monkeypatch.context() as patch:
        patch.setattr(evaluator.Evaluator, "generate", signal_then_generate)
        line = stopped(capsys, config)
    assert line == (
        f"stopped by SIGTERM after optimizer step 6: {save_dir / 'checkpoint_1'} already holds this point; "
        "run the same command again to resume from it"
    )
    assert [m["epoch"] for m in metrics(save_dir)] == [1]  # the evaluation under way finished and was reported
    rerun(capsys, config)
    assert_same_run(save_dir, straight)


def test_a_signal_during_a_save_lets_it_finish_then_stops(tmp_path, tiny_model_dir, monkeypatch, capsys):
    config = demo_config(tmp_path, tiny_model_dir, name="in_save", **KEYS)
    save_dir = tmp_path / "checkpoints" / "in_save"
    real = ckpt.write_checkpoint

    def signal_then_write(save_dir, name, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(save_dir, name, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "write_checkpoint", signal_then_write)
        line = stopped(capsys, config)
    assert line.startswith(f"stopped by SIGTERM after optimizer step 2: {save_dir / 'step_2'} already holds this point")
    assert ckpt.missing_parts(save_dir / "step_2", ckpt.read_state(save_dir / "step_2")) == []


# --- the signal handler -------------------------------------------------------------------------


def test_stop_signals_only_set_a_flag_while_entered_and_the_handlers_are_restored_after():
    before = {sig: signal.getsignal(sig) for sig in preemption.STOP_SIGNALS}
    for sig in preemption.STOP_SIGNALS:
        with preemption.StopRequests() as stop:
            assert not stop.requested
            os.kill(os.getpid(), sig)
            os.kill(os.getpid(), signal.SIGTERM)  # a later one does not replace the first
            assert stop.signal_name == sig.name
        assert {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS} == before


def test_a_second_sigint_aborts_at_once_but_torchruns_forwarded_copy_does_not(tmp_path):
    now = [100.0]
    with preemption.StopRequests(clock=lambda: now[0]) as stop:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C from the terminal
        now[0] += 0.2
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C, forwarded by torchrun's agent
        assert stop.signal_name == "SIGINT"

    def ctrl_c_twice():
        with preemption.StopRequests(clock=lambda: now[0]):
            os.kill(os.getpid(), signal.SIGINT)
            now[0] += preemption.DUPLICATE_S + 1
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("still running after a second Ctrl-C")

    log = tmp_path / "abort.log"
    assert in_child(ctrl_c_twice, log) == 128 + signal.SIGINT, log.read_text()
    assert log.read_text().strip() == (
        "interrupted again: aborted without saving; re-running the same command resumes from the newest checkpoint"
    )


LEFT_RUNNING = """
from torch.utils.data import DataLoader
from training.preemption import ignore_stop_signals
loader = DataLoader(list(range(100)), batch_size=1, num_workers=1, worker_init_fn=ignore_stop_signals)
batches = iter(loader)  # never exhausted nor shut down: what an error unwinding a run can leave to the exit
next(batches)
"""


def test_workers_left_running_by_an_error_do_not_hang_the_exit():
    """Workers ignore stop signals, and multiprocessing's exit handler ends them with SIGTERM and
    waits: without preemption's own exit handler this process would never exit."""
    result = subprocess.run(
        [sys.executable, "-c", LEFT_RUNNING],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=scaled_timeout(120),
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]


# --- a hard kill at every file write of a save --------------------------------------------------


def _kill_at_write(save_dir: Path, kill_at: int) -> None:
    """In this (child) process: os._exit(9) at the kill_at-th file write of its first save (the
    temporary directory, the rename, the dropping of an older checkpoint); os._exit(0) when that
    save, with its pruning, completed without reaching it."""
    writes, in_save = [0], [False]

    def counted(real, path_of=lambda *a, **k: a[0] if a else None, writing=lambda *a, **k: True):
        def wrapper(*args, **kwargs):
            path = path_of(*args, **kwargs)
            if in_save[0] and writing(*args, **kwargs) and str(save_dir) in str(path):
                writes[0] += 1
                if writes[0] == kill_at:
                    os._exit(9)
            return real(*args, **kwargs)

        return wrapper

    def mode(*args, **kwargs) -> bool:
        return any(c in (args[1] if len(args) > 1 else kwargs.get("mode", "r")) for c in "wax+")

    builtins.open = io.open = counted(io.open, writing=mode)
    torch.save = counted(torch.save, path_of=lambda obj, f, *a, **k: f)
    transformers.modeling_utils.safe_save_file = counted(
        transformers.modeling_utils.safe_save_file, path_of=lambda tensors, f, *a, **k: f
    )
    os.replace = counted(os.replace)
    write, prune = ckpt.write_checkpoint, ckpt.prune

    def write_in_save(*args, **kwargs):
        in_save[0] = True
        return write(*args, **kwargs)

    def prune_then_exit(*args, **kwargs):
        dropped = prune(*args, **kwargs)
        os._exit(0)  # the save and its pruning completed before the kill_at-th write
        return dropped

    ckpt.write_checkpoint, ckpt.prune = write_in_save, prune_then_exit


def assert_complete(directory: Path, model_files: set[str]) -> None:
    """What a complete checkpoint holds, spelled out: its state file's parts, each readable."""
    assert (directory / ckpt.STATE_FILE).is_file(), f"{directory}: named as a checkpoint, without a state file"
    state = json.loads((directory / ckpt.STATE_FILE).read_text())
    expected = (
        {f"model/{name}" for name in model_files}
        | {"trainer_state.json"}
        | ({"optimizer.pt"} if state["optimizer_saved"] else set())
        | {f"rank_{r}.pt" for r in range(state["ranks"])}
    )
    assert {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} == expected, directory
    load_file(directory / "model" / "model.safetensors")
    for name in expected - {f"model/{n}" for n in model_files} - {"trainer_state.json"}:
        torch.load(directory / name, weights_only=True)


@pytest.mark.slow  # some twenty forked runs
def test_a_hard_kill_at_any_file_write_of_a_save_leaves_no_incomplete_checkpoint(
    tmp_path, tiny_model_dir, straight, capsys
):
    """The saves of step_4 (it drops step_2) and of checkpoint_1 (it drops step_4), each killed at
    every one of its file writes in turn, from the same starting state: nothing named as a
    checkpoint, and nothing holding a state file, is ever incomplete, and the newest complete
    checkpoint is the old one or the new one. The rerun after the kill at checkpoint_1's last
    write (while dropping step_4) ends as the uninterrupted run."""
    config = demo_config(tmp_path, tiny_model_dir, name="saves", **KEYS)
    save_dir = tmp_path / "checkpoints" / "saves"
    model_files = {p.name for p in (straight / "checkpoint_1" / "model").iterdir()}
    log = tmp_path / "saves.log"

    def restore(snapshot: Path) -> None:
        shutil.rmtree(save_dir)
        shutil.copytree(snapshot, save_dir)

    assert in_child(lambda: (_kill_at_write(save_dir, 0), run.main([str(config)])), log) == 0  # step_2 lands
    for landed in ("step_4", "checkpoint_1"):
        before, killed = tmp_path / f"before_{landed}", tmp_path / f"killed_{landed}"
        shutil.copytree(save_dir, before)
        previous = ckpt.newest_checkpoint(save_dir)[0]
        kill_at = 1
        while True:
            restore(before)
            status = in_child(lambda k=kill_at: (_kill_at_write(save_dir, k), run.main([str(config)])), log)
            assert status in (0, 9), log.read_text()[-3000:]
            for path in save_dir.iterdir():
                if re.fullmatch(r"(checkpoint|step)_\d+", path.name) or (path / ckpt.STATE_FILE).exists():
                    assert_complete(path, model_files)
            assert ckpt.newest_checkpoint(save_dir)[0] in (previous, save_dir / landed), kill_at
            if status == 0:
                break
            shutil.rmtree(killed, ignore_errors=True)
            shutil.copytree(save_dir, killed)
            kill_at += 1
        assert ckpt.newest_checkpoint(save_dir)[0] == save_dir / landed
        # the writes counted: rank part, model (3 files), processor (2), run record, optimizer, state, rename, drop
        assert kill_at == (12 if landed == "step_4" else 10), kill_at  # checkpoint_1: no optimizer.pt, no rank part
    restore(killed)
    rerun(capsys, config)
    assert_same_run(save_dir, straight)


# --- two ranks ---------------------------------------------------------------------------------


def torchrun(config: Path, **env: str) -> subprocess.CompletedProcess:
    """tests/helpers/instrumented_run.py under a 2-rank torchrun, with its FAULT or RECORD variables."""
    return launch("-m", "tests.helpers.instrumented_run", config, timeout=300, env=env)


@pytest.mark.slow
def test_two_ranks_stop_together_and_resume_after_sigterm_and_kill_9(tmp_path, tiny_model_dir, monkeypatch):
    """Under torchrun, 2 ranks x 2 per micro-batch x accumulation 2, DataLoader workers, 2 epochs:
    only rank 1 gets SIGTERM, after step 3; both stop after that step (exit 75) with one step_3.
    The rerun is killed hard (os._exit on rank 1) after step 8, when checkpoint_1 (no optimizer.pt:
    reset by design) is the newest. The third run ends as the uninterrupted 2-rank run, keeping
    save_total_limit 1 checkpoint. The uninterrupted run's first step also shows the loss
    token-weighted across ranks and accumulation steps: its gradients before and after clipping,
    and its logged loss, are one process's at batch 8 (the same 8 samples)."""
    keys = {**KEYS, "num_epochs": 2, "batch_size_training": 2, "num_workers": 1, "save_total_limit": 1}
    straight = demo_config(tmp_path, tiny_model_dir, name="straight", **keys)
    config = demo_config(tmp_path, tiny_model_dir, name="two", **keys)
    save_dir = tmp_path / "checkpoints" / "two"

    result = torchrun(straight, RECORD=str(tmp_path / "straight.pt"))
    assert result.returncode == 0, result.stderr[-3000:]
    one = recorded_run(
        tmp_path,
        tiny_model_dir,
        monkeypatch,
        "one",
        **{**keys, "num_epochs": 1, "batch_size_training": 8, "gradient_accumulation_steps": 1, "num_workers": 0},
    )
    assert_same_steps(torch.load(tmp_path / "straight.pt", weights_only=True), one, steps=1)

    result = torchrun(config, FAULT="3:1:SIGTERM")
    lines = [line for line in result.stderr.splitlines() if line.startswith("stopped by ")]
    assert lines == [
        f"stopped by a stop signal to another rank after optimizer step 3: saved {save_dir / 'step_3'}; "
        "run the same command again to resume from it"
    ], result.stderr[-3000:]
    assert result.stderr.count("exitcode  : 75") == 2, result.stderr[-3000:]  # torchrun's report of each rank
    assert not re.search(r"\[rank\d\]: Traceback", result.stderr), result.stderr[-3000:]
    assert sorted(p.name for p in save_dir.iterdir() if p.is_dir() and p.name != "predictions") == ["step_3"]
    assert {p.name for p in (save_dir / "step_3").glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}

    result = torchrun(config, FAULT="8:1:exit")
    assert result.returncode != 0 and "exitcode  : 9" in result.stderr, result.stderr[-3000:]
    assert f"resuming from {save_dir / 'step_3'} (in epoch 1 after 6 micro-batches)" in result.stdout
    newest, state = ckpt.newest_checkpoint(save_dir)
    assert newest == save_dir / "checkpoint_1" and not state.optimizer_saved
    assert not (newest / ckpt.OPTIMIZER_FILE).exists()

    result = torchrun(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {save_dir / 'checkpoint_1'} (epoch 1)" in result.stdout
    a, b = weights(save_dir / "checkpoint_2"), weights(tmp_path / "checkpoints" / "straight" / "checkpoint_2")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert metrics(save_dir) == metrics(tmp_path / "checkpoints" / "straight")
    assert logged_steps(save_dir) == logged_steps(tmp_path / "checkpoints" / "straight")
    assert sorted(p.name for p in save_dir.iterdir()) == [
        "checkpoint_2",
        "config.yaml",
        "curves.png",
        "metrics.jsonl",
        "predictions",
        "train_log.jsonl",
    ]
