"""Model families: each encodes text and calls its denoiser exactly as its diffusers pipeline does, is detected from
model_index.json, and a base model given to the wrong family's recipe is one clear line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finetune.errors import InputError
from finetune.families import family_names, get_family, resolve_family
from finetune.recipe import load_config
from tests.tiny_models import (
    make_tiny_ddpm_pipeline,
    make_tiny_flux_pipeline,
    make_tiny_sd3_pipeline,
    make_tiny_sd_pipeline,
    make_tiny_sdxl_pipeline,
)

BUILDERS = {
    "sd": make_tiny_sd_pipeline,
    "sdxl": make_tiny_sdxl_pipeline,
    "sd3": make_tiny_sd3_pipeline,
    "flux": make_tiny_flux_pipeline,
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def lora_config(base, **model):
    return load_config({"method": "lora", "model": {"pretrained_model_name_or_path": str(base), **model}})


def test_the_registry_holds_one_file_per_family():
    assert sorted(family_names()) == ["flux", "sd", "sd3", "sdxl"]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_text_conditioning_is_the_pipelines_own(bases, name):
    """The conditioning a family computes for training is what its pipeline computes at inference (SDXL: both
    encoders' penultimate states concatenated, the second one's pooled projection; SD3: both CLIPs' states padded to
    T5's width before T5's sequence, both pooled projections; Flux: T5's sequence and CLIP's pooled output)."""
    import diffusers

    family = get_family(name)
    pipe = getattr(diffusers, family.text_to_image_pipeline).from_pretrained(bases[name])
    parts = {n: getattr(pipe, n) for n in (*family.tokenizers, *family.text_encoders)}
    prompts = ["a photo of a toy", "two dots"]
    ours = family.encode_prompt(parts, prompts, torch.device("cpu"))
    if name == "flux":
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompts, prompts, device="cpu", num_images_per_prompt=1)
        theirs = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
    elif name == "sd3":
        embeds = pipe.encode_prompt(prompts, prompts, prompts, device="cpu", do_classifier_free_guidance=False)
        theirs = {"prompt_embeds": embeds[0], "pooled_prompt_embeds": embeds[2]}
    else:
        embeds = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        theirs = {"prompt_embeds": embeds[0], **({"pooled_prompt_embeds": embeds[2]} if name == "sdxl" else {})}
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def test_sdxl_time_ids_come_from_each_examples_own_size_and_crop(bases):
    """A 100x60 landscape centre-cropped to 64: original (60, 100), crop top-left (0, 26) in the 107x64 resize, and
    the flip mirrors the crop as the diffusers SDXL script does; the ids are what the pipeline builds from them."""
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from finetune.families.sdxl import add_time_ids
    from finetune.imaging import image_to_tensor

    image = Image.new("RGB", (100, 60), (10, 20, 30))
    by_flip: dict = {}
    for seed in range(20):  # seeds until one example is flipped and one is not
        sizes: dict = {}
        _, flipped = image_to_tensor(image, 64, 3, np.random.default_rng(seed), True, True, sizes)
        by_flip.setdefault(flipped, sizes)
    examples = [by_flip[False], by_flip[True]]
    assert examples[0]["original_size"].tolist() == [60, 100] and examples[0]["target_size"].tolist() == [64, 64]
    assert examples[0]["crop_top_left"].tolist() == [0, 21] and examples[1]["crop_top_left"].tolist() == [0, 22]
    batch = {key: torch.stack([e[key] for e in examples]) for key in examples[0]}
    ids = add_time_ids(batch, torch.device("cpu"), torch.float32)
    pipe = StableDiffusionXLPipeline.from_pretrained(bases["sdxl"])
    projection = pipe.text_encoder_2.config.projection_dim
    expected = pipe._get_add_time_ids((60, 100), (0, 21), (64, 64), torch.float32, projection)
    torch.testing.assert_close(ids[:1], expected)


def test_the_family_is_read_from_model_index_and_a_wrong_recipe_is_one_line(bases, tmp_path, capsys):
    from finetune.__main__ import main

    assert resolve_family(lora_config(bases["sd"])).name == "sd"
    assert resolve_family(lora_config(bases["sdxl"])).name == "sdxl"
    wrong = r"is a StableDiffusionXLPipeline \(family 'sdxl'\), but model.family is 'sd'"
    with pytest.raises(InputError, match=wrong):
        resolve_family(lora_config(bases["sdxl"], family="sd"))
    with pytest.raises(InputError, match=r"StableDiffusionPipeline \(family 'sd'\), but model.family is 'sdxl'"):
        resolve_family(lora_config(bases["sd"], family="sdxl"))
    # an SD 1.5 recipe given an SDXL folder, from the command line: exit 2, one line naming the recipe to use
    images = tmp_path / "images"
    images.mkdir()
    code = main(
        [
            "finetune/recipes/sd_lora.yaml",
            f"model.pretrained_model_name_or_path={bases['sdxl']}",
            f"data.dataset={images}",
            f"train.output_dir={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "model.family is 'sd'" in err and "finetune/recipes/sdxl_*.yaml" in err
    # a pipeline of no supported family lists the supported ones
    ddpm = make_tiny_ddpm_pipeline(tmp_path / "ddpm")
    with pytest.raises(InputError, match=r"is a DDPMPipeline, which difftune does not train. Supported model famil"):
        resolve_family(lora_config(ddpm))


def test_an_sdxl_vae_stays_fp32_under_fp16_unless_a_fixed_vae_is_given(bases):
    family = get_family("sdxl")
    assert family.vae_dtype(lora_config(bases["sdxl"]), torch.float16) == torch.float32
    assert family.vae_dtype(lora_config(bases["sdxl"]), torch.bfloat16) == torch.bfloat16
    fixed = lora_config(bases["sdxl"], vae="madebyollin/sdxl-vae-fp16-fix")
    assert family.vae_dtype(fixed, torch.float16) == torch.float16
    assert "vae" not in family.subfolders(fixed) and "text_encoder_2" in family.subfolders(fixed)
    assert json.loads((bases["sdxl"] / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def test_the_text_encoders_learn_at_their_own_rate(bases, tmp_path):
    """lora.text_encoder_lr: both SDXL text encoders' LoRA in a group of its own, the UNet's at optim.lr."""
    from accelerate import Accelerator

    from finetune.methods import get_method_class
    from tests.helpers import reset_accelerate
    from tests.tiny_models import make_test_images

    for path in make_test_images(tmp_path / "images", 2, size=64):
        path.with_suffix(".txt").write_text("a toy")
    reset_accelerate()
    recipe = {
        "method": "lora",
        "model": {"pretrained_model_name_or_path": str(bases["sdxl"])},
        "data": {"dataset": str(tmp_path / "images"), "resolution": 64},
        "optim": {"lr": 1e-3},
        "train": {"output_dir": str(tmp_path / "run")},
        "lora": {"train_text_encoder": True, "text_encoder_lr": 5e-5},
    }
    method = get_method_class("lora")(load_config(recipe), Accelerator(cpu=True))
    method.setup()
    unet_group, text_group = method.parameter_groups()
    assert "lr" not in unet_group and text_group["lr"] == 5e-5
    text = {id(p) for name in ("text_encoder", "text_encoder_2") for p in getattr(method, name).parameters()}
    assert text_group["params"] and all(id(p) in text for p in text_group["params"])
    assert unet_group["params"] and not any(id(p) in text for p in unet_group["params"])
    assert len(unet_group["params"]) + len(text_group["params"]) == len(method.trainable_parameters())
    assert method.parameter_groups(lr_scale=4)[1]["lr"] == 2e-4
    with pytest.raises(InputError, match="text_encoder_lr must be positive"):
        load_config(recipe, ["lora.text_encoder_lr=0"])


def test_sdxl_text_encoder_parameters_that_never_reach_the_unet_stay_frozen(bases):
    """The first encoder conditions through its penultimate states: a LoRA on its last layer would never get a
    gradient (DDP refuses that), so the family freezes it; everything it freezes truly has no effect."""
    from peft import LoraConfig
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(bases["sdxl"], subfolder="text_encoder")
    encoder.add_adapter(LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    frozen = get_family("sdxl").freeze_unused({"text_encoder": encoder})
    assert frozen and all(".layers.1." in name for name in frozen), frozen  # the tiny encoder has 2 layers
    ids = torch.tensor([[0, 5, 9, 1]])
    output = encoder(ids, output_hidden_states=True).hidden_states[-2].sum()
    output.backward()
    trainable = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable), "every parameter left to train is used"


def test_flux_packs_latents_and_calls_its_transformer_as_the_pipeline_does(bases):
    """The 2x2 packing, the position ids and the transformer call (sigma, not sigma x 1000; the guidance input) are
    FluxPipeline's own: the prediction unpacks to what the pipeline's transformer call returns."""
    from diffusers import FluxPipeline

    from finetune.families.flux import latent_image_ids, pack_latents, unpack_latents

    pipe = FluxPipeline.from_pretrained(bases["flux"])
    latents = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(latents, 2, 16, 8, 6)
    torch.testing.assert_close(pack_latents(latents), packed, rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 8, 6), latents, rtol=0, atol=0)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32)
    torch.testing.assert_close(latent_image_ids(8, 6, "cpu", torch.float32), ids, rtol=0, atol=0)

    family = get_family("flux")
    conditioning = family.encode_prompt(pipe.components, ["a toy", "two dots"], torch.device("cpu"))
    sigmas = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ours = family.denoise(
            pipe.transformer, latents, sigmas * 1000, {**conditioning, "guidance_scale": 3.5}, batch={}
        )
        theirs = pipe.transformer(
            hidden_states=packed,
            timestep=sigmas,
            guidance=torch.full((2,), 3.5),
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=conditioning["prompt_embeds"],
            txt_ids=torch.zeros(conditioning["prompt_embeds"].shape[1], 3),
            img_ids=ids,
            return_dict=False,
        )[0]
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(theirs, 64, 48, 8), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_families_load_their_flow_schedule_and_refuse_a_prediction_type(bases, name):
    """The training schedule is the folder's FlowMatchEulerDiscreteScheduler (its shift), and an epsilon/v
    prediction_type, meaningless for a velocity target, is one line naming the key."""
    family = get_family(name)
    config = lora_config(bases[name])
    schedule = family.load_component(config, "noise_scheduler")
    assert type(schedule).__name__ == "FlowMatchEulerDiscreteScheduler"
    config = load_config(
        {
            "method": "lora",
            "model": {"pretrained_model_name_or_path": str(bases[name])},
            "diffusion": {"prediction_type": "epsilon"},
        }
    )
    with pytest.raises(InputError, match=r"diffusion.prediction_type: the .* family trains with flow matching"):
        family.load_component(config, "noise_scheduler")
