"""Reliability and security through the CLI: bad input, preemption and faults, nothing lost.

Every user mistake (config, data, checkpoint) ends `run.main` with status 2 and one line
"error: ..." on stderr that names the file, the record and the key or path. A rank dying under
torchrun, or a full disk, never leaves a checkpoint that looks complete but is not, and rerunning
the same command finishes exactly as an uninterrupted run (kills and stop signals at chosen steps,
evaluations and file writes: tests/integration/test_preemption.py). Neither pickled code nor a model
directory's own *.py ever runs unless the config opts in.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText

import run
from modeling import assembly as model_setup
from storage import atomic
from storage import checkpoints as ckpt
from tests.helpers.runs import REPO, demo_config, launch, metrics, save_text_model, subprocess_env, weights

DEMO = REPO / "data" / "demo"
# num_workers 0: one process, so a run is bit-for-bit reproducible (the fault tests compare exactly)
RUN_KEYS = dict(num_epochs=4, epochs_per_stage=1, max_latent_stage=2, num_workers=0)
SUBPROCESS_ENV = subprocess_env()


def user_error(capsys, config: Path, *fragments: object) -> str:
    """Run the CLI; it must fail with status 2 and exactly one line "error: ..." holding every fragment."""
    assert run.main([str(config)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert err.rstrip().splitlines()[-1] == lines[0], err[-3000:]  # the message itself is one line
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


def no_model_loading(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded despite a bad config")

    monkeypatch.setattr(model_setup, "load_base_model", fail)


pytestmark = pytest.mark.usefixtures("one_thread")  # identical arithmetic in every run (tests/conftest.py)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir) -> Path:
    """An uninterrupted run of RUN_KEYS: what every interrupted run must end with, exactly."""
    tmp = tmp_path_factory.mktemp("straight")
    config = demo_config(tmp, tiny_model_dir, name="straight", **RUN_KEYS)
    assert run.main([str(config)]) == 0
    return tmp / "checkpoints" / "straight"


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"num_epoch": 3}, "unknown key 'num_epoch' (did you mean 'num_epochs'?)"),
        ({"lr": "fast"}, "key 'lr': expected a number, got 'fast'"),
        ({"coconut": "yes"}, "key 'coconut': expected true/false"),
        ({"val_path": None}, "key 'val_path': required"),
        ({"image_dir": "/nonexistent/images"}, "key 'image_dir': path does not exist"),
        ({"load_model_path": "/nonexistent/checkpoint.pt"}, "key 'load_model_path': path does not exist"),
        ({"coconut": True, "no_cot": True}, "choose at most one method"),
        ({"batch_size_training": 0}, "key 'batch_size_training': must be > 0"),
        ({"num_epochs": -1}, "key 'num_epochs': must be > 0"),
        ({"gradient_accumulation_steps": 0}, "key 'gradient_accumulation_steps': must be > 0"),
        ({"num_workers": -2}, "key 'num_workers': must be >= 0"),
        ({"max_tiles": 0}, "key 'max_tiles': must be > 0"),
        ({"max_length": 0}, "key 'max_length': must be > 0"),
        pytest.param(
            {"decode_cuda_graph": True},
            "key 'decode_cuda_graph': CUDA graph decoding needs one process on a GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there: the key is valid"),
        ),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_config_error_names_file_and_key_before_model_loading(
    tmp_path, tiny_model_dir, monkeypatch, capsys, keys, message
):
    no_model_loading(monkeypatch)
    config = demo_config(tmp_path, tiny_model_dir, **keys)
    user_error(capsys, config, config, message)


def test_save_path_not_writable(tmp_path, tiny_model_dir, monkeypatch, capsys):
    no_model_loading(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a directory cannot be made under a regular file, even by root
    config = demo_config(tmp_path, tiny_model_dir, save_path=str(blocker / "sub"))
    user_error(capsys, config, config, "key 'save_path': not writable", blocker / "sub")


def test_unreadable_config_file(tmp_path, capsys):
    user_error(capsys, tmp_path / "nope.yaml", tmp_path / "nope.yaml", "config file not found")
    user_error(capsys, tmp_path, tmp_path, "cannot read the config file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1e-4\n")
    user_error(capsys, bad, bad, "not valid YAML: expected ',' or ']'", "line 2, column 1")
    bad.write_text("- lr: 1e-4\n")
    user_error(capsys, bad, bad, "expected a mapping of keys to values, got list")


@pytest.mark.parametrize("size", [50, 112])  # 50: not a multiple of the patch (14); 112: a multiple, still wrong
def test_image_size_must_be_the_vision_towers_before_weights_load(tmp_path, tiny_model_dir, monkeypatch, capsys, size):
    no_model_loading(monkeypatch)
    config = demo_config(tmp_path, tiny_model_dir, image_size=size)
    user_error(
        capsys, config, f"key 'image_size': {size}", "image_size 56", "patch size 14", tiny_model_dir / "config.json"
    )


# --- data -------------------------------------------------------------------------------------


def _record(image: str | None = "ok.png", **keys) -> dict:
    record = {"question": "what color is the square?", "steps": ["The square is red."], "answer": "red"}
    if image is not None:
        record["image"] = image
    return {**record, **keys}


def _png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: Pillow's size check reads only the header."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def _write_images(images: Path, outside: Path) -> None:
    images.mkdir()
    Image.new("RGB", (64, 64), (200, 20, 20)).save(images / "ok.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (images / "empty.png").write_bytes(b"")
    (images / "bomb.png").write_bytes(_png_with_size(10_000, 10_000))  # between 1x and 2x Pillow's limit
    (images / "big_bomb.png").write_bytes(_png_with_size(20_000, 20_000))  # over 2x: Pillow's own error
    # a truncated JPEG passes a header check: it fails when decoded, as every image is when the data set is built
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, "JPEG")
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    Image.new("RGB", (64, 64)).save(outside)
    (images / "link.png").symlink_to(outside)


DATA_CASES = {  # name: (train file content, fragments the error line must hold besides the file)
    "not_json": ('[{"question": ', "not valid JSON"),
    "not_a_list": ({"question": "q", "steps": [], "answer": "a"}, "expected a JSON list of records, got dict"),
    "missing_steps": ([_record(), {"question": "q", "answer": "a"}], "record 1: missing key 'steps'"),
    "missing_answer": ([_record(), {"question": "q", "steps": []}], "record 1: missing key 'answer'"),
    "steps_not_strings": ([_record(), _record(steps=["one", 2])], "record 1: key 'steps': expected a list of strings"),
    "empty_question": ([_record(), _record(question="  ")], "record 1: key 'question': expected a non-empty string"),
    "answer_not_string": ([_record(), _record(answer=42)], "record 1: key 'answer': expected a string, got int"),
    "missing_image": ([_record(), _record("nope.png")], "record 1: image not found", "nope.png"),
    "corrupt_image": ([_record(), _record("corrupt.png")], "record 1: unreadable image", "corrupt.png"),
    "zero_byte_image": ([_record(), _record("empty.png")], "record 1: unreadable image", "empty.png"),
    "decompression_bomb": ([_record(), _record("bomb.png")], "record 1: unreadable image", "decompression bomb"),
    "decompression_bomb_2x": ([_record(), _record("big_bomb.png")], "record 1: unreadable image", "decompression bomb"),
    "truncated_image": (
        [_record(), _record("truncated.jpg")],
        "record 1: unreadable image",
        "truncated.jpg",
        "truncated",
    ),
    "parent_escape": ([_record(), _record("../outside.png")], "record 1: path '../outside.png' escapes image_dir"),
    "absolute_escape": ([_record(), _record("/etc/hostname")], "record 1: path '/etc/hostname' escapes image_dir"),
    "symlink_escape": ([_record(), _record("link.png")], "record 1: path 'link.png' escapes image_dir"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_names_file_record_and_key(tmp_path, tiny_model_dir, capsys, case):
    content, *fragments = DATA_CASES[case]
    _write_images(tmp_path / "images", tmp_path / "outside.png")
    train = tmp_path / "train.json"
    train.write_text(content if isinstance(content, str) else json.dumps(content))
    val = tmp_path / "val.json"
    val.write_text(json.dumps([_record()]))
    # num_workers 1: an image that fails only when decoded does so in a DataLoader worker
    config = demo_config(
        tmp_path,
        tiny_model_dir,
        train_path=str(train),
        val_path=str(val),
        image_dir=str(tmp_path / "images"),
        num_epochs=1,
        num_workers=1,
    )
    user_error(capsys, config, train, *fragments)


def _mode_images(images: Path) -> list[str]:
    """One image per Pillow mode a data set meets, sizes chosen to give 1 to several tiles."""
    images.mkdir()
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (40, 90), dtype=np.uint8)
    rgba = rng.integers(0, 256, (70, 50, 4), dtype=np.uint8)
    files = {
        "gray.png": Image.fromarray(gray),
        "bilevel.png": Image.fromarray(gray > 128),
        "gray_alpha.png": Image.merge("LA", (Image.fromarray(gray), Image.fromarray(255 - gray))),
        "rgba.png": Image.fromarray(rgba),
        "palette.png": Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE),
        "palette_transparent.png": Image.fromarray(rgba[..., :3]).convert(
            "P", palette=Image.Palette.ADAPTIVE, colors=16
        ),
        "gray16.png": Image.fromarray(gray.astype(np.uint16) * 257),
        "int32.tif": Image.fromarray(gray.astype(np.int32) * 1000),
        "float.tif": Image.fromarray(gray.astype(np.float32) / 255),
        "cmyk.jpg": Image.fromarray(rgba).convert("CMYK"),
    }
    expected = {
        "gray.png": "L",
        "bilevel.png": "1",
        "gray_alpha.png": "LA",
        "rgba.png": "RGBA",
        "palette.png": "P",
        "palette_transparent.png": "P",
        "gray16.png": "I;16",
        "int32.tif": "I",
        "float.tif": "F",
        "cmyk.jpg": "CMYK",
    }
    for name, image in files.items():
        kwargs = {"transparency": 0} if name == "palette_transparent.png" else {}
        image.save(images / name, **kwargs)
        with Image.open(images / name) as saved:
            assert saved.mode == expected[name], (name, saved.mode)
    return list(files)


def test_every_image_mode_trains_through_the_cli(tmp_path, tiny_model_dir):
    names = _mode_images(tmp_path / "images")
    data = tmp_path / "modes.json"
    data.write_text(json.dumps([_record(name) for name in names]))
    config = demo_config(
        tmp_path,
        tiny_model_dir,
        train_path=str(data),
        val_path=str(data),
        image_dir=str(tmp_path / "images"),
        num_epochs=2,
        epochs_per_stage=1,
        batch_size_training=4,
        num_workers=1,
    )
    assert run.main([str(config)]) == 0
    history = metrics(tmp_path / "checkpoints" / "run")
    assert [m["total"] for m in history] == [len(names)] * 2
    assert all(np.isfinite(m["train_loss"]) and np.isfinite(m["val_loss"]) for m in history)


def test_overlong_record_errors_by_default_and_is_dropped_on_request(tmp_path, tiny_model_dir, capsys):
    long_question = "what color is the square " * 60
    records = [_record(image=f"train/{p.name}") for p in sorted((DEMO / "images" / "train").iterdir())[:6]]
    records.insert(3, _record(image=records[0]["image"], question=long_question))
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    keys = dict(train_path=str(data), max_length=200, num_epochs=1)
    config = demo_config(tmp_path, tiny_model_dir, name="error", **keys)
    user_error(capsys, config, data, "record 3:", "exceed max_length 200", "overlong: drop")

    config = demo_config(tmp_path, tiny_model_dir, name="drop", overlong="drop", **keys)
    with pytest.warns(UserWarning, match=r"dropped 1 records longer than 200 tokens: \[3\]"):
        assert run.main([str(config)]) == 0


# --- checkpoints ------------------------------------------------------------------------------


def _payload_pickle(path: Path, sentinel: Path) -> None:
    """A torch.save file whose unpickling would run code (it writes `sentinel`)."""

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(sentinel)!r}, 'w').write('code ran')",)

    torch.save({"model.language_model.embed_tokens.weight": torch.zeros(1), "x": Payload()}, path)


@pytest.mark.slow
def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path, tiny_model_dir, straight, capsys):
    state = AutoModelForImageTextToText.from_pretrained(straight / "checkpoint_1" / "model").state_dict()
    files = {}
    good = tmp_path / "good.safetensors"
    save_file(state, good)
    files["truncated.safetensors"] = good.read_bytes()[: good.stat().st_size // 2]
    files["corrupt.safetensors"] = os.urandom(4096)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    files["truncated.pt"] = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    files["corrupt.pt"] = os.urandom(4096)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        config = demo_config(
            tmp_path, tiny_model_dir, name=name.replace(".", "_"), load_model_path=str(tmp_path / name)
        )
        user_error(capsys, config, tmp_path / name, "corrupt")

    # a checkpoint of another model: the first tensor (in file order) whose shape differs is named
    names = list(state)
    foreign = dict(state)
    for k in (names[2], names[7]):
        foreign[k] = torch.zeros(*(n + 1 for n in state[k].shape))
    torch.save(foreign, tmp_path / "foreign.pt")
    config = demo_config(tmp_path, tiny_model_dir, name="foreign", load_model_path=str(tmp_path / "foreign.pt"))
    user_error(
        capsys,
        config,
        tmp_path / "foreign.pt",
        f"tensor '{names[2]}' has shape",
        f"the model expects {tuple(state[names[2]].shape)}",
    )

    # a checkpoint directory (HF format) whose weights file is truncated
    broken = tmp_path / "broken_checkpoint"
    shutil.copytree(straight / "checkpoint_1", broken)
    weights_file = broken / "model" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    config = demo_config(tmp_path, tiny_model_dir, name="broken", load_model_path=str(broken))
    user_error(capsys, config, broken, "cannot load the model")


def test_pickled_code_is_never_run(tmp_path, tiny_model_dir, straight, capsys):
    sentinel = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    _payload_pickle(evil, sentinel)
    torch.load(evil, weights_only=False)  # the payload is live: a plain torch.load runs it
    assert sentinel.exists()
    sentinel.unlink()

    config = demo_config(tmp_path, tiny_model_dir, name="evil", load_model_path=str(evil))
    user_error(capsys, config, evil, "refused", "GLOBAL exec")
    assert not sentinel.exists()

    # the optimizer state of a checkpoint that a run resumes from
    save_dir = tmp_path / "checkpoints" / "resumed"
    shutil.copytree(straight / "checkpoint_1", save_dir / "checkpoint_1")
    _payload_pickle(save_dir / "checkpoint_1" / ckpt.OPTIMIZER_FILE, sentinel)
    config = demo_config(tmp_path, tiny_model_dir, name="resumed", **RUN_KEYS)
    user_error(
        capsys, config, save_dir / "checkpoint_1" / ckpt.OPTIMIZER_FILE, "unreadable optimizer state", "GLOBAL exec"
    )
    assert not sentinel.exists()


# --- faults -----------------------------------------------------------------------------------


def test_kill_between_save_and_eval_loses_no_metrics_line(tmp_path, tiny_model_dir, straight, capsys):
    """Checkpoint 2 saved, its eval never reported, the last line cut short: the rerun fills the gap."""
    save_dir = tmp_path / "checkpoints" / "gap"
    for epoch in (1, 2):
        shutil.copytree(straight / f"checkpoint_{epoch}", save_dir / f"checkpoint_{epoch}")
    first, second = (straight / "metrics.jsonl").read_text().splitlines()[:2]
    (save_dir / "metrics.jsonl").write_text(first + "\n" + second[: len(second) // 2])
    config = demo_config(tmp_path, tiny_model_dir, name="gap", **RUN_KEYS)
    assert run.main([str(config)]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert metrics(save_dir) == metrics(straight)
    assert_same_weights(save_dir / "checkpoint_4", straight / "checkpoint_4")


def test_partial_and_stateless_checkpoints_are_never_resumed(tmp_path, tiny_model_dir, straight, capsys):
    save_dir = tmp_path / "checkpoints" / "leftovers"
    for epoch in (1, 2):
        shutil.copytree(straight / f"checkpoint_{epoch}", save_dir / f"checkpoint_{epoch}")
    # what a killed save leaves: the temporary directory, here even with a state file
    partial = atomic.temp_path(save_dir / f"{ckpt.PREFIX}3")
    shutil.copytree(straight / "checkpoint_1", partial)
    (partial / ckpt.STATE_FILE).write_text(json.dumps({"epoch": 3, "step": 18, "best_acc": 0.0}))
    # a newer checkpoint directory without trainer_state.json (and with other weights)
    stateless = save_dir / "checkpoint_3"
    shutil.copytree(straight / "checkpoint_1", stateless)
    (stateless / ckpt.STATE_FILE).unlink()
    # the user's own hidden directories there are not this project's leftovers
    theirs = [save_dir / n for n in (".tmp-notes", f"{atomic.TMP_PREFIX}mine", f"{atomic.TMP_PREFIX}checkpoint_x")]
    for path in theirs:
        path.mkdir()
        (path / "keep.txt").write_text("mine")

    config = demo_config(tmp_path, tiny_model_dir, name="leftovers", **RUN_KEYS)
    assert run.main([str(config)]) == 0
    assert f"resuming from {save_dir / 'checkpoint_2'} (epoch 2)" in capsys.readouterr().out
    assert [e for e, _ in ckpt.complete_checkpoints(save_dir)] == [1, 2, 3, 4]
    assert sorted(p.name for p in save_dir.iterdir() if p.is_dir() and p not in theirs and p.name != "predictions") == [
        f"checkpoint_{e}" for e in (1, 2, 3, 4)
    ]
    assert all((path / "keep.txt").read_text() == "mine" for path in theirs)
    assert ckpt.read_state(stateless).epoch == 3
    assert_same_weights(stateless, straight / "checkpoint_3")


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, straight, monkeypatch, capsys):
    config = demo_config(tmp_path, tiny_model_dir, name="full", **RUN_KEYS)
    save_dir = tmp_path / "checkpoints" / "full"
    real_save = torch.save
    calls = []

    def disk_full_on_second_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"\x00" * 100)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_full_on_second_save)
        user_error(
            capsys, config, save_dir / "checkpoint_2", "No space left on device", "earlier checkpoints are intact"
        )
    dirs = sorted(p.name for p in save_dir.iterdir() if p.is_dir() and p.name != "predictions")
    assert dirs == ["checkpoint_1"]  # no partial directory
    first = save_dir / "checkpoint_1"
    assert_same_weights(first, straight / "checkpoint_1")
    AutoModelForImageTextToText.from_pretrained(first / "model")
    assert ckpt.read_state(first).epoch == 1 and ckpt.read_optimizer_state(first) is not None

    # space freed, same command: nothing was lost
    assert run.main([str(config)]) == 0
    assert_same_weights(save_dir / "checkpoint_4", straight / "checkpoint_4")


def _files(save_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(save_dir)): p.read_bytes() for p in sorted(save_dir.rglob("*")) if p.is_file()}


def _copy_checkpoints(straight: Path, save_dir: Path, epochs: tuple[int, ...] = (1, 2)) -> None:
    for epoch in epochs:
        shutil.copytree(straight / f"checkpoint_{epoch}", save_dir / f"checkpoint_{epoch}")
    lines = (straight / "metrics.jsonl").read_text().splitlines()[: max(epochs)]
    (save_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def test_a_newest_checkpoint_without_its_optimizer_state_is_refused(tmp_path, tiny_model_dir, straight, capsys):
    """Its state says optimizer.pt was saved: a fresh AdamW would silently give other weights."""
    save_dir = tmp_path / "checkpoints" / "lost"
    _copy_checkpoints(straight, save_dir)
    (save_dir / "checkpoint_2" / ckpt.OPTIMIZER_FILE).unlink()
    before = _files(save_dir)
    config = demo_config(tmp_path, tiny_model_dir, name="lost", **RUN_KEYS)
    user_error(
        capsys,
        config,
        save_dir / "checkpoint_2",
        "incomplete checkpoint: optimizer.pt missing although trainer_state.json lists it",
        "remove checkpoint_2 to resume from checkpoint_1",
    )
    assert _files(save_dir) == before


def test_a_checkpoint_holding_only_its_state_file_is_refused(tmp_path, tiny_model_dir, straight, capsys):
    save_dir = tmp_path / "checkpoints" / "bare"
    (save_dir / "checkpoint_1").mkdir(parents=True)
    shutil.copy(straight / "checkpoint_1" / ckpt.STATE_FILE, save_dir / "checkpoint_1")
    config = demo_config(tmp_path, tiny_model_dir, name="bare", **RUN_KEYS)
    user_error(
        capsys,
        config,
        save_dir / "checkpoint_1",
        "incomplete checkpoint: model/ (config.json and weights), optimizer.pt missing",
        "remove checkpoint_1 to start over",
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epoch": "2"}, "key 'epoch': expected an integer >= 0, got '2'"),
        ({"epoch": -3}, "key 'epoch': expected an integer >= 0, got -3"),
        ({"epoch": 9}, "key 'epoch': 9 is past num_epochs (4)"),
        ({"step": 1.5}, "key 'step': expected an integer >= 0, got 1.5"),
        ({"best_acc": "high"}, "key 'best_acc': expected a number in [0, 1], got 'high'"),
        ({"train_loss": float("nan")}, "key 'train_loss': expected a finite number or null, got nan"),
        ({"optimizer_saved": 1}, "key 'optimizer_saved': expected true or false, got 1"),
        ({"epochs": 2}, "unknown key 'epochs'"),
        ([2], "expected a JSON object, got list"),
    ],
    ids=[
        "epoch_string",
        "epoch_negative",
        "epoch_past_num_epochs",
        "step_float",
        "best_acc_string",
        "train_loss_nan",
        "optimizer_saved_int",
        "unknown_key",
        "not_an_object",
    ],
)
def test_bad_trainer_state_values_are_named_and_nothing_is_overwritten(
    tmp_path, tiny_model_dir, straight, capsys, change, message
):
    save_dir = tmp_path / "checkpoints" / "bad_state"
    _copy_checkpoints(straight, save_dir)
    state_file = save_dir / "checkpoint_2" / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, **change} if isinstance(change, dict) else change))
    before = _files(save_dir)
    config = demo_config(tmp_path, tiny_model_dir, name="bad_state", **RUN_KEYS)
    user_error(capsys, config, state_file, message)
    assert _files(save_dir) == before


def _disk_full_under(save_dir: Path, monkeypatch) -> None:
    """Writing any file under save_dir fails as a full disk does: created, then ENOSPC."""
    real_open = io.open

    def full_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax") and str(save_dir) in str(file):
            real_open(file, mode, *args, **kwargs).close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", full_open)
    monkeypatch.setattr("builtins.open", full_open)


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
def test_a_full_disk_at_start_is_one_line_and_leaves_no_temporary_file(
    tmp_path, tiny_model_dir, straight, monkeypatch, capsys, resumed
):
    """The first file a fresh run writes is config.yaml; a resumed one first rewrites metrics.jsonl."""
    save_dir = tmp_path / "checkpoints" / "full"
    if resumed:
        _copy_checkpoints(straight, save_dir)
    before = _files(save_dir) if resumed else {}
    config = demo_config(tmp_path, tiny_model_dir, name="full", **RUN_KEYS)
    with monkeypatch.context() as patch:
        _disk_full_under(save_dir, patch)
        first = save_dir / ("metrics.jsonl" if resumed else "config.yaml")
        user_error(capsys, config, f"could not write {first}: No space left on device")
    assert _files(save_dir) == before  # nothing half-written, no temporary file left


def test_the_weights_only_refusal_keeps_torchs_reason_without_its_advice(tmp_path, tiny_model_dir, capsys):
    class SystemCall:
        def __reduce__(self):
            return os.system, ("true",)

    evil = tmp_path / "system.pt"
    torch.save({"model.language_model.embed_tokens.weight": torch.zeros(1), "x": SystemCall()}, evil)
    config = demo_config(tmp_path, tiny_model_dir, name="system", load_model_path=str(evil))
    line = user_error(capsys, config, evil, "weights_only=True refused it", "GLOBAL posix.system")
    for advice in ("weights_only=False", "`weights_only` set to `False`", "trust", "safe_globals"):
        assert advice not in line, line


RANK_1_FAILS = """
import os
import sys
import time
sys.path.insert(0, {repo!r})
import run
from training import trainer

