"""The `difftune` command: --version, train's --print-config / --dry-run / --help TOPIC, the launcher path (a tiny
LoRA job whose stderr holds none of the libraries' known noise, ending with where the model is and how to load it),
a tracker that is not installed, and `difftune generate`'s seed and image-to-image."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from finetune.cli import main
from tests.helpers import REPO, subprocess_env, tiny_ddpm_recipe

DEMO = REPO / "finetune" / "recipes" / "digits_unconditional.yaml"

# lines the libraries print on every run that are no business of the user's (issue 20): none may reach stderr
KNOWN_NOISE = (
    "Failed to load CPU gemm_4bit_forward",  # bitsandbytes, on import
    "requires torchvision",  # transformers, looking up a pipeline's CLIPImageProcessor
    "should be kept in float32",  # diffusers, on every .to(dtype) cast
    "were not passed to `accelerate launch`",  # accelerate, when the launcher guesses its values
    ".checkpoint-",  # accelerate's INFO lines naming each checkpoint's staging folder
    "generated new fontManager",  # matplotlib
    "Traceback",
    "CalledProcessError",  # accelerate's launcher after a failed run
)


def write_recipe(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def captioned_images(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """A folder of plain images with metadata.jsonl captions ("a toy")."""
    folder.mkdir()
    lines = []
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (60 * i, 100, 200)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": "a toy"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_version_names_the_package_and_its_libraries(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert re.match(r"difftune .+ \(diffusers \S+, torch \S+\)", out), out
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'difftune = "finetune.cli:main"' in pyproject and 'wandb = ["wandb"]' in pyproject


def test_print_config_shows_the_resolved_recipe(capsys):
    assert main(["train", str(DEMO), "train.max_train_steps=7", "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["method"] == "unconditional" and config["train"]["max_train_steps"] == 7
    assert config["ema"]["use_ema"] is True and "num_train_epochs" in config["train"]  # defaults filled in


def test_help_for_one_method_or_section(capsys):
    assert main(["train", "--help", "lora"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("method 'lora'") and "lora.rank:" in out and "[train]" not in out
    assert main(["train", "--help", "train"]) == 0
    out = capsys.readouterr().out
    assert "train.num_train_epochs:" in out and "lora.rank" not in out
    assert main(["train", "--help"]) == 0
    assert "--dry-run" in capsys.readouterr().out


def test_dry_run_checks_everything_and_trains_nothing(tmp_path, capsys):
    output = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_ddpm_recipe(output))
    assert (
        main(["train", str(recipe), "--dry-run", "train.num_train_epochs=3", "checkpoint.checkpointing_steps=4"]) == 0
    )
    out = capsys.readouterr().out
    assert "data: 64 example(s)" in out and "steps: 24 optimizer steps (train.num_train_epochs=3)" in out, out
    assert "global batch: 8 = 8 per process" in out and "checkpoints: 6" in out
    assert not output.exists(), "a dry run writes nothing"
    # the data is checked too: a missing folder is one line and exit code 2
    assert main(["train", str(recipe), "--dry-run", f"data.dataset={tmp_path / 'nope'}"]) == 2
    assert "data.dataset" in capsys.readouterr().err


def test_dry_run_of_a_lora_plans_buckets_and_the_latent_cache(tiny_sd_dir, tmp_path, capsys):
    images = captioned_images(tmp_path / "images", [(64, 64), (64, 64), (48, 80), (48, 80)])
    recipe = {
        "method": "lora",
        "lora": {"cache": "memory"},
        "model": {"pretrained_model_name_or_path": str(tiny_sd_dir)},
        "data": {"dataset": str(images), "resolution": 64, "aspect_buckets": True},
        "train": {"output_dir": str(tmp_path / "out"), "train_batch_size": 2, "max_train_steps": 10},
    }
    assert main(["train", str(write_recipe(tmp_path, recipe)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "buckets: 2 of about 64x64 px" in out and "latent cache: about" in out, out
    assert "steps: 10 optimizer steps" in out and not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_ddpm_recipe(tmp_path / "run"))
    assert main(["train", str(recipe), "train.report_to=wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "wandb package is not installed" in err and "pip install" in err
    assert not (tmp_path / "run").exists()


def with_feature_extractor(tiny_sd_dir: Path, folder: Path) -> Path:
    """The tiny SD with a CLIPImageProcessor listed in model_index.json, as every real SD folder has."""
    from transformers import CLIPImageProcessor

    shutil.copytree(tiny_sd_dir, folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor"
    )
    index = json.loads((folder / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_difftune_train_launches_a_quiet_run_that_says_where_the_model_is(tiny_sd_dir, tmp_path):
    """Through the launcher, bf16 (the VAE cast), a base folder with a feature extractor, checkpoints at every step,
    the length given in epochs: stderr holds none of the known noise; the last line names the model and its loading."""
    base = with_feature_extractor(tiny_sd_dir, tmp_path / "base")
    images = captioned_images(tmp_path / "images", [(64, 64)] * 4)
    output = tmp_path / "out"
    recipe = {
        "method": "lora",
        "lora": {"rank": 4, "validation_prompts": ["a toy"]},
        "model": {"pretrained_model_name_or_path": str(base)},
        "data": {"dataset": str(images), "resolution": 64},
        "diffusion": {"num_inference_steps": 2},
        "train": {
            "output_dir": str(output),
            "num_train_epochs": 1,
            "train_batch_size": 2,
            "num_samples": 2,
            "report_to": "jsonl",
            "mixed_precision": "bf16",
            "progress_bar": False,
        },
        "checkpoint": {"checkpointing_steps": 1},
    }
    command = [sys.executable, "-m", "finetune.cli", "train", str(write_recipe(tmp_path, recipe))]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    noise = [line for line in done.stderr.splitlines() if any(n in line for n in KNOWN_NOISE)]
    assert not noise, noise
    steps = [json.loads(line)["step"] for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert steps[-1] == 2, steps  # one epoch: 4 images / batch 2
    assert (output / "checkpoint-1").is_dir() and (output / "checkpoint-2").is_dir()
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("difftune: done: 2 steps in ") and f'load_lora_weights("{output}")' in last, last
    assert "StableDiffusionPipeline.from_pretrained(" in last


def test_a_bad_recipe_stops_before_the_launcher_in_one_line(tmp_path, capsys, monkeypatch):
    import finetune.cli

    monkeypatch.setattr(finetune.cli, "launch_training", lambda *a: pytest.fail("launched a recipe that cannot run"))
    recipe = write_recipe(tmp_path, tiny_ddpm_recipe(tmp_path / "run"))
    assert main(["train", str(recipe), "optim.lr=fast"]) == 2
    assert capsys.readouterr().err.strip() == "difftune: optim.lr: expected a number, got 'fast'"


def png_settings(path: Path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["parameters"])


def test_generate_draws_a_seed_and_runs_image_to_image(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "images"
    assert main(["generate", str(tiny_sd_dir), "--prompt", "a toy", "--steps", "2", "--num-images", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    printed = re.search(r"seed: (\d+) ", capsys.readouterr().err)
    assert printed, "the drawn seed is printed"
    seed = int(printed.group(1))
    assert [png_settings(out / f"000{i}.png")["seed"] for i in (1, 2)] == [seed, seed + 1]
    assert png_settings(out / "grid.png")["seeds"] == [seed, seed + 1]

    # image-to-image: the same seed from two different images gives two different results, each tagged as such
    made = []
    for colour in ("red", "blue"):
        source = tmp_path / f"{colour}.png"
        Image.new("RGB", (64, 64), colour).save(source)
        folder = tmp_path / colour
        assert main(["generate", str(tiny_sd_dir), "--prompt", "a toy", "--steps", "4", "--image", str(source),
                     "--strength", "0.5", "--seed", "3", "--out", str(folder)]) == 0  # fmt: skip
        settings = png_settings(folder / "0001.png")
        assert settings["image_to_image"] is True and settings["strength"] == 0.5 and settings["seed"] == 3
        with Image.open(folder / "0001.png") as image:
            made.append(image.convert("RGB").tobytes())
    assert made[0] != made[1]
    assert main(["generate", str(tiny_sd_dir), "--prompt", "a toy", "--strength", "0.5", "--out", str(out)]) == 2

    # a pixel DDPM: SDEdit through its scheduler loop, at the model's size and channels
    from tests.tiny_models import make_tiny_ddpm_pipeline

    ddpm = make_tiny_ddpm_pipeline(tmp_path / "ddpm", resolution=8)
    pixels = tmp_path / "pixels"
    assert main(["generate", str(ddpm), "--image", str(tmp_path / "red.png"), "--steps", "4", "--num-images", "2",
                 "--seed", "1", "--out", str(pixels)]) == 0  # fmt: skip
    with Image.open(pixels / "0002.png") as image:
        assert image.size == (8, 8) and image.mode == "L"
    assert png_settings(pixels / "0002.png")["strength"] == 0.8 and png_settings(pixels / "0002.png")["seed"] == 2


def test_unknown_subcommand_is_one_line(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_python_dash_m_finetune_cli_runs_without_installing():
    done = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "train" in done.stdout and done.stderr == ""
