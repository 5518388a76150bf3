"""Unconditional pixel-space DDPM trained from scratch: a UNet2DModel learns to denoise images (Ho et al. 2020).

Trains: every UNet parameter. Loss: the diffusion objective of DenoisingMethod. Saves: a `DDPMPipeline` folder
(`DDPMPipeline.from_pretrained(output_dir)`), with the DDIM or DDPM scheduler chosen by `diffusion.sampler`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from finetune.config import Config, ConfigError, option
from finetune.data import TrainingExamples, build_image_source
from finetune.methods.base import DenoisingMethod

_DOWN = "DownBlock2D"
_ATTN_DOWN = "AttnDownBlock2D"
_UP = "UpBlock2D"
_ATTN_UP = "AttnUpBlock2D"

# UNet2DModel shapes: small ones for CPU, and the DDPM paper's (as published in google/ddpm-*)
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(  # tests: ~0.1M parameters
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=(_DOWN, _DOWN),
        up_block_types=(_UP, _UP),
    ),
    "digits": dict(  # the CPU demo at 16 px: ~0.69M parameters, attention at 4x4
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=(_DOWN, _DOWN, _ATTN_DOWN),
        up_block_types=(_ATTN_UP, _UP, _UP),
    ),
    "ddpm-cifar10": dict(  # Ho et al. 2020, CIFAR-10 32 px: 35.7M parameters, attention at 16x16
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=(_DOWN, _ATTN_DOWN, _DOWN, _DOWN),
        up_block_types=(_UP, _UP, _ATTN_UP, _UP),
    ),
    "ddpm-celebahq-256": dict(  # the shape of google/ddpm-celebahq-256: ~114M parameters, attention at 16x16
        block_out_channels=(128, 128, 256, 256, 512, 512),
        layers_per_block=2,
        down_block_types=(_DOWN, _DOWN, _DOWN, _DOWN, _ATTN_DOWN, _DOWN),
        up_block_types=(_UP, _ATTN_UP, _UP, _UP, _UP, _UP),
    ),
}


@dataclass
class UnconditionalOptions:
    preset: Literal["tiny", "digits", "ddpm-cifar10", "ddpm-celebahq-256"] = option(
        "digits", "UNet2DModel shape: 'tiny' (tests), 'digits' (CPU demo), or the DDPM paper's CIFAR-10 / CelebA-HQ."
    )
    block_out_channels: list[int] | None = option(
        None, "Override the preset's channels per resolution level (the number of levels must match the preset)."
    )
    layers_per_block: int | None = option(None, "Override the preset's ResNet layers per block.")
    dropout: float = option(0.0, "Dropout in the ResNet blocks (the DDPM paper used 0.1 on CIFAR-10).")
    resnet_time_scale_shift: Literal["default", "scale_shift"] = option(
        "default",
        "How the time (and class) embedding enters each ResNet block: 'default' adds it to the features, "
        "'scale_shift' scales and shifts the normalised features with it (Nichol & Dhariwal 2021, adaptive group "
        "norm).",
    )

    def __post_init__(self):
        levels = len(UNET_PRESETS[self.preset]["block_out_channels"])
        if self.block_out_channels is not None and len(self.block_out_channels) != levels:
            raise ConfigError(
                f"block_out_channels has {len(self.block_out_channels)} levels but preset {self.preset!r} has "
                f"{levels}: give {levels} numbers or choose another preset"
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


class UnconditionalDDPM(DenoisingMethod):
    name = "unconditional"
    summary = "pixel-space DDPM (UNet2DModel) trained from scratch on an image dataset or the digits"
    Options = UnconditionalOptions
    takes_timestep_spacing = True  # diffusion.timestep_spacing: its saved pipeline's scheduler

    @classmethod
    def check_config(cls, config: Config) -> None:
        resolution, levels = (
            config.data.resolution,
            len(UNET_PRESETS[config.method_options.preset]["block_out_channels"]),
        )
        if resolution % 2 ** (levels - 1):
            raise ConfigError(
                f"data.resolution={resolution} must be divisible by {2 ** (levels - 1)} for the "
                f"{config.method_options.preset!r} UNet ({levels} resolution levels)"
            )

    # -- set-up ------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        source = self.build_source()
        self.train_dataset = TrainingExamples(
            source,
            self.config.train.seed,
            self.config.data.repeats,
            transform=self.make_example,
            min_length=self.config.train.train_batch_size * self.accelerator.num_processes,
        )
        self.unet, self.noise_scheduler = self.load_components(source.channels)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.config.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()

    def build_source(self):
        return build_image_source(self.config.data)

    def make_example(self, example: dict, rng) -> dict:
        return example

    def unet_kwargs(self, channels: int) -> dict[str, Any]:
        options = self.options
        kwargs = dict(UNET_PRESETS[options.preset])
        if options.block_out_channels is not None:
            kwargs["block_out_channels"] = tuple(options.block_out_channels)
        if options.layers_per_block is not None:
            kwargs["layers_per_block"] = options.layers_per_block
        return dict(
            sample_size=self.config.data.resolution,
            in_channels=channels,
            out_channels=channels,
            dropout=options.dropout,
            resnet_time_scale_shift=options.resnet_time_scale_shift,
            **kwargs,
        )

    def load_components(self, channels: int):
        diffusion = self.config.diffusion
        unet = UNet2DModel(**self.unet_kwargs(channels))
        scheduler = DDPMScheduler(**diffusion.from_scratch_scheduler_kwargs())
        return unet, scheduler

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet}

    # -- training ----------------------------------------------------------------------------------------------------
    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["pixel_values"]

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return self.unet(noisy, timesteps).sample

    # -- outputs -----------------------------------------------------------------------------------------------------
    def sampling_scheduler(self):
        scheduler_class = DDIMScheduler if self.config.diffusion.sampler == "ddim" else DDPMScheduler
        spacing = self.config.diffusion.timestep_spacing
        extra = {"timestep_spacing": spacing} if spacing else {}
        return scheduler_class.from_config(self.noise_scheduler.config, **extra)

    def pipeline(self):
        return DDPMPipeline(unet=self.unwrap(self.unet), scheduler=self.sampling_scheduler())

    @contextlib.contextmanager
    def eval_mode(self):
        """Dropout off while sampling; the training mode comes back afterwards."""
        unet = self.unwrap(self.unet)
        was_training = unet.training
        unet.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            unet.train(was_training)

    def validation_inputs(self, num_images: int) -> dict[str, Any]:
        """What the pipeline is asked for besides steps and seed."""
        return {"batch_size": num_images}

    def inference_steps(self) -> int:
        """Sampling steps of sample grids and evaluation."""
        return self.config.diffusion.num_inference_steps

    def guidance_inputs(self) -> dict[str, Any]:
        """Pipeline arguments that evaluation passes on (a guided model's guidance scale)."""
        return {}

    def sample(self, num_images: int, seed: int) -> list:
        with self.eval_mode():
            pipe = self.pipeline()
            pipe.set_progress_bar_config(disable=True)
            return pipe(
                **self.validation_inputs(num_images),
                **self.guidance_inputs(),
                generator=torch.Generator(self.device).manual_seed(seed),
                num_inference_steps=self.inference_steps(),
            ).images

    def evaluate(self, num_images: int, seed: int) -> dict[str, float] | None:
        """Fréchet distance, KID and class accuracy of samples on the digits classifier's features, each with its
        real-vs-real baseline (digits only)."""
        if self.config.data.dataset != "digits":
            return None
        from finetune.evaluate import DigitsEvaluator, evaluate_pipeline, metrics_for_logging

        if getattr(self, "_evaluator", None) is None:  # trains or loads the cached classifier once per run
            self._evaluator = DigitsEvaluator(resolution=self.config.data.resolution)
        with self.eval_mode():
            result = evaluate_pipeline(
                self.pipeline(),
                num_samples=num_images,
                steps=self.inference_steps(),
                seed=seed,
                digits_evaluator=self._evaluator,
                pipeline_kwargs=self.guidance_inputs(),
            )
        return metrics_for_logging(result, prefix="")

    def save(self, output_dir: Path) -> None:
        self.pipeline().save_pretrained(output_dir, safe_serialization=True)

    def card(self) -> dict[str, Any]:
        steps = self.config.diffusion.num_inference_steps
        return {
            "tags": ["unconditional-image-generation"],
            "pipeline_tag": "unconditional-image-generation",
            "usage": f"""
from diffusers import DDPMPipeline

pipe = DDPMPipeline.from_pretrained("OUTPUT_DIR_OR_REPO_ID")
images = pipe(batch_size=16, num_inference_steps={steps}).images
""",
        }
