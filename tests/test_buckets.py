"""Aspect-ratio buckets (data.aspect_buckets, finetune/buckets.py): which bucket an image lands in, that it keeps its
content and is never enlarged with bucket_no_upscale, the sampler's guarantees (one bucket per global batch, each
example once per epoch, 2 processes x b = 1 process x 2b, an order from (seed, epoch) only), SDXL's time ids, and
whole runs: a LoRA on a folder of portrait, landscape and square images, 2 processes against 1, SIGKILL + resume."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.buckets import BucketBatchSampler, BucketPlan, bucket_ladder, cover_geometry, make_sampler
from finetune.config import ConfigError, DataConfig
from finetune.data import DigitsRecords, TrainingExamples, build_image_source, collate_examples
from tests.helpers import REPO, assert_same_tensors, run_training, safetensors_in, tiny_ddpm_recipe

RED, BLUE, GREEN, YELLOW, GRAY = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0), (128, 128, 128)
# at data.resolution 64 with 8 px sides, the ladder's 2:3 bucket is 56x80 (h = 64 * sqrt(3/2) = 78.4 -> 80,
# w = 52.3 -> 56), 3:2 is 80x56, 1:2 is 48x88 (h = 64 * sqrt(2) = 90.5 -> 88, w = 45.3 -> 48) and 1:1 is 64x64
PORTRAIT, LANDSCAPE, SQUARE, TALL = (56, 80), (80, 56), (64, 64), (48, 88)


def banded(size: tuple[int, int], first: tuple, last: tuple, vertical: bool, band: int = 16) -> Image.Image:
    """A gray image whose first and last `band` rows (vertical) or columns have their own colours."""
    array = np.empty((size[1], size[0], 3), dtype=np.uint8)
    array[:] = GRAY
    if vertical:
        array[:band], array[-band:] = first, last
    else:
        array[:, :band], array[:, -band:] = first, last
    return Image.fromarray(array)


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def three_shapes(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    banded((112, 160), RED, BLUE, vertical=True).save(folder / "portrait.png")  # 2:3, twice 56x80
    banded((160, 112), GREEN, YELLOW, vertical=False).save(folder / "landscape.png")  # 3:2, twice 80x56
    noise((96, 96), 0).save(folder / "square.png")
    return folder


def source_with_buckets(config: DataConfig, multiple: int = 8):
    source = build_image_source(config)
    source.use_buckets(BucketPlan.from_config(config, multiple))
    return source


def examples_by_name(source) -> dict[str, int]:
    return {Path(str(source.image_sources[row])).name: index for index, row in enumerate(source.indices)}


def colour(pixels: torch.Tensor) -> np.ndarray:
    """The mean colour (0-255) of a slice of a [3, ...] tensor in [-1, 1]."""
    return ((pixels.reshape(3, -1).mean(dim=1) + 1) * 127.5).numpy()


# ---------------------------------------------------------------------------------------------------------------------
# which bucket, and what of the image is kept
# ---------------------------------------------------------------------------------------------------------------------
def test_three_aspect_ratios_land_in_their_buckets_and_keep_their_content(tmp_path):
    folder = three_shapes(tmp_path / "images")
    config = DataConfig(dataset=str(folder), resolution=64, aspect_buckets=True)
    source = source_with_buckets(config)
    index = examples_by_name(source)
    buckets = dict(zip(index, (source.example_buckets()[i] for i in index.values())))
    assert buckets == {"portrait.png": PORTRAIT, "landscape.png": LANDSCAPE, "square.png": SQUARE}
    rng = np.random.default_rng(0)
    portrait = source.get(index["portrait.png"], rng)["pixel_values"]
    landscape = source.get(index["landscape.png"], rng)["pixel_values"]
    assert portrait.shape == (3, 80, 56) and landscape.shape == (3, 56, 80)
    assert source.get(index["square.png"], rng)["pixel_values"].shape == (3, 64, 64)
    # the portrait's top and bottom rows and the landscape's first and last columns survive, unsquashed
    np.testing.assert_allclose(colour(portrait[:, 0]), RED, atol=3)
    np.testing.assert_allclose(colour(portrait[:, -1]), BLUE, atol=3)
    np.testing.assert_allclose(colour(portrait[:, 40]), GRAY, atol=3)
    np.testing.assert_allclose(colour(landscape[:, :, 0]), GREEN, atol=3)
    np.testing.assert_allclose(colour(landscape[:, :, -1]), YELLOW, atol=3)

    # the square path (buckets off) cuts them: what the buckets are for
    square = build_image_source(DataConfig(dataset=str(folder), resolution=64))
    cropped = square.get(examples_by_name(square)["portrait.png"], rng)["pixel_values"]
    assert cropped.shape == (3, 64, 64)
    np.testing.assert_allclose(colour(cropped[:, 0]), GRAY, atol=3)
    np.testing.assert_allclose(colour(cropped[:, -1]), GRAY, atol=3)


def test_bucket_no_upscale_never_enlarges_an_image(tmp_path, caplog):
    folder = tmp_path / "small"
    folder.mkdir()
    sizes = {"square40.png": (40, 40), "portrait30x45.png": (30, 45), "wide200x50.png": (200, 50)}
    for name, size in sizes.items():
        noise(size, len(name)).save(folder / name)
    noise((6, 100), 1).save(folder / "sliver.png")  # under one 8 px step wide at any bucket shape: left out

    enlarged = source_with_buckets(DataConfig(dataset=str(folder), resolution=64, aspect_buckets=True))
    by_name = examples_by_name(enlarged)
    assert enlarged.example_buckets()[by_name["square40.png"]] == SQUARE, "without the option a 40 px image grows"

    config = DataConfig(dataset=str(folder), resolution=64, aspect_buckets=True, bucket_no_upscale=True)
    with caplog.at_level(logging.WARNING):
        source = source_with_buckets(config)
    assert "1 image(s) smaller than one bucket step (8 px) left out" in caplog.text and "sliver.png" in caplog.text
    by_name = examples_by_name(source)
    assert set(by_name) == set(sizes)
    expected = {"square40.png": (40, 40), "portrait30x45.png": (24, 40), "wide200x50.png": (88, 48)}
    for name, index in by_name.items():
        bucket = source.example_buckets()[index]
        assert bucket == expected[name], name
        new_size, _ = cover_geometry(sizes[name], bucket, np.random.default_rng(0))
        assert new_size[0] <= sizes[name][0] and new_size[1] <= sizes[name][1], (name, new_size)
        assert source.get(index, np.random.default_rng(0))["pixel_values"].shape == (3, bucket[1], bucket[0])
    # an image exactly the size of its bucket is used as it is: no resampling at all
    pixels = source.get(by_name["square40.png"], np.random.default_rng(0))["pixel_values"]
    original = torch.from_numpy(np.asarray(Image.open(folder / "square40.png"), dtype=np.float32) / 127.5 - 1)
    assert torch.equal(pixels, original.permute(2, 0, 1))

    # any size: the bucket fits inside the image, so covering it never needs a scale above 1
    plan = BucketPlan.from_config(config, 8)
    for width, height in np.random.default_rng(1).integers(8, 400, size=(300, 2)):
        bucket = plan.bucket_for((int(width), int(height)))
        if bucket is not None:
            assert bucket[0] <= width and bucket[1] <= height and bucket[0] % 8 == 0 and bucket[1] % 8 == 0


def test_the_ladder_is_diffusers_and_follows_the_options():
    from diffusers.training_utils import find_nearest_bucket, generate_aspect_ratio_buckets

    ladder = bucket_ladder(1024, 8, 0.5, 2.0)
    assert sorted(ladder) == sorted((w, h) for h, w in generate_aspect_ratio_buckets(1024, divisibility=8))
    assert all(abs(w * h / 1024**2 - 1) < 0.03 for w, h in ladder), "about resolution^2 pixels each"
    assert (1024, 1024) in ladder and (728, 1448) in ladder and (1448, 728) in ladder
    assert bucket_ladder(1024, 8, 1.0, 1.0) == [(1024, 1024)]
    wide = bucket_ladder(512, 64, 0.25, 4.0)  # kohya's --min_bucket_reso 256 --max_bucket_reso 1024 at 512 px
    assert (1024, 256) in wide and (256, 1024) in wide and all(w % 64 == 0 and h % 64 == 0 for w, h in wide)
    assert max(w / h for w, h in bucket_ladder(512, 8, 0.75, 1.5)) == pytest.approx(1.5, abs=0.02)

    # the step comes from the family: 16 px sides for a family whose latents need them (Flux's packed latents)
    plan = BucketPlan.from_config(DataConfig(resolution=512, aspect_buckets=True), multiple=16)
    assert plan.step == 16 and all(w % 16 == 0 and h % 16 == 0 for w, h in plan.ladder)
    with pytest.raises(ConfigError, match="data.bucket_step=24 must be a multiple of 16"):
        BucketPlan.from_config(DataConfig(resolution=512, bucket_step=24), multiple=16)
    # nearest by aspect ratio: diffusers' rule
    for size in [(300, 200), (200, 300), (1000, 999), (640, 100)]:
        bucket = plan.bucket_for(size)
        options = [(h, w) for w, h in plan.ladder]
        assert bucket == plan.ladder[find_nearest_bucket(size[1], size[0], options)]


def test_without_diffusers_bucket_helpers_the_same_ladder_and_choice(monkeypatch):
    """pyproject allows diffusers releases without the bucket helpers: our copies of them give the same buckets."""
    import diffusers.training_utils as training_utils

    from finetune import buckets

    sizes = [(int(w), int(h)) for w, h in np.random.default_rng(2).integers(8, 3000, size=(400, 2))]
    expected = {}
    for resolution, step, low, high in [(64, 8, 0.5, 2.0), (512, 64, 0.25, 4.0), (1024, 16, 0.6, 1.7)]:
        plan = buckets.BucketPlan(
            resolution, step, low, high, False, tuple(bucket_ladder(resolution, step, low, high))
        )
        expected[resolution] = (plan.ladder, [plan.bucket_for(size) for size in sizes])
    monkeypatch.delattr(training_utils, "generate_aspect_ratio_buckets")
    monkeypatch.delattr(training_utils, "find_nearest_bucket")
    for resolution, step, low, high in [(64, 8, 0.5, 2.0), (512, 64, 0.25, 4.0), (1024, 16, 0.6, 1.7)]:
        plan = buckets.BucketPlan(
            resolution, step, low, high, False, tuple(bucket_ladder(resolution, step, low, high))
        )
        assert (plan.ladder, [plan.bucket_for(size) for size in sizes]) == expected[resolution]


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.bucket_min_aspect=0", "data.bucket_min_aspect must be in"),
        ("data.bucket_min_aspect=1.5", "data.bucket_min_aspect must be in"),
        ("data.bucket_max_aspect=0.8", "data.bucket_max_aspect must be >= 1"),
        ("data.bucket_step=12", "data.bucket_step must be a multiple of 8"),
        ("lora.validation_sizes=[64x60]", "validation_sizes: '64x60' is not 'WxH'"),
    ],
)
def test_bad_bucket_options_name_the_key(override, message):
    from finetune.recipe import load_config

    recipe = {"method": "lora", "model": {"pretrained_model_name_or_path": "x"}, "data": {"aspect_buckets": True}}
    with pytest.raises(ConfigError, match=message):
        load_config(recipe, [override])


def test_buckets_are_refused_where_they_cannot_work(tmp_path):
    from finetune.recipe import load_config

    with pytest.raises(ConfigError, match="the unconditional method trains on data.resolution squares"):
        load_config(tiny_ddpm_recipe(tmp_path / "run"), ["data.aspect_buckets=true"])
    # (an inpainting checkpoint refuses them at set-up: tests/test_inpainting.py)
    digits = TrainingExamples(DigitsRecords(DataConfig(max_samples=8)), seed=0)
    with pytest.raises(ConfigError, match="data.dataset='digits' has images of one size"):
        make_sampler(digits, DataConfig(aspect_buckets=True), 8, batch_size=2, num_processes=1, seed=0)


def test_unreadable_images_are_skipped_and_counted_and_a_vanished_one_is_replaced_within_its_bucket(tmp_path, caplog):
    folder = three_shapes(tmp_path / "images")
    banded((112, 160), BLUE, RED, vertical=True).save(folder / "portrait2.png")
    (folder / "broken.png").write_bytes(b"not a png")
    config = DataConfig(dataset=str(folder), resolution=64, aspect_buckets=True, verify_images=False)
    with caplog.at_level(logging.WARNING):
        source = source_with_buckets(config)
    assert "1 unreadable (broken.png)" in caplog.text, "the header pass counts it like data.verify_images would"
    assert len(source) == 4
    by_name = examples_by_name(source)
    (folder / "portrait.png").unlink()  # gone mid-training: another image of its bucket takes its place
    example = source.get(by_name["portrait.png"], np.random.default_rng(0))
    assert Path(source.image_sources[example["row"]]).name == "portrait2.png"
    assert example["pixel_values"].shape == (3, 80, 56)


# ---------------------------------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------------------------------
BUCKETS_OF_EXAMPLES = [PORTRAIT] * 9 + [LANDSCAPE] * 7 + [SQUARE] * 5 + [TALL] * 2  # TALL: under one global batch
np.random.default_rng(5).shuffle(BUCKETS_OF_EXAMPLES)


def global_batches(num_processes: int, global_batch: int, epoch: int, skip: int = 0) -> list[list[int]]:
    """The global batches of an epoch as the processes see them: each rank's stream through accelerate's shard of
    the sampler (and its skip of the first `skip` batches on resume), put back together step by step."""
    from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler

    sampler = BucketBatchSampler(BUCKETS_OF_EXAMPLES, global_batch // num_processes, num_processes, seed=7)
    sampler.set_epoch(epoch)
    streams = []
    for rank in range(num_processes):
        shard = BatchSamplerShard(sampler, num_processes, rank) if num_processes > 1 else sampler
        streams.append(list(SkipBatchSampler(shard, skip) if skip else shard))
        assert len(streams[-1]) == len(sampler) // num_processes - skip
    return [sum(step, []) for step in zip(*streams)]


def test_sampler_one_bucket_per_global_batch_each_example_once_and_any_process_count_alike():
    one = global_batches(1, 4, epoch=0)
    assert global_batches(2, 4, epoch=0) == one
    assert global_batches(4, 4, epoch=0) == one
    for batch in one:
        assert len(batch) == 4 and len({BUCKETS_OF_EXAMPLES[i] for i in batch}) == 1, batch
    seen = Counter(i for batch in one for i in batch)
    assert max(seen.values()) == 1, "each example at most once per epoch"
    dropped = Counter(BUCKETS_OF_EXAMPLES[i] for i in range(len(BUCKETS_OF_EXAMPLES)) if i not in seen)
    assert dropped == {PORTRAIT: 1, LANDSCAPE: 3, SQUARE: 1, TALL: 2}, "drop_last drops per bucket"
    sampler = BucketBatchSampler(BUCKETS_OF_EXAMPLES, 4, 1, seed=7)
    assert sampler.dropped() == dropped and len(sampler) == len(one) == 4

    # the order follows from (seed, epoch): the same again, another epoch (or seed) another order and other drops
    assert global_batches(1, 4, epoch=0) == one
    assert global_batches(1, 4, epoch=1) != one
    other_seed = BucketBatchSampler(BUCKETS_OF_EXAMPLES, 4, 1, seed=8).global_batches(0)
    assert [sorted(batch) for _, batch in other_seed] != [sorted(batch) for batch in one]
    # a resumed run skips the batches it trained and continues exactly, on any number of processes
    assert global_batches(2, 4, epoch=0, skip=1) == one[1:]
    assert global_batches(1, 4, epoch=0, skip=3) == one[3:]


# ---------------------------------------------------------------------------------------------------------------------
# whole runs on the tiny models
# ---------------------------------------------------------------------------------------------------------------------
def mixed_folder(folder: Path, extra_square: bool = False) -> Path:
    """Two portraits (2:3), two landscapes (3:2), two squares (and a third), each with a .txt caption."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(112, 160), (120, 168), (160, 112), (168, 120), (96, 96), (72, 72)] + ([(80, 80)] if extra_square else [])
    for i, size in enumerate(sizes):
        noise(size, 10 + i).save(folder / f"image_{i}.png")
        (folder / f"image_{i}.txt").write_text(f"a toy picture {i}")
    return folder


