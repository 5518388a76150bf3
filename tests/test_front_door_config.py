"""The front door: overrides read by field type, checks in order before anything loads (config -> output folder ->
model path -> data), one line per bad input with the exit code of its kind, and no input file ever changed."""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors.torch import save_file

from finetune import preflight
from finetune.__main__ import main
from finetune.config import ConfigError
from finetune.errors import InputError, RunError
from finetune.recipe import OverrideText, build_dataclass, load_config
from tests.helpers import PYTHON, REPO, subprocess_env
from tests.tiny_models import make_test_images

DEMO = REPO / "finetune" / "recipes" / "digits_unconditional.yaml"
MODEL_KEY = "model.pretrained_model_name_or_path"


# ---------------------------------------------------------------------------------------------------------------------
# overrides: values, not YAML documents
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Fields:
    text: str = "x"
    count: int = 1
    rate: float = 1.0
    flag: bool = False
    maybe: float | None = None
    name: str | None = None
    precision: Literal["no", "fp16", "bf16"] | None = None
    choice: Literal["adamw", "adamw8bit"] = "adamw"
    sizes: list[int] = field(default_factory=list)
    words: list[str] = field(default_factory=list)


GOOD = [
    ("text", "outputs/run #3", "outputs/run #3"),
    ("text", "a: b", "a: b"),
    ("text", "[abc", "[abc"),
    ("text", "{a: 1}", "{a: 1}"),
    ("text", "no", "no"),
    ("text", "yes", "yes"),
    ("text", "null", "null"),
    ("text", "007", "007"),
    ("text", "1e-4", "1e-4"),
    ("text", "", ""),
    ("count", "7", 7),
    ("count", "1_000", 1000),
    ("count", "1e3", 1000),
    ("count", "-2", -2),
    ("rate", "2e-4", 2e-4),
    ("rate", "3", 3.0),
    ("flag", "true", True),
    ("flag", "False", False),
    ("flag", "yes", True),
    ("flag", "no", False),
    ("flag", "on", True),
    ("flag", "off", False),
    ("maybe", "null", None),
    ("maybe", "~", None),
    ("maybe", "", None),
    ("maybe", "0.5", 0.5),
    ("name", "null", None),
    ("name", "me/run #1: a [test]", "me/run #1: a [test]"),
    ("precision", "no", "no"),
    ("precision", "BF16", "bf16"),
    ("precision", "null", None),
    ("choice", "adamw8bit", "adamw8bit"),
    ("sizes", "[8, 16, 32]", [8, 16, 32]),
    ("sizes", "8,16,32", [8, 16, 32]),
    ("sizes", "[]", []),
    ("sizes", "4", [4]),
    ("words", "a cat, #1: on a mat", ["a cat, #1: on a mat"]),
    ("words", '[a, "b, c", no]', ["a", "b, c", "no"]),
]
BAD = [
    ("count", "1.5", "t.count: expected an integer, got '1.5'"),
    ("count", "true", "t.count: expected an integer, got 'true'"),
    ("count", "seven", "t.count: expected an integer"),
    ("rate", "fast", "t.rate: expected a number, got 'fast'"),
    ("rate", "nan", "t.rate: expected a number, got 'nan'"),
    ("flag", "maybe", "t.flag: expected true or false, got 'maybe'"),
    ("maybe", "fast", "t.maybe: expected float | null, got 'fast'"),
    ("precision", "false", "t.precision: expected 'no' | 'fp16' | 'bf16' | null, got 'false'"),
    ("choice", "sgd", "t.choice: 'sgd' is not one of ['adamw', 'adamw8bit']"),
    ("sizes", "[abc", "t.sizes: '[abc' is not a list (line 1, column 5"),
    ("sizes", "[8, 16", "t.sizes: '[8, 16' is not a list"),
    ("sizes", "[[8]]", "t.sizes: '[[8]]' is not a flat list; write it as t.sizes=[1, 2]"),
    ("sizes", "[8, x]", "t.sizes[1]: expected an integer, got 'x'"),
    ("words", "[abc", "t.words: '[abc' is not a list"),
]


