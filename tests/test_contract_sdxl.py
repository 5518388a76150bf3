"""The method contract (tests/contract.py) on the sdxl family: every row trains, saves, loads into the plain
diffusers pipeline and changes its image, trains only what it should, caches without changing the loss, and resumes
after a SIGKILL to the weights of an uninterrupted run."""

from __future__ import annotations

import pytest

from tests.contract import check_row, make_bases, rows_of

ROWS = rows_of("sdxl")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return make_bases(tmp_path_factory.mktemp("contract-sdxl"), "sdxl")


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_method_contract(row, bases):
    check_row(row, bases)


SDXL_RECIPES = ["sdxl_lora", "sdxl_dreambooth_lora", "sdxl_dreambooth", "sdxl_textual_inversion"]


@pytest.mark.parametrize("name", SDXL_RECIPES)
def test_every_sdxl_recipe_trains_on_the_tiny_sdxl_and_loads(name, bases, tmp_path):
    """The recipe files as shipped (gradient checkpointing, caches, text-encoder LoRA with its own rate, prior
    preservation, AdamW8bit for the full UNet), pointed at the tiny SDXL for two fp32 steps."""
    from pathlib import Path

    import diffusers

    from tests.helpers import run_training

    recipe = Path(__file__).resolve().parents[1] / "finetune" / "recipes" / f"{name}.yaml"
    overrides = [
        f"model.pretrained_model_name_or_path={bases['sdxl']}",
        "data.resolution=64",
        "train.mixed_precision=no",
        "train.max_train_steps=2",
        "train.gradient_accumulation_steps=1",
        "train.sample_every=0",
        "train.num_samples=1",
        "diffusion.num_inference_steps=2",
        f"train.output_dir={tmp_path / 'run'}",
        "checkpoint.checkpointing_steps=0",
    ]
    if "dreambooth" in name:
        overrides += [
            f"dreambooth.instance_data_dir={bases['instance']}",
            "dreambooth.num_class_images=2",
            "dreambooth.class_inference_steps=2",
        ]
    else:
        overrides.append(f"data.dataset={bases['captioned']}")
    out = run_training(recipe, *overrides)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(out if name == "sdxl_dreambooth" else bases["sdxl"])
    if name in ("sdxl_lora", "sdxl_dreambooth_lora"):
        pipe.load_lora_weights(out)
    elif name == "sdxl_textual_inversion":
        from pipelines.load import load_embeddings

        assert load_embeddings(pipe, str(out)) == ["<cat-toy>"]
    assert (out / "README.md").is_file()