step = trainer.Trainer.optimizer_step

def step_then_fail(self, *args, **kwargs):
    step(self, *args, **kwargs)
    if self.info.rank == 1:
        print("rank 1: {how} after its first optimizer step", file=sys.stderr, flush=True)
        {action}

trainer.Trainer.optimizer_step = step_then_fail
sys.exit(run.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "action", "evidence"),
    [
        # torchrun's agent sees the exit and stops the other rank
        ("dies", "os._exit(1)", "exitcode  : 1"),
        # nothing exits: rank 0's next collective fails after dist_timeout_s (10 s); torchrun then sends
        # rank 1 SIGTERM, which only asks it to stop at its next step boundary (it never gets there),
        # and SIGKILL after its shutdown grace (30 s by default)
        ("hangs", "time.sleep(3600)", "Timed out waiting 10000ms"),
    ],
)
def test_a_failing_rank_stops_the_other_in_bounded_time(tmp_path, tiny_model_dir, how, action, evidence):
    wrapper = tmp_path / "rank_1_fails.py"
    wrapper.write_text(RANK_1_FAILS.format(repo=str(REPO), how=how, action=action))
    config = demo_config(tmp_path, tiny_model_dir, name=how, dist_timeout_s=10, batch_size_training=4, num_epochs=1)
    start = time.monotonic()
    result = launch(wrapper, config, timeout=180)
    elapsed = time.monotonic() - start
    assert f"rank 1: {how} after its first optimizer step" in result.stderr, result.stderr[-3000:]
    assert result.returncode != 0 and evidence in result.stderr, result.stderr[-3000:]
    assert elapsed < 90, (elapsed, result.stderr[-3000:])  # the timeout and torchrun's grace, with start-up
    assert not ckpt.complete_checkpoints(tmp_path / "checkpoints" / how)