@pytest.mark.parametrize("name, text, expected", GOOD, ids=[f"{n}={t}" for n, t, _ in GOOD])
def test_override_text_is_read_by_the_field_type(name, text, expected):
    value = getattr(build_dataclass(Fields, {name: OverrideText(text)}, "t"), name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("name, text, message", BAD, ids=[f"{n}={t}" for n, t, _ in BAD])
def test_bad_override_text_is_one_line_naming_the_key(name, text, message):
    with pytest.raises(ConfigError) as err:
        build_dataclass(Fields, {name: OverrideText(text)}, "t")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_real_overrides_keep_hashes_colons_and_brackets():
    config = load_config(
        DEMO,
        [
            "train.output_dir=outputs/run #3",
            "train.mixed_precision=no",
            "data.dataset=[abc",
            "hub.hub_model_id=me/a: b",
            "unconditional.block_out_channels=[8, 16, 16]",
            "optim.max_grad_norm=null",
            "ema.use_ema=yes",
        ],
    )
    assert config.train.output_dir == "outputs/run #3" and config.train.mixed_precision == "no"
    assert config.data.dataset == "[abc" and config.hub.hub_model_id == "me/a: b"
    assert config.method_options.block_out_channels == [8, 16, 16]
    assert config.optim.max_grad_norm is None and config.ema.use_ema is True
    with pytest.raises(ConfigError, match=r"unconditional.block_out_channels: '\[abc' is not a list"):
        load_config(DEMO, ["unconditional.block_out_channels=[abc"])
    prompts = load_config({"method": "lora"}, ["lora.validation_prompts=a cat #2: sitting"]).method_options
    assert prompts.validation_prompts == ["a cat #2: sitting"]


def test_recipe_words_no_and_yes(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: unconditional\ntrain:\n  mixed_precision: no\n  output_dir: off\nema:\n  use_ema: yes\n"
    )
    config = load_config(recipe)
    assert config.train.mixed_precision == "no" and config.train.output_dir == "off" and config.ema.use_ema is True
    # a dict built by YAML 1.1 code (yaml.safe_load) holds False for `no`
    assert load_config({"method": "unconditional", "train": {"mixed_precision": False}}).train.mixed_precision == "no"
    config.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").to_dict() == config.to_dict()


# ---------------------------------------------------------------------------------------------------------------------
# helpers: folders that look like models, without building one
# ---------------------------------------------------------------------------------------------------------------------
def fake_pipeline(folder: Path, weights_bytes: int = 64) -> Path:
    """model_index.json, a scheduler and a UNet folder with a small but valid safetensors file. Never loaded."""
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "X"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    save_file(
        {"w": torch.zeros(max(weights_bytes // 4, 1))}, str(folder / "unet" / "diffusion_pytorch_model.safetensors")
    )
    return folder


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the given files/folders: inputs must be byte-identical afterwards."""
    out = {}
    for root in roots:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_main(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("difftune:")]
    assert len(lines) == 1, err
    return code, lines[0]


def ddpm_args(tmp_path: Path, model: str | Path, *more: str) -> list[str]:
    """A ddpm_finetune command line on a recipe of its own (written once per test, hashed by the tests)."""
    recipe = tmp_path / "recipe.yaml"
    if not recipe.exists():
        recipe.write_text("method: ddpm_finetune\ndata:\n  dataset: digits\n  resolution: 8\n")
    return [str(recipe), f"{MODEL_KEY}={model}", f"train.output_dir={tmp_path / 'out'}", *more]


# ---------------------------------------------------------------------------------------------------------------------
# model paths
# ---------------------------------------------------------------------------------------------------------------------
def test_missing_model_folder_is_named_without_pickle_or_repo_id_talk(tmp_path, capsys):
    missing = tmp_path / "models" / "my-modle"
    (tmp_path / "models" / "my-model").mkdir(parents=True)
    args = ddpm_args(tmp_path, missing)
    before = snapshot(Path(args[0]))
    code, line = run_main(capsys, *args)
    assert code == 2
    assert f"{MODEL_KEY}: the folder '{missing}' does not exist" in line
    assert "did you mean" in line and "my-model" in line
    assert "pickle" not in line and "Repo id" not in line
    assert snapshot(Path(args[0])) == before


def test_model_path_is_checked_before_the_data(tmp_path, capsys):
    code, line = run_main(capsys, *ddpm_args(tmp_path, tmp_path / "nope", f"data.dataset={tmp_path / 'no-data'}"))
    assert code == 2 and MODEL_KEY in line and "no-data" not in line


def test_offline_hub_id_not_in_cache_says_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, line = run_main(capsys, *ddpm_args(tmp_path, "difftune-tests/not-cached"))
    assert code == 2 and "offline mode is on (HF_HUB_OFFLINE=1)" in line
    assert "unset HF_HUB_OFFLINE" in line and "hf download difftune-tests/not-cached" in line


def test_folder_without_model_index_and_a_file_as_model(tmp_path, capsys):
    folder = tmp_path / "just-weights"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    code, line = run_main(capsys, *ddpm_args(tmp_path, folder))
    assert code == 2 and f"the folder '{folder}' has no model_index.json" in line
    code, line = run_main(capsys, *ddpm_args(tmp_path, folder / "diffusion_pytorch_model.safetensors"))
    assert code == 2 and "is a file, not a model folder" in line


@pytest.mark.parametrize("cut", ["short", "header", "data"])
def test_truncated_safetensors_is_called_corrupt(tmp_path, capsys, cut):
    model = fake_pipeline(tmp_path / "model", weights_bytes=4096)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"short": data[:5], "header": data[:20], "data": data[:-100]}[cut])
    before = snapshot(model)
    code, line = run_main(capsys, *ddpm_args(tmp_path, model))
    assert code == 2
    assert f"{MODEL_KEY}: '{weights}' is corrupt or truncated (safetensors header/length:" in line
    assert snapshot(model) == before


def test_pickle_hint_only_for_pickle_only_folders(tmp_path, capsys):
    model = fake_pipeline(tmp_path / "model")
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    code, line = run_main(capsys, *ddpm_args(tmp_path, model))
    assert code == 2 and "holds only pickle weights (diffusion_pytorch_model.bin)" in line
    assert "model.allow_pickle=true" in line
    preflight.check_model_path(model, MODEL_KEY, "pipeline", pickle_hint="")  # allowed: no complaint
    (model / "unet" / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(InputError, match="has a config.json but no weights") as err:
        preflight.check_model_path(model, MODEL_KEY, "pipeline")
    assert "allow_pickle" not in str(err.value)


def test_the_family_loader_says_the_same(tmp_path):
    from finetune.families import get_family

    config = load_config({"method": "lora", "model": {"pretrained_model_name_or_path": str(tmp_path / "gone")}})
    with pytest.raises(InputError) as err:
        get_family("sd").load(config)
    assert f"{MODEL_KEY}: the folder '{tmp_path / 'gone'}' does not exist" in str(err.value)
    assert "allow_pickle" not in str(err.value)


def test_every_command_checks_its_model_path(tmp_path, capsys, monkeypatch):
    from captioning.__main__ import main as caption_main
    from finetune.evaluate import main as evaluate_main
    from pipelines.generate import main as generate_main

    images = tmp_path / "images"
    make_test_images(images, 1, size=16)
    before = snapshot(images)
    missing = tmp_path / "no-model"
    assert caption_main([str(images), "--model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--model: the folder '{missing}' does not exist" in err and "Traceback" not in err
    assert snapshot(images) == before, "nothing is written into the image folder before the model is checked"

    out = tmp_path / "generated"
    assert generate_main([str(missing), "--prompt", "a cat", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"difftune: base model: the folder '{missing}' does not exist" in err and "Traceback" not in err

    broken = fake_pipeline(tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert evaluate_main([str(broken), "--num-samples", "2"]) == 2
    err = capsys.readouterr().err
    assert "PIPELINE_FOLDER" in err and "is corrupt or truncated" in err and "Traceback" not in err
    assert generate_main([str(broken), "--prompt", "a cat", "--out", str(out)]) == 2
    assert "is corrupt or truncated" in capsys.readouterr().err

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert generate_main(["difftune-tests/not-cached", "--prompt", "a cat", "--out", str(out)]) == 2
    assert "offline mode is on" in capsys.readouterr().err
    assert caption_main([str(images), "--model", "difftune-tests/not-cached-blip"]) == 2
    assert "offline mode is on" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# output folder: writable and with room, checked first
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "error, reason",
    [
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
        (OSError(errno.EROFS, "x"), "read-only"),
    ],
)
def test_unwritable_output_folder_is_reported_before_the_model(tmp_path, capsys, monkeypatch, error, reason):
    def refuse(folder):
        raise error

    monkeypatch.setattr(preflight, "write_probe", refuse)
    out = tmp_path / "out"
    code, line = run_main(capsys, *ddpm_args(tmp_path, tmp_path / "no-model"))
    assert code == 2
    assert f"train.output_dir: cannot create the folder '{out}' ({reason}" in line
    assert "no-model" not in line, "the output folder is checked before the model path"
    out.mkdir()
    code, line = run_main(capsys, *ddpm_args(tmp_path, tmp_path / "no-model"))
    assert code == 2 and f"train.output_dir: cannot write in the folder '{out}' ({reason}" in line


def test_output_folder_under_a_file_cannot_be_created(tmp_path, capsys):
    (tmp_path / "a-file").write_text("mine")
    args = ddpm_args(tmp_path, tmp_path / "no-model") + [f"train.output_dir={tmp_path / 'a-file' / 'run'}"]
    code, line = run_main(capsys, *args)
    assert code == 2 and "train.output_dir: cannot create the folder" in line and "is a file" in line
    assert (tmp_path / "a-file").read_text() == "mine"


def test_a_run_stopped_by_a_check_leaves_no_output_folder(tmp_path, capsys):
    code, _ = run_main(capsys, *ddpm_args(tmp_path, tmp_path / "no-model"))
    assert code == 2 and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"], "no probe file is left behind"


def test_not_enough_free_space_prints_both_numbers(tmp_path, capsys, monkeypatch):
    model = fake_pipeline(tmp_path / "model", weights_bytes=10_000_000)
    usage = collections.namedtuple("usage", "total used free")(10**12, 10**12 - 34_000_000, 34_000_000)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage)
    code, line = run_main(capsys, *ddpm_args(tmp_path, model, "checkpoint.checkpointing_steps=100"))
    assert code == 2
    assert "train.output_dir: only 34.0 MB free" in line and "needs at least 40.0 MB" in line
    # a LoRA of the same base writes little: only the floor applies, and 34 MB is above it
    lora = load_config({"method": "lora", "model": {"pretrained_model_name_or_path": str(model)}})
    assert preflight.estimate_output_bytes(lora)[0] == 0


# ---------------------------------------------------------------------------------------------------------------------
# exit codes
# ---------------------------------------------------------------------------------------------------------------------
def test_exit_codes_by_kind(tmp_path, capsys, monkeypatch):
    import finetune.train

    def failing(error: BaseException):
        def train(config):
            raise error

        return train

    args = [str(DEMO), f"train.output_dir={tmp_path / 'out'}"]
    for error, code in ((InputError("data.dataset: bad"), 2), (RunError("hub: the push failed"), 1)):
        monkeypatch.setattr(finetune.train, "train", failing(error))
        assert run_main(capsys, *args) == (code, f"difftune: {error}")

    monkeypatch.setattr(finetune.train, "train", failing(RuntimeError("boom\nsecond line")))
    code, line = run_main(capsys, *args)
    assert code == 1
    assert line == "difftune: internal error: RuntimeError: boom (run with DIFFTUNE_DEBUG=1 for the traceback)"
    with pytest.raises(RuntimeError, match="boom"):
        main([*args, "--debug"])
    monkeypatch.setenv("DIFFTUNE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(args)


def test_bad_recipe_yaml_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: unconditional\ntrain:\n  output_dir: a\n   seed: 3\n")
    code, line = run_main(capsys, str(recipe))
    assert code == 2 and f"recipe '{recipe}' is not valid YAML: line 4" in line


def test_subprocess_bad_model_path_no_traceback(tmp_path):
    """The real command line, as a user runs it: exit code 2, one line, no traceback, the recipe unchanged."""
    missing = tmp_path / "missing model"
    args = ddpm_args(tmp_path, missing)
    before = snapshot(Path(args[0]))
    result = subprocess.run(
        [PYTHON, "-m", "finetune", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"difftune: {MODEL_KEY}: the folder '{missing}' does not exist" in result.stderr
    assert snapshot(Path(args[0])) == before
