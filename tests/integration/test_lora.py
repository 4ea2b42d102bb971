"""LoRA (use_llm_lora, use_backbone_lora) through peft, as InternVL's fine-tune sets it up.

InternVL's internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py: wrap_llm_lora puts
adapters on the language model's self_attn.{q,k,v,o}_proj and mlp.{gate,down,up}_proj, wrap_backbone_lora
on InternViT's attn.qkv, attn.proj, mlp.fc1, mlp.fc2 (in transformers' native layout attention.q_proj,
k_proj, v_proj, projection_layer, mlp.fc1, fc2), both with lora_alpha = 2 × rank and dropout 0.05, via
peft's get_peft_model on that part, which freezes the rest of the part. Here: the latent loop on the
adapted model is exact (against the hand-merged model and against recomputing from scratch), the new
token rows train while the rest of their matrices stays put, and a LoRA run checkpoints, resumes,
exports and answers through the CLI, under FSDP2 too.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import run
import utils
from coconut import Coconut
from dataset import Batch, LatentIds
from modeling.activation_checkpointing import enable_latent_checkpointing
from modeling.loading import add_latent_tokens
from modeling.lora import apply_lora
from multimodal.collator_mm import MultimodalCollator
from multimodal.dataset_mm import ImageTokens
from tests.helpers.latent_reference import reference_forward
from tests.helpers.runs import REPO, demo_config, metrics, mm_config, scaled_timeout, subprocess_env, torchrun, weights
from tests.helpers.text_lm import END, EOS, LATENT, PAD, START, assert_close_grads, grads, mixed_batch, tiny_lm
from tests.helpers.tiny_vl import mixed
from utils import ConfigError, ModelSetupError, config_from_dict

pytestmark = pytest.mark.transformers  # exercises transformers' model code (with_transformers.sh)

LORA = dict(use_llm_lora=4, use_backbone_lora=2, lora_dropout=0.0)
SCALING = 2.0  # InternVL's lora_alpha = 2 × rank, for every rank
# InternVL's default LLM LoRA targets (wrap_llm_lora in its model code), spelled out here
INTERNVL_LLM_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.down_proj",
    "mlp.up_proj",
)


def _model(tiny_model_dir, **keys):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = add_latent_tokens(processor.tokenizer, model)
    return model, processor, ids, mm_config(tiny_model_dir, coconut=True, **keys)


def lora_model(tiny_model_dir, **keys):
    """The tiny InternVL with both parts' adapters, moved off their initial state (B = 0 would hide
    them) as training would: every adapter and the three new rows get a random offset."""
    model, processor, ids, config = _model(tiny_model_dir, **{**LORA, **keys})
    torch.manual_seed(1)  # lora_A's random initialisation, the offsets, then the batch's pixels
    apply_lora(model, config, ids)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or name.endswith(".rows"):
                p.add_(0.2 * torch.randn_like(p))
    return model, processor, ids


def merged_by_hand(tiny_model_dir, lora: torch.nn.Module, ids) -> torch.nn.Module:
    """The plain model with W + SCALING · B A in every adapted layer and the trained rows written into the
    embeddings and head, computed here from the LoRA model's tensors (not by peft or lora.py)."""
    model, _, _, _ = _model(tiny_model_dir)
    own = dict(lora.named_parameters())
    rows = [ids.start, ids.latent, ids.end]
    with torch.no_grad():
        for name, p in model.named_parameters():
            module, _, param = name.rpartition(".")
            if f"{module}.lora_A.default.weight" in own and param == "weight":
                a, b = own[f"{module}.lora_A.default.weight"], own[f"{module}.lora_B.default.weight"]
                p.copy_(own[f"{module}.base_layer.weight"] + SCALING * b @ a)
            elif f"{module}.rows" in own:
                p.copy_(own[name])
                p[rows] = own[f"{module}.rows"]
            else:
                p.copy_(own.get(name, own.get(f"{module}.base_layer.{param}")))
    return model