# --- remote code ------------------------------------------------------------------------------

EVIL_CODE = "open({sentinel!r}, 'w').write('remote code ran')\nraise RuntimeError('remote code ran')\n"


def _with_remote_code(model_dir: Path, sentinel: Path, classes: dict[str, str]) -> None:
    """Point the model's configs at a module of its own that must never be imported."""
    (model_dir / "evil.py").write_text(EVIL_CODE.format(sentinel=str(sentinel)))
    for name in ("config.json", "tokenizer_config.json", "processor_config.json"):
        path = model_dir / name
        if path.exists():
            data = json.loads(path.read_text())
            data["auto_map"] = {k: f"evil.{v}" for k, v in classes.items()}
            path.write_text(json.dumps(data))


def test_a_models_own_code_runs_only_when_the_config_opts_in(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import transformers.dynamic_module_utils as dynamic

    sentinel = tmp_path / "remote_code_ran"
    # multimodal: InternVL always loads as transformers' native class
    vl = tmp_path / "vl_model"
    shutil.copytree(tiny_model_dir, vl)
    _with_remote_code(
        vl,
        sentinel,
        {
            "AutoConfig": "EvilConfig",
            "AutoModelForImageTextToText": "Evil",
            "AutoProcessor": "EvilProcessor",
            "AutoTokenizer": "EvilTokenizer",
        },
    )
    config = demo_config(tmp_path, tiny_model_dir, name="vl", model_id=str(vl), num_epochs=1)
    assert run.main([str(config)]) == 0
    assert not sentinel.exists()

    # text-only: a Qwen2 model (a class transformers has) whose config also maps to its own code
    text = save_text_model(tmp_path / "text_model", tiny_model_dir)
    _with_remote_code(text, sentinel, {"AutoConfig": "EvilConfig", "AutoModelForCausalLM": "Evil"})
    records = [{k: v for k, v in r.items() if k != "image"} for r in json.loads((DEMO / "val.json").read_text())]
    data = tmp_path / "text.json"
    data.write_text(json.dumps(records))
    keys = dict(model_id=str(text), multimodal=False, train_path=str(data), val_path=str(data), num_epochs=1)
    assert run.main([str(demo_config(tmp_path, tiny_model_dir, name="text", **keys))]) == 0
    assert not sentinel.exists()

    # opting in runs it (so the two runs above really had code to refuse)
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    opted_in = demo_config(tmp_path, tiny_model_dir, name="trusted", trust_remote_code=True, **keys)
    user_error(capsys, opted_in, text, "remote code ran")
    assert sentinel.exists()