def lora_recipe(base: Path, data: Path, output_dir: Path, batch: int = 2, steps: int = 4, **data_options) -> dict:
    return {
        "method": "lora",
        "model": {"pretrained_model_name_or_path": str(base)},
        "data": {"dataset": str(data), "resolution": 64, "aspect_buckets": True, "random_flip": True, **data_options},
        "optim": {"lr": 1e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 1},
        "diffusion": {"num_inference_steps": 1},
        "train": {
            "output_dir": str(output_dir),
            "max_train_steps": steps,
            "train_batch_size": batch,
            "num_samples": 3,
            "report_to": "jsonl",
            "progress_bar": False,
            "log_every": 1,
        },
        "checkpoint": {"checkpointing_steps": 0},
        "lora": {"caption_dropout": 0.3},
    }


def test_a_lora_run_on_portrait_landscape_and_square_images_writes_buckets_json_and_trains(
    tmp_path, caplog, monkeypatch
):
    from tests.tiny_models import make_tiny_sd_pipeline

    epochs = []  # the sampler hears of each epoch (with 2 processes only from the loop: tested below)
    set_epoch = BucketBatchSampler.set_epoch
    monkeypatch.setattr(
        BucketBatchSampler, "set_epoch", lambda self, epoch: (epochs.append(epoch), set_epoch(self, epoch))
    )

    base = make_tiny_sd_pipeline(tmp_path / "base")
    recipe = lora_recipe(base, mixed_folder(tmp_path / "data", extra_square=True), tmp_path / "run", steps=5)
    recipe["lora"]["validation_sizes"] = ["56x80", "64x64", "80x56"]
    with caplog.at_level(logging.INFO):
        out = run_training(recipe)
    assert json.loads((out / "buckets.json").read_text()) == {"56x80": 2, "64x64": 3, "80x56": 2}
    table = [r.getMessage() for r in caplog.records if r.name == "finetune.buckets"]
    assert any(line.split() == ["56x80", "0.70", "2", "1", "0"] for line in table), table
    assert any(line.split() == ["64x64", "1.00", "3", "1", "1"] for line in table), table
    assert any(line.split() == ["80x56", "1.43", "2", "1", "0"] for line in table), table
    assert "1 of 7 examples are left out of each epoch" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5], "trains to the end, across epochs of 3 batches"
    assert sorted(set(epochs)) == [0, 1]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    grid = Image.open(out / "samples" / "final.png")
    # one captioned row per prompt and size, each in a cell of the largest size (enlarged x2 for viewing)
    from finetune.outputs import LABEL_HEIGHT

    assert grid.size == (2 * 80 + 2 + 2, 2 + 3 * (2 * 80 + 2 + LABEL_HEIGHT)), grid.size