def batch_of(processor, ids) -> Batch:
    tok = processor.tokenizer
    samples = mixed(tok, ids, ImageTokens.from_processor(processor))
    return MultimodalCollator(tok.pad_token_id, ids.latent)(samples)


def coconut(model, processor, ids) -> Coconut:
    tok = processor.tokenizer
    return Coconut(model, ids.latent, ids.start, ids.end, tok.eos_token_id, pad_token_id=tok.pad_token_id)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_coconut_equals_the_merged_models_coconut_and_the_from_scratch_reference(tiny_model_dir, checkpointing):
    """Loss and every gradient of Coconut on the adapted model equal (1) Coconut on the model merged by hand,
    whose weight gradient G gives the adapters' as dB = s·G·Aᵀ, dA = s·Bᵀ·G and the rows' as G[rows], and
    (2) the latent loop recomputed from scratch on the adapted model; with activation checkpointing too."""
    model, processor, ids = lora_model(tiny_model_dir)
    merged = merged_by_hand(tiny_model_dir, model, ids)
    batch = batch_of(processor, ids)
    if checkpointing:
        enable_latent_checkpointing(model.model.language_model.layers)
    out = coconut(model, processor, ids)(batch)
    out.loss.backward()
    got = grads(model)
    model.zero_grad()

    ref_loss, _ = reference_forward(
        model, ids.latent, batch.input_ids, batch.attention_mask, batch.position_ids, batch.labels, batch.pixel_values
    )
    ref_loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    # fp32 rounding of two summation orders (the copy-free latent passes add prefix and latents apart):
    # up to ~2e-6 of a tensor's largest gradient on its smallest elements; a wrong term is ~1 of it
    assert_close_grads(got, grads(model), atol_of_max=1e-5)

    merged_out = coconut(merged, processor, ids)(batch)
    merged_out.loss.backward()
    torch.testing.assert_close(out.loss, merged_out.loss, rtol=1e-5, atol=1e-6)
    g = dict(merged.named_parameters())
    own = {n: p.detach() for n, p in model.named_parameters()}
    rows = [ids.start, ids.latent, ids.end]
    expected = {}
    for name in got:
        module, _, param = name.rpartition(".")
        if ".lora_A." in name:
            layer = module.split(".lora_A.")[0]
            expected[name] = SCALING * own[f"{layer}.lora_B.default.weight"].T @ g[f"{layer}.weight"].grad
        elif ".lora_B." in name:
            layer = module.split(".lora_B.")[0]
            expected[name] = SCALING * g[f"{layer}.weight"].grad @ own[f"{layer}.lora_A.default.weight"].T
        elif param == "rows":
            expected[name] = g[f"{module}.weight"].grad[rows]
        else:
            expected[name] = g[name].grad
    assert any(".lora_B." in n for n in got) and any(n.endswith(".rows") for n in got)
    assert any("vision_tower" in n and "lora_A" in n for n in got)  # the backbone's adapters learn through the loop
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        # The merged weights round W + s·B·A once more than the adapted layers do: errors of fp32 rounding,
        # carried through the latent passes, ~1e-5 of each tensor's largest gradient (a wrong term is ~1)
        scale = float(value.abs().max())
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_a_text_only_lm_gets_the_same_adapters_and_rows(tied):
    """A text-only causal LM (tiny Qwen2): its decoder is the language model; with tied embeddings the head
    shares the embedding's rows as it shares its matrix. Coconut on it equals the from-scratch reference."""
    model = tiny_lm()
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    config = config_from_dict({"model_id": "m", "train_path": "t", "val_path": "v", **LORA, "use_backbone_lora": 0})
    apply_lora(model, config, LatentIds(START, LATENT, END))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith(".rows"):
                p.add_(0.2 * torch.randn_like(p))
    assert (model.lm_head.rows is model.model.embed_tokens.rows) is tied
    batch = mixed_batch()
    out = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)(batch)
    out.loss.backward()
    got = grads(model)
    model.zero_grad()
    ref_loss, _ = reference_forward(
        model, LATENT, batch.input_ids, batch.attention_mask, batch.position_ids, batch.labels
    )
    ref_loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(got, grads(model))
    assert {n for n in got if not n.startswith("model.layers.")} == (
        {"model.embed_tokens.rows"} if tied else {"model.embed_tokens.rows", "lm_head.rows"}
    )


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_parts_follow_internvl_and_the_freeze_flags(tiny_model_dir):
    """use_llm_lora freezes the language model and its head (InternVL wraps the whole Qwen2ForCausalLM) except
    its adapters and the three new rows; the projector and, without use_backbone_lora, the vision tower keep
    their flags (freeze_mlp / freeze_backbone); use_backbone_lora freezes the vision tower's own weights."""
    model, _, ids, config = _model(tiny_model_dir, use_llm_lora=4)
    apply_lora(model, config, ids)
    trainable = _trainable(model)
    assert {"model.language_model.embed_tokens.rows", "lm_head.rows"} <= trainable
    assert not any(
        n.startswith(("model.language_model.", "lm_head.")) and "lora_" not in n and not n.endswith(".rows")
        for n in trainable
    )
    assert {n for n in trainable if "lora_" in n} == {
        f"model.language_model.layers.{i}.{m}.lora_{ab}.default.weight"
        for i in (0, 1)
        for m in INTERNVL_LLM_TARGETS
        for ab in "AB"
    }
    assert "model.multi_modal_projector.linear_1.weight" in trainable
    assert "model.vision_tower.encoder.layer.0.attention.q_proj.weight" in trainable
    layer = model.model.language_model.layers[0].self_attn.q_proj
    assert (layer.r["default"], layer.scaling["default"]) == (4, 2.0)  # alpha 2 × rank, as InternVL

    model, _, ids, config = _model(tiny_model_dir, use_backbone_lora=2, backbone_lora_alpha=8, freeze_mlp=True)
    from modeling.loading import freeze

    freeze(model, config)
    apply_lora(model, config, ids)
    trainable = _trainable(model)
    assert not any("multi_modal_projector" in n for n in trainable)
    assert {n for n in trainable if n.startswith("model.vision_tower.")} == {
        f"model.vision_tower.encoder.layer.{i}.{m}.lora_{ab}.default.weight"
        for i in (0, 1)
        for m in (
            "attention.q_proj",
            "attention.k_proj",
            "attention.v_proj",
            "attention.projection_layer",
            "mlp.fc1",
            "mlp.fc2",
        )
        for ab in "AB"
    }
    assert "model.language_model.embed_tokens.weight" in trainable  # no LLM adapters: the LLM trains whole
    layer = model.model.vision_tower.encoder.layer[0].mlp.fc1
    assert (layer.r["default"], layer.scaling["default"]) == (2, 4.0)


