"""The flow-matching miniature on a few steps: latent_diffusion with model.family=sd3 builds an SD3 transformer and two
CLIP encoders on the digits autoencoder's latents, trains them with the family's rectified-flow objective and saves a
StableDiffusion3Pipeline folder (without T5) that plain diffusers samples; LoRA trains on top of it, and the
fine-tuning benchmark runs on it as its second base model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import reset_accelerate, run_training
from tests.test_miniature import FAST, RECIPES, TINY_AUTOENCODER
from tests.tiny_models import TOKENIZER_DIR

TINY_FLOW = [
    f"latent_diffusion.tokenizer={TOKENIZER_DIR}",
    "latent_diffusion.text_hidden_size=16",
    "latent_diffusion.text_intermediate_size=32",
    "latent_diffusion.text_layers=1",
    "latent_diffusion.text_heads=2",
    "latent_diffusion.transformer_layers=2",
    "latent_diffusion.transformer_heads=2",
    "latent_diffusion.transformer_head_dim=8",
    "latent_diffusion.flow_shift=2.0",
    "data.max_samples=256",
    "train.train_batch_size=16",
    "train.num_samples=4",
    "train.eval_every=0",
    "train.sample_every=0",
    "diffusion.num_inference_steps=2",
]
PROMPTS = ["a handwritten digit seven", "the digit two"]


@pytest.fixture(scope="module")
def flow_miniature(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny autoencoder, then the flow miniature on it, trained with the real recipes on a few steps."""
    root = tmp_path_factory.mktemp("flow_miniature")
    vae = run_training(
        RECIPES / "digits_autoencoder.yaml",
        f"train.output_dir={root / 'vae'}",
        "train.max_train_steps=6",
        *TINY_AUTOENCODER,
        *FAST,
    )
    base = run_training(
        RECIPES / "digits_flow_text_to_image.yaml",
        f"train.output_dir={root / 'flow'}",
        f"latent_diffusion.vae={vae}",
        "train.max_train_steps=4",
        *TINY_FLOW,
        *FAST,
    )
    return {"vae": vae, "base": base, "root": root}


def sample(pipe, prompts=PROMPTS, steps: int = 2) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(
        prompts, num_inference_steps=steps, height=16, width=16, guidance_scale=3.0, generator=generators
    ).images


def test_flow_miniature_is_an_sd3_pipeline_that_plain_diffusers_samples(flow_miniature):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    folder = flow_miniature["base"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and not (folder / "text_encoder_3").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 2.0
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    config = pipe.transformer.config
    assert (config.in_channels, config.patch_size, config.num_layers, config.sample_size) == (
        4,
        1,
        2,
        8,
    )  # 8x8 latents
    assert config.joint_attention_dim == config.pooled_projection_dim == 2 * 16  # the two CLIP widths
    assert pipe.vae.config.block_out_channels == [8, 16] and pipe.vae.config.shift_factor == 0.0
    # the two encoders are distinct models (each its own initialisation, both trained)
    assert not torch.equal(
        pipe.text_encoder.text_model.embeddings.token_embedding.weight,
        pipe.text_encoder_2.text_model.embeddings.token_embedding.weight,
    )

    images = np.stack([np.asarray(image) for image in sample(pipe)])
    assert images.shape == (2, 16, 16, 3)
    assert not np.array_equal(images[0], images[1])

    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in log if "loss" in row]
    assert len(losses) == 4 and all(np.isfinite(losses))
    card = (folder / "README.md").read_text()
    assert "held out of training: nine" in card and "SD3Transformer2DModel" in card
    assert "text_encoder_3=None, tokenizer_3=None" in card  # the card's loading line works on this folder