def test_dreambooth_with_prior_preservation_trains_instance_and_class_images_in_their_buckets(tmp_path):
    """The generated class images are data.resolution squares: they share the square bucket, the instance images
    keep theirs (and the latent cache encodes one bucket shape at a time)."""
    from tests.tiny_models import make_tiny_sd_pipeline

    base = make_tiny_sd_pipeline(tmp_path / "base")
    instance = tmp_path / "instance"
    instance.mkdir()
    for i, size in enumerate([(112, 160), (120, 168), (160, 112), (168, 120)]):
        noise(size, i).save(instance / f"dog_{i}.png")
    recipe = lora_recipe(base, instance, tmp_path / "run", steps=4)
    del recipe["lora"]
    recipe["method"] = "dreambooth"
    recipe["dreambooth"] = {
        "instance_data_dir": str(instance),
        "instance_prompt": "a photo of sks dog",
        "use_lora": True,
        "with_prior_preservation": True,
        "class_prompt": "a photo of dog",
        "num_class_images": 2,
        "class_inference_steps": 1,
        "sample_batch_size": 2,
        "cache": "memory",
    }
    out = run_training(recipe)
    assert json.loads((out / "buckets.json").read_text()) == {"56x80": 2, "64x64": 2, "80x56": 2}
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and (out / "pytorch_lora_weights.safetensors").is_file()


