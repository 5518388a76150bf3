"""Masked loss (data.masked_loss): each image's mask (alpha channel, <name>.mask.png beside it, or a metadata column)
is cut with its image (resize, crop, bucket, flip), and weights the loss per latent pixel; mask files are never
training images; cached and uncached masked losses agree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config import ConfigError, DataConfig
from finetune.data import build_image_source, collate_examples
from finetune.masks import pixel_loss_weights
from finetune.objectives import weighted_mse
from finetune.recipe import load_config
from tests.helpers import reset_accelerate, run_training


def rgba_image(width: int, height: int, seed: int) -> Image.Image:
    """Black red channel, alpha a smooth random field: composited over white (as every image is), red becomes
    1 - alpha, so the cut mask must equal 1 - the cut red channel."""
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1)).astype(np.uint8)
    alpha = np.asarray(Image.fromarray(field).resize((width, height), Image.Resampling.BILINEAR))
    zeros = np.zeros_like(alpha)
    rgba = np.stack([zeros, rng.integers(0, 256, alpha.shape), rng.integers(0, 256, alpha.shape), alpha], axis=-1)
    return Image.fromarray(rgba.astype(np.uint8), mode="RGBA")


@pytest.fixture
def masked_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    lines = []
    for i, (w, h) in enumerate([(96, 64), (64, 96), (80, 80)]):
        rgba_image(w, h, i).save(folder / f"alpha_{i}.png")
        lines.append({"file_name": f"alpha_{i}.png", "text": f"a toy {i}"})
    # a JPEG with its mask beside it, and one with its mask named in the metadata
    for name, seed in (("beside", 7), ("listed", 8)):
        rgba = rgba_image(72, 64, seed)
        rgba.convert("RGB").save(folder / f"{name}.jpg", quality=100)
        mask_name = f"{name}.mask.png" if name == "beside" else "masks/listed_mask.png"
        (folder / mask_name).parent.mkdir(exist_ok=True)
        rgba.getchannel("A").save(folder / mask_name)
        lines.append(
            {"file_name": f"{name}.jpg", "text": f"a {name} toy", **({"mask": mask_name} if name == "listed" else {})}
        )
    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "plain.png")
    lines.append({"file_name": "plain.png", "text": "no mask"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder


@pytest.mark.parametrize("buckets", [False, True])
def test_each_mask_is_cut_with_its_image_and_mask_files_are_not_images(masked_folder, buckets):
    config = DataConfig(
        dataset=str(masked_folder),
        resolution=48,
        center_crop=False,
        random_flip=True,
        masked_loss=True,
        aspect_buckets=buckets,
    )
    source = build_image_source(config, columns=["text"])
    names = sorted(str(s).rsplit("/", 1)[-1] for s in source.image_sources)
    assert names == ["alpha_0.png", "alpha_1.png", "alpha_2.png", "beside.jpg", "listed.jpg", "plain.png"]
    if buckets:
        from finetune.buckets import make_sampler
        from finetune.data import TrainingExamples

        make_sampler(TrainingExamples(source, seed=0), config, 8, batch_size=1, num_processes=1, seed=0)
    shapes, flips = set(), set()
    for index in range(len(source)):
        for epoch in range(3):
            example = source.get(index, np.random.default_rng([0, epoch, index]))
            mask, red = example["loss_mask"], (example["pixel_values"][0] + 1) / 2
            name = str(source.image_sources[example["row"]])
            assert mask.shape == (1, *red.shape), name
            if name.endswith("plain.png"):
                assert torch.equal(mask, torch.ones_like(mask))
            elif name.endswith(".png"):  # 1 - red, cut the same way: equal up to 8-bit rounding
                torch.testing.assert_close(mask[0], 1 - red.clamp(0, 1), atol=1 / 127.5 + 1e-6, rtol=0)
            else:
                assert 0.05 < mask.mean() < 0.95  # the mask file, not ones
            shapes.add(tuple(mask.shape))
            flips.add(example["flipped"])
    assert flips == {True, False} and (len(shapes) > 1) == buckets


def test_a_mask_of_the_wrong_size_is_one_line(masked_folder):
    Image.new("L", (10, 10)).save(masked_folder / "beside.mask.png")
    config = DataConfig(dataset=str(masked_folder), resolution=48, masked_loss=True)
    with pytest.raises(ConfigError, match=r"bad loss masks .*beside.mask.png: 10x10"):
        _ = build_image_source(config, columns=["text"]).loss_masks
    with pytest.raises(ConfigError, match="digits have none"):
        DataConfig(masked_loss=True)
    with pytest.raises(ConfigError, match="the unconditional method has no masked loss"):
        load_config({"method": "unconditional", "data": {"dataset": str(masked_folder), "masked_loss": True}})


def test_the_loss_ignores_errors_outside_the_mask():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., :, 32:] = 1.0  # the right half counts
    weights = pixel_loss_weights(mask, (8, 8), unmasked_weight=0.0)
    changed = prediction.clone()
    changed[..., :4] += torch.randn(2, 4, 8, 4, generator=generator)  # the left half only
    assert weighted_mse(changed, target, None, weights) == weighted_mse(prediction, target, None, weights)
    changed[..., 4:] += 0.1
    assert weighted_mse(changed, target, None, weights) != weighted_mse(prediction, target, None, weights)
    half = pixel_loss_weights(mask, (8, 8), unmasked_weight=0.5)
    assert set(half.unique().tolist()) == {0.5, 1.0}


def test_cached_and_uncached_masked_losses_agree_and_a_run_trains(tiny_sd_dir, masked_folder, tmp_path):
    from accelerate import Accelerator

    from finetune.methods import get_method_class

    def recipe(output_dir, cache):
        return {
            "method": "lora",
            "model": {"pretrained_model_name_or_path": str(tiny_sd_dir)},
            "data": {"dataset": str(masked_folder), "resolution": 64, "random_flip": True, "masked_loss": True},
            "optim": {"lr": 1e-3},
            "diffusion": {"num_inference_steps": 2},
            "train": {
                "output_dir": str(output_dir),
                "max_train_steps": 2,
                "train_batch_size": 2,
                "num_samples": 1,
                "report_to": "jsonl",
                "progress_bar": False,
                "log_every": 1,
            },
            "checkpoint": {"checkpointing_steps": 0},
            "lora": {"rank": 4, "cache": cache},
        }

    losses = {}
    for cache in ("none", "memory"):
        reset_accelerate()
        method = get_method_class("lora")(load_config(recipe(tmp_path / cache, cache)), Accelerator(cpu=True))
        method.setup()
        method.before_training(None)
        batch = collate_examples([method.train_dataset[i] for i in range(len(method.train_dataset))])
        assert batch["loss_mask"].shape == (6, 1, 64, 64)
        losses[cache] = method.loss(batch)[0].item()
        unmasked = {**batch, "loss_mask": torch.ones_like(batch["loss_mask"])}
        assert abs(method.loss(unmasked)[0].item() - losses[cache]) > 1e-4, "the masks weight the loss"
    assert losses["memory"] == pytest.approx(losses["none"], rel=1e-5, abs=1e-6)
    out = run_training(recipe(tmp_path / "run", "memory"), "data.aspect_buckets=true")
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "buckets.json").is_file()
