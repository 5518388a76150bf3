"""pipelines/: load_pipeline with several LoRAs and their scales, embeddings, a replacement UNet and a scheduler;
the generate command for text-to-image, inpainting, class-conditional and DDPM folders; SD3 and Flux folders with
their LoRAs, and an SD3 folder saved without T5."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipelines.generate import main, parse_lora
from pipelines.load import load_pipeline
from tests.helpers import sd_image
from tests.tiny_models import (
    make_test_images,
    make_tiny_ddpm_pipeline,
    make_tiny_flux_pipeline,
    make_tiny_sd3_pipeline,
    make_tiny_sd_pipeline,
    make_tiny_unet2d,
)

PROMPT = "a toy picture"


def make_lora(folder, base, seed: int, alpha: float = 4.0, text_encoder: bool = False, **unet_changes):
    """A rank-4 LoRA on the tiny UNet's attention (or on a UNet built with `unet_changes`), optionally on the text
    encoder too, random A and B, saved the way the lora method saves it (diffusers file + kohya export)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from finetune.adapters import LoraOptions, add_lora, save_kohya, save_lora
    from finetune.families import get_family

    if unet_changes:
        config = dict(UNet2DConditionModel.load_config(base, subfolder="unet"), **unet_changes)
        unet = UNet2DConditionModel.from_config(config)
    else:
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder") if text_encoder else None
    modules = {"unet": unet, "text_encoder": encoder}
    add_lora(modules, LoraOptions(rank=4, alpha=alpha, train_text_encoder=text_encoder))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (unet, encoder) if text_encoder else (unet,):
            for name, parameter in module.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    save_lora(folder, modules, get_family("sd"))
    save_kohya(folder, modules, get_family("sd"))
    return folder


def make_transformer_lora(folder: Path, base: Path, family: str, seed: int) -> Path:
    """A rank-4 LoRA with random A and B on the attention of the tiny SD3 or Flux transformer, saved as the lora
    method saves it for that family."""
    import diffusers

    from finetune.adapters import LoraOptions, add_lora, save_lora
    from finetune.families import get_family

    family_ = get_family(family)
    cls = getattr(diffusers, family_.denoiser_class)
    transformer = cls.from_config(cls.load_config(base, subfolder="transformer"))
    add_lora({"transformer": transformer}, LoraOptions(rank=4, alpha=4.0), family_)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    save_lora(folder, {"transformer": transformer}, family_)
    return folder


