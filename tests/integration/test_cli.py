"""The command line: a bad config or override is refused in a fraction of a second (before torch loads)
with one line naming the file, the override and the key; overrides work as keys of the file, under
torchrun too; faults of model_id, remote code and the converter end as one line; requirements list
every third-party import.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

import run
from storage import atomic
from tests.helpers.runs import REPO, demo_config, launch, save_text_model, scaled_timeout, subprocess_env
from utils import Config, config_from_dict, load_config

HUB_ID = "nobody/never-loaded"  # a model_id the refusals below never get as far as loading
HEAVY = ("torch", "transformers", "numpy")


def config_file(tmp_path: Path, model_id: object = HUB_ID, **keys) -> Path:
    """args/demo.yaml on the demo data with a private save_path, the given model_id and keys (any name)."""
    path = demo_config(tmp_path, model_id)
    raw = yaml.safe_load(path.read_text())
    raw.update(keys)
    path.write_text(yaml.safe_dump(raw))
    return path


def cli_error(capsys, argv: list[object], *fragments: object) -> str:
    """run.main must end with status 2 and exactly one line "error: ..." holding every fragment."""
    assert run.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert err.rstrip().splitlines()[-1] == lines[0], err[-3000:]  # the message itself is one line
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


# --- refuse fast --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "override"])
def test_bad_config_is_refused_before_torch_is_imported(tmp_path, where):
    keys = {"num_epoch": 3} if where == "file" else {}
    config = config_file(tmp_path, **keys)
    overrides = ["lr=.nan"] if where == "override" else []
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / "run.py"), str(config), *overrides],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=scaled_timeout(120),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    expected = "unknown key 'num_epoch'" if where == "file" else "override 'lr=.nan': key 'lr'"
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    # "import time: self | cumulative | [indent]module" for every module imported, nested ones indented
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert "yaml" in imported and "utils" in imported  # the listing is there: the check below can see imports
    loaded = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert not loaded, loaded


# --- overrides ----------------------------------------------------------------------------------


def test_overrides_are_read_as_yaml_and_win_over_the_file(tmp_path):
    config = config_file(tmp_path, lr=0.5, max_length=100)
    loaded = load_config(
        config,
        [
            "lr=1e-4",
            "num_epochs=3",
            "name=exp/b",
            "bf16=true",
            "max_length=null",
            "prompt_format=internvl2_5",
            "max_grad_norm=1",
        ],
    )
    assert loaded.lr == 1e-4 and loaded.num_epochs == 3 and loaded.name == "exp/b" and loaded.bf16 is True
    assert loaded.max_length is None and loaded.prompt_format == "internvl2_5"
    assert loaded.max_grad_norm == 1.0 and isinstance(loaded.max_grad_norm, float)
    assert loaded.seed == 0 and loaded.batch_size_training == 8  # untouched keys keep the file's values
    # an override can supply what the file lacks; checks across keys see the result
    raw = yaml.safe_load(config.read_text())
    del raw["val_path"]
    config.write_text(yaml.safe_dump(raw))
    assert load_config(config, [f"val_path={REPO / 'data/demo/val.json'}"]).val_path.endswith("val.json")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lrr=0.1"], "override 'lrr=0.1': unknown key 'lrr' (did you mean 'lr'?)"),
        (["bf16=maybe"], "override 'bf16=maybe': key 'bf16': expected true/false, got 'maybe'"),
        (["num_epochs=2.5"], "override 'num_epochs=2.5': key 'num_epochs': expected an integer"),
        (["num_epochs=0"], "override 'num_epochs=0': key 'num_epochs': must be > 0"),
        (["lr=.inf"], "override 'lr=.inf': key 'lr': must be a finite number >= 0, got inf"),
        (["cot=true"], "override 'cot=true': keys ['coconut', 'cot']: choose at most one method"),
        (["lr"], "override 'lr': expected KEY=VALUE"),
        (["=3"], "override '=3': expected KEY=VALUE"),
        (["lr=[1"], "override 'lr=[1': not valid YAML"),
        (["name=/elsewhere"], "override 'name=/elsewhere': key 'name': must name a directory inside save_path"),
        (["val_path=/nonexistent.json"], "override 'val_path=/nonexistent.json': key 'val_path': path does not exist"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_a_bad_override_is_refused_naming_file_override_and_key(tmp_path, capsys, overrides, message):
    config = config_file(tmp_path)  # coconut: true
    cli_error(capsys, [config, *overrides], f"{config}: {message}")


def test_export_takes_no_config_or_overrides(capsys):
    with pytest.raises(SystemExit) as e:
        run.main(["--export", "a", "b", "lr=1"])
    assert e.value.code == 2 and "--export takes no config file or KEY=VALUE overrides" in capsys.readouterr().err


# --- config faults (issue 13) -------------------------------------------------------------------

FLOAT_KEYS = ("lr", "weight_decay", "uniform_prob", "warmup_ratio", "max_grad_norm", "lora_dropout")


def test_float_keys_listed_here_are_every_float_key_of_config():
    floats = {k for k, t in typing.get_type_hints(Config).items() if t is float or float in typing.get_args(t)}
    assert floats == set(FLOAT_KEYS)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), -1.0], ids=str)
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_or_negative_float_keys_are_refused(tmp_path, capsys, key, value):
    config = config_file(tmp_path, **{key: value})
    cli_error(capsys, [config], f"{config}: key '{key}': must be a finite number >= 0, got {value}")


def test_zero_stays_a_valid_float():
    config = config_from_dict({"model_id": "m", "train_path": "t", "val_path": "v", **{k: 0 for k in FLOAT_KEYS}})
    assert all(getattr(config, k) == 0.0 for k in FLOAT_KEYS)


def test_a_key_given_twice_in_the_file_is_refused_naming_key_and_lines(tmp_path, capsys):
    config = config_file(tmp_path)
    lines = config.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("lr:")) + 1
    config.write_text("\n".join(lines + ["lr: 0.5"]) + "\n")
    cli_error(capsys, [config], config, f"key 'lr' given twice (first at line {first})", f"line {len(lines) + 1}")


def test_a_yaml_merge_key_still_sets_defaults_that_later_keys_override(tmp_path):
    config = config_file(tmp_path)
    raw = yaml.safe_load(config.read_text())
    del raw["lr"]
    config.write_text("<<: {lr: 0.25, seed: 7}\n" + yaml.safe_dump(raw) + "lr: 0.5\n")
    loaded = load_config(config)
    assert (loaded.lr, loaded.seed) == (0.5, 0)  # explicit keys win over the merged mapping, whatever the order


@pytest.mark.parametrize("name", ["/abs/run", "../out", "a/../../b", "", ".", "a/.."])
def test_name_must_stay_inside_save_path(tmp_path, capsys, name):
    config = config_file(tmp_path, name=name)
    cli_error(capsys, [config], config, "key 'name': must name a directory inside save_path", repr(name))


def test_an_absolute_name_leaves_the_directory_it_names_untouched(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    keep = atomic.temp_path(elsewhere / "checkpoint_1")  # what a run's clean-up would delete in its own directory
    keep.mkdir(parents=True)
    config = config_file(tmp_path, name=str(elsewhere))
    cli_error(capsys, [config], config, "key 'name'")
    assert list(elsewhere.iterdir()) == [keep]


def test_a_name_that_is_a_symlink_out_of_save_path_is_refused(tmp_path, capsys):
    save_path = tmp_path / "checkpoints"
    save_path.mkdir()
    (save_path / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    config = config_file(tmp_path, name="link")
    cli_error(capsys, [config], config, "key 'name'", f"resolves to {tmp_path / 'outside'}, outside save_path")
    assert config_from_dict({"model_id": "m", "train_path": "t", "val_path": "v", "name": "exp/run1"}).name


@pytest.mark.parametrize(("key", "value"), [("max_tiles", 100_000), ("max_tiles", 129), ("video_tiles", 129)])
def test_tile_counts_are_bounded(tmp_path, capsys, key, value):
    config = config_file(tmp_path, **{key: value})
    cli_error(capsys, [config], config, f"key '{key}': at most 128", f"got {value}")
    base = {"model_id": "m", "train_path": "t", "val_path": "v"}
    assert getattr(config_from_dict({**base, key: 128}), key) == 128


@pytest.mark.parametrize("model_id", ["/nonexistent/model", "./missing_model", "~/missing/model/dir", "a/b/c"])
def test_a_missing_model_directory_is_refused_before_loading(tmp_path, capsys, model_id):
    config = config_file(tmp_path, model_id)
    cli_error(capsys, [config], config, f"key 'model_id': no model directory {model_id}")


def test_a_model_id_that_is_a_file_is_refused(tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    config = config_file(tmp_path, weights)
    cli_error(capsys, [config], config, f"key 'model_id': no model directory {weights}")


@pytest.mark.slow
def test_an_unknown_hub_id_offline_is_one_line(tmp_path):
    config = config_file(tmp_path, "nobody/no-such-model-xyz")
    env = {**subprocess_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, str(REPO / "run.py"), str(config), f"model_cache_dir={tmp_path}/c"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled_timeout(300),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith(
        "error: model_id 'nobody/no-such-model-xyz': not a local directory, and the hub gives no copy"
    ), last
    assert "HF_HUB_OFFLINE" in last  # huggingface_hub's reason, kept on the same line


def test_a_model_directory_without_model_files_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    config = config_file(tmp_path, empty, num_epochs=1)
    cli_error(capsys, [config], f"{empty}: cannot load the processor")


def test_converter_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    original = tmp_path / "InternVL-original"
    original.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, original / name)
    (original / "config.json").write_text(
        json.dumps(
            {
                "model_type": "internvl_chat",
                "ps_version": "v1",
                "llm_config": {"model_type": "qwen2"},
                "vision_config": {"image_size": 56, "patch_size": 14},
            }
        )
    )
    cache = tmp_path / "cache"
    config = config_file(tmp_path, original, model_cache_dir=str(cache), num_epochs=1)
    cli_error(
        capsys,
        [config],
        f"model_id '{original}': cannot convert the original-format InternVL checkpoint",
        "ps_version 'v1' is not supported",
    )
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-converted left behind


EVIL_CODE = "open({sentinel!r}, 'w').write('remote code ran')\nraise RuntimeError('remote code ran')\n"


def test_remote_code_never_runs_or_prompts_unless_trusted(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A text-only model whose config type exists only in its own code (auto_map): without trust_remote_code
    transformers would ask on stdin, and "y" would run it. It must neither ask nor run; the run stops with
    one line saying which key opts in."""
    import transformers.dynamic_module_utils as dynamic

    model = save_text_model(tmp_path / "text_model", tiny_model_dir)
    sentinel = tmp_path / "remote_code_ran"
    (model / "evil.py").write_text(EVIL_CODE.format(sentinel=str(sentinel)))
    for name, auto_map in (
        ("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}),
        ("tokenizer_config.json", {"AutoTokenizer": [None, "evil.EvilTokenizer"]}),
    ):
        data = json.loads((model / name).read_text())
        data["auto_map"] = auto_map
        if name == "config.json":
            data["model_type"] = "evil_lm"  # no built-in class to fall back on: transformers would ask
        (model / name).write_text(json.dumps(data))

    prompts = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": prompts.append(prompt) or "y")
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))  # if it did run: not in ~
    records = [
        {k: v for k, v in r.items() if k != "image"}
        for r in json.loads((REPO / "data" / "demo" / "val.json").read_text())
    ]
    data = tmp_path / "text.json"
    data.write_text(json.dumps(records))
    config = config_file(tmp_path, model, multimodal=False, train_path=str(data), val_path=str(data), num_epochs=1)
    cli_error(capsys, [config], model, "auto_map in config.json", "trust_remote_code: true")
    assert prompts == [] and not sentinel.exists()


