"""The miniature text-to-image pipeline, every stage on a few steps: autoencoder -> latent diffusion (a
StableDiffusionPipeline folder that plain diffusers samples) -> the fine-tuning benchmark's runs and table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, run_training
from tests.tiny_models import TOKENIZER_DIR

RECIPES = REPO / "finetune" / "recipes"
FAST = ["train.report_to=jsonl", "train.progress_bar=false", "train.log_every=1", "checkpoint.checkpointing_steps=0"]
TINY_AUTOENCODER = [
    "autoencoder.block_out_channels=[8,16]",
    "autoencoder.norm_num_groups=8",
    "autoencoder.scaling_samples=64",
    "data.max_samples=256",
    "train.train_batch_size=16",
    "train.num_samples=4",
]
TINY_LATENT_DIFFUSION = [
    f"latent_diffusion.tokenizer={TOKENIZER_DIR}",
    "latent_diffusion.block_out_channels=[16,32]",
    "latent_diffusion.norm_num_groups=8",
    "latent_diffusion.text_hidden_size=16",
    "latent_diffusion.text_intermediate_size=32",
    "latent_diffusion.text_layers=1",
    "latent_diffusion.text_heads=2",
    "train.train_batch_size=16",
    "train.num_samples=4",
    "train.eval_every=0",
    "train.sample_every=0",
    "diffusion.num_inference_steps=2",
]


@pytest.fixture(scope="module")
def miniature(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny autoencoder and latent diffusion model trained with the real recipes on a few steps."""
    root = tmp_path_factory.mktemp("miniature")
    vae = run_training(
        RECIPES / "digits_autoencoder.yaml",
        f"train.output_dir={root / 'vae'}",
        "train.max_train_steps=12",
        "train.eval_every=6",
        "train.eval_num_samples=16",
        *TINY_AUTOENCODER,
        *FAST,
    )
    base = run_training(
        RECIPES / "digits_text_to_image.yaml",
        f"train.output_dir={root / 'base'}",
        f"latent_diffusion.vae={vae}",
        "train.max_train_steps=4",
        *TINY_LATENT_DIFFUSION,
        *FAST,
    )
    return {"vae": vae, "base": base, "root": root}


def logged(folder: Path, key: str) -> list[float]:
    lines = (folder / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines if key in json.loads(line)]


def test_autoencoder_learns_and_saves_scaled_latents(miniature):
    from diffusers import AutoencoderKL

    losses = logged(miniature["vae"], "reconstruction_loss")
    assert losses[-1] < losses[0], f"reconstruction loss did not fall: {losses}"
    evaluations = [
        json.loads(line)["eval"]
        for line in (miniature["vae"] / "train_log.jsonl").read_text().splitlines()
        if "eval" in json.loads(line)
    ]
    assert evaluations and evaluations[-1]["reconstruction_mse"] < evaluations[0]["reconstruction_mse"] + 1e-6

    vae = AutoencoderKL.from_pretrained(miniature["vae"])
    assert vae.config.in_channels == 3 and vae.config.block_out_channels == [8, 16]
    from finetune.digits import load_digits_tensors

    images, _ = load_digits_tensors(16, "all")
    with torch.no_grad():
        latents = vae.encode(images[:64].expand(-1, 3, -1, -1)).latent_dist.sample() * vae.config.scaling_factor
    assert latents.shape[-1] == 8  # two levels: downsampled by 2
    assert 0.5 < latents.std().item() < 2.0, "the saved scaling_factor should bring latents to unit variance"
    assert (miniature["vae"] / "samples" / "final.png").is_file()


def test_latent_diffusion_folder_samples_in_plain_diffusers(miniature):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(miniature["base"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a handwritten digit seven", "the digit two"], num_inference_steps=2, height=16, width=16, output_type="np"
    ).images
    assert images.shape == (2, 16, 16, 3)
    assert pipe.vae.config.block_out_channels == [8, 16]
    assert pipe.text_encoder.config.hidden_size == 16
    card = (miniature["base"] / "README.md").read_text()
    assert "held out of training: nine" in card


def test_latent_diffusion_holds_out_digits_and_writes_captions(tmp_path):
    from finetune.methods.latent_diffusion import LatentDiffusion
    from finetune.recipe import load_config

    config = load_config(
        RECIPES / "digits_text_to_image.yaml",
        [f"train.output_dir={tmp_path}", "latent_diffusion.vae=unused", "latent_diffusion.holdout_digits=[9,3]"],
    )
    method = LatentDiffusion.__new__(LatentDiffusion)
    method.config, method.options = config, config.method_options
    source = method.build_source()
    assert 9 not in source.labels.tolist() and 3 not in source.labels.tolist() and len(source) > 1000
    assert source.get(0, np.random.default_rng(0))["pixel_values"].shape[0] == 3  # gray as RGB (data.channels=3)
    captions = method.all_captions()
    assert "a handwritten digit seven" in captions and "a handwritten digit" in captions
    assert not any("nine" in c or "three" in c for c in captions)


def test_unknown_vae_is_a_clear_error(tmp_path):
    from finetune.config import ConfigError

    # checked before anything loads (preflight), naming the option
    with pytest.raises(ConfigError, match=r"latent_diffusion.vae: the folder .*missing' does not exist"):
        run_training(
            RECIPES / "digits_text_to_image.yaml",
            f"train.output_dir={tmp_path / 'out'}",
            f"latent_diffusion.vae={tmp_path / 'missing'}",
            *TINY_LATENT_DIFFUSION,
            *FAST,
        )


def test_fine_tuning_benchmark_runs_every_method(miniature):
    from benchmarks import bench_digits_finetune as bench

    work = miniature["root"] / "bench"
    report = bench.run_benchmark(
        bench.parse_args(
            [
                "--base",
                str(miniature["base"]),
                "--models",
                "unet",  # the flow miniature's rows: tests/test_flow_miniature.py
                "--work",
                str(work),
                "--per-prompt",
                "2",
                "--steps",
                "2",
                "--controls-per-digit",
                "2",
                "--in-process",
                "--teach-overrides",
                "train.max_train_steps=2",
                *FAST,
            ]
        )
    )
    rows = json.loads((work / "results.json").read_text())["rows"]
    labels = [t.label for t in bench.TEACHINGS] + [bench.STYLE.label, bench.CONTROLNET]
    assert [r["method"] for r in rows[1:]] == labels
    # the ControlNet's rows: with and without it, on seen digits' and nines' edge maps; its pairs' grid
    controlnet = rows[-1]
    assert all(0 <= controlnet[f"follows_{k}"] <= 1 for k in ("seen", "unseen", "seen_without", "unseen_without"))
    assert "| unseen digit (9) |" in report and (work / "grid_controlnet.png").is_file()
    data = work / "controlnet-data"
    assert len(list((data / "conditioning").glob("*.png"))) == len(list(data.glob("*.png")))
    for row in rows[1:]:
        assert row["steps"] == 2 and row["size_kb"] > 0
    for teaching in bench.TEACHINGS:
        assert teaching.label in report
        assert (work / f"grid_{teaching.recipe.removesuffix('.yaml')}.png").is_file()
    assert 0 <= rows[-2]["thick_with_trigger"] <= 1
    # the full fine-tune saves a whole pipeline, the adapters a small file
    sizes = {r["method"]: r["size_kb"] for r in rows[1:]}
    assert sizes["DreamBooth"] > 10 * sizes["Textual Inversion"]


def test_style_classifier_tells_thick_from_plain():
    from benchmarks.bench_digits_finetune import train_style_classifier

    _, accuracy = train_style_classifier(seed=0, steps=150)
    assert accuracy > 0.95
