"""ControlNet data and inputs (the training itself is in the contract table, tests/contract.py): each conditioning
image is cut with its image (resize, random crop, bucket, flip) and is never a training image; bad conditioning
inputs and unsupported families are one line with exit code 2 before any model loads; the dataset builder
(python -m captioning.conditioning) and its annotators."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.conditioning import build_conditioning_dataset, canny_edges, coarse_blur
from captioning.conditioning import main as conditioning_main
from finetune.__main__ import main
from finetune.config import DataConfig
from finetune.data import build_image_source
from tests.tiny_models import make_test_images, make_tiny_sd_pipeline


@pytest.fixture
def controlled(tmp_path):
    """Images of several sizes, each with a conditioning image that is a copy of it, in conditioning/ (with one
    stray file there that no line names: still not a training image)."""
    folder = tmp_path / "images"
    (folder / "conditioning").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, (w, h) in enumerate([(96, 64), (64, 96), (80, 80), (72, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"image_{i}.png")
        shutil.copy(folder / f"image_{i}.png", folder / "conditioning" / f"image_{i}.png")
        lines.append(
            {"file_name": f"image_{i}.png", "text": f"toy {i}", "conditioning_image": f"conditioning/image_{i}.png"}
        )
    Image.new("RGB", (64, 64)).save(folder / "conditioning" / "stray.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


@pytest.mark.parametrize("buckets", [False, True])
def test_each_conditioning_image_is_cut_with_its_image_and_is_not_a_training_image(controlled, buckets):
    config = DataConfig(
        dataset=str(controlled), resolution=48, center_crop=False, random_flip=True, aspect_buckets=buckets
    )
    source = build_image_source(config, columns=["text", "conditioning_image"])
    assert sorted(str(s).rsplit("/", 1)[-1] for s in source.image_sources) == [f"image_{i}.png" for i in range(4)]
    assert source.report.total == 4, "conditioning files are not counted as images"
    if buckets:
        from finetune.buckets import make_sampler
        from finetune.data import TrainingExamples

        make_sampler(TrainingExamples(source, seed=0), config, 8, batch_size=1, num_processes=1, seed=0)
    shapes, flips = set(), set()
    for index in range(len(source)):
        for epoch in range(3):
            example = source.get(index, np.random.default_rng([0, epoch, index]))
            control = example["conditioning_pixel_values"]
            assert "conditioning_image" not in example and 0 <= control.min() and control.max() <= 1
            torch.testing.assert_close(control * 2 - 1, example["pixel_values"], atol=1e-6, rtol=0)
            shapes.add(tuple(control.shape))
            flips.add(example["flipped"])
    assert flips == {True, False} and (len(shapes) > 1) == buckets


def run_until_models_load(monkeypatch, tmp_path, capsys, base, dataset, *overrides) -> tuple[int, str]:
    """The training command on `dataset`; loading any component fails the test (the error must come first)."""
    from finetune.families.base import Family

    def no_loading(*args, **kwargs):
        raise AssertionError("a model loaded before the bad input was reported")

    monkeypatch.setattr(Family, "load", no_loading)
    code = main(
        [
            "method=controlnet",
            f"model.pretrained_model_name_or_path={base}",
            f"data.dataset={dataset}",
            "data.resolution=64",
            f"train.output_dir={tmp_path / 'run'}",
            *overrides,
        ]
    )
    return code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("controlnet-sd") / "sd")


def test_bad_conditioning_inputs_are_one_line_before_the_model_loads(
    controlled, tiny_sd, tmp_path, monkeypatch, capsys
):
    (controlled / "conditioning" / "image_1.png").unlink()
    code, err = run_until_models_load(monkeypatch, tmp_path, capsys, tiny_sd, controlled)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "conditioning/image_1.png" in err and "does not exist" in err

    Image.new("RGB", (10, 10)).save(controlled / "conditioning" / "image_1.png")
    code, err = run_until_models_load(monkeypatch, tmp_path, capsys, tiny_sd, controlled)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "image_1.png is 10x10, its image image_1.png 64x96" in err

    code, err = run_until_models_load(
        monkeypatch, tmp_path, capsys, tiny_sd, controlled, "data.conditioning_image_column=edges"
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "data.conditioning_image_column: column 'edges' not found" in err and "conditioning_image" in err

    code, err = run_until_models_load(monkeypatch, tmp_path, capsys, tiny_sd, "digits")
    assert code == 2 and "data.dataset=digits has no conditioning images" in err, err


def test_families_without_a_controlnet_are_refused_in_one_line(controlled, tmp_path, monkeypatch, capsys):
    from tests.tiny_models import make_tiny_sd3_pipeline

    sd3 = make_tiny_sd3_pipeline(tmp_path / "sd3")
    capsys.readouterr()
    code, err = run_until_models_load(monkeypatch, tmp_path, capsys, sd3, controlled)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "method controlnet is not supported for the sd3 family" in err and "sd, sdxl" in err


def test_canny_edges_outline_a_square_and_the_blur_keeps_the_layout():
    image = Image.new("RGB", (32, 32))
    image.paste((255, 255, 255), (8, 8, 24, 24))
    edges = np.asarray(canny_edges(image, sigma=0)) > 0
    assert edges[8:24, 7:9].any(axis=1).all() and edges[8:24, 23:25].any(axis=1).all(), "left and right sides"
    assert not edges[12:20, 12:20].any() and not edges[:4].any(), "nothing inside the square or far outside"
    assert not np.asarray(canny_edges(Image.new("RGB", (16, 16), (90, 90, 90)))).any(), "a flat image has no edges"
    blurred = np.asarray(coarse_blur(image, cells=4))
    assert blurred.shape == (32, 32, 3) and len(np.unique(blurred[:, :, 0])) <= 16
    assert blurred[0, 0, 0] == 0 and blurred[12, 12, 0] == 255


def test_the_dataset_builder_writes_conditioning_images_and_keeps_captions(tmp_path, capsys):
    folder = tmp_path / "photos"
    images = make_test_images(folder, 3, size=32)
    images[0].with_suffix(".txt").write_text("a red toy")
    assert conditioning_main([str(folder), "--caption", "a photo"]) == 0
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [line["text"] for line in lines] == ["a red toy", "a photo", "a photo"]
    assert all((folder / line["conditioning_image"]).is_file() for line in lines)
    assert Image.open(folder / lines[0]["conditioning_image"]).size == (32, 32)
    assert build_conditioning_dataset(folder) == (0, 3), "a second run keeps what is there"
    source = build_image_source(DataConfig(dataset=str(folder), resolution=32), ["text", "conditioning_image"])
    assert len(source) == 3 and source.conditioning is not None
    assert conditioning_main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sd_controlnet", "sdxl_controlnet"])
def test_the_controlnet_recipes_train_on_the_tiny_models(name, controlled, tmp_path):
    """The recipe files as shipped (gradient checkpointing, accumulation, SDXL's caches; 8-bit Adam on SD), pointed
    at a tiny model for two fp32 steps; the output loads into the family's plain ControlNet pipeline."""
    from pathlib import Path

    import diffusers

    from tests.helpers import run_training
    from tests.tiny_models import make_tiny_sdxl_pipeline

    base = (make_tiny_sd_pipeline if name == "sd_controlnet" else make_tiny_sdxl_pipeline)(tmp_path / "base")
    recipe = Path(__file__).resolve().parents[1] / "finetune" / "recipes" / f"{name}.yaml"
    overrides = [
        f"model.pretrained_model_name_or_path={base}",
        f"data.dataset={controlled}",
        "data.resolution=64",
        "train.mixed_precision=no",
        "train.max_train_steps=2",
        "train.sample_every=0",
        "train.num_samples=1",
        "diffusion.num_inference_steps=2",
        f"train.output_dir={tmp_path / 'run'}",
        "checkpoint.checkpointing_steps=0",
    ]
    if name == "sd_controlnet":
        overrides.append("optim.optimizer=adamw8bit")
    out = run_training(recipe, *overrides)
    controlnet = diffusers.ControlNetModel.from_pretrained(out, subfolder="controlnet")
    pipeline = (
        "StableDiffusionControlNetPipeline" if name == "sd_controlnet" else "StableDiffusionXLControlNetPipeline"
    )
    assert pipeline in (out / "README.md").read_text()
    getattr(diffusers, pipeline).from_pretrained(base, controlnet=controlnet)
