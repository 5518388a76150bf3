"""finetune.imaging: one list of image extensions, one way to open and convert an image, one `pipeline_kind`."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from finetune import data, imaging


def test_one_extension_list_shared_by_every_reader():
    from finetune import evaluate, masks
    from finetune.methods import dreambooth

    assert {".gif", ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".webp", ".bmp"} == imaging.IMAGE_EXTENSIONS
    for module in (data, dreambooth, masks, evaluate):
        assert module.IMAGE_EXTENSIONS is imaging.IMAGE_EXTENSIONS, module.__name__
    for name in ("IMAGE_EXTENSIONS", "open_image", "image_to_tensor", "ImageTooLarge", "EXIF_ORIENTATION"):
        assert getattr(data, name) is getattr(imaging, name), name
    assert imaging.is_image_file("a/B.PNG") and imaging.is_image_file("x.tif") and imaging.is_image_file("x.gif")
    assert not imaging.is_image_file("metadata.jsonl") and not imaging.is_image_file("png")


def test_evaluation_folders_read_gif_and_tif_too(tmp_path):
    from finetune.evaluate import load_image_folder

    for i, suffix in enumerate((".png", ".gif", ".tif")):
        Image.new("RGB", (8, 8), (40 * i,) * 3).save(tmp_path / f"{i}{suffix}")  # a GIF is a palette image
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_image_folder(tmp_path)
    assert images.shape == (3, 3, 8, 8)
    assert [round(float(v), 3) for v in images[:, 0, 0, 0]] == [round(40 * i / 127.5 - 1, 3) for i in range(3)]


def _rotated_jpeg(path, size=(40, 20)):
    """A landscape JPEG whose EXIF says: show me turned a quarter (orientation 6), i.e. as a portrait."""
    image = Image.new("RGB", size, (200, 30, 30))
    exif = Image.Exif()
    exif[imaging.EXIF_ORIENTATION] = 6
    image.save(path, format="JPEG", exif=exif.tobytes())
    return path


def test_load_image_is_upright_keeps_or_converts_the_mode_and_reports_broken_files(tmp_path):
    assert imaging.load_image(_rotated_jpeg(tmp_path / "photo.jpg")).size == (20, 40)

    transparent = tmp_path / "alpha.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(transparent)
    assert imaging.load_image(transparent).mode == "RGBA"  # kept: the caller decides what transparency becomes
    assert imaging.load_image(transparent, "L").mode == "L"
    assert np.asarray(imaging.to_mode(imaging.load_image(transparent), 3)).min() == 255  # on white

    big = tmp_path / "big.jpg"
    Image.new("RGB", (800, 800), "white").save(big, quality=90)
    assert imaging.load_image(big, "RGB").size == (800, 800)
    assert imaging.load_image(big, "RGB", draft_size=200).size == (200, 200)  # decoded at 1/4 scale

    truncated = tmp_path / "truncated.png"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:-30])
    with pytest.raises(Exception):  # noqa: B017 - whatever PIL raises for it; the callers word it for their users
        imaging.load_image(truncated, verify=True)


def test_caption_and_app_loaders_go_through_imaging(tmp_path):
    from captioning.caption import load_image as caption_load
    from pipelines.steps import load_image as app_load

    photo = _rotated_jpeg(tmp_path / "photo.jpg")
    assert caption_load(photo).size == (20, 40) and caption_load(photo).mode == "RGB"
    assert app_load(photo).size == (20, 40)
    (tmp_path / "fake.png").write_text("not a png")
    with pytest.raises(ValueError, match="'fake.png' is not an image that can be read"):
        app_load(tmp_path / "fake.png")


@pytest.fixture(scope="module")
def pipelines(tiny_sd_dir, tmp_path_factory):
    import diffusers as d

    from pipelines.class_conditional import ClassConditionalDDPMPipeline
    from tests.tiny_models import make_tiny_sdxl_pipeline, make_tiny_unet2d

    sd = d.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    sdxl = d.StableDiffusionXLPipeline.from_pretrained(make_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl")))
    return {
        "sd": sd,
        "sd-img2img": d.StableDiffusionImg2ImgPipeline(**sd.components),
        "sd-inpaint": d.StableDiffusionInpaintPipeline(**sd.components),
        "sdxl": sdxl,
        "sdxl-img2img": d.StableDiffusionXLImg2ImgPipeline(**sdxl.components),
        "sdxl-inpaint": d.StableDiffusionXLInpaintPipeline(**sdxl.components),
        "ddpm": d.DDPMPipeline(make_tiny_unet2d(), d.DDPMScheduler()),
        "ddim": d.DDIMPipeline(make_tiny_unet2d(), d.DDIMScheduler()),
        "class": ClassConditionalDDPMPipeline(make_tiny_unet2d(num_class_embeds=3), d.DDPMScheduler()),
    }


# pipeline: (imaging.pipeline_kind, pipelines.steps.pipeline_kind: the kind or the start of its error)
KINDS = {
    "sd": ("text", "text"),
    "sd-img2img": ("image-to-image", "StableDiffusionImg2ImgPipeline needs an input image"),
    "sd-inpaint": ("inpaint", "StableDiffusionInpaintPipeline needs an input image"),
    "sdxl": ("text", "text"),
    "sdxl-img2img": ("image-to-image", "StableDiffusionXLImg2ImgPipeline needs an input image"),
    "sdxl-inpaint": ("inpaint", "StableDiffusionXLInpaintPipeline needs an input image"),
    "ddpm": ("unconditional", "unconditional"),
    "ddim": ("unconditional", "unconditional"),
    "class": ("class", "class"),
}


def test_one_pipeline_kind_for_generate_and_the_app(pipelines):
    from pipelines import generate, steps

    assert generate.pipeline_kind is imaging.pipeline_kind
    for name, (kind, app_kind) in KINDS.items():
        pipe = pipelines[name]
        assert imaging.pipeline_kind(pipe) == kind, name
        if app_kind in imaging.PIPELINE_KINDS:
            assert steps.pipeline_kind(pipe) == app_kind, name
        else:
            with pytest.raises(ValueError, match=app_kind):
                steps.pipeline_kind(pipe)
    with pytest.raises(ValueError, match="StableDiffusionImg2ImgPipeline is an image-to-image pipeline"):
        generate.generate(pipelines["sd-img2img"], prompts=["a toy"])
    with pytest.raises(ValueError, match="is not a pipeline difftune can run"):
        imaging.pipeline_kind(pipelines["sd"].vae)
