"""The miniature text-to-image pipeline, every stage on a few steps: autoencoder -> latent diffusion (a
StableDiffusionPipeline folder that plain diffusers samples) -> the fine-tuning benchmark's runs and table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.methods.latent_diffusion import digit_prompt
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


def miniature_method(output_dir, holdout_digits: str):
    """The UNet miniature's method as its recipe configures it (no VAE loaded): its data seam, without training."""
    from finetune.methods.latent_diffusion import LatentDiffusion
    from finetune.recipe import load_config

    config = load_config(
        RECIPES / "digits_text_to_image.yaml",
        [
            f"train.output_dir={output_dir}",
            "latent_diffusion.vae=unused",
            f"latent_diffusion.holdout_digits={holdout_digits}",
        ],
    )
    method = LatentDiffusion.__new__(LatentDiffusion)
    method.config, method.options = config, config.method_options
    return method


def test_latent_diffusion_holds_out_digits_and_writes_captions(tmp_path):
    method = miniature_method(tmp_path, "[9,3]")
    source = method.build_source()
    assert 9 not in source.labels.tolist() and 3 not in source.labels.tolist() and len(source) > 1000
    assert source.get(0, np.random.default_rng(0))["pixel_values"].shape[0] == 3  # gray as RGB (data.channels=3)
    captions = method.all_captions()
    assert "a handwritten digit seven" in captions and "a handwritten digit" in captions
    assert not any("nine" in c or "three" in c for c in captions)


def test_holdout_removes_every_example_of_the_held_out_digits(tmp_path):
    """The data seam the miniature trains from: not one image of a held-out digit is left (compared pixel for pixel
    with the dataset's images of those digits), and every image of the other digits still is."""
    from finetune.digits import load_digits_tensors

    source = miniature_method(tmp_path, "[3,5]").build_source()
    rng = np.random.default_rng(0)
    trained = {source.get(i, rng)["pixel_values"][0].numpy().tobytes() for i in range(len(source))}
    images, labels = load_digits_tensors(16, "all")
    held_out = {image[0].numpy().tobytes() for image in images[(labels == 3) | (labels == 5)]}
    kept = {image[0].numpy().tobytes() for image in images[(labels != 3) & (labels != 5)]}
    assert held_out and not trained & held_out  # (no held-out digit's pixels equal a kept one's: nothing masked)
    assert kept <= trained and len(source) == int(((labels != 3) & (labels != 5)).sum())


def test_holdout_digits_are_validated(tmp_path):
    from finetune.config import ConfigError
    from finetune.recipe import load_config

    common = [f"train.output_dir={tmp_path}", "latent_diffusion.vae=unused"]
    with pytest.raises(ConfigError, match=r"latent_diffusion.holdout_digits must be digits 0-9, got \[12\]"):
        load_config(RECIPES / "digits_text_to_image.yaml", [*common, "latent_diffusion.holdout_digits=[3,12]"])


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


def test_benchmark_averages_every_method_over_held_out_digits_and_seeds(miniature):
    """Two held-out digits (a tiny miniature trained without each, cached and reused), 2 steps per method: one summary
    row per method with a mean and a spread, the per-digit rows, and a second run that trains no miniature. (One seed
    keeps the suite short: seeds are averaged exactly as digits are, as runs of the same summary.)"""
    from benchmarks import bench_digits_finetune as bench

    root = miniature["root"]

    def run(work: Path, *only: str) -> dict:
        args = [
            "--held-out-digits", "3", "5",
            "--seeds", "0",
            *only,
            "--models", "unet",
            "--vae", str(miniature["vae"]),
            "--miniatures", str(root / "miniatures"),
            "--base-overrides", "train.max_train_steps=2", *TINY_LATENT_DIFFUSION, *FAST,
            "--work", str(work),
            "--per-prompt", "2",
            "--steps", "2",
            "--in-process",
            "--teach-overrides", "train.max_train_steps=2", *FAST,
        ]  # fmt: skip
        report = bench.run_benchmark(bench.parse_args(args))
        return {"report": report, **json.loads((work / "results.json").read_text())}

    first = run(root / "bench-digits")
    labels = ["miniature model, no fine-tuning"] + [t.label for t in bench.TEACHINGS] + [bench.STYLE.label]
    assert [entry["method"] for entry in first["summary"]] == labels  # no ControlNet unless named
    for entry in first["summary"]:
        assert entry["runs"] == 2 and entry["held_out_digits"] == [3, 5] and entry["seeds"] == [0]
        metrics = ["prior_accuracy"] + (["thick_with_trigger"] if entry["method"] == bench.STYLE.label else [])
        metrics += ["fidelity", "prior_drop"] if entry["method"] in labels[1:-1] else []
        for metric in metrics:
            value = entry[metric]
            assert value["min"] <= value["mean"] <= value["max"] and value["std"] >= 0, (entry["method"], metric)
            assert 0 <= value["min"] and value["max"] <= 1
    # each run's fidelity is the fraction read as its own held-out digit
    rows = [r for r in first["rows"] if r["method"] == "LoRA"]
    assert sorted((r["held_out"], r["seed"]) for r in rows) == [(3, 0), (5, 0)]
    assert [(e["method"], e["held_out"]) for e in first["per_digit"][:2]] == [(labels[0], 3), (labels[1], 3)]
    assert len(first["per_digit"]) == 2 * len(labels)
    for label in labels:
        assert f"| {label} |" in first["report"] and f"| {label} | 5 |" in first["report"]
    assert "[" in first["report"].split(f"| {labels[1]} |")[1].splitlines()[0]  # mean [min–max]
    # prior preservation draws its class images from the prompts of the digits the miniature knows, not the new one
    class_images = root / "bench-digits" / "holdout-3-seed-0" / "digits_teach_dreambooth_prior" / "class_images"
    assert {p.read_text() for p in class_images.glob("class_*.txt")} == {digit_prompt(d) for d in range(10) if d != 3}
    # one miniature per digit, trained without it; the runs' instance images are of that digit
    assert sorted(first["setup_s"]) == ["unet_without_3_s", "unet_without_5_s"]
    cached = sorted((root / "miniatures").iterdir())
    assert [folder.name.split("-")[:3] for folder in cached] == [
        ["unet", "without", "five"],
        ["unet", "without", "three"],
    ]
    assert "held out of training: three" in (cached[1] / "README.md").read_text()
    assert (root / "bench-digits" / "holdout-5-seed-0" / "instance" / "0004.png").is_file()
    # benchmarks run apart (one process per digit) combine into the same averages: trains nothing
    combined = root / "bench-digits-combined"
    bench.run_benchmark(bench.parse_args(["--combine", str(root / "bench-digits"), "--work", str(combined)]))
    assert json.loads((combined / "results.json").read_text())["summary"] == first["summary"]
    # again (one digit, one seed, one method): the cached miniature is reused, and the same seed gives the same numbers
    second = run(root / "bench-digits-again", "--held-out-digits", "3", "--seeds", "0", "--methods", "LoRA")
    assert second["setup_s"] == {}
    assert [(r["method"], r["prior_accuracy"], r.get("fidelity")) for r in second["rows"][:2]] == [
        (r["method"], r["prior_accuracy"], r.get("fidelity")) for r in first["rows"][:2]
    ]


def test_style_classifier_tells_thick_from_plain():
    from benchmarks.bench_digits_finetune import train_style_classifier

    _, accuracy = train_style_classifier(seed=0, steps=150)
    assert accuracy > 0.95