def test_a_target_module_that_matches_nothing_is_named(tiny_model_dir):
    model, _, ids, config = _model(tiny_model_dir, use_llm_lora=4, llm_lora_target_modules=["self_attn.qkv_proj"])
    with pytest.raises(
        ModelSetupError,
        match=r"key 'llm_lora_target_modules': 'self_attn.qkv_proj' names no "
        r"linear layer of the language model",
    ):
        apply_lora(model, config, ids)


def test_only_the_three_rows_of_embeddings_and_head_move_in_training(tiny_model_dir):
    """AdamW with weight decay on the trainable parameters: the new rows change, every other row of the
    embedding and head matrices stays bit-identical (a gradient mask would let weight decay move them)."""
    model, processor, ids = lora_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    coconut(model, processor, ids)(batch_of(processor, ids)).loss.backward()
    optimizer.step()
    after = model.state_dict()
    for name in ("model.language_model.embed_tokens", "lm_head"):
        assert torch.equal(after[f"{name}.weight"], before[f"{name}.weight"])
        assert not torch.equal(after[f"{name}.rows"], before[f"{name}.rows"])
    assert torch.equal(
        after["model.language_model.layers.0.mlp.up_proj.base_layer.weight"],
        before["model.language_model.layers.0.mlp.up_proj.base_layer.weight"],
    )