def test_sdxl_time_ids_carry_each_examples_original_size_and_crop_cached_or_not(tmp_path):
    """Portraits 100x200 go to the 48x88 bucket (resized to 48x96, 4 rows cut above and below); landscapes 200x100
    to 88x48 (96x48, 4 columns cut at each side). The UNet must get exactly those numbers as time ids."""
    from accelerate import Accelerator

    from finetune.methods import get_method_class
    from finetune.recipe import load_config
    from tests.helpers import reset_accelerate
    from tests.tiny_models import make_tiny_sdxl_pipeline

    base = make_tiny_sdxl_pipeline(tmp_path / "base")
    data = tmp_path / "data"
    data.mkdir()
    for i, size in enumerate([(100, 200), (100, 200), (200, 100), (200, 100)]):
        noise(size, i).save(data / f"image_{i}.png")
        (data / f"image_{i}.txt").write_text(f"a picture {i}")
    expected = {(100, 200): [200, 100, 4, 0, 88, 48], (200, 100): [100, 200, 0, 4, 48, 88]}  # (w, h) -> ids
    seen: dict[str, dict] = {}
    checked = set()
    for cache in ("none", "memory"):
        reset_accelerate()
        config = load_config(lora_recipe(base, data, tmp_path / cache), [f"lora.cache={cache}"])
        method = get_method_class("lora")(config, Accelerator(cpu=True))
        method.setup()
        sampler = make_sampler(method.train_dataset, config.data, method.bucket_multiple(), 2, 1, seed=0)
        method.before_training(None)
        captured: list[torch.Tensor] = []

        def capture(module, args, kwargs, into=captured):
            into.append(kwargs["added_cond_kwargs"]["time_ids"].clone())

        method.unet.register_forward_pre_hook(capture, with_kwargs=True)
        losses, ids = [], []
        for _, indices in sampler.global_batches(0):
            batch = collate_examples([method.train_dataset[i] for i in indices])
            torch.manual_seed(0)
            losses.append(method.loss(batch)[0].item())
            for row, time_ids in zip(batch["row"].tolist(), captured[-1].tolist()):
                size = Image.open(method.train_dataset.source.image_sources[row]).size
                assert time_ids == expected[size], (size, time_ids)
                checked.add((cache, size))
            ids.append(captured[-1])
        seen[cache] = {"losses": losses, "ids": torch.cat(ids)}
    assert checked == {(cache, size) for cache in ("none", "memory") for size in expected}
    assert torch.equal(seen["none"]["ids"], seen["memory"]["ids"])
    np.testing.assert_allclose(seen["none"]["losses"], seen["memory"]["losses"], atol=1e-5)


