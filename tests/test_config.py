"""Configuration: recipes parse, overrides apply, and every bad key or value fails with a message naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.__main__ import main
from finetune.config import SECTIONS, ConfigError
from finetune.methods import get_method_class, method_names
from finetune.recipe import load_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "finetune" / "recipes").glob("*.yaml"))
DEMO = RECIPES[0].parent / "digits_unconditional.yaml"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_parses_and_names_its_launch_command(recipe):
    config = load_config(recipe)
    assert config.method in method_names()
    header = recipe.read_text().splitlines()[:12]
    assert any(("difftune train" in line or "accelerate launch" in line) and recipe.name in line for line in header), (
        f"{recipe.name}: the header comment must give the exact launch command"
    )


def test_dotted_overrides_are_typed():
    config = load_config(DEMO, ["optim.lr=2e-4", "train.max_train_steps=7", "ema.use_ema=false"])
    assert config.optim.lr == pytest.approx(2e-4) and isinstance(config.optim.lr, float)
    assert config.train.max_train_steps == 7 and config.ema.use_ema is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown key 'optim.lrr'. Valid keys in 'optim': adam_beta1"),
        (["optimizer.lr=1"], "unknown section 'optimizer'. Valid top-level keys"),
        (["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
        (["train.max_train_steps=1.5"], "train.max_train_steps: expected an integer"),
        (["train.max_train_steps=0"], "train.max_train_steps must be >= 1"),
        (["ema.use_ema=maybe"], "ema.use_ema: expected true or false"),
        (["optim.optimizer=sgd"], "optim.optimizer: 'sgd' is not one of ['adamw', 'adamw8bit']"),
        (["diffusion.prediction_type=noise"], "diffusion.prediction_type: expected"),
        (["method=gan"], "unknown method 'gan'. Valid methods:"),
        (["unconditional.preset=huge"], "unconditional.preset: 'huge' is not one of"),
        (["data.resolution=18"], "data.resolution=18 must be divisible by 4"),
        (["optim.lr"], "must look like section.key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO if "method=gan" not in overrides else {"method": "unconditional"}, overrides)
    assert message in str(err.value)


def test_impossible_combination_is_rejected_before_anything_loads():
    with pytest.raises(ConfigError, match="guidance_scale != 1 needs class_conditional.label_dropout > 0"):
        load_config({"method": "class_conditional", "class_conditional": {"guidance_scale": 3.0, "label_dropout": 0}})
    with pytest.raises(ConfigError, match="model.pretrained_model_name_or_path is required"):
        load_config({"method": "ddpm_finetune"})


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert main([str(DEMO), "optim.lrr=1"]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err


def test_help_lists_every_option_with_default_and_help(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    import dataclasses

    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name}:" in text
            assert f.metadata.get("help"), f"{section}.{f.name} has no help text"
    for name in method_names():
        assert f"method '{name}'" in text
        for f in dataclasses.fields(get_method_class(name).Options):
            assert f"{name}.{f.name}:" in text


def test_saved_config_reloads_identically(tmp_path):
    config = load_config(DEMO, ["optim.lr=3e-4"])
    config.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").to_dict() == config.to_dict()


def test_the_config_sections_are_a_leaf_that_imports_no_method():
    """config <-> methods was an import circle: the sections import nothing of ours but the errors, and reading a
    recipe (which needs the method registry) lives above the methods in finetune.recipe."""
    import subprocess
    import sys

    code = (
        "import sys, finetune.config\n"
        "ours = sorted(m for m in sys.modules if m.startswith('finetune.'))\n"
        "assert ours == ['finetune.config', 'finetune.errors'], ours\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
