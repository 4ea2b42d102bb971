"""Smoke run of bench.bench_step on the tiny model: every mode reports, and it measures the right computation."""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch

from bench.bench_step import CUDA_ONLY_MODES, MODES, OPT_IN_MODES, failed, main

pytestmark = pytest.mark.transformers  # exercises transformers' model code (with_transformers.sh)

SMALL = [
    "--tiny",
    "--device",
    "cpu",
    "--dtype",
    "fp32",
    "--iters",
    "1",
    "--warmup",
    "0",
    "--batch",
    "2",
    "--tiles",
    "1",
    "--question",
    "8",
    "--latents",
    "2",
    "--answer",
    "8",
    "--new-tokens",
    "4",
]
TIMING = {"ms_median", "ms_min", "ms_max", "cpu_ms_median", "peak_mem_gib"}
STEP = TIMING | {"loss", "saved_gib", "tflops", "mfu"}
DECODE = TIMING | {"prefill_ms", "ms_per_token", "samples", "new_tokens", "samples_per_s", "tokens_per_s"}
EXPECTED_KEYS = {
    "vision": STEP | {"tiles"},
    "sft": STEP | {"tokens"},
    "coconut": STEP | {"tokens", "passes"},
    "naive": STEP | {"tokens", "passes"},
    "decode": DECODE,
    "decode_step": TIMING | {"decoder", "cache_len", "samples"},
    "naive_decode": DECODE | {"match_vs_decode"},
    "decode_graph": DECODE | {"match_vs_decode"},
    "coconut_compiled": STEP | {"tokens", "passes", "first_step_s"},
}
CPU_MODES = [m for m in MODES if m not in CUDA_ONLY_MODES + OPT_IN_MODES]


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_model_dir) -> list[dict]:
    out = tmp_path_factory.mktemp("bench") / "results.jsonl"
    returned = main([*SMALL, "--out", str(out)])
    written = read_lines(out)
    assert written == returned
    return written


def test_every_mode_writes_a_line(smoke):
    header, *measured, summary = smoke
    assert header["mode"] == "header" and summary["mode"] == "summary"
    assert {"device", "torch", "transformers", "dtype", "command", "params", "layout", "flops"} <= header.keys()
    assert header["layout"]["seq"] == 4 + 2 + 8 + 1 + 2 + 1 + 8 + 1  # 1 tile = 4 image tokens in the tiny model
    assert [line["mode"] for line in measured] == CPU_MODES
    for line in measured:
        assert "error" not in line, line
        assert EXPECTED_KEYS[line["mode"]] <= line.keys(), line
        assert line["peak_mem_gib"] is None  # CPU: no per-mode peak
        numbers = [v for k, v in line.items() if k not in ("mode", "peak_mem_gib", "decoder")]
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers), line
    assert {
        "coconut_over_sft_ms",
        "coconut_over_sft_cpu_ms",
        "naive_over_sft_ms",
        "naive_decode_over_decode_ms_per_token",
    } <= summary.keys()
    assert summary["coconut_over_sft_saved"] > 1.0  # the latent passes keep their K/V for the backward


def test_coconut_computes_what_the_naive_design_computes(smoke):
    lines = {line["mode"]: line for line in smoke}
    assert lines["coconut"]["loss"] == pytest.approx(lines["naive"]["loss"], rel=1e-4)
    assert lines["sft"]["loss"] != pytest.approx(lines["coconut"]["loss"], rel=1e-4)  # latents do matter
    assert lines["naive_decode"]["match_vs_decode"] == 1.0
    assert lines["decode_step"]["decoder"] == "StaticGreedyDecoder"
    assert lines["decode_step"]["cache_len"] == lines["header"]["layout"]["prompt"] + 4  # --new-tokens 4 >= 0 + 1 + 2


def test_freeze_backbone_counts_vision_forward_only(smoke, tmp_path):
    out = tmp_path / "frozen.jsonl"
    frozen = main([*SMALL, "--freeze-backbone", "--modes", "sft,coconut", "--out", str(out)])
    full_flops, frozen_flops = smoke[0]["flops"], frozen[0]["flops"]
    assert frozen_flops["vision"] == pytest.approx(full_flops["vision"] / 3)
    coconut = {line["mode"]: line for line in smoke}["coconut"]
    frozen_coconut = {line["mode"]: line for line in frozen}["coconut"]
    assert frozen_coconut["loss"] == pytest.approx(coconut["loss"], rel=1e-6)  # same batch, same weights


