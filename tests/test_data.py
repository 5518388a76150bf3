"""Data: image folders with bad files, every image mode, caption sources, column errors, seeded augmentation."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config import ConfigError, DataConfig
from finetune.data import TrainingExamples, build_image_source, collate_examples
from finetune.imaging import image_to_tensor, to_mode
from tests.helpers import run_training, tiny_ddpm_recipe


def write_good_and_bad_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), mode="L").save(folder / "gray.png")
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red: becomes white
    rgba.save(folder / "rgba.png")
    palette = Image.new("P", (16, 16))
    palette.putpalette([0, 0, 255] * 256)
    palette.save(folder / "palette.png")
    Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)).save(folder / "sixteen_bit.png")  # white, 16-bit
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "photo.jpg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "not_an_image.png").write_text("hello")
    (folder / "truncated.png").write_bytes((folder / "rgb.png").read_bytes()[:60])
    (folder / "notes.txt").write_text("ignored: not an image")  # a .txt without a same-named image
    return {"rgb.png", "gray.png", "rgba.png", "palette.png", "sixteen_bit.png", "photo.jpg"}


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    good = write_good_and_bad_images(tmp_path / "images")
    config = DataConfig(dataset=str(tmp_path / "images"), resolution=8)
    with caplog.at_level(logging.WARNING):
        source = build_image_source(config)
    assert len(source) == len(good)
    assert sorted(name.split("/")[-1] for _, name, _ in source.skipped) == [
        "empty.png",
        "not_an_image.png",
        "truncated.png",
    ]
    assert "skipped 3 unreadable image(s) of 9" in caplog.text
    for i in range(len(source)):
        pixels = source.get(i, np.random.default_rng(0))["pixel_values"]
        assert pixels.shape == (3, 8, 8) and pixels.min() >= -1 and pixels.max() <= 1


def test_verification_decodes_no_png_pixels_and_jpegs_at_an_eighth_yet_catches_damage(tmp_path, monkeypatch):
    from PIL import ImageFile

    from finetune.imaging import check_image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "good.png")
    Image.fromarray(pixels).save(tmp_path / "good.jpg", quality=90)
    png, jpg = (tmp_path / "good.png").read_bytes(), (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    (tmp_path / "cut.png").write_bytes(png[: len(png) - 30])
    flipped = bytearray(png)
    flipped[png.index(b"IDAT") + 40] ^= 0xFF  # one damaged byte of pixel data: its chunk's CRC no longer matches
    (tmp_path / "flipped.png").write_bytes(bytes(flipped))

    decoded = []
    original_load = ImageFile.ImageFile.load

    def load(image):
        decoded.append((image.format, image.size))
        return original_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    assert check_image(tmp_path / "good.png") == (80, 64) and decoded == [], "a PNG is verified, not decoded"
    assert check_image(tmp_path / "good.jpg") == (80, 64) and decoded == [("JPEG", (10, 8))], "JPEG at 1/8 scale"
    for name in ("cut.jpg", "cut.png", "flipped.png"):
        with pytest.raises(Exception):  # noqa: B017 - PIL raises OSError or SyntaxError
            check_image(tmp_path / name)
    monkeypatch.setattr(ImageFile.ImageFile, "load", original_load)
    config = DataConfig(dataset=str(tmp_path), resolution=8)
    skipped = sorted(name.split("/")[-1] for _, name, _ in build_image_source(config).skipped)
    assert skipped == ["cut.jpg", "cut.png", "flipped.png"]


@pytest.mark.parametrize("channels", [1, 3])
def test_every_image_mode_converts(channels):
    white16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(to_mode(white16, channels)).min() == 255, "16-bit white must stay white, not clip"
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(to_mode(transparent, channels)).min() == 255, "transparent pixels become white"
    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 255] * 256)
    assert to_mode(palette, channels).mode == ("L" if channels == 1 else "RGB")
    la = Image.new("LA", (4, 4), (0, 255))
    assert np.asarray(to_mode(la, channels)).max() == 0


def test_resize_and_crop_to_a_square():
    image = Image.fromarray(np.arange(40 * 20 * 3, dtype=np.uint8).reshape(20, 40, 3) % 255)
    rng = np.random.default_rng(0)
    centered, _ = image_to_tensor(image, 10, 3, rng, center_crop=True)
    assert centered.shape == (3, 10, 10)
    crops = {
        image_to_tensor(image, 10, 3, np.random.default_rng(s), center_crop=False)[0].sum().item() for s in range(6)
    }
    assert len(crops) > 1, "random crops move"
    flips = [image_to_tensor(image, 10, 3, np.random.default_rng(s), random_flip=True)[1] for s in range(20)]
    assert any(flips) and not all(flips)


def test_an_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        build_image_source(DataConfig(dataset=str(tmp_path / "empty")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="has no readable images"):
        build_image_source(DataConfig(dataset=str(tmp_path / "bad")))
    with pytest.raises(ConfigError, match="does not exist"):
        build_image_source(DataConfig(dataset=str(tmp_path / "missing")))


def test_a_wrong_column_lists_the_columns(tmp_path):
    folder = tmp_path / "captioned"
    write_good_and_bad_images(folder)
    with open(folder / "metadata.jsonl", "w") as handle:
        for name in ("rgb.png", "gray.png"):
            handle.write(json.dumps({"file_name": name, "caption": f"a picture {name}"}) + "\n")
    config = DataConfig(dataset=str(folder), caption_column="text")
    with pytest.raises(ConfigError) as err:
        build_image_source(config, columns=["text"])
    message = str(err.value)
    assert "data.caption_column: column 'text' not found" in message and "caption" in message and "image" in message
    # the four readable images metadata.jsonl does not list are used without a caption (data.unlisted_images=use,
    # the default), or left out with unlisted_images=skip: counted in the summary either way
    source = build_image_source(DataConfig(dataset=str(folder), caption_column="caption"), columns=["caption"])
    assert sorted(source.get(i, np.random.default_rng(0))["caption"] for i in range(len(source))) == [
        "",
        "",
        "",
        "",
        "a picture gray.png",
        "a picture rgb.png",
    ]
    config = DataConfig(dataset=str(folder), caption_column="caption", unlisted_images="skip")
    source = build_image_source(config, columns=["caption"])
    assert sorted(source.get(i, np.random.default_rng(0))["caption"] for i in range(len(source))) == [
        "a picture gray.png",
        "a picture rgb.png",
    ]


def test_txt_sidecar_captions_become_a_caption_column(tmp_path):
    folder = tmp_path / "kohya"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"caption {i}\n")
    source = build_image_source(DataConfig(dataset=str(folder), resolution=8), columns=["text"])
    assert [source.get(i, np.random.default_rng(0))["text"] for i in range(3)] == [f"caption {i}" for i in range(3)]


def test_augmentation_depends_only_on_seed_epoch_and_index():
    config = DataConfig(dataset="digits", resolution=8, random_flip=True, max_samples=16)
    examples = TrainingExamples(build_image_source(config), seed=3)
    first = collate_examples([examples[i] for i in range(16)])
    again = collate_examples([examples[i] for i in reversed(range(16))])
    assert torch.equal(first["pixel_values"], again["pixel_values"].flip(0))
    assert torch.equal(first["seed"], again["seed"].flip(0))
    examples.set_epoch(1)
    next_epoch = collate_examples([examples[i] for i in range(16)])
    assert not torch.equal(first["seed"], next_epoch["seed"])


def test_training_on_an_image_folder_end_to_end(tmp_path):
    write_good_and_bad_images(tmp_path / "images")
    recipe = tiny_ddpm_recipe(
        tmp_path / "run",
        data={"dataset": str(tmp_path / "images"), "max_samples": None, "random_flip": True},
        train={"train_batch_size": 4, "max_train_steps": 3},
    )
    out = run_training(recipe)
    from diffusers import DDPMPipeline

    images = DDPMPipeline.from_pretrained(out)(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 3)


def test_verification_keeps_its_verdicts_for_unchanged_files(tmp_path, monkeypatch):
    """With a memo (a disk cache's verified-images.json), a file whose size and modification time are unchanged is
    not opened again; a rewritten one is, and a damaged one is found; another pixel limit checks everything."""
    from pathlib import Path

    from finetune import imaging
    from finetune.data import find_unreadable_images

    write_good_and_bad_images(tmp_path / "images")
    files = sorted(str(p) for p in (tmp_path / "images").iterdir() if p.suffix in (".png", ".jpg"))
    checked, check_image = [], imaging.check_image

    def counting_check(source, max_pixels=None):
        checked.append(Path(source).name)
        return check_image(source, max_pixels)

    monkeypatch.setattr(imaging, "check_image", counting_check)
    memo = tmp_path / "cache" / "verified-images.json"
    first = find_unreadable_images(files, memo=memo)
    assert len(checked) == len(files) == 9 and len(first) == 3 and memo.is_file()
    checked.clear()
    assert find_unreadable_images(files, memo=memo) == first and checked == [], "nothing opened, the same verdicts"
    assert find_unreadable_images(files) == first and len(checked) == 9, "(without the memo: everything checked)"

    checked.clear()
    rgb = tmp_path / "images" / "rgb.png"
    rgb.write_bytes(rgb.read_bytes()[:70])  # damaged in place: another size and modification time
    again = find_unreadable_images(files, memo=memo)
    assert checked == ["rgb.png"] and sorted(Path(n).name for _, n, _ in again) == sorted(
        ["rgb.png", *(Path(n).name for _, n, _ in first)]
    )
    checked.clear()
    assert find_unreadable_images(files, memo=memo) == again and checked == []
    find_unreadable_images(files, max_pixels=10**6, memo=memo)
    assert len(checked) == 9, "the verdicts of another data.max_image_pixels are not reused"
