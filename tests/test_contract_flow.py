"""The method contract (tests/contract.py) on the flow-matching families, SD3 and Flux: every row trains, saves,
loads into the plain diffusers pipeline and changes its image, trains only what it should, caches without changing
the loss, and resumes after a SIGKILL to the weights of an uninterrupted run. Plus each shipped recipe on the tiny
models, and what the families refuse (textual inversion, SD3's kohya export) in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.config import ConfigError
from finetune.errors import InputError
from tests.contract import check_row, make_bases, rows_of

FAMILIES = ("sd3", "flux")
ROWS = [row for family in FAMILIES for row in rows_of(family)]
RECIPES = {
    "sd3_lora": "sd3",
    "sd3_dreambooth": "sd3",
    "flux_lora": "flux",
    "flux_dreambooth_lora": "flux",
    "flux_dreambooth": "flux",
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract-flow")
    made = {}
    for family in FAMILIES:
        made.update(make_bases(root / family, family))
    made["root"] = root
    return made


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_method_contract(row, bases):
    check_row(row, bases)


def recipe_overrides(name: str, bases: dict, output_dir: Path) -> list[str]:
    overrides = [
        f"model.pretrained_model_name_or_path={bases[RECIPES[name]]}",
        "data.resolution=64",
        "train.mixed_precision=no",
        "train.max_train_steps=2",
        "train.gradient_accumulation_steps=1",
        "train.sample_every=0",
        "train.num_samples=1",
        "diffusion.num_inference_steps=2",
        f"train.output_dir={output_dir}",
        "checkpoint.checkpointing_steps=0",
    ]
    if not torch.cuda.is_available():  # diffusers' 4-bit quantizer needs a GPU (tested on one by benchmarks/)
        overrides.append("model.quantize=none")
    if "dreambooth" in name:
        overrides += [
            f"dreambooth.instance_data_dir={bases['instance']}",
            "dreambooth.num_class_images=2",
            "dreambooth.class_inference_steps=2",
        ]
    else:
        overrides.append(f"data.dataset={bases['captioned']}")
    return overrides


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_flow_recipe_trains_on_the_tiny_model_and_loads(name, bases, tmp_path, caplog):
    """The recipe files as shipped (gradient checkpointing, the text-conditioning cache that frees the text encoders,
    AdamW8bit, NF4 where the recipe asks for it), pointed at the tiny model for two fp32 steps."""
    import diffusers

    from tests.helpers import run_training

    recipe = Path(__file__).resolve().parents[1] / "finetune" / "recipes" / f"{name}.yaml"
    with caplog.at_level("INFO"):
        out = run_training(recipe, *recipe_overrides(name, bases, tmp_path / "run"))
    assert "freed the text encoders" in caplog.text
    pipeline = diffusers.StableDiffusion3Pipeline if RECIPES[name] == "sd3" else diffusers.FluxPipeline
    full = not (out / "pytorch_lora_weights.safetensors").exists()
    pipe = pipeline.from_pretrained(out if full else bases[RECIPES[name]])
    if not full:
        pipe.load_lora_weights(out)
    assert (out / "README.md").is_file() and (out / "samples" / "final.png").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_what_a_flow_family_does_not_support_is_one_line_before_loading(family, bases, tmp_path):
    from tests.helpers import run_training

    base = str(bases[family])
    ti = {"placeholder_token": "<x>", "initializer_token": "toy"}
    common = {"model": {"pretrained_model_name_or_path": base}, "data": {"dataset": str(bases["captioned"])}}
    common["train"] = {"output_dir": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match="does not load textual-inversion embeddings"):
        run_training({**common, "method": "textual_inversion", "textual_inversion": ti})
    if family == "sd3":  # Flux exports kohya's sd-scripts layout (tests/test_kohya_flux.py)
        with pytest.raises(ConfigError, match="no standard kohya key layout"):
            run_training({**common, "method": "lora", "lora": {"export_kohya": True}})
    with pytest.raises(ConfigError, match="cannot leave out text_encoder"):
        run_training({**common, "method": "lora"}, "model.drop_text_encoders=[text_encoder]")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="quantizes with bitsandbytes on a CUDA GPU only"):
            run_training({**common, "method": "lora"}, "model.quantize=nf4")
        return
    with pytest.raises(ConfigError, match="freezes the transformer in 4 bits"):
        run_training(
            {
                **common,
                "method": "dreambooth",
                "dreambooth": {"instance_data_dir": str(bases["instance"]), "instance_prompt": "a photo of sks toy"},
            },
            "model.quantize=nf4",
        )
