"""The tiny model builders save folders that the plain diffusers/transformers classes load and run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_models import (
    BLIP_VOCAB_FILE,
    TOKENIZER_DIR,
    load_tiny_clip_tokenizer,
    make_test_images,
    make_tiny_blip,
    make_tiny_ddpm_pipeline,
    make_tiny_sd_pipeline,
)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def test_clip_tokenizer_encodes_any_text_without_unknown_tokens():
    tokenizer = load_tiny_clip_tokenizer()
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) < 1000
    text = "A photo of sks TOY, café crème 🤗🐱 in 3D — 東京 at 12:30!"
    ids = tokenizer(text).input_ids
    # The unknown token is <|endoftext|>: it may only appear once, as the closing token.
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    # Byte-level BPE is lossless: decoding gives the text back, lowercased, up to the spaces CLIP puts between words.
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")


def test_clip_tokenizer_single_token_words():
    tokenizer = load_tiny_clip_tokenizer()
    for word in ("toy", "sks", "photo", "handwritten", "digit", "seven", "painting", "rendering"):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    # Textual inversion tests need a word that is NOT a single token to exercise their error path.
    assert len(tokenizer("square", add_special_tokens=False).input_ids) > 1
    batch = tokenizer(["a photo of sks toy"], padding="max_length", truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (1, 77)


@pytest.mark.parametrize(
    ("script", "outputs"),
    [
        ("make_clip_tokenizer.py", ["vocab.json", "merges.txt", "tokenizer_config.json"]),
        ("make_blip_vocab.py", ["vocab.txt"]),
    ],
)
def test_vendored_assets_match_their_generator(tmp_path, script, outputs):
    if script == "make_clip_tokenizer.py":
        arguments, vendored_dir = ["--out-dir", str(tmp_path)], TOKENIZER_DIR
    else:
        arguments, vendored_dir = ["--out-file", str(tmp_path / "vocab.txt")], BLIP_VOCAB_FILE.parent
    subprocess.run([sys.executable, str(ASSETS_DIR / script), *arguments], check=True, capture_output=True)
    for name in outputs:
        assert (tmp_path / name).read_bytes() == (vendored_dir / name).read_bytes(), name


def test_tiny_sd_pipeline_loads_and_generates(tiny_sd_dir):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    assert not list(tiny_sd_dir.rglob("*.bin")), "weights must be safetensors"
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert pipeline.unet.config.in_channels == 4
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size == 32
    assert pipeline.text_encoder.config.vocab_size == len(pipeline.tokenizer)
    assert pipeline.tokenizer.model_max_length == 77
    assert pipeline.scheduler.config.steps_offset == 1
    # Training scripts build their noise scheduler from the same folder.
    assert DDPMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler").config.num_train_timesteps == 1000
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        "a photo of sks toy",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


def test_tiny_sd_pipeline_is_seeded(tmp_path, tiny_sd_dir):
    from safetensors.torch import load_file

    rebuilt = make_tiny_sd_pipeline(tmp_path / "again", seed=0)
    other_seed = make_tiny_sd_pipeline(tmp_path / "other", seed=1)
    weights_file = Path("unet") / "diffusion_pytorch_model.safetensors"
    reference, same, different = (load_file(folder / weights_file) for folder in (tiny_sd_dir, rebuilt, other_seed))
    assert all(torch.equal(reference[name], same[name]) for name in reference)
    assert not all(torch.equal(reference[name], different[name]) for name in reference)


def test_tiny_inpainting_pipeline_loads_and_generates(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    folder = make_tiny_sd_pipeline(tmp_path / "inpaint", inpainting=True)
    pipeline = StableDiffusionInpaintPipeline.from_pretrained(folder)
    assert pipeline.unet.config.in_channels == 9
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        "a cat",
        image=Image.new("RGB", (64, 64), "white"),
        mask_image=Image.new("L", (64, 64), 255),
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize(("resolution", "channels"), [(16, 1), (32, 3)])
def test_tiny_ddpm_pipeline_loads_and_generates(tmp_path, resolution, channels):
    from diffusers import DDPMPipeline

    folder = make_tiny_ddpm_pipeline(tmp_path / "ddpm", resolution=resolution, channels=channels)
    pipeline = DDPMPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, resolution, resolution, channels)


def test_tiny_blip_loads_and_captions(tiny_blip_dir):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    assert (tiny_blip_dir / "model.safetensors").is_file()
    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_dir, use_safetensors=True).eval()
    processor = BlipProcessor.from_pretrained(tiny_blip_dir)
    assert model.config.text_config.bos_token_id == processor.tokenizer.convert_tokens_to_ids("[DEC]")
    assert model.config.text_config.sep_token_id == processor.tokenizer.sep_token_id
    assert model.config.text_config.pad_token_id == processor.tokenizer.pad_token_id
    assert model.config.text_config.encoder_hidden_size == model.config.vision_config.hidden_size

    images = [Image.new("RGB", (50, 40), color) for color in ("red", "navy", "white")]
    inputs = processor(images=images, return_tensors="pt")
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)
    with torch.inference_mode():
        output_ids = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5)
    assert output_ids.shape == (3, 6)  # [DEC] and five new tokens
    assert (output_ids[:, 0] == model.config.text_config.bos_token_id).all()
    captions = processor.batch_decode(output_ids, skip_special_tokens=True)
    assert all(caption.strip() for caption in captions)
    # The captions depend on the image (the weights are initialised so that the cross-attention matters).
    assert len(set(captions)) > 1


def test_tiny_blip_is_seeded(tmp_path, tiny_blip_dir):
    from safetensors.torch import load_file

    rebuilt = load_file(make_tiny_blip(tmp_path / "again", seed=0) / "model.safetensors")
    reference = load_file(tiny_blip_dir / "model.safetensors")
    assert reference.keys() == rebuilt.keys()
    assert all(torch.equal(reference[name], rebuilt[name]) for name in reference)


def test_make_test_images(tmp_path):
    paths = make_test_images(tmp_path / "images", 5, size=48, seed=3)
    assert [path.name for path in paths] == [f"image_{index:03d}.png" for index in range(5)]
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (48, 48)
            arrays.append(np.asarray(image))
    # Each picture is a shape on a background (two colours at least), and the pictures differ.
    assert all(len(np.unique(array.reshape(-1, 3), axis=0)) >= 2 for array in arrays)
    assert len({array.tobytes() for array in arrays}) == 5
    again = make_test_images(tmp_path / "again", 5, size=48, seed=3)
    assert [path.read_bytes() for path in again] == [path.read_bytes() for path in paths]
