"""Inpainting checkpoints trained by the text-to-image methods (a tiny 9-channel inpainting pipeline): masks, the UNet
conditioning the pipelines expect, full and LoRA outputs that plain `StableDiffusionInpaintPipeline` loads, and the
errors for mask options on the wrong model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image
from safetensors.torch import load_file

from finetune.buckets import make_sampler
from finetune.config import ConfigError
from finetune.data import collate_examples
from finetune.masks import random_mask, tensor_to_image
from finetune.methods import get_method_class
from finetune.recipe import load_config
from tests.helpers import reset_accelerate, run_training
from tests.test_dreambooth import PROMPT, prior, recipe
from tests.tiny_models import make_test_images, make_tiny_sd_pipeline


@pytest.fixture(scope="session")
def tiny_inpaint_dir(tmp_path_factory):
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-inpaint"), inpainting=True)


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    make_test_images(folder, 4, size=64)
    return folder


def centre_mask(size=64) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(mask, mode="L")


def inpaint(pipe, image, mask):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        image=image,
        mask_image=mask,
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.manual_seed(0),
        height=64,
        width=64,
    ).images[0]


def set_up(config):
    from accelerate import Accelerator

    reset_accelerate()
    method = get_method_class(config.method)(config, Accelerator(cpu=True))
    method.setup()
    return method


# -- masks -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["rectangle", "ellipse"])
@pytest.mark.parametrize("size", [(96, 128), (16, 128)])
def test_random_masks_are_binary_seeded_and_cover_the_requested_area(shape, size):
    height, width = size
    coverages = []
    for seed in range(300):
        mask = random_mask(height, width, np.random.default_rng(seed), [shape], min_area=0.1, max_area=0.5)
        assert mask.shape == (height, width) and mask.dtype == np.float32
        assert set(np.unique(mask).tolist()) <= {0.0, 1.0}
        coverages.append(mask.mean())
        if shape == "rectangle":  # one filled axis-aligned box
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all() and mask.sum() == rows.size * cols.size
    coverages = np.array(coverages)
    assert coverages.min() >= 0.1 - 0.03 and coverages.max() <= 0.5 + 0.03, (coverages.min(), coverages.max())
    assert abs(coverages.mean() - 0.3) < 0.03, "areas are uniform in [min_area, max_area]"
    assert (coverages < 0.2).any() and (coverages > 0.4).any()


def test_random_masks_depend_only_on_the_generator():
    def draw(seed, **kw):
        return random_mask(64, 64, np.random.default_rng(seed), **kw)

    assert np.array_equal(draw(3), draw(3)) and not np.array_equal(draw(3), draw(4))
    assert all(draw(seed, full_probability=1.0).all() for seed in range(5))
    full = [draw(seed, full_probability=0.25).all() for seed in range(400)]
    assert 0.18 < np.mean(full) < 0.32
    assert not any(draw(seed, max_area=0.75).all() for seed in range(50))


# -- conditioning ----------------------------------------------------------------------------------------------------
def test_training_conditions_the_unet_exactly_like_the_inpainting_pipeline(
    tiny_inpaint_dir, instance_dir, tmp_path, monkeypatch
):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    # the pipeline samples the VAE posterior of the masked image, training takes its mean: compare with the mean
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    method = set_up(load_config(recipe(tiny_inpaint_dir, instance_dir, tmp_path / "run")))
    examples = method.train_dataset
    example = next(e for e in (examples[i] for i in range(len(examples))) if 0 < e["mask"].mean() < 1)
    assert torch.equal(examples[0]["mask"], examples[0]["mask"]), "the mask is drawn from the example's own seed"
    batch = collate_examples([example])
    ours = method.inpainting_conditioning(batch, (32, 32))

    seen = {}
    pipe = method.pipeline()

    def record(module, args):
        seen.setdefault("input", args[0].clone())  # returns None: the arguments stay as they are

    hook = pipe.unet.register_forward_pre_hook(record)
    try:
        pipe.set_progress_bar_config(disable=True)
        pipe(
            PROMPT,
            image=tensor_to_image(example["pixel_values"]),
            mask_image=tensor_to_image(example["mask"]),
            num_inference_steps=1,
            guidance_scale=1.0,
            height=64,
            width=64,
            output_type="latent",
        )
    finally:
        hook.remove()
    pipeline_input = seen["input"]
    assert pipeline_input.shape == (1, 9, 32, 32)
    assert torch.equal(pipeline_input[:, 4:5], ours[:, :1]), "mask channel"
    # the same up to float rounding (the pipeline normalises x / 255 * 2 - 1, the data loader x / 127.5 - 1) ...
    torch.testing.assert_close(pipeline_input[:, 5:], ours[:, 1:], atol=5e-4, rtol=0)
    # ... which is far below what a wrong convention changes (here: repainting the complement of the mask)
    inverted = method.inpainting_conditioning({**batch, "mask": 1 - batch["mask"]}, (32, 32))
    assert (inverted[:, 1:] - ours[:, 1:]).abs().max() > 100 * 5e-4


def test_cached_and_uncached_training_give_the_same_loss(tiny_inpaint_dir, instance_dir, tmp_path):
    class_dir = tmp_path / "class"
    make_test_images(class_dir, 2, size=64, seed=5)
    losses = {}
    for cache in ("none", "memory"):
        options = dict(cache=cache, **prior(class_dir, num_class_images=2, prior_loss_weight=0.5))
        config = load_config(
            recipe(tiny_inpaint_dir, instance_dir, tmp_path / cache, **options),
            ["data.random_flip=true"],
        )
        method = set_up(config)
        method.before_training(None)
        examples = method.train_dataset
        batch = collate_examples([examples[i] for i in range(len(examples))])
        assert batch["loss_weight"].tolist().count(1.0) == 4 and len(batch["row"].unique()) >= 6
        losses[cache] = method.loss(batch)[0].item()
        if cache == "memory":
            assert method.cache.moments and "a photo of toy" in method.cache.text
    assert losses["memory"] == pytest.approx(losses["none"], rel=1e-5, abs=1e-6)


# -- outputs ---------------------------------------------------------------------------------------------------------
def test_full_inpainting_saves_an_inpaint_pipeline_that_repaints_the_masked_region(
    tiny_inpaint_dir, instance_dir, tmp_path
):
    out = run_training(recipe(tiny_inpaint_dir, instance_dir, tmp_path / "run"))
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    image, mask = Image.open(instance_dir / "image_001.png").convert("RGB"), centre_mask()
    base = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint_dir)
    trained = StableDiffusionInpaintPipeline.from_pretrained(out)
    before, after = inpaint(base, image, mask), inpaint(trained, image, mask)
    inside = np.asarray(mask) > 127
    change = np.abs(np.asarray(after, np.float32) - np.asarray(before, np.float32))
    assert change[inside].mean() > 1.0, "the fine-tuned model paints the masked region differently"
    # the composited result (pipe.image_processor.apply_overlay, as in the card) keeps every unmasked pixel
    result = np.asarray(trained.image_processor.apply_overlay(mask, image, after), np.int16)
    assert np.abs(result[~inside] - np.asarray(image, np.int16)[~inside]).max() <= 1
    assert np.abs(result[inside] - np.asarray(after, np.int16)[inside]).max() <= 1
    card = (out / "README.md").read_text()
    assert "StableDiffusionInpaintPipeline.from_pretrained" in card and "mask_image=mask" in card


def test_lora_inpainting_with_prior_preservation_loads_into_the_inpaint_pipeline(
    tiny_inpaint_dir, instance_dir, tmp_path
):
    options = dict(use_lora=True, **prior(tmp_path / "class", num_class_images=2))
    out = run_training(recipe(tiny_inpaint_dir, instance_dir, tmp_path / "run", lr=5e-3, **options))
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == ["class_0.png", "class_1.png"]
    assert all(k.startswith("unet.") for k in load_file(str(out / "pytorch_lora_weights.safetensors")))
    image, mask = Image.open(instance_dir / "image_001.png").convert("RGB"), centre_mask()
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint_dir)
    before = np.asarray(inpaint(pipe, image, mask), np.float32)
    pipe.load_lora_weights(out)
    inside = np.asarray(mask) > 127
    assert np.abs(np.asarray(inpaint(pipe, image, mask), np.float32) - before)[inside].mean() > 1.0
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(np.asarray(inpaint(pipe, image, mask), np.float32), before)
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "mask_image=mask" in card and "inpainting" in card


def test_lora_on_captioned_images_trains_an_inpainting_checkpoint(tiny_inpaint_dir, instance_dir, tmp_path):
    """Inpainting is a variant of every text-to-image method, not a method: plain LoRA on captions trains one."""
    images = tmp_path / "captioned"
    files = make_test_images(images, 3, size=64, seed=4)
    lines = [json.dumps({"file_name": f.name, "text": f"{PROMPT} {i}"}) for i, f in enumerate(files)]
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    config = recipe(tiny_inpaint_dir, instance_dir, tmp_path / "run", method="lora", lr=5e-3, steps=3)
    config["data"]["dataset"] = str(images)
    config["lora"] = {"rank": 4, "mask_shapes": ["rectangle"], "full_mask_probability": 0.0}
    out = run_training(config)
    image, mask = Image.open(instance_dir / "image_001.png").convert("RGB"), centre_mask()
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint_dir)
    before = np.asarray(inpaint(pipe, image, mask), np.float32)
    pipe.load_lora_weights(out)
    assert np.abs(np.asarray(inpaint(pipe, image, mask), np.float32) - before).max() > 1.0
    card = (out / "README.md").read_text()
    assert "StableDiffusionInpaintPipeline" in card and "mask_image=mask" in card and "inpainting" in card


# -- bad input -------------------------------------------------------------------------------------------------------
def test_mask_options_on_a_text_to_image_model_and_the_old_method_name_are_one_clear_line(
    tiny_sd_dir, instance_dir, tmp_path
):
    masks = tmp_path / "masks"
    make_test_images(masks, 1, size=64)
    with pytest.raises(ConfigError, match=r"dreambooth.mask_data_dir .* are for inpainting models.*text-to-image"):
        run_training(recipe(tiny_sd_dir, instance_dir, tmp_path / "a", mask_data_dir=str(masks)))
    with pytest.raises(ConfigError, match=r"method 'inpainting' is gone: .*use method 'dreambooth'"):
        run_training(recipe(tiny_sd_dir, instance_dir, tmp_path / "b", method="inpainting"))
    with pytest.raises(ConfigError, match="mask_data_dir is inside the training image folder"):
        load_config(recipe(tiny_sd_dir, instance_dir, tmp_path / "c", mask_data_dir=str(instance_dir / "m")))


def test_user_masks_follow_their_images(tiny_inpaint_dir, tmp_path):
    from accelerate import Accelerator

    images, masks = tmp_path / "images", tmp_path / "masks"
    make_test_images(images, 3, size=64)
    masks.mkdir()
    for i in range(3):
        mask = np.zeros((64, 64), np.uint8)
        mask[:, : 16 * (i + 1)] = 255  # left stripes of different widths: a flip is visible
        Image.fromarray(mask, mode="L").save(masks / f"image_{i:03d}.png")
    config = load_config(
        recipe(tiny_inpaint_dir, images, tmp_path / "run", mask_data_dir=str(masks)),
        ["data.random_flip=true"],
    )
    reset_accelerate()
    method = get_method_class("dreambooth")(config, Accelerator(cpu=True))

    def find_masks():
        method.inpainting, method.masks = True, None
        source = method.build_source()
        method.prepare_masks(source)
        return source

    source = find_masks()
    flips = set()
    for index in range(3):
        for epoch in range(4):
            rng = np.random.default_rng([0, epoch, index])
            example = method.make_example(source.get(index, rng), rng)
            expected = torch.zeros(1, 64, 64)
            expected[..., : 16 * (example["row"] + 1)] = 1.0
            assert torch.equal(example["mask"], expected.flip(-1) if example["flipped"] else expected)
            flips.add(example["flipped"])
    assert flips == {True, False}

    (masks / "image_002.png").unlink()
    with pytest.raises(ConfigError, match="1 training image\\(s\\) have no mask .*image_002.png"):
        find_masks()
    Image.new("L", (32, 64)).save(masks / "image_002.png")
    with pytest.raises(ConfigError, match="image_002.png: mask 32x64, image 64x64"):
        find_masks()
    with pytest.raises(ConfigError, match="user masks need data.center_crop=true"):
        load_config(config.to_dict(), ["data.center_crop=false"])


def test_an_inpainting_model_trains_in_aspect_buckets_with_masks_cut_like_their_images(tiny_inpaint_dir, tmp_path):
    """With data.aspect_buckets, each example's mask has its bucket's shape: a user mask is cut exactly as its image
    (here the mask is the image's own white top half, so they must line up), a random one is drawn in the bucket;
    the run trains to the end and samples at every validation size."""
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir(), masks.mkdir()
    for name, (width, height) in {"portrait": (48, 96), "landscape": (96, 48), "square": (64, 64)}.items():
        array = np.zeros((height, width, 3), np.uint8)
        array[: height // 2, : width // 3] = 255  # not mirror-symmetric: a flip shows
        Image.fromarray(array).save(photos / f"{name}.png")
        Image.fromarray(array[..., 0]).save(masks / f"{name}.png")
    overrides = ["data.aspect_buckets=true", "data.random_flip=true", "train.train_batch_size=1"]
    config = load_config(recipe(tiny_inpaint_dir, photos, tmp_path / "run", mask_data_dir=str(masks)), overrides)
    method = set_up(config)
    make_sampler(method.train_dataset, config.data, method.bucket_multiple(), 1, 1, seed=0)  # assigns the buckets
    shapes, flips = set(), set()
    for epoch in range(3):
        method.train_dataset.set_epoch(epoch)
        for index in range(len(method.train_dataset)):
            example = method.train_dataset[index]
            pixels, mask = example["pixel_values"], example["mask"]
            assert mask.shape == (1, *pixels.shape[1:])
            assert torch.equal(mask[0] > 0.5, pixels[0] > 0), "the mask is cut, resized and flipped with its image"
            shapes.add(tuple(pixels.shape[1:]))
            flips.add(example["flipped"])
    assert len(shapes) == 3 and flips == {True, False}, (shapes, flips)
    random_masks = method.masks.__class__(method.options, 64, {})  # no user masks: drawn in the bucket
    assert random_masks.mask_for(0, False, False, np.random.default_rng(0), (48, 80)).shape == (1, 80, 48)

    out = run_training(
        recipe(tiny_inpaint_dir, photos, tmp_path / "trained", steps=3, validation_sizes=["48x80", "80x48"]),
        *overrides,
        "train.num_samples=2",
    )
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps[-1] == 3
    assert json.loads((out / "buckets.json").read_text()).keys() >= {"64x64"}
    assert (out / "samples" / "final.png").is_file()
