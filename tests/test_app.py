"""pipelines/steps.py (generation with its denoising steps, SDEdit reconstruction) and pipelines/app.py (the Gradio
app), ending with the app driven in headless Chromium.

The browser test needs Debian's Chromium (/usr/bin/chromium; `.ci/run` installs it) and Playwright's Python client
(the `app` extra; it drives that Chromium, no browser is downloaded). Without them it is skipped, except in CI
(CI=true), where it fails so that a missing install step shows. It saves a screenshot to the test's tmp folder and,
when DIFFTUNE_APP_SCREENSHOT names a file, there as well.

The README screenshot (docs/app.png) comes from the demo model:
    python -m tests.test_app --model outputs/digits-unconditional --screenshot docs/app.png
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import steps as S
from pipelines.load import load_pipeline
from tests.test_pipelines import make_transformer_lora
from tests.tiny_models import (
    make_tiny_ddpm_pipeline,
    make_tiny_flux_pipeline,
    make_tiny_sd3_pipeline,
    make_tiny_sdxl_pipeline,
    make_tiny_unet2d,
)

CHROMIUM = "/usr/bin/chromium"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def need(module: str):
    """The module, or a skip outside CI / a failure in CI (where the `app` extra must be installed)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if IN_CI:
            pytest.fail(f"{module} is not installed ({err}); CI installs the `app` extra: pip install -e '.[app]'")
        pytest.skip(f"{module} is not installed: pip install -e '.[app]'")


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster on one than on two when other jobs share the cores
    (seen here: 0.3 s per tiny-UNet step on 2 busy cores, 0.012 s on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ddpm_dir(tmp_path_factory) -> Path:
    return make_tiny_ddpm_pipeline(tmp_path_factory.mktemp("app_ddpm") / "ddpm", resolution=8, channels=1)


def make_class_conditional(folder: Path, num_classes: int = 3) -> Path:
    from diffusers import DDIMScheduler

    from pipelines.class_conditional import ClassConditionalDDPMPipeline

    unet = make_tiny_unet2d(resolution=8, num_class_embeds=num_classes + 1)  # + the "no class" label
    pipe = ClassConditionalDDPMPipeline(unet=unet, scheduler=DDIMScheduler(), num_classes=num_classes)
    pipe.save_pretrained(folder)
    (folder / "README.md").write_text("pipe(class_labels=[0], guidance_scale=2.0, num_inference_steps=12)\n")
    return folder


def make_lora(folder: Path, base: Path, seed: int, family: str = "sd", **unet_changes) -> Path:
    """A rank-4 LoRA with random A and B on the tiny SD (or SDXL: `family="sdxl"`) UNet's attention, or on a UNet
    built with `unet_changes` (another base model), saved as the lora method saves it."""
    from diffusers import UNet2DConditionModel

    from finetune.adapters import LoraOptions, add_lora, save_lora
    from finetune.families import get_family

    config = dict(UNet2DConditionModel.load_config(base, subfolder="unet"), **unet_changes)
    unet = UNet2DConditionModel.from_config(config)
    add_lora({"unet": unet}, LoraOptions(rank=4, alpha=4.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    save_lora(folder, {"unet": unet}, get_family(family))
    return folder


@pytest.fixture(scope="module")
def tiny_flow_served(tmp_path_factory) -> dict:
    """Tiny SD3 and Flux folders and a LoRA for each: {"sd3": {"base", "lora"}, "flux": {...}}."""
    root = tmp_path_factory.mktemp("app_flow")
    served = {}
    for family, make in (("sd3", make_tiny_sd3_pipeline), ("flux", make_tiny_flux_pipeline)):
        base = make(root / family)
        served[family] = {"base": base, "lora": make_transformer_lora(root / f"{family}-lora", base, family, seed=1)}
    return served


# ---------------------------------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------------------------------
def test_ddpm_steps_are_kept_without_changing_the_images(tiny_ddpm_dir):
    pipe = load_pipeline(tiny_ddpm_dir, device="cpu")
    assert S.pipeline_kind(pipe) == "unconditional"
    result = S.generate_with_steps(pipe, steps=6, seed=1, num_images=2)
    plain = pipe(batch_size=2, num_inference_steps=6, generator=S._generators(1, 2)).images
    assert [as_array(a).tolist() for a in result.images] == [as_array(b).tolist() for b in plain]

    record = result.record
    assert len(record) == 7 and [f.step for f in record.frames] == list(range(7))
    assert record.label(0) == "step 0 of 6: the starting noise" and record.label(6).startswith("step 6 of 6")
    last = record.image(pipe, 6)
    assert last.size == (8, 8) and last.mode == "L"
    np.testing.assert_array_equal(as_array(last), as_array(result.images[0]))  # the last step is the image
    assert np.abs(as_array(record.image(pipe, 0)) - as_array(last)).mean() > 10
    assert np.abs(as_array(record.image(pipe, 3, "x0")) - as_array(record.image(pipe, 3, "sample"))).mean() > 1
    assert record.image(pipe, 3) is record.image(pipe, 3)  # decoded once, then cached

    long = S.generate_with_steps(pipe, steps=62, seed=0, max_frames=13).record  # every 6th step, and the last
    assert [f.step for f in long.frames] == [0, 6, 12, 18, 24, 30, 36, 42, 48, 54, 60, 62]


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_other_samplers_keep_x0(tiny_ddpm_dir, scheduler):
    pipe = load_pipeline(tiny_ddpm_dir, device="cpu")
    pipe.scheduler = S.fresh_scheduler(pipe.scheduler, scheduler)
    record = S.generate_with_steps(pipe, steps=4, seed=0).record
    assert len(record) == 5 and all(frame.x0 is not None for frame in record.frames[1:])
    with pytest.raises(ValueError, match="scheduler 'lms' is not one of default"):
        S.fresh_scheduler(pipe.scheduler, "lms")


def test_stable_diffusion_steps_are_decoded_with_the_vae(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir, device="cpu")
    assert S.pipeline_kind(pipe) == "text" and S.model_image_size(pipe) == (64, 64, 3)
    result = S.generate_with_steps(pipe, steps=4, seed=2, prompt="a toy", guidance=5.0)
    plain = pipe("a toy", num_inference_steps=4, guidance_scale=5.0, generator=S._generators(2, 1)).images[0]
    np.testing.assert_array_equal(as_array(result.images[0]), as_array(plain))
    record = result.record
    assert record.latent and len(record) == 5 and record.frames[0].sample.shape == (1, 4, 32, 32)
    np.testing.assert_array_equal(as_array(record.image(pipe, 4)), as_array(plain))
    assert record.image(pipe, 1).size == (64, 64)
    assert np.abs(as_array(record.image(pipe, 1)) - as_array(record.image(pipe, 4))).mean() > 1

    # Euler scales x_t by sigma; kept frames are the variance-preserving equivalent (unit-variance start)
    pipe.scheduler = S.fresh_scheduler(pipe.scheduler, "euler")
    euler = S.generate_with_steps(pipe, steps=3, seed=0, prompt="a toy").record
    assert float(pipe.scheduler.init_noise_sigma) > 2  # x_T = noise * init_noise_sigma
    assert 0.8 < float(euler.frames[0].sample.std()) < 1.2


def test_class_conditional_steps_and_guidance(tmp_path):
    from pipelines.app import load_served_model

    served = load_served_model(str(make_class_conditional(tmp_path / "cc")), device="cpu")
    assert served.kind == "class" and served.num_classes == 3 and served.guided
    assert served.default_steps == 12 and served.default_guidance == 2.0  # from the model card
    result = S.generate_with_steps(served.pipe, steps=3, seed=0, num_images=2, class_label=2, guidance=2.0)
    plain = served.pipe(class_labels=[2, 2], guidance_scale=2.0, num_inference_steps=3, generator=S._generators(0, 2))
    assert [as_array(a).tolist() for a in result.images] == [as_array(b).tolist() for b in plain.images]
    assert len(result.record) == 4 and result.settings["class_label"] == 2
    with pytest.raises(ValueError, match=r"class 3 is outside \[0, 3\)"):
        S.generate_with_steps(served.pipe, steps=2, class_label=3)


# ---------------------------------------------------------------------------------------------------------------------
# SDEdit
# ---------------------------------------------------------------------------------------------------------------------
def digit_like(size: int = 40) -> Image.Image:
    """A white ring on black, RGB and not square: the model's preprocessing crops, resizes and converts it."""
    y, x = np.mgrid[:size, : size + 10]
    ring = np.abs(np.hypot(y - size / 2, x - (size + 10) / 2) - size / 3) < size / 10
    return Image.fromarray(np.repeat((ring * 255).astype(np.uint8)[..., None], 3, axis=2))


def test_sdedit_of_a_pixel_model(tiny_ddpm_dir, tmp_path):
    pipe = load_pipeline(tiny_ddpm_dir, device="cpu")
    scheduler = pipe.scheduler
    image = digit_like()
    light = S.reconstruct(pipe, image, strength=0.1, steps=20, seed=0)
    heavy = S.reconstruct(pipe, image, strength=1.0, steps=20, seed=0)
    assert light.original.size == (8, 8) and light.original.mode == "L"
    assert light.denoising_steps == 2 and heavy.denoising_steps == 20
    assert light.timestep < heavy.timestep
    original = as_array(light.original)

    def error(picture):
        return np.abs(as_array(picture) - original).mean()

    assert error(light.noised) < error(heavy.noised)  # more noise at a higher level
    assert error(light.reconstruction) < error(heavy.reconstruction)  # a light touch keeps the input
    again = S.reconstruct(pipe, image, strength=0.1, steps=20, seed=0)
    np.testing.assert_array_equal(as_array(again.reconstruction), as_array(light.reconstruction))
    assert pipe.scheduler is scheduler  # the pipeline keeps its own scheduler, untouched

    with pytest.raises(ValueError, match="leaves no step to denoise"):
        S.reconstruct(pipe, image, strength=0.05, steps=10)
    with pytest.raises(ValueError, match=r"noise level must be in \(0, 1\]"):
        S.reconstruct(pipe, image, strength=0.0, steps=10)

    served_cc = make_class_conditional(tmp_path / "cc")
    cc = load_pipeline(served_cc, device="cpu")
    guided = S.reconstruct(cc, image, strength=0.5, steps=4, seed=0, class_label=1, guidance=2.0)
    assert guided.original.size == (8, 8) and guided.denoising_steps == 2


def test_sdedit_of_stable_diffusion(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir, device="cpu")
    result = S.reconstruct(pipe, digit_like(80), strength=0.5, steps=4, seed=0, prompt="a toy")
    assert result.original.size == result.noised.size == result.reconstruction.size == (64, 64)
    assert result.denoising_steps == 2 and 0 < result.timestep < 1000
    assert np.abs(as_array(result.noised) - as_array(result.original)).mean() > 5


# ---------------------------------------------------------------------------------------------------------------------
# the app without a browser: models, settings and errors as the page shows them
# ---------------------------------------------------------------------------------------------------------------------
def component(app, elem_id: str):
    return next(block for block in app.blocks.values() if getattr(block, "elem_id", None) == elem_id)


def test_errors_are_shown_in_the_page(tiny_sd_dir, tmp_path, monkeypatch):
    need("gradio")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from pipelines.app import ModelHolder, build_app

    not_a_pipeline = tmp_path / "photos"
    not_a_pipeline.mkdir()
    app = build_app(str(not_a_pipeline), device="cpu")
    status = component(app, "model-status").value
    assert "**Error:**" in status and "is not a diffusers pipeline folder: it has no model_index.json" in status
    assert app.holder.model is None and component(app, "generate").value == "Generate"

    holder = ModelHolder()
    assert not holder.load(str(tmp_path / "nothing-here"))
    assert "no such file or folder" in holder.error

    wide = make_lora(tmp_path / "wide", tiny_sd_dir, seed=3, block_out_channels=[16, 48], norm_num_groups=8)
    assert not holder.load(str(tiny_sd_dir), lora=[str(wide)], device="cpu")
    assert "does not fit the base model" in holder.error and "was it trained on another base model?" in holder.error

    text_file = tmp_path / "notes.png"
    text_file.write_text("this is not an image")
    with pytest.raises(ValueError, match="'notes.png' is not an image that can be read"):
        S.load_image(text_file)
    truncated = tmp_path / "half.png"
    buffer = io.BytesIO()
    digit_like().save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(ValueError, match="'half.png' is not an image that can be read"):
        S.load_image(truncated)


def handler(app, name: str):
    return next(function.fn for function in app.fns.values() if function.name == name)


def test_the_page_loads_models_generates_and_reconstructs(tiny_sd_dir, tiny_ddpm_dir, tmp_path, monkeypatch):
    """The event handlers as the page calls them: what they return is what the page shows."""
    need("gradio")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from pipelines.app import build_app

    app = build_app(None)
    assert "No model loaded" in component(app, "model-status").value
    on_load, on_generate = handler(app, "on_load"), handler(app, "on_generate")
    on_step, on_upload, on_reconstruct = (
        handler(app, "on_step"),
        handler(app, "on_upload"),
        handler(app, "on_reconstruct"),
    )
    assert on_generate("", "", None, 4, 1.0, 0, "default", 1.0, 1, [])[-1].startswith("**Error:** no model loaded")

    cc = make_class_conditional(tmp_path / "cc")
    status, prompt, negative, classes, steps, guidance, scheduler, lora_scale, images, *reset = on_load(
        str(cc), "", ""
    )
    assert "ClassConditionalDDPMPipeline (class-conditional" in status and "classes 0-2" in status
    assert not prompt["visible"] and classes["visible"] and classes["choices"] == [("0", 0), ("1", 1), ("2", 2)]
    assert steps["value"] == 12 and guidance["visible"] and guidance["value"] == 2.0 and not lora_scale["visible"]
    assert scheduler["choices"] == ["default", "ddim", "ddpm", "dpm++"] and images["value"] == 4

    seen_progress = []

    def progress(fraction, desc=None, unit=None):  # what gr.Progress is told: (done, total) after every step
        seen_progress.append(fraction)

    gallery, history, record, slider, image, label, status = on_generate(
        "", "", 2, 5, 2.0, 7, "ddpm", 1.0, 3, [], progress=progress
    )
    assert status.startswith("Generated 3 images in") and "DDPMScheduler" in status
    assert seen_progress == [(step, 5) for step in range(1, 6)]
    assert [caption for _, caption in gallery] == [f"class 2 · 5 steps · guidance 2 · seed {s}" for s in (7, 8, 9)]
    assert gallery[0][0].size == (256, 256)  # 8 px enlarged x32 for the page
    assert slider["value"] == 5 and slider["interactive"] and label == "step 5 of 5 (from t = 0)"
    first, first_label = on_step(record, 0, "sample")
    assert first_label == "step 0 of 5: the starting noise"
    assert np.abs(as_array(first) - as_array(image)).mean() > 1
    assert on_step(record, 2, "x0")[0].size == (256, 256)
    more = on_generate("", "", 0, 2, 2.0, 0, "default", 1.0, 1, history)[0]
    assert len(more) == 4 and more[0][1] == "class 0 · 2 steps · guidance 2 · seed 0"
    # Stop: the run ends after its current step, says so, and leaves the gallery as it was; the next run starts clean
    on_start, on_stop = handler(app, "on_start"), handler(app, "on_stop")
    on_stop()
    *unchanged, status = on_generate("", "", 0, 4, 2.0, 0, "default", 1.0, 1, more)
    assert status == "Stopped after step 1 of 4." and all(u == {"__type__": "update"} for u in unchanged)
    assert on_start() == "" and on_generate("", "", 0, 2, 2.0, 0, "default", 1.0, 1, [])[-1].startswith("Generated")

    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    assert "'notes.png' is not an image that can be read" in on_upload(str(text_file))[1]
    assert "'notes.png' is not an image" in on_reconstruct(str(text_file), 0.5, "", "", 1, 4, 2.0, 0, "ddim", 1.0)[-1]
    picture = tmp_path / "ring.png"
    digit_like().save(picture)
    shown, status = on_upload(str(picture))
    assert shown.size == (256, 256) and status == ""
    original, noised, output, status = on_reconstruct(str(picture), 0.5, "", "", 1, 4, 2.0, 0, "ddim", 1.0)
    assert status.startswith("Noised to t =") and "denoised in 2 steps" in status and output.size == (256, 256)

    wide = make_lora(tmp_path / "wide", tiny_sd_dir, seed=3, block_out_channels=[16, 48], norm_num_groups=8)
    status, *kept = on_load(str(tiny_sd_dir), str(wide), "")
    assert status.startswith("**Error:** Could not load") and "does not fit the base model" in status
    assert kept == [{"__type__": "update"}] * 12  # a failed load leaves the settings and the step viewer alone
    assert "Still serving **" in status and str(cc) in status  # the class-conditional model stays
    assert on_step(record, 1, "sample")[1] == "step 1 of 5 (from t = 800)"  # same model: its steps still show

    status, prompt, *_ = on_load(str(tiny_ddpm_dir), "", "")
    assert "DDPMPipeline (unconditional" in status and not prompt["visible"]
    assert "reloaded" in on_step(record, 1, "sample")[1]  # steps of the previous model are not decoded with this one


def test_a_missing_demo_model_says_how_to_make_it(tmp_path, monkeypatch):
    need("gradio")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from pipelines.app import DEMO_MODEL, build_app

    status = component(build_app(DEMO_MODEL), "model-status").value
    assert "no such file or folder" in status and "`make demo`" in status
    assert "make demo" not in component(build_app(str(tmp_path / "elsewhere")), "model-status").value


def test_lora_scale_scheduler_and_embeddings(tiny_sd_dir, tmp_path):
    from safetensors.torch import save_file

    from pipelines.app import _apply_settings, load_served_model

    lora = make_lora(tmp_path / "lora", tiny_sd_dir, seed=1)
    embeddings = tmp_path / "ti"
    embeddings.mkdir()
    save_file({"<thing>": torch.randn(2, 32)}, str(embeddings / "learned_embeds.safetensors"))
    served = load_served_model(str(tiny_sd_dir), [f"{lora}:0.5"], [str(embeddings)], device="cpu")
    assert served.loras == [(str(lora), 0.5)] and served.tokens == ["<thing>"]
    assert served.scheduler_choices[:3] == ["default", "ddim", "ddpm"] and "euler" in served.scheduler_choices
    assert "LoRA" in served.describe() and "`<thing>`" in served.describe()

    def image(scale, scheduler="default"):
        _apply_settings(served, scheduler, scale)
        return as_array(S.generate_with_steps(served.pipe, steps=2, seed=0, prompt="a toy").images[0])

    off, half, full = image(0.0), image(1.0), image(2.0)
    assert np.abs(half - off).mean() > 0.5 and np.abs(full - half).mean() > 0.5
    np.testing.assert_array_equal(image(1.0), half)
    assert type(served.pipe.scheduler).__name__ == "DDIMScheduler"
    image(1.0, "euler_a")
    assert type(served.pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"

    base = load_pipeline(tiny_sd_dir, device="cpu")
    reference = base("a toy", num_inference_steps=2, generator=S._generators(0, 1)).images[0]
    np.testing.assert_array_equal(off, as_array(reference))  # LoRA scale 0: the base model


def test_a_controlnet_and_its_control_image_are_served_like_sd(tiny_sd_dir, tmp_path):
    """The app (and its step recorder) runs the base model with a ControlNet: each generation follows the control
    image it was started with, as the plain ControlNet pipeline draws it."""
    import diffusers
    from PIL import Image

    from pipelines.app import load_served_model

    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    torch.manual_seed(0)
    for name, parameter in controlnet.named_parameters():  # as if trained: the zero convolutions carry the control
        if "controlnet_" in name or "conv_out" in name:
            parameter.data.normal_(0, 0.2)
    controlnet.save_pretrained(tmp_path / "cn" / "controlnet")
    controls = {}
    for name, colour in (("white", 255), ("black", 0)):
        controls[name] = tmp_path / f"{name}.png"
        Image.new("RGB", (64, 64), (colour,) * 3).save(controls[name])
    with pytest.raises(ValueError, match="needs a control image"):
        load_served_model(str(tiny_sd_dir), controlnet=str(tmp_path / "cn"), device="cpu")
    images = {}
    for name, control in controls.items():
        served = load_served_model(str(tiny_sd_dir), controlnet=str(tmp_path / "cn"), control_image=str(control))
        assert served.kind == "text" and "ControlNet" in served.describe()
        with pytest.raises(ValueError, match="needs a control image"):
            S.generate_with_steps(served.pipe, steps=2, seed=0, prompt="a toy")
        result = S.generate_with_steps(
            served.pipe, steps=2, seed=0, prompt="a toy", control_image=served.control_image
        )  # (the page's callback passes the served model's control image)
        images[name] = as_array(result.images[0])
        plain = served.pipe(
            "a toy", image=served.control_image, num_inference_steps=2, generator=S._generators(0, 1)
        ).images[0]
        np.testing.assert_array_equal(images[name], as_array(plain))
    assert np.abs(images["white"] - images["black"]).mean() > 0.5, "the control image matters"


def test_a_distilled_student_defaults_to_its_steps(tmp_path):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    from pipelines.app import load_served_model

    ddpm = DDIMPipeline.from_pretrained(make_tiny_ddpm_pipeline(tmp_path / "teacher", resolution=8))
    student = tmp_path / "student-4-steps"
    scheduler = DDIMScheduler.from_config(ddpm.scheduler.config, timestep_spacing="trailing")
    DDIMPipeline(unet=UNet2DModel.from_config(ddpm.unet.config), scheduler=scheduler).save_pretrained(student)
    (student / "README.md").write_text("images = pipe(batch_size=16, num_inference_steps=4).images\n")
    served = load_served_model(str(student), device="cpu")
    assert served.kind == "unconditional" and served.default_steps == 4
    assert served.scheduler_choices == ["default", "ddim", "ddpm", "dpm++"]
    assert len(S.generate_with_steps(served.pipe, steps=4, seed=0).record) == 5


@pytest.fixture(scope="module")
def tiny_sdxl_served(tmp_path_factory) -> dict:
    """A tiny SDXL folder, a LoRA for it and an embedding in SDXL's layout (one tensor per text encoder)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("app_sdxl")
    base = make_tiny_sdxl_pipeline(root / "sdxl")
    embeddings = root / "ti"
    embeddings.mkdir()
    generator = torch.Generator().manual_seed(0)
    vectors = {key: torch.randn(1, 32, generator=generator) for key in ("clip_l", "clip_g")}
    save_file(vectors, str(embeddings / "learned_embeds.safetensors"), metadata={"token": "<thing>"})
    return {"base": base, "lora": make_lora(root / "lora", base, seed=1, family="sdxl"), "embeddings": embeddings}


def test_an_sdxl_folder_with_its_lora_and_embeddings_is_served_like_sd(tiny_sdxl_served, tmp_path, monkeypatch):
    """The page's handlers on SDXL as on SD 1.5: loaded with a LoRA and an SDXL embedding (its token in both
    tokenizers), text controls shown, the LoRA scale changes the image and 0 gives the base model, steps decode."""
    need("gradio")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from pipelines.app import build_app, for_display

    app = build_app(None, device="cpu")
    on_load, on_generate, on_step = (handler(app, name) for name in ("on_load", "on_generate", "on_step"))
    base, lora, embeddings = (str(tiny_sdxl_served[key]) for key in ("base", "lora", "embeddings"))
    status, prompt, negative, classes, steps, guidance, scheduler, lora_scale, images, *reset = on_load(
        base, f"{lora}:0.5", embeddings
    )
    assert "StableDiffusionXLPipeline (text-to-image, latent space, 64x64" in status, status
    assert f"LoRA `{lora}` x0.5" in status and "embedding tokens `<thing>`" in status
    assert prompt["visible"] and negative["visible"] and not classes["visible"]
    assert steps["value"] == 30 and guidance["visible"] and guidance["value"] == 7.5 and lora_scale["visible"]
    assert "euler" in scheduler["choices"] and images["value"] == 1
    pipe = app.holder.model.pipe
    assert "<thing>" in pipe.tokenizer.get_added_vocab() and "<thing>" in pipe.tokenizer_2.get_added_vocab()

    def generate(scale: float):
        gallery, _, record, slider, image, label, status = on_generate(
            "a <thing>", "", None, 3, 5.0, 0, "default", scale, 1, []
        )
        assert status.startswith("Generated 1 image in") and "EulerDiscreteScheduler" in status, status
        return as_array(gallery[0][0]), record, image

    off, _, _ = generate(0.0)
    full, record, image = generate(1.0)
    assert full.shape == (256, 256, 3) and np.abs(full - off).mean() > 0.5
    np.testing.assert_array_equal(generate(1.0)[0], full)
    first, first_label = on_step(record, 0, "sample")
    assert first_label == "step 0 of 3: the starting noise" and np.abs(as_array(first) - as_array(image)).mean() > 1

    plain = load_pipeline(base, embeddings=[embeddings], device="cpu")
    reference = plain("a <thing>", num_inference_steps=3, guidance_scale=5.0, generator=S._generators(0, 1)).images[0]
    np.testing.assert_array_equal(off, as_array(for_display(reference)))  # LoRA scale 0: the base model


# what differs between the flow-matching families: the pipeline, its native size (SD3: its transformer's sample size;
# Flux: its VAE's, the transformer has none), its default guidance, whether it uses a negative prompt
FLOW_FAMILIES = {
    "sd3": {"pipeline": "StableDiffusion3Pipeline", "size": 32, "guidance": 7.0, "negative": True},
    "flux": {"pipeline": "FluxPipeline", "size": 64, "guidance": 3.5, "negative": False},
}


@pytest.mark.parametrize("family", list(FLOW_FAMILIES))
def test_sd3_and_flux_folders_with_their_lora_are_served_like_sd(family, tiny_flow_served, tmp_path, monkeypatch):
    """The page's handlers on SD3 and Flux as on SD 1.5: loaded with a LoRA, only the flow-matching sampler offered,
    the pipeline's own guidance (Flux.1-dev's an input of the model) and no negative prompt for Flux; the LoRA scale
    changes the image and 0 gives the base model; the steps decode (Flux's packed latents unpacked, the VAE's shift
    added: the last step is the image); SDEdit runs their image-to-image pipelines at the model's size."""
    need("gradio")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from pipelines.app import build_app, for_display

    expected = FLOW_FAMILIES[family]
    size, guidance_value = expected["size"], expected["guidance"]
    app = build_app(None, device="cpu")
    on_load, on_generate, on_step, on_reconstruct = (
        handler(app, name) for name in ("on_load", "on_generate", "on_step", "on_reconstruct")
    )
    base, lora = (str(tiny_flow_served[family][key]) for key in ("base", "lora"))
    status, prompt, negative, classes, steps, guidance, scheduler, lora_scale, images, *reset = on_load(
        base, f"{lora}:0.5", ""
    )
    assert f"{expected['pipeline']} (text-to-image, latent space, {size}x{size}" in status, status
    assert f"LoRA `{lora}` x0.5" in status and "FlowMatchEulerDiscreteScheduler" in status
    assert prompt["visible"] and negative["visible"] == expected["negative"] and not classes["visible"]
    assert ("no negative prompt" in status) != expected["negative"]
    assert guidance["visible"] and guidance["value"] == guidance_value and lora_scale["visible"]
    assert ("an input of the" in guidance["label"]) == (family == "flux")
    assert scheduler["choices"] == ["default", "euler"] and images["value"] == 1

    def generate(scale: float, scheduler: str = "default"):
        # a negative prompt: SD3 uses it; for Flux the page hides the box, and what it still holds is not sent
        gallery, _, record, slider, image, label, status = on_generate(
            "a toy", "blurry", None, 3, guidance_value, 0, scheduler, scale, 1, []
        )
        assert status.startswith("Generated 1 image in") and "FlowMatchEulerDiscreteScheduler" in status, status
        return as_array(gallery[0][0]), record, as_array(image)

    off, _, _ = generate(0.0)
    full, record, last_step = generate(1.0, "euler")
    assert full.shape[2] == 3 and np.abs(full - off).mean() > 0.5
    np.testing.assert_array_equal(generate(1.0)[0], full)
    np.testing.assert_array_equal(last_step, full)  # the last step, unpacked and decoded, is the image
    assert len(record) == 4 and record.frames[0].sample.shape == (1, 16, size // 2, size // 2)
    first, first_label = on_step(record, 0, "sample")
    assert first_label == "step 0 of 3: the starting noise" and np.abs(as_array(first) - full).mean() > 1
    x0, x0_label = on_step(record, 1, "x0")
    assert x0_label.startswith("step 1 of 3 (from t = 1000)")
    assert np.abs(as_array(x0) - as_array(on_step(record, 1, "sample")[0])).mean() > 1
    # x0 = x_t - sigma v; the last Euler step goes to sigma 0, so its x_t is that step's x0
    assert all(frame.x0 is not None for frame in record.frames[1:])
    torch.testing.assert_close(record.frames[-1].x0, record.frames[-1].sample, rtol=1e-4, atol=1e-4)

    plain = load_pipeline(base, device="cpu")
    negative_prompt = {"negative_prompt": "blurry"} if expected["negative"] else {}
    reference = plain(
        "a toy",
        num_inference_steps=3,
        guidance_scale=guidance_value,
        height=size,
        width=size,
        generator=S._generators(0, 1),
        **negative_prompt,
    ).images[0]
    np.testing.assert_array_equal(off, as_array(for_display(reference)))  # LoRA scale 0: the base model

    picture = tmp_path / "ring.png"
    digit_like(80).save(picture)
    original, noised, output, status = on_reconstruct(
        str(picture), 0.5, "a toy", "", None, 4, guidance_value, 0, "default", 1.0
    )
    assert status.startswith("Noised to t =") and "denoised in 2 steps" in status, status
    assert np.abs(as_array(noised) - as_array(original)).mean() > 5
    result = S.reconstruct(app.holder.model.pipe, digit_like(80), strength=0.5, steps=4, seed=0, prompt="a toy")
    assert result.original.size == result.noised.size == result.reconstruction.size == (size, size)
    assert (
        "does not work with this model, a flow-matching model"
        in on_generate("a toy", "", None, 2, guidance_value, 0, "ddim", 1.0, 1, [])[-1]
    )


def test_sdedit_of_sdxl(tiny_sdxl_served):
    pipe = load_pipeline(tiny_sdxl_served["base"], device="cpu")
    result = S.reconstruct(pipe, digit_like(80), strength=0.5, steps=4, seed=0, prompt="a toy")
    assert result.original.size == result.noised.size == result.reconstruction.size == (64, 64)
    assert result.denoising_steps == 2 and 0 < result.timestep < 1000


def http_get(url: str) -> str | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except (urllib.error.URLError, OSError):
        return None


def outward_address() -> str | None:
    """This machine's address on its network (no packet is sent), or None when it has only loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_command_serves_on_loopback_and_shows_a_bad_model_in_the_page(tmp_path):
    need("gradio")
    from tests.helpers import subprocess_env, wait_for

    not_a_pipeline = tmp_path / "photos"
    not_a_pipeline.mkdir()
    port = free_port()
    command = [sys.executable, "-m", "pipelines.app", "--model", str(not_a_pipeline), "--port", str(port)]
    env = subprocess_env(GRADIO_TEMP_DIR=str(tmp_path / "gradio"), OMP_NUM_THREADS="1")
    log = tmp_path / "app.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command, cwd=Path(__file__).parents[1], env=env, stdout=handle, stderr=subprocess.STDOUT, text=True
        )
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/config") is not None, timeout=240, process=process)
        wait_for(lambda: "difftune app on" in log.read_text(), timeout=60, process=process)  # printed once served
        config = http_get(f"http://127.0.0.1:{port}/config")
        address = outward_address()
        if address is not None:  # served on loopback only
            with socket.socket() as sock, pytest.raises(OSError):
                sock.settimeout(5)
                sock.connect((address, port))
    finally:
        process.terminate()
        process.wait(timeout=60)
    output = log.read_text()
    assert "is not a diffusers pipeline folder: it has no model_index.json" in config
    assert f"difftune app on http://127.0.0.1:{port}/" in output and "share=True" not in output
    assert "is not a diffusers pipeline folder" in output and "Traceback" not in output, output


# ---------------------------------------------------------------------------------------------------------------------
# the app in headless Chromium
# ---------------------------------------------------------------------------------------------------------------------
def require_browser():
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    need("playwright.sync_api")


def step_label(page) -> str:
    """The step caption under the slider ('step 3 of 6 (from t = 499)'), without a progress timer's text."""
    match = re.search(r"step \d+ of \d+.*", page.inner_text("#step-label"))
    return match.group(0) if match else page.inner_text("#step-label")


DROP_FILE = """([target, name, b64]) => {
    // a file dropped on the element, as a user drags one from their file manager
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], name, {type: "image/png"}));
    for (const type of ["dragenter", "dragover", "drop"]) {
        target.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
    }
}"""
DROP_ZONE = "#rec-file button[aria-dropeffect=copy]"


def drop_file(page, name: str, data: bytes) -> None:
    import base64

    page.locator(DROP_ZONE).evaluate(
        f"(target, args) => ({DROP_FILE})([target, ...args])", [name, base64.b64encode(data).decode()]
    )


WATCH_STATUS = """() => {
    // notes whether the status line was ever without a result line (cleared when the run started)
    const status = document.querySelector('#generate-status');
    window.statusCleared = !status.innerText.match(/Generated|Error|Stopped/);
    new MutationObserver(() => {
        if (!status.innerText.match(/Generated|Error|Stopped/)) window.statusCleared = true;
    }).observe(status, {subtree: true, childList: true, characterData: true});
}"""
RUN_DONE = """() => {
    const text = document.querySelector('#generate-status').innerText;
    return window.statusCleared && text.match(/Generated|Error|Stopped/) && !text.match(/queue:|denoising/);
}"""


def set_numbers(page, values: dict) -> None:
    """Type numbers into the settings (elem_id -> value; None leaves one alone), as a user would."""
    for elem_id, value in values.items():
        if value is not None:
            field = page.locator(f"#{elem_id} input[type=number], #{elem_id} input:not([type=range])").first
            field.fill(str(value))
            field.press("Enter")


def generate_and_wait(page, prompt: str | None) -> str:
    """Generate: Enter in the prompt box when the model takes a prompt, else the button. Waits until the previous
    status line has gone (cleared as the run starts) and this run's has come, and returns it."""
    page.evaluate(WATCH_STATUS)
    if prompt is not None:
        page.fill("#prompt textarea", prompt)
        page.press("#prompt textarea", "Enter")
    else:
        page.click("#generate")
    page.wait_for_function(RUN_DONE)
    return page.inner_text("#generate-status")


def drive_app(
    url: str,
    screenshot: Path,
    *,
    prompt: str | None = None,
    steps: int | None = None,
    images: int | None = None,
    slider_to: float = 0.0,
    upload: Path | None = None,
) -> dict:
    """Open the app and use it as a person would: generate (Enter in the prompt box when there is one, after setting
    steps / number of images), move the steps slider to the fraction `slider_to` of its range and check that the
    shown image changes, try to load a model that is not there and check that the settings and the step viewer
    stay, drop a file that is not an image and then `upload` (if given) on the SDEdit drop zone and reconstruct it,
    generate once more and save a screenshot. Returns what it saw; raises AssertionError when the page does not
    behave."""
    from playwright.sync_api import sync_playwright

    host = url.rstrip("/")
    outside: list[str] = []
    seen: dict = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(float(os.environ.get("DIFFTUNE_APP_TIMEOUT_S", 240)) * 1000)
            page.on(
                "request",
                lambda request: (
                    None if request.url.startswith((host, "data:", "blob:")) else outside.append(request.url)
                ),
            )
            page.goto(url)
            page.wait_for_selector("#generate")
            settings = {"steps": steps, "num-images": images}
            set_numbers(page, settings)
            seen["status"] = generate_and_wait(page, prompt)
            assert seen["status"].startswith("Generated"), seen["status"]
            seen["gallery"] = page.locator("#gallery img").count()
            assert seen["gallery"] >= 1

            shown = page.locator("#step-image img")
            first_src = shown.evaluate("img => img.src")
            first_label = step_label(page)
            slider = page.locator("#step-slider input[type=range]")
            maximum = int(slider.get_attribute("max"))
            target = round(slider_to * maximum)
            assert target != maximum
            slider.fill(str(target))  # as a user dragging it: input and change events
            page.wait_for_function(
                "src => { const img = document.querySelector('#step-image img'); return img && img.src !== src; }",
                arg=first_src,
            )
            second_src = shown.evaluate("img => img.src")
            page.wait_for_function(f"document.querySelector('#step-label').innerText.includes('step {target} of')")
            seen["labels"] = (first_label, step_label(page))
            before, after = (Image.open(io.BytesIO(page.request.get(src).body())) for src in (first_src, second_src))
            seen["step_change"] = float(np.abs(as_array(before.convert("L")) - as_array(after.convert("L"))).mean())
            assert seen["step_change"] > 0.5, "the image at another step looks the same"

            # a Load that fails: the error shows, the settings and the step viewer stay as they were
            kept = {
                "images": page.input_value("#num-images input[type=number]"),
                "steps": page.input_value("#steps input[type=number]"),
                "slider": page.input_value("#step-slider input[type=range]"),
                "step_image": shown.evaluate("img => img.src"),
            }
            if not page.locator("#load").is_visible():
                page.get_by_text("Model", exact=True).first.click()  # the accordion is closed when a model is served
            path_box = page.locator("#model-path input, #model-path textarea").first
            served = path_box.input_value()
            path_box.fill(str(screenshot.parent / "no-such-model"))
            page.click("#load")
            page.wait_for_function("document.querySelector('#model-status').innerText.includes('Error')")
            seen["failed_load"] = page.inner_text("#model-status")
            after_failure = {
                "images": page.input_value("#num-images input[type=number]"),
                "steps": page.input_value("#steps input[type=number]"),
                "slider": page.input_value("#step-slider input[type=range]"),
                "step_image": shown.evaluate("img => img.src"),
            }
            assert after_failure == kept, (kept, after_failure)
            seen["kept_after_failed_load"] = kept
            path_box.fill(served)  # and back to the model served, its defaults, the accordion closed again
            page.click("#load")
            page.wait_for_function("!document.querySelector('#model-status').innerText.includes('Error')")
            page.get_by_text("Model", exact=True).first.click()

            # SDEdit: files dropped on the drop zone; one that is not an image is reported in the page
            page.get_by_role("tab", name="Reconstruct (SDEdit)").click()
            drop_file(page, "notes.png", b"this is not an image")
            page.wait_for_function("document.querySelector('#rec-status').innerText.includes('not an image')")
            seen["upload_error"] = page.inner_text("#rec-status")
            if upload is not None:
                page.click("#rec-file button[aria-label='Remove Image']")
                drop_file(page, upload.name, upload.read_bytes())
                page.wait_for_function("!document.querySelector('#rec-status').innerText.includes('not an image')")
                page.wait_for_selector("#rec-file img")  # the drop zone previews the image
                page.wait_for_selector("#rec-input img")  # and the app shows it as the model sees it
                page.click("#reconstruct")
                page.wait_for_function("document.querySelector('#rec-status').innerText.match(/Noised|Error/)")
                seen["reconstruct"] = page.inner_text("#rec-status")
                assert seen["reconstruct"].startswith("Noised to t ="), seen["reconstruct"]
                assert page.locator("#rec-noised img").count() == 1 and page.locator("#rec-output img").count() == 1
            page.get_by_role("tab", name="Generate").click()

            # once more, other seeds (the status of the last run goes as this one starts), then the picture
            set_numbers(page, {**settings, "seed": 100})
            seen["second_status"] = generate_and_wait(page, prompt)
            assert seen["second_status"].startswith("Generated"), seen["second_status"]
            seen["gallery_after"] = page.locator("#gallery img").count()
            page.locator("#step-slider input[type=range]").fill(str(target))
            page.wait_for_function(f"document.querySelector('#step-label').innerText.includes('step {target} of')")
            page.wait_for_selector("#step-image img")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        except Exception:
            failure = screenshot.with_name(f"{screenshot.stem}-failure.png")
            page.screenshot(path=str(failure), full_page=True)
            print(f"the page when the check failed: {failure}", file=sys.stderr)
            raise
        finally:
            browser.close()
    seen["outside_requests"] = outside
    return seen


def test_app_in_headless_chromium(tiny_sd_dir, tmp_path, monkeypatch):
    need("gradio")
    require_browser()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from pipelines.app import build_app, launch

    app = build_app(str(tiny_sd_dir), device="cpu")
    assert app.holder.error is None
    port = free_port()
    launch(app, port, block=False, quiet=True)
    try:
        picture = tmp_path / "ring.png"
        digit_like(80).save(picture)
        screenshot = tmp_path / "app.png"
        seen = drive_app(
            f"http://127.0.0.1:{port}/", screenshot, prompt="a toy", steps=6, images=2, slider_to=0.5, upload=picture
        )
    finally:
        app.close()
    assert seen["gallery"] == 2 and seen["labels"][0].startswith("step 6 of 6")
    assert "no such file or folder" in seen["failed_load"] and "Still serving" in seen["failed_load"]
    assert seen["kept_after_failed_load"]["images"] == "2" and seen["kept_after_failed_load"]["steps"] == "6"
    assert "'notes.png' is not an image that can be read" in seen["upload_error"]
    assert seen["reconstruct"].startswith("Noised to t =") and seen["gallery_after"] == 4
    assert seen["outside_requests"] == []  # nothing but the app itself: no analytics, fonts or CDNs
    with Image.open(screenshot) as shot:
        assert shot.format == "PNG" and shot.width == 1280 and shot.height > 600
    if os.environ.get("DIFFTUNE_APP_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["DIFFTUNE_APP_SCREENSHOT"])


# ---------------------------------------------------------------------------------------------------------------------
# the README screenshot
# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot of the app driven in headless Chromium")
    parser.add_argument("--model", default="outputs/digits-unconditional")
    parser.add_argument("--screenshot", default="docs/app.png")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--slider-to", type=float, default=0.8, help="fraction of the steps shown in the screenshot")
    parser.add_argument("--colors", type=int, default=64, help="palette size of the saved PNG (smaller file)")
    args = parser.parse_args(argv)
    from pipelines.app import build_app, launch

    app = build_app(args.model)
    if app.holder.error:
        print(app.holder.error, file=sys.stderr)
        return 2
    port = free_port()
    launch(app, port, block=False, quiet=True)
    try:
        raw = Path(args.screenshot).with_suffix(".raw.png")
        seen = drive_app(f"http://127.0.0.1:{port}/", raw, images=args.images, slider_to=args.slider_to)
    finally:
        app.close()
    with Image.open(raw) as shot:
        shot.convert("RGB").quantize(colors=args.colors, method=Image.Quantize.MEDIANCUT).save(
            args.screenshot, optimize=True
        )
    raw.unlink()
    print(seen, f"-> {args.screenshot} ({Path(args.screenshot).stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