def test_a_random_crop_is_recorded_where_it_was_cut_flipped_or_not(tmp_path):
    """With random crops and flips, crop_top_left (mirrored when flipped, as diffusers' SDXL script does) names the
    exact window the pixels came from."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(100, 200), (200, 100), (90, 90), (150, 101)]):
        noise(size, i).save(folder / f"image_{i}.png")
    config = DataConfig(dataset=str(folder), resolution=64, aspect_buckets=True, center_crop=False, random_flip=True)
    source = source_with_buckets(config)
    flips = set()
    for epoch in range(3):
        examples = TrainingExamples(source, seed=0)
        examples.set_epoch(epoch)
        for index in range(len(examples)):
            example = examples[index]
            image = Image.open(source.image_sources[example["row"]]).convert("RGB")
            bucket_h, bucket_w = example["target_size"].tolist()
            assert example["original_size"].tolist() == [image.height, image.width]
            assert (bucket_w, bucket_h) == source.example_buckets()[index]
            new_size, _ = cover_geometry(image.size, (bucket_w, bucket_h), np.random.default_rng(0))
            top, left = example["crop_top_left"].tolist()
            if example["flipped"]:
                left = new_size[0] - left - bucket_w
            window = image.resize(new_size, Image.Resampling.BICUBIC).crop(
                (left, top, left + bucket_w, top + bucket_h)
            )
            pixels = torch.from_numpy(np.asarray(window, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
            assert torch.equal(example["pixel_values"], pixels.flip(-1) if example["flipped"] else pixels)
            flips.add(example["flipped"])
    assert flips == {True, False}


@pytest.mark.multiprocess
def test_two_processes_equal_one_process_with_buckets(tmp_path):
    from tests.test_multiprocess import env, two_process_command, write_recipe
    from tests.tiny_models import make_tiny_sd_pipeline

    base = make_tiny_sd_pipeline(tmp_path / "base")
    data = mixed_folder(tmp_path / "data", extra_square=True)

    def recipe(output_dir, batch):
        # seed 1: epoch 1 (step 4) starts in another bucket than epoch 0 did, so the 2-process run must learn the
        # epoch from the loop (accelerate's shard of a batch sampler does not pass it on)
        run = lora_recipe(base, data, output_dir, batch=batch, steps=4)
        run["train"]["seed"] = 1
        return run

    buckets = [(56, 80)] * 2 + [(80, 56)] * 2 + [(64, 64)] * 3  # the folder's, in file-name order
    order = BucketBatchSampler(buckets, 2, 1, seed=1)
    assert order.global_batches(0)[0][0] != order.global_batches(1)[0][0]
    reference = run_training(recipe(tmp_path / "one", 2))
    path = write_recipe(tmp_path / "two.yaml", recipe(tmp_path / "two", 1))
    launcher = subprocess.Popen(
        two_process_command(path),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:  # a hung job: both ranks go with the launcher, none is left running
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 0, stderr[-3000:]
    assert "global batch 2 = 1 per process x 2 processes" in stderr
    assert json.loads((tmp_path / "two" / "buckets.json").read_text()) == {"56x80": 2, "64x64": 3, "80x56": 2}
    # the tolerance of the square path's test (tests/test_multiprocess.py): float rounding of DDP's mean; a wrong
    # split of the data moves the weights by whole steps (~1e-3)
    assert_same_tensors(safetensors_in(tmp_path / "two"), safetensors_in(reference), atol=5e-5)


def test_sigkill_and_resume_equal_an_uninterrupted_run_with_buckets(tmp_path):
    """Random crops and flips, 3 batches per epoch and one example dropped per epoch: the run killed right after
    checkpoint-2 resumes into the next epoch with the weights of the uninterrupted run."""
    from tests.contract import killed_after_the_first_checkpoint
    from tests.tiny_models import make_tiny_sd_pipeline

    base = make_tiny_sd_pipeline(tmp_path / "base")
    data = mixed_folder(tmp_path / "data", extra_square=True)

    def recipe(output_dir):
        run = lora_recipe(base, data, output_dir, steps=5, center_crop=False)
        run["checkpoint"]["checkpointing_steps"] = 2
        return run

    straight = run_training(recipe(tmp_path / "straight"))
    killed = tmp_path / "killed"
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["finetune.train", "tests.contract"])
    process = context.Process(target=killed_after_the_first_checkpoint, args=(recipe(killed),))
    process.start()
    process.join(timeout=300)
    if process.exitcode is None:
        process.kill()
        process.join()
    assert process.exitcode == -signal.SIGKILL, f"the run ended with exit code {process.exitcode}, not by SIGKILL"
    assert [p.name for p in killed.glob("checkpoint-*")] == ["checkpoint-2"]
    resumed = run_training(recipe(killed), "checkpoint.resume_from_checkpoint=latest")
    assert_same_tensors(safetensors_in(resumed), safetensors_in(straight), atol=0)