def test_flow_miniature_trains_with_the_families_flow_objective(flow_miniature, tmp_path):
    """The run's loss is rectified flow's (the family's objective, through TextToImageMethod): the velocity
    target noise - latents, on sigma * 1000 timesteps, and sampling with the Euler flow scheduler."""
    from accelerate import Accelerator

    from finetune.methods.latent_diffusion import LatentDiffusion
    from finetune.objectives import FlowMatchingObjective
    from finetune.recipe import load_config

    reset_accelerate()
    config = load_config(
        RECIPES / "digits_flow_text_to_image.yaml",
        [f"train.output_dir={tmp_path}", f"latent_diffusion.vae={flow_miniature['vae']}", *TINY_FLOW, *FAST],
    )
    method = LatentDiffusion(config, Accelerator(cpu=True))
    method.setup()
    assert method.family.name == "sd3" and method.denoiser is method.transformer
    assert isinstance(method.objective, FlowMatchingObjective) and method.prediction_type == "flow"
    assert set(method.text_encoders) == {"text_encoder", "text_encoder_2"}
    assert method.text_encoder_trains and all(p.requires_grad for p in method.transformer.parameters())
    clean = torch.randn(3, 4, 4, 4)
    noisy, timesteps, noise = method.objective.noised(clean, torch.arange(3))
    sigma = timesteps / 1000
    torch.testing.assert_close(noisy, (1 - sigma[:, None, None, None]) * clean + sigma[:, None, None, None] * noise)
    torch.testing.assert_close(method.objective.target(clean, noise, timesteps), noise - clean)
    assert type(method.pipeline().scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_flow_miniature_refuses_what_it_cannot_build(tmp_path):
    from finetune.config import ConfigError

    common = [f"train.output_dir={tmp_path / 'out'}", "latent_diffusion.vae=unused", *TINY_FLOW, *FAST]
    with pytest.raises(ConfigError, match=r"model.family='flux': latent_diffusion builds sd .*, sd3"):
        run_training(RECIPES / "digits_flow_text_to_image.yaml", "model.family=flux", *common)
    with pytest.raises(ConfigError, match=r"latent_diffusion.text_encoder: an sd3 model builds its two CLIP"):
        run_training(RECIPES / "digits_flow_text_to_image.yaml", f"latent_diffusion.text_encoder={tmp_path}", *common)


def test_lora_trains_on_the_flow_miniature(flow_miniature):
    """LoRA with the flow miniature as its base model: trains the transformer's LoRA layers, saves a file that
    StableDiffusion3Pipeline loads (through difftune's loader, which names the missing T5), and changes the images."""
    from safetensors.torch import load_file

    from benchmarks.bench_digits_finetune import prepare_data
    from pipelines.load import load_pipeline

    data = prepare_data(flow_miniature["root"] / "lora-data", num_instance=4, resolution=16, seed=0)
    out = run_training(
        RECIPES / "digits_teach_lora.yaml",
        f"model.pretrained_model_name_or_path={flow_miniature['base']}",
        "model.drop_text_encoders=[text_encoder_3]",
        f"data.dataset={data['instance']}",
        f"train.output_dir={flow_miniature['root'] / 'lora'}",
        "train.max_train_steps=3",
        "optim.lr=1.0e-2",
        "diffusion.num_inference_steps=2",
        *FAST,
    )
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert weights and all(key.startswith("transformer.") for key in weights)
    ups = [value for key, value in weights.items() if "lora.up" in key or "lora_B" in key]  # (B starts at zero)
    assert ups and any(value.abs().sum() > 0 for value in ups), "the LoRA did not train"
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))

    prompts = ["a handwritten digit sks"]
    base = np.asarray(sample(load_pipeline(flow_miniature["base"], device="cpu", dtype="float32"), prompts)[0])
    taught = load_pipeline(flow_miniature["base"], lora=str(out), device="cpu", dtype="float32")
    assert type(taught).__name__ == "StableDiffusion3Pipeline"
    assert not np.array_equal(np.asarray(sample(taught, prompts)[0]), base)


def test_benchmark_runs_both_base_models_side_by_side(flow_miniature, tmp_path):
    """The benchmark's rows (LoRA, full DreamBooth and the style LoRA here) on the flow miniature beside the UNet
    miniature, one table with a value per base model in each cell; Textual Inversion only on the UNet."""
    from benchmarks import bench_digits_finetune as bench

    unet = run_training(
        RECIPES / "digits_text_to_image.yaml",
        f"train.output_dir={tmp_path / 'unet'}",
        f"latent_diffusion.vae={flow_miniature['vae']}",
        "train.max_train_steps=2",
        "latent_diffusion.block_out_channels=[16,32]",
        "latent_diffusion.norm_num_groups=8",
        *[o for o in TINY_FLOW if not o.startswith(("latent_diffusion.transformer", "latent_diffusion.flow"))],
        *FAST,
    )
    work = tmp_path / "bench"
    methods = ["LoRA", "DreamBooth", "Textual Inversion", bench.STYLE.label]  # the style runs when named
    report = bench.run_benchmark(
        bench.parse_args(
            ["--base", str(unet), "--flow-base", str(flow_miniature["base"]), "--work", str(work)]
            + ["--per-prompt", "1", "--steps", "2", "--in-process", "--methods", *methods]
            + ["--teach-overrides", "train.max_train_steps=1", *FAST]
        )
    )
    rows = json.loads((work / "results.json").read_text())["rows"]
    ran = {(r["model"], r["method"]) for r in rows}
    style = bench.STYLE.label
    assert {(model, m) for model in ("unet", "flow") for m in ["LoRA", "DreamBooth", style]} <= ran
    assert ("unet", "Textual Inversion") in ran and ("flow", "Textual Inversion") not in ran
    assert all(r["steps"] == 1 for r in rows if "steps" in r)
    for name in ("base", "digits_teach_lora", "digits_teach_dreambooth"):
        assert (work / f"grid_{name}.png").is_file() and (work / f"grid_flow_{name}.png").is_file()
    sizes = {(r["model"], r["method"]): r["size_kb"] for r in rows if "size_kb" in r}
    assert sizes["flow", "DreamBooth"] > 10 * sizes["flow", "LoRA"]  # a whole pipeline vs an adapter
    # side by side: each method once, a value per base model in each cell; "—" where a model has no such row
    lines = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("| ")}
    assert "UNet (DDPM) / SD3 transformer (flow matching)" in report
    assert lines["LoRA"].count(" / ") >= 4 and lines["Textual Inversion"].count("—") >= 3, report
    assert report.count("| DreamBooth |") == 1 and "DreamBooth-LoRA" not in report  # --methods chose four