# --- requirements -------------------------------------------------------------------------------

# Where a distribution's import name differs from its name and the package is not installed here, the
# test cannot map it; every package of requirements*.txt is installed by the README's test command.
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*([^#]*?)\s*(#\s*(.*))?$")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(path: Path) -> dict[str, str]:
    """{normalized package name: its comment} of a requirements file (lines like -r are skipped)."""
    found = {}
    for line in path.read_text().splitlines():
        match = REQUIREMENT.match(line)
        if match and not line.lstrip().startswith(("#", "-")):
            found[_normalize(match.group(1))] = (match.group(5) or "").strip()
    return found


def _project_files() -> list[Path]:
    """Every .py file of the project; data/ (built models, downloads) and hidden or cache folders left out."""

    def kept(path: Path) -> bool:
        return not any(p.startswith(".") or p in ("data", "__pycache__") for p in path.relative_to(REPO).parts)

    return sorted(filter(kept, REPO.rglob("*.py")))


def _imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file, wherever it is (lazy imports in functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _third_party(names: set[str]) -> set[str]:
    local = {p.stem for p in REPO.glob("*.py")} | {p.parent.name for p in REPO.glob("*/__init__.py")}
    return {n for n in names if n not in sys.stdlib_module_names and n not in local}


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _package_of(module: str) -> str:
    distributions = _distributions().get(module)
    assert distributions, f"'{module}' is imported but not installed: cannot tell which package provides it"
    return _normalize(distributions[0])


def test_requirements_list_every_third_party_import():
    runtime = _requirements(REPO / "requirements.txt")
    test_only = _requirements(REPO / "requirements-test.txt")
    used: dict[str, set[str]] = {}  # package -> files importing it
    for path in _project_files():
        is_test = path.relative_to(REPO).parts[0] == "tests"
        for module in _third_party(_imports(path)):
            package = _package_of(module)
            used.setdefault(package, set()).add(str(path.relative_to(REPO)))
            listed = package in runtime or (is_test and package in test_only)
            where = "requirements.txt or requirements-test.txt" if is_test else "requirements.txt"
            assert listed, f"{path.relative_to(REPO)} imports {module} (package {package}), not in {where}"
    assert {"numpy", "huggingface-hub", "torch", "transformers", "pyyaml"} <= runtime.keys()
    # command-line tools ("tool: ..." comments) are run, not imported: README's test command must run them
    tools = {p for p, comment in test_only.items() if comment.startswith("tool:")}
    test_command = (REPO / "README.md").read_text().split("# 2. install and run the tests\n", 1)[1].splitlines()[0]
    assert all(f"{tool} " in test_command for tool in tools), (tools, test_command)
    unused = sorted((runtime.keys() | test_only.keys()) - used.keys() - tools)
    assert not unused, f"listed but imported nowhere: {unused}"


PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)$")


def test_every_requirement_is_pinned_in_constraints():
    """constraints.txt (README's install commands: -c constraints.txt) fixes one tested version of every
    package requirements*.txt lists, as name==version lines only."""
    lines = [line.strip() for line in (REPO / "constraints.txt").read_text().splitlines()]
    pins = [line for line in lines if line and not line.startswith("#")]
    malformed = [line for line in pins if not PIN.match(line)]
    assert not malformed, f"constraints.txt: not name==version: {malformed}"
    pinned = [_normalize(PIN.match(line)[1]) for line in pins]
    assert len(pinned) == len(set(pinned)), "constraints.txt pins a package twice"
    for name in ("requirements.txt", "requirements-test.txt"):
        unpinned = sorted(_requirements(REPO / name).keys() - set(pinned))
        assert not unpinned, f"{name} lists {unpinned}, not pinned in constraints.txt"
    readme = (REPO / "README.md").read_text()
    for marker in ("# 1. install and run the offline demo", "# 2. install and run the tests"):
        install = readme.split(marker, 1)[1].splitlines()[1]
        assert "-c constraints.txt" in install.split("&&")[0], install  # a fresh machine gets what CI tested


@pytest.mark.slow
def test_optional_dependencies_are_marked_and_imported_only_on_their_path():
    """Packages marked "optional: <path>" must not load with the training code: importing every module
    outside preprocessing/, bench/ and tests/ (what run.py, --export and training use) leaves them out."""
    runtime = _requirements(REPO / "requirements.txt")
    optional = {p for p, comment in runtime.items() if comment.startswith("optional:")}
    assert {"decord", "datasets", "wandb"} <= optional
    assert not {"torch", "transformers", "numpy", "huggingface-hub"} & optional
    packages = ("multimodal", "modeling", "storage", "training", "deploy")
    modules = [p.stem for p in REPO.glob("*.py")] + [
        f"{pkg}.{p.stem}" for pkg in packages for p in (REPO / pkg).glob("*.py")
    ]
    script = (
        f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=scaled_timeout(300),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "training.trainer" in loaded and "torch" in loaded  # the core did load
    packages = {_package_of(m.split(".")[0]) for m in loaded if "." not in m and m in _distributions()}
    assert not packages & optional, sorted(packages & optional)


# --- torchrun -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_rank_refuses_a_bad_override_under_torchrun(tmp_path):
    """run.main on each rank (tests.helpers.held_run: no rank exits before every rank has finished, so
    torchrun cannot stop a rank before it prints because another one refused first)."""
    config = config_file(tmp_path)
    records = tmp_path / "ranks"
    records.mkdir()
    env = {"HELD_RUN_DIR": str(records)}
    result = launch("-m", "tests.helpers.held_run", config, "max_grad_norm=.nan", timeout=300, env=env)
    assert {p.name: p.read_text() for p in records.iterdir()} == {"rank0": "2", "rank1": "2"}, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 2, result.stderr[-3000:]  # one per rank
    assert all(f"{config}: override 'max_grad_norm=.nan': key 'max_grad_norm'" in line for line in errors)


@pytest.mark.slow
def test_overrides_apply_on_every_rank_under_torchrun(tmp_path, tiny_model_dir):
    """The file alone is refused under torchrun (CUDA-graph compile) and would run 5 epochs; the overrides
    make it valid, one epoch, into another directory, on both ranks alike (a rank without them would fail
    or train on, and the collectives would not match)."""
    config = demo_config(
        tmp_path, tiny_model_dir, compile_latent_passes="reduce-overhead", num_epochs=5, batch_size_training=2
    )
    result = launch(REPO / "run.py", config, "compile_latent_passes=null", "num_epochs=1", "name=over", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "checkpoints"
    assert sorted(p.name for p in runs.iterdir()) == ["over"]
    assert sorted(p.name for p in (runs / "over").iterdir() if p.name.startswith("checkpoint_")) == ["checkpoint_1"]