def test_profile_reports_where_the_time_goes(tmp_path, tiny_model_dir):
    """--profile adds op counts and top ops; the latent passes show up as extra operators."""
    lines = main([*SMALL, "--modes", "sft,coconut", "--profile", "--profile-top", "3"])
    profiles = {line["mode"]: line["profile"] for line in lines if "profile" in line}
    assert profiles.keys() == {"sft", "coconut"}
    for prof in profiles.values():
        assert prof["wall_ms"] > 0 and prof["gpu_busy_ms"] is None and prof["top_gpu_ms"] is None
        assert 1 <= len(prof["top_cpu_ms"]) <= 3
        for name, ms, count in prof["top_cpu_ms"]:
            assert isinstance(name, str) and ms > 0 and count >= 1
    assert profiles["coconut"]["aten_ops"] > profiles["sft"]["aten_ops"] > 0


@pytest.mark.slow
def test_compiled_mode_measures_the_same_loss(tiny_model_dir):
    lines = main([*SMALL, "--latents", "3", "--modes", "coconut,coconut_compiled"])
    by_mode = {line["mode"]: line for line in lines}
    assert EXPECTED_KEYS["coconut_compiled"] <= by_mode["coconut_compiled"].keys()
    assert by_mode["coconut_compiled"]["loss"] == pytest.approx(by_mode["coconut"]["loss"], rel=1e-5)
    assert by_mode["coconut"]["saved_gib"] > 0 and by_mode["coconut_compiled"]["saved_gib"] is None
    assert "coconut_compiled_over_sft_ms" not in by_mode["summary"]  # no sft in this run


def test_a_failing_mode_is_reported_and_the_others_still_run(tiny_model_dir):
    lines = main([*SMALL, "--modes", "decode_graph,sft"])  # CUDA graphs on a CPU: refused
    by_mode = {line["mode"]: line for line in lines}
    assert by_mode["decode_graph"]["error"] == "ValueError"
    assert "needs one process" in by_mode["decode_graph"]["msg"]
    assert "error" not in by_mode["sft"] and by_mode["sft"]["ms_median"] > 0
    assert failed(lines)


def test_ragged_batch_is_left_padded_and_still_exact(tiny_model_dir):
    """--ragged shortens questions across the batch: padded like real data, coconut still equals naive."""
    lines = main(
        [
            *SMALL,
            "--batch",
            "3",
            "--ragged",
            "3",
            "--modes",
            "coconut,naive,decode,naive_decode",
            "--naive-decode-samples",
            "3",
        ]
    )
    header, by_mode = lines[0], {line["mode"]: line for line in lines}
    assert header["layout"]["ragged"] == 3
    assert all("error" not in line for line in lines), lines
    assert by_mode["coconut"]["loss"] == pytest.approx(by_mode["naive"]["loss"], rel=1e-4)
    assert by_mode["naive_decode"]["match_vs_decode"] == 1.0  # one by one, each with its padding


def test_ragged_beyond_the_question_is_refused(capsys):
    with pytest.raises(SystemExit):
        main([*SMALL, "--ragged", "9"])
    assert "exceeds --question 8" in capsys.readouterr().err


def test_shapes_cycle_latent_columns_and_column_multiple_aligns_them(tiny_model_dir):
    """--shapes 3: three latent columns, as a real run's batches have; --column-multiple 16 pads them to one."""
    mixed = main([*SMALL, "--shapes", "3", "--modes", "coconut,naive"])
    aligned = main([*SMALL, "--shapes", "3", "--column-multiple", "16", "--modes", "coconut,naive"])
    columns = mixed[0]["layout"]["latent_columns"]
    assert len(set(columns)) == 3
    assert aligned[0]["layout"]["latent_columns"] == [16] * 3  # 4 image + 2 + 8 question + 1 = 15, rounded up
    for lines in (mixed, aligned):
        by_mode = {line["mode"]: line for line in lines}
        assert all("error" not in line for line in lines), lines
        assert by_mode["coconut"]["loss"] == pytest.approx(by_mode["naive"]["loss"], rel=1e-4)
    # padding only moves the latents right: the same samples give the same loss (last run: batch 0)
    assert {line["mode"]: line for line in aligned}["coconut"]["loss"] == pytest.approx(
        {line["mode"]: line for line in mixed}["coconut"]["loss"], rel=1e-4
    )


def graph_tensors() -> int:
    """Live tensors that belong to an autograd graph (a forward whose graph is still held)."""
    return sum(isinstance(obj, torch.Tensor) and obj.grad_fn is not None for obj in gc.get_objects())


def test_step_modes_leave_no_graph_behind(tiny_model_dir):
    """Each step mode's untimed saved_gib forward frees its graph. A pack hook that kept the tensor
    itself tied every saved output to its own node, a cycle that outlived the mode: at full size the
    plain step's ~9 GiB of activations stayed alive and the Coconut step after it ran out of memory."""
    gc.collect()
    before = graph_tensors()
    lines = main([*SMALL, "--modes", "vision,sft,coconut,naive"])
    assert all(line.get("saved_gib", 1) > 0 for line in lines[1:-1]), lines
    gc.collect()
    assert graph_tensors() == before