@pytest.fixture(scope="module")
def loras(tiny_sd_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return make_lora(root / "a", tiny_sd_dir, seed=1), make_lora(
        root / "b", tiny_sd_dir, seed=2, alpha=8.0, text_encoder=True
    )


def image_of(pipe, prompt=PROMPT):
    # 32 px (16 px latents): a quarter of the tiny model's native 64 px compute
    return sd_image(pipe, prompt, size=32)


def test_several_loras_with_their_own_scales(tiny_sd_dir, loras):
    a, b = loras
    base = image_of(load_pipeline(tiny_sd_dir, device="cpu"))
    only_a = image_of(load_pipeline(tiny_sd_dir, lora=str(a), lora_scale=1.0, device="cpu"))
    both = image_of(load_pipeline(tiny_sd_dir, lora=[a, b], lora_scale=[1.0, 1.0], device="cpu"))
    a_half = image_of(load_pipeline(tiny_sd_dir, lora=[a, b], lora_scale=[0.5, 1.0], device="cpu"))
    a_file = str(a / "pytorch_lora_weights.safetensors")  # a LoRA given as a file
    b_off = image_of(load_pipeline(tiny_sd_dir, lora=[a_file, b], lora_scale=[1.0, 0.0], device="cpu"))
    all_off = image_of(load_pipeline(tiny_sd_dir, lora=[a, b], lora_scale=0.0, device="cpu"))

    assert np.abs(only_a - base).max() > 1e-3 and np.abs(both - only_a).max() > 1e-3
    assert np.abs(a_half - both).max() > 1e-3, "each LoRA has its own scale"
    np.testing.assert_allclose(b_off, only_a, atol=1e-5)  # scale 0 switches one LoRA off
    np.testing.assert_allclose(all_off, base, atol=1e-5)  # and all of them: the base model's image
    # the kohya/WebUI export of b (UNet + text encoder, alpha 8 != rank 4) passes the check and loads at b's strength
    only_b = image_of(load_pipeline(tiny_sd_dir, lora=b, device="cpu"))
    kohya_b = image_of(load_pipeline(tiny_sd_dir, lora=b / "pytorch_lora_weights_kohya.safetensors", device="cpu"))
    assert np.abs(only_b - base).max() > 1e-3
    np.testing.assert_allclose(kohya_b, only_b, atol=1e-5)
    with pytest.raises(ValueError, match="2 LoRAs but 3 scales"):
        load_pipeline(tiny_sd_dir, lora=[a, b], lora_scale=[1.0, 1.0, 1.0], device="cpu")


def test_a_lora_for_another_base_model_fails_naming_the_keys(tiny_sd_dir, tmp_path):
    # other widths: the same module names with other shapes (diffusers raises a long size-mismatch dump)
    wide = make_lora(tmp_path / "wide", tiny_sd_dir, seed=3, block_out_channels=[16, 48], norm_num_groups=8)
    with pytest.raises(ValueError) as err:
        load_pipeline(tiny_sd_dir, lora=str(wide), device="cpu")
    message = str(err.value)
    assert f"LoRA {str(wide)!r} does not fit the base model" in message and "another base model" in message
    assert re.search(
        r"unet\.down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_\w+\.lora[._](A|down)\.weight: "
        r"shape \[4, 48\] is for 48 inputs, unet\.down_blocks\.1\..* has 64",
        message,
    ), message

    # another block layout: module names the tiny UNet does not have (diffusers loads it without a word)
    swapped = make_lora(
        tmp_path / "swapped",
        tiny_sd_dir,
        seed=4,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    )
    with pytest.raises(ValueError, match=r"no module 'down_blocks\.0\.attentions\.0\.transformer_blocks"):
        load_pipeline(tiny_sd_dir, lora=str(swapped), device="cpu")


def test_embeddings_unet_and_scheduler(tiny_sd_dir, tmp_path):
    embeddings = tmp_path / "ti"
    embeddings.mkdir()
    save_file(
        {"<thing>": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
        str(embeddings / "learned_embeds.safetensors"),
    )
    base = load_pipeline(tiny_sd_dir, device="cpu")
    pipe = load_pipeline(tiny_sd_dir, embeddings=str(embeddings), device="cpu")
    assert {"<thing>", "<thing>_1"} <= set(pipe.tokenizer.get_vocab())
    assert np.abs(image_of(pipe, "a <thing>") - image_of(base, "a <thing>")).max() > 1e-3

    other = make_tiny_sd_pipeline(tmp_path / "other", seed=1)  # a "trained" UNet in a pipeline folder
    with_unet = load_pipeline(tiny_sd_dir, unet=str(other), device="cpu")
    with_unet_folder = load_pipeline(tiny_sd_dir, unet=str(other / "unet"), device="cpu", scheduler="euler_a")
    assert np.abs(image_of(with_unet) - image_of(base)).max() > 1e-3
    for name, value in with_unet.unet.state_dict().items():
        torch.testing.assert_close(with_unet_folder.unet.state_dict()[name], value, rtol=0, atol=0)
    assert type(with_unet_folder.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert np.isfinite(image_of(with_unet_folder)).all()
    with pytest.raises(ValueError, match="scheduler 'lms' is not one of ddim, ddpm, euler, euler_a, dpm\\+\\+, pndm"):
        load_pipeline(tiny_sd_dir, scheduler="lms", device="cpu")


def test_generate_writes_numbered_images_and_a_grid_without_overwriting(tiny_sd_dir, loras, tmp_path, capsys):
    a, b = loras
    out = tmp_path / "out"
    argv = [str(tiny_sd_dir), "--prompt", PROMPT, "--prompt", "a toy drawing", "--num-images", "2", "--steps", "2"]
    argv += ["--height", "32", "--width", "32"]
    argv += ["--lora", f"{a}:0.7", "--lora", str(b), "--scheduler", "dpm++", "--seed", "5", "--out", str(out)]
    assert main(argv + ["--negative-prompt", "blurry", "--batch-size", "3"]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["0001.png", "0002.png", "0003.png", "0004.png", "grid.png"]
    # 32 px enlarged x2 (nearest), a row per prompt with the prompt under it in an 18 px strip, 2 px gaps
    assert Image.open(out / "grid.png").size == (2 * 64 + 3 * 2, 2 + 2 * (64 + 2 + 18))
    settings = json.loads(Image.open(out / "0003.png").text["parameters"])
    assert settings["prompt"] == "a toy drawing" and settings["seed"] == 7 and settings["negative_prompt"] == "blurry"
    assert settings["lora"] == [f"{a}:0.7", f"{b}:1.0"] and settings["scheduler"] == "DPMSolverMultistepScheduler"

    assert main(argv) == 0  # again, into the same folder: new names, old files untouched
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:04d}.png" for i in range(1, 9)] + ["grid-2.png", "grid.png"]
    assert all((out / name).read_bytes() == data for name, data in first.items())
    # same seeds and settings without the negative prompt; same seed + same settings give the same image
    assert main(argv + ["--negative-prompt", "blurry", "--batch-size", "3"]) == 0
    assert (out / "0011.png").read_bytes() == first["0003.png"]
    assert "grid: " in capsys.readouterr().out

    assert parse_lora("dir/x:0.5") == ("dir/x", 0.5) and parse_lora("C:\\lora") == ("C:\\lora", 1.0)
    assert main([str(tiny_sd_dir), "--out", str(out)]) == 2
    assert "--prompt is required" in capsys.readouterr().err


def test_inpainting_generate(tmp_path, capsys):
    base = make_tiny_sd_pipeline(tmp_path / "inpaint", inpainting=True)
    (image_path,) = make_test_images(tmp_path / "images", 1, size=64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out"
    argv = [str(base), "--prompt", "a red door", "--steps", "2", "--num-images", "2", "--out", str(out)]
    assert main(argv + ["--image", str(image_path), "--mask", str(tmp_path / "mask.png")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0001.png", "0002.png", "grid.png"]
    assert Image.open(out / "0001.png").size == (64, 64)
    assert json.loads(Image.open(out / "0001.png").text["parameters"])["strength"] == 1.0
    assert main(argv + ["--image", str(image_path)]) == 2
    assert "inpainting pipeline: give --image and --mask" in capsys.readouterr().err


def test_class_conditional_and_ddpm_folders(tmp_path, capsys):
    from diffusers import DDIMScheduler

    from pipelines.class_conditional import ClassConditionalDDPMPipeline

    unet = make_tiny_unet2d(resolution=8, num_class_embeds=4)  # 3 classes + the "no class" label
    folder = tmp_path / "class-conditional"
    ClassConditionalDDPMPipeline(unet=unet, scheduler=DDIMScheduler(), num_classes=3).save_pretrained(folder)
    out = tmp_path / "out"
    argv = [str(folder), "--class-labels", "0", "2", "--num-images", "2", "--steps", "2", "--out", str(out)]
    assert main(argv + ["--guidance", "2.0", "--scheduler", "ddpm"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0001.png", "0002.png", "0003.png", "0004.png", "grid.png"]
    labels = [json.loads(Image.open(out / f"000{i}.png").text["parameters"])["class_label"] for i in range(1, 5)]
    assert labels == [0, 0, 2, 2]
    assert Image.open(out / "grid.png").size == (2 * 64 + 3 * 2, 2 + 2 * (64 + 2 + 18))  # 8 px x8, rows per class
    assert main([str(folder), "--class-labels", "3", "--steps", "2", "--out", str(out)]) == 2
    assert "class_labels must be integers in [0, 3)" in capsys.readouterr().err
    assert main([str(folder), "--prompt", "a three", "--out", str(out)]) == 2
    assert main([str(folder), "--class-labels", "1", "--scheduler", "euler", "--out", str(out)]) == 2

    ddpm = make_tiny_ddpm_pipeline(tmp_path / "ddpm", resolution=8)
    assert (
        main([str(ddpm), "--num-images", "3", "--steps", "2", "--scheduler", "ddim", "--out", str(tmp_path / "d")])
        == 0
    )
    assert len(list((tmp_path / "d").glob("000*.png"))) == 3
    assert Image.open(tmp_path / "d" / "0001.png").size == (8, 8)


# ---------------------------------------------------------------------------------------------------------------------
# Stable Diffusion 3 and Flux
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flow_models(tmp_path_factory) -> dict:
    """Tiny SD3 and Flux folders and a LoRA for each: {"sd3": (base, lora), "flux": (base, lora)}."""
    root = tmp_path_factory.mktemp("flow")
    models = {}
    for family, make in (("sd3", make_tiny_sd3_pipeline), ("flux", make_tiny_flux_pipeline)):
        base = make(root / family)
        models[family] = base, make_transformer_lora(root / f"{family}-lora", base, family, seed=1)
    return models


def test_an_sd3_folder_saved_without_t5_loads_without_it(flow_models, tmp_path):
    """model_index.json lists T5 as null (saved with text_encoder_3=None), or lists it but the folder lacks it (left
    out when copied): both load with text_encoder_3=None and make the same image; the same weights with T5 another."""
    with_t5 = flow_models["sd3"][0]
    saved_without = make_tiny_sd3_pipeline(tmp_path / "saved-without", with_t5=False)
    assert json.loads((saved_without / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    copied_without = tmp_path / "copied-without"
    shutil.copytree(with_t5, copied_without, ignore=lambda folder, names: [n for n in names if n == "text_encoder_3"])
    assert json.loads((copied_without / "model_index.json").read_text())["text_encoder_3"][1] == "T5EncoderModel"

    images = {}
    for name, folder in (("saved", saved_without), ("copied", copied_without), ("t5", with_t5)):
        pipe = load_pipeline(folder, device="cpu")
        assert (pipe.text_encoder_3 is None and pipe.tokenizer_3 is None) == (name != "t5")
        images[name] = sd_image(pipe, PROMPT, size=32)
    np.testing.assert_array_equal(images["copied"], images["saved"])
    assert np.abs(images["t5"] - images["saved"]).max() > 1e-3  # T5's sequence instead of zeros


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_generate_sd3_and_flux_with_a_lora(family, flow_models, tmp_path, capsys):
    base, lora = (str(path) for path in flow_models[family])
    out = tmp_path / "out"
    argv = [
        base,
        "--prompt",
        PROMPT,
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--seed",
        "0",
        "--out",
        str(out),
    ]
    negative = ["--negative-prompt", "blurry"] if family == "sd3" else []  # Flux does not use one

    def image(*extra: str) -> np.ndarray:
        assert main([*argv, *negative, *extra]) == 0, capsys.readouterr().err
        newest = max(out.glob("0*.png"))
        settings = json.loads(Image.open(newest).text["parameters"])
        assert settings["scheduler"] == "FlowMatchEulerDiscreteScheduler"
        return np.asarray(Image.open(newest), dtype=np.int16)

    with_lora = image("--lora", f"{lora}:0.8")
    assert with_lora.shape == (64, 64, 3)
    assert json.loads(Image.open(out / "0001.png").text["parameters"])["lora"] == [f"{lora}:0.8"]
    plain = image("--scheduler", "euler")  # their flow-matching sampler, as the folder has it
    np.testing.assert_array_equal(image("--lora", f"{lora}:0"), plain)  # scale 0: the base model
    assert np.abs(with_lora - plain).mean() > 0.5
    capsys.readouterr()

    assert main([*argv, "--scheduler", "ddim"]) == 2
    assert "scheduler 'ddim' does not work with" in capsys.readouterr().err
    embeddings = tmp_path / "ti"
    embeddings.mkdir()
    save_file({"<thing>": torch.randn(1, 32)}, str(embeddings / "learned_embeds.safetensors"))
    assert main([*argv, "--embeddings", str(embeddings)]) == 2
    assert "does not take Textual Inversion embeddings" in capsys.readouterr().err
    if family == "flux":
        assert main([*argv, "--negative-prompt", "blurry"]) == 2
        assert "FluxPipeline does not use a negative prompt" in capsys.readouterr().err
