"""Seconds per training step and peak memory of each Stable Diffusion method, with and without caching.

Tiny pipeline at 64 px (the one the tests build; same shape as the reference figures for the diffusers example
scripts in FIELD_NOTES.md), and optionally the Stable Diffusion 1.5 architecture at 512 px with random weights
(no download), meant for a GPU.

    .venv/bin/python -m benchmarks.bench_sd                 # tiny, CPU
    .venv/bin/python -m benchmarks.bench_sd --sd15 --methods lora --mixed-precision bf16   # on a GPU
    .venv/bin/python -m benchmarks.bench_sd --methods lora --set train.mixed_precision=bf16   # a lever, on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import REPO, measure_training, print_table

sys.path.insert(0, str(REPO))
from tests.tiny_models import TOKENIZER_DIR, make_test_images, make_tiny_sd_pipeline  # noqa: E402

# the diffusers example scripts on the same tiny pipeline, 64 px (FIELD_NOTES.md, measured on this machine kind on
# another day; the side-by-side figure is benchmarks/reference_sd_step.py, timed in the same run)
REFERENCE_S_PER_STEP = {"lora": 0.240, "dreambooth_lora": 0.148, "textual_inversion": 0.208}
REFERENCE_PEAK_MB = {"lora": 730}


def method_recipes(base: Path, data: Path, instance: Path, resolution: int) -> dict[str, dict]:
    common = {
        "model": {"pretrained_model_name_or_path": str(base)},
        "data": {"resolution": resolution, "random_flip": True},
        "optim": {"lr": 1e-4},
    }
    return {
        "lora": {
            **common,
            "method": "lora",
            "data": {**common["data"], "dataset": str(data)},
            "train": {"train_batch_size": 4},
            "lora": {"rank": 4},
        },
        "dreambooth_lora": {
            **common,
            "method": "dreambooth",
            "train": {"train_batch_size": 2},
            "dreambooth": {
                "use_lora": True,
                "instance_data_dir": str(instance),
                "instance_prompt": "a photo of sks toy",
            },
        },
        "dreambooth": {
            **common,
            "method": "dreambooth",
            "train": {"train_batch_size": 2},
            "dreambooth": {"instance_data_dir": str(instance), "instance_prompt": "a photo of sks toy"},
        },
        "textual_inversion": {
            **common,
            "method": "textual_inversion",
            "data": {**common["data"], "dataset": str(instance)},
            "train": {"train_batch_size": 4},
            "textual_inversion": {"placeholder_token": "<sks>", "initializer_token": "toy"},
        },
    }


def build_sd15(out_dir: Path) -> Path:
    """Stable Diffusion 1.5's architecture with random weights (the vendored tiny tokenizer stands in for CLIP's)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        latent_channels=4,
        sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(out_dir)
    return out_dir


REFERENCE_BATCH = {"lora": 4, "dreambooth_lora": 2, "textual_inversion": 4}


def measure_reference(name: str, base: Path, data: Path, instance: Path, steps: int) -> dict:
    """The diffusers example script's per-step work (benchmarks/reference_sd_step.py) in a fresh process."""
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "reference_sd_step.py"),
        "--method",
        name,
        "--base",
        str(base),
        "--data",
        str(data if name == "lora" else instance),
        "--batch-size",
        str(REFERENCE_BATCH[name]),
        "--steps",
        str(steps),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"reference run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["lora", "dreambooth_lora", "textual_inversion", "dreambooth"])
    parser.add_argument("--steps", type=int, default=15, help="timed steps after 3 warm-up steps")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; the median is reported")
    parser.add_argument("--sd15", action="store_true", help="SD 1.5 architecture at 512 px, batch 1 (GPU)")
    parser.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="recipe overrides for every difftune run, e.g. train.channels_last=true optim.adamw_implementation=fused "
        "data.num_workers=2 train.compile=true (YAML values)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        resolution = 512 if args.sd15 else 64
        base = build_sd15(tmp / "sd15") if args.sd15 else make_tiny_sd_pipeline(tmp / "tiny")
        data = tmp / "captioned"
        for i, image in enumerate(make_test_images(data, 16, size=resolution)):
            image.with_suffix(".txt").write_text(f"a toy picture {i}")
        instance = tmp / "instance"
        make_test_images(instance, 5, size=resolution, seed=1)
        recipes = method_recipes(base, data, instance, resolution)
        rows = []
        for name in args.methods:
            # the reference and both cache modes take turns, so a slow minute of the machine hits all of them
            with_reference = not args.sd15 and name in REFERENCE_BATCH
            samples: dict[str, list[dict]] = {"reference": [], "none": [], "memory": []}
            for _ in range(args.repeats):
                if with_reference:
                    samples["reference"].append(measure_reference(name, base, data, instance, args.steps))
                for cache in ("none", "memory"):
                    recipe = json.loads(json.dumps(recipes[name]))
                    recipe.setdefault(recipe["method"], {})["cache"] = cache
                    if args.sd15:
                        recipe["train"]["train_batch_size"] = 1
                    if args.mixed_precision:
                        recipe["train"]["mixed_precision"] = args.mixed_precision
                    for override in args.set:
                        key, _, value = override.partition("=")
                        section, _, name = key.partition(".")
                        recipe.setdefault(section, {})[name] = yaml.safe_load(value)
                    samples[cache].append(measure_training(recipe, steps=args.steps, warmup_steps=3))
                    print(name, cache, samples[cache][-1], flush=True)
            reference = statistics.median(r["s_per_step"] for r in samples["reference"]) if with_reference else None
            reference_memory = (
                statistics.median(r["peak_memory_mb"] for r in samples["reference"]) if with_reference else None
            )
            for cache in ("none", "memory"):
                s_per_step = statistics.median(r["s_per_step"] for r in samples[cache])
                rows.append(
                    {
                        "method": name,
                        "batch": recipes[name]["train"]["train_batch_size"] if not args.sd15 else 1,
                        "cache": cache,
                        "s_per_step": s_per_step,
                        "peak_memory_mb": statistics.median(r["peak_memory_mb"] for r in samples[cache]),
                        "script_s_per_step": reference,
                        "speedup_vs_script": reference / s_per_step if reference else None,
                        "script_peak_mb": reference_memory,
                        "field_notes_s_per_step": None if args.sd15 else REFERENCE_S_PER_STEP.get(name),
                    }
                )
    print()
    print_table(
        rows,
        [
            "method",
            "batch",
            "cache",
            "s_per_step",
            "script_s_per_step",
            "speedup_vs_script",
            "peak_memory_mb",
            "script_peak_mb",
            "field_notes_s_per_step",
        ],
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