def test_lora_keys_are_checked_like_every_key():
    base = {"model_id": "m", "train_path": "t", "val_path": "v"}
    for keys, message in [
        ({"use_llm_lora": -1}, "key 'use_llm_lora': must be >= 0"),
        ({"llm_lora_alpha": 0}, "key 'llm_lora_alpha': must be > 0"),
        ({"lora_dropout": 1.0}, "key 'lora_dropout': must be in [0, 1)"),
        ({"llm_lora_target_modules": "q_proj"}, "key 'llm_lora_target_modules': expected a non-empty list"),
        ({"backbone_lora_target_modules": []}, "key 'backbone_lora_target_modules': expected a non-empty list"),
        ({"use_backbone_lora": 8}, "key 'use_backbone_lora': only multimodal (InternVL) models"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            config_from_dict({**base, **keys})
    config = config_from_dict({**base, "use_llm_lora": 16})
    assert config.llm_lora_alpha is None and config.lora_dropout == 0.05  # InternVL's: alpha 2 × rank, dropout 0.05
    assert config.llm_lora_target_modules == list(INTERNVL_LLM_TARGETS)


def test_without_peft_a_lora_key_is_refused_in_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Before any model loads (the CLI checks that peft can be imported), and where a LoRA checkpoint is
    loaded (lora.py imports peft only then)."""
    real = utils.importlib.util.find_spec
    monkeypatch.setattr(utils.importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    config = demo_config(tmp_path, tiny_model_dir, name="nopeft", use_llm_lora=8)
    assert run.main([str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {config}: key 'use_llm_lora': LoRA needs peft, which is not installed (pip install peft)"
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    model, _, ids, config = _model(tiny_model_dir, use_llm_lora=4)
    with pytest.raises(ModelSetupError, match="needs peft, which is not installed: pip install peft"):
        apply_lora(model, config, ids)


# --- through the CLI ------------------------------------------------------------------------------

RUN_KEYS = dict(
    use_llm_lora=4, use_backbone_lora=2, activation_checkpointing=True, epochs_per_stage=1, max_latent_stage=2, lr=1e-2
)


def _adapter(checkpoint) -> dict:
    return load_file(checkpoint / "model" / "adapter" / "adapter_model.safetensors")


def _logits(model, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).logits


@pytest.mark.slow
def test_a_lora_run_checkpoints_its_adapters_resumes_exactly_answers_and_exports_a_plain_model(
    tmp_path, tiny_model_dir
):
    """Dropout 0.05 (InternVL's) and activation checkpointing on. A run stopped after epoch 1 and resumed
    ends with the same plain weights and adapters, tensor for tensor, as a run never stopped; the frozen
    weights stay those of the model it started from; --infer answers as the run's evaluation did; the
    checkpoint is peft's standard layout (PeftModel.from_pretrained on model/ and model/adapter) and
    --export writes that model merged, which loads without peft."""
    straight = demo_config(tmp_path, tiny_model_dir, name="straight", num_epochs=2, **RUN_KEYS)
    assert run.main([str(straight)]) == 0
    split = demo_config(tmp_path, tiny_model_dir, name="split", num_epochs=1, **RUN_KEYS)
    assert run.main([str(split)]) == 0
    raw = yaml.safe_load(split.read_text())
    split.write_text(yaml.safe_dump({**raw, "num_epochs": 2}))
    assert run.main([str(split)]) == 0
    checkpoint = tmp_path / "checkpoints" / "straight" / "checkpoint_2"
    for part in (weights, _adapter):
        a, b = part(checkpoint), part(tmp_path / "checkpoints" / "split" / "checkpoint_2")
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    trained, start = (
        AutoModelForImageTextToText.from_pretrained(d).state_dict() for d in (checkpoint / "model", tiny_model_dir)
    )
    frozen = [k for k in start if k.startswith(("model.language_model.layers.", "model.vision_tower.encoder."))]
    assert len(frozen) > 30 and all(torch.equal(trained[k], start[k]) for k in frozen)
    assert not torch.equal(
        trained["model.multi_modal_projector.linear_1.weight"], start["model.multi_modal_projector.linear_1.weight"]
    )  # no adapters there: it trains

    predictions = tmp_path / "infer.jsonl"
    data = REPO / "data" / "demo"
    answered = subprocess.run(
        [
            sys.executable,
            "run.py",
            "--infer",
            str(checkpoint),
            "--output",
            str(predictions),
            "--data",
            str(data / "val.json"),
            "--image-dir",
            str(data / "images"),
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=scaled_timeout(300),
    )
    assert answered.returncode == 0, answered.stderr[-3000:]
    evaluated = (tmp_path / "checkpoints" / "straight" / "predictions" / "epoch_2.jsonl").read_text().splitlines()
    assert [json.loads(line)["output"] for line in predictions.read_text().splitlines()] == [
        json.loads(line)["output"] for line in evaluated
    ]

    from peft import PeftModel

    processor = AutoProcessor.from_pretrained(checkpoint / "model")
    ids = add_latent_tokens(processor.tokenizer)
    base = AutoModelForImageTextToText.from_pretrained(checkpoint / "model", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(checkpoint / "model" / "adapter")).eval()
    batch = batch_of(processor, ids)
    expected = _logits(adapted, batch)
    out = tmp_path / "export"
    assert run.main(["--export", str(checkpoint), str(out), "--dtype", "fp32"]) == 0
    assert not (out / "adapter").exists()
    script = (
        "import sys, torch; sys.modules['peft'] = None\n"  # the export must load without peft
        "from transformers import AutoModelForImageTextToText\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(out)!r}, dtype=torch.float32)\n"
        "from safetensors.torch import save_file\n"
        f"save_file(m.state_dict(), {str(tmp_path / 'loaded.safetensors')!r})"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=scaled_timeout(300),
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    plain = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    for k, v in load_file(tmp_path / "loaded.safetensors").items():
        assert torch.equal(plain.state_dict()[k], v), k
    torch.testing.assert_close(_logits(plain, batch), expected, rtol=1e-5, atol=1e-5)
    assert metrics(tmp_path / "checkpoints" / "straight")[-1]["stage"] == 1


@pytest.mark.slow
def test_a_run_resumes_its_adapters_only_with_the_same_lora_keys(tmp_path, tiny_model_dir, capsys):
    config = demo_config(tmp_path, tiny_model_dir, name="keys", num_epochs=1, use_llm_lora=4)
    assert run.main([str(config)]) == 0
    capsys.readouterr()
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "num_epochs": 2, "use_llm_lora": 8}))
    assert run.main([str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "checkpoint_1/model: saved by a run with other LoRA keys (use_llm_lora)" in err


@pytest.mark.slow
def test_lora_on_two_fsdp_ranks_matches_one_rank_on_the_global_batch(tmp_path, tiny_model_dir):
    """FSDP2 (gloo, CPU) shards the adapted decoder and vision layers and the new rows: 2 ranks × batch 4
    give the losses, plain weights and adapters of 1 process × batch 8 (dropout 0: ranks draw other masks)."""
    keys = dict(RUN_KEYS, num_epochs=2, lr=1e-3, lora_dropout=0.0)
    one = demo_config(tmp_path, tiny_model_dir, name="one", batch_size_training=8, **keys)
    two = demo_config(tmp_path, tiny_model_dir, name="two", batch_size_training=4, **keys)
    assert run.main([str(one)]) == 0
    result = torchrun(two, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    for ma, mb in zip(
        metrics(tmp_path / "checkpoints" / "one"), metrics(tmp_path / "checkpoints" / "two"), strict=True
    ):
        for key in ("train_loss", "val_loss"):
            assert abs(ma[key] - mb[key]) <= 1e-5 * abs(ma[key]), (key, ma, mb)
    for part in (weights, _adapter):
        a, b = (part(tmp_path / "checkpoints" / name / "checkpoint_2") for name in ("one", "two"))
        assert a.keys() == b.keys()
        for k in a:
            if not k.endswith("k_proj.bias"):  # zero true gradient: rounding noise under Adam (test_distributed)
                torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)
