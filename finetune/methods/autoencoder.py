"""The first stage of latent diffusion (Rombach et al. 2022, sec. 3.1): a KL-regularised autoencoder (`AutoencoderKL`).

Trains: a new AutoencoderKL (`block_out_channels`, `latent_channels` ...) or, with model.pretrained_model_name_or_path,
an existing one (a VAE folder, or a pipeline folder / Hub id with a `vae` subfolder). Loss: L1 (or MSE) reconstruction
of the image from a posterior sample, plus `kl_weight` x KL(posterior || N(0, I)). Saves: an AutoencoderKL folder
(`AutoencoderKL.from_pretrained(output_dir)`) whose `scaling_factor` is 1 / std of its latents on the training data,
as Stable Diffusion's 0.18215 was measured, so a diffusion model on the scaled latents sees unit variance. The
`latent-diffusion` method trains a text-conditioned UNet on this autoencoder's latents.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from finetune import diffusion
from finetune.config import Config, ConfigError, option
from finetune.data import TrainingExamples, build_image_source
from finetune.methods.base import Method, eval_mode

logger = logging.getLogger(__name__)


@dataclass
class AutoencoderOptions:
    block_out_channels: list[int] = option(
        default_factory=lambda: [32, 64, 64],
        help="Channels per resolution level of a new autoencoder; it downsamples by 2^(levels - 1).",
    )
    layers_per_block: int = option(1, "ResNet layers per level of a new autoencoder.")
    latent_channels: int = option(4, "Channels of the latent (Stable Diffusion: 4).")
    norm_num_groups: int = option(8, "GroupNorm groups of a new autoencoder (must divide every channel count).")
    kl_weight: float = option(1e-6, "Weight of the KL term (Stable Diffusion's autoencoders: 1e-6).")
    reconstruction_loss: Literal["l1", "mse"] = option("l1", "Pixel reconstruction loss.")
    scaling_samples: int = option(
        1024, "Training images encoded at the end to measure the latents' std (the saved scaling_factor)."
    )

    def __post_init__(self):
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ConfigError(
                f"autoencoder.block_out_channels must be positive numbers, got {self.block_out_channels}"
            )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(
                f"autoencoder.norm_num_groups={self.norm_num_groups} does not divide the channel counts {bad} of "
                "block_out_channels: choose a common divisor"
            )
        if self.latent_channels < 1 or self.layers_per_block < 1:
            raise ConfigError("autoencoder.latent_channels and autoencoder.layers_per_block must be >= 1")
        if self.kl_weight < 0:
            raise ConfigError(f"autoencoder.kl_weight must be >= 0, got {self.kl_weight}")
        if self.scaling_samples < 1:
            raise ConfigError(f"autoencoder.scaling_samples must be >= 1, got {self.scaling_samples}")


def load_autoencoder(path: str, revision: str | None = None, allow_pickle: bool = False):
    """An AutoencoderKL from a VAE folder, or from the `vae` subfolder of a pipeline folder or Hub id."""
    from diffusers import AutoencoderKL

    weights = dict(revision=revision, use_safetensors=None if allow_pickle else True)
    local = Path(path)
    subfolder = "vae" if (local / "vae").is_dir() or not local.exists() else None
    try:
        return AutoencoderKL.from_pretrained(path, subfolder=subfolder, **weights)
    except (OSError, ValueError) as err:
        if subfolder is not None and not local.exists():  # a Hub id of a bare VAE repository
            try:
                return AutoencoderKL.from_pretrained(path, **weights)
            except (OSError, ValueError):
                pass
        raise ConfigError(
            f"cannot load an AutoencoderKL from {path!r} (a VAE folder, or a pipeline with a 'vae' subfolder; only "
            f"safetensors load unless model.allow_pickle=true): {err}"
        ) from err


class SeededReconstruction(torch.nn.Module):
    """encode -> reparameterised posterior sample with given noise -> decode, as one forward: what the training
    wrapper (DDP, FSDP) must see so that gradients synchronise."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * noise
        kl = posterior.kl() / posterior.mean[0].numel()  # per latent element, so kl_weight does not scale with size
        return self.vae.decode(latents).sample, kl


class Autoencoder(Method):
    name = "autoencoder"
    summary = "AutoencoderKL (the latent-diffusion first stage) trained from scratch or fine-tuned on images"
    Options = AutoencoderOptions

    @classmethod
    def check_config(cls, config: Config) -> None:
        factor = 2 ** (len(config.method_options.block_out_channels) - 1)
        if config.model.pretrained_model_name_or_path is None and config.data.resolution % factor:
            raise ConfigError(
                f"data.resolution={config.data.resolution} must be divisible by {factor}, the downsampling of an "
                f"autoencoder with {len(config.method_options.block_out_channels)} levels"
            )

    def setup(self) -> None:
        from diffusers import AutoencoderKL

        source = build_image_source(self.config.data)
        model = self.config.model
        if model.pretrained_model_name_or_path:
            vae = load_autoencoder(model.pretrained_model_name_or_path, model.revision, model.allow_pickle)
            if vae.config.in_channels != source.channels:
                raise ConfigError(
                    f"the autoencoder takes {vae.config.in_channels}-channel images but the data has "
                    f"{source.channels}: set data.channels={vae.config.in_channels}"
                )
        else:
            options, levels = self.options, len(self.options.block_out_channels)
            vae = AutoencoderKL(
                in_channels=source.channels,
                out_channels=source.channels,
                down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=tuple(options.block_out_channels),
                layers_per_block=options.layers_per_block,
                latent_channels=options.latent_channels,
                norm_num_groups=options.norm_num_groups,
                sample_size=self.config.data.resolution,
            )
        if self.config.train.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        vae.train()
        self.autoencoder = SeededReconstruction(vae)
        self.train_dataset = TrainingExamples(
            source,
            self.config.train.seed,
            self.config.data.repeats,
            min_length=self.config.train.train_batch_size * self.accelerator.num_processes,
        )

    @property
    def vae(self):
        """The AutoencoderKL itself (inside the training wrapper after accelerator.prepare)."""
        return self.unwrap(self.autoencoder).vae

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"autoencoder": self.autoencoder}

    # -- training ----------------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        pixels = batch["pixel_values"].to(self.device)

        # the posterior sample's noise, from the example's own seed: identical across resumes and process counts
        latent_shape = (self.vae.config.latent_channels, *(n // self.downsampling for n in pixels.shape[-2:]))
        noise = diffusion.seeded_noise(diffusion.example_generators(batch["seed"]), latent_shape).to(self.device)

        # encode to the posterior q(z | x), sample z (reparameterised), decode
        reconstruction, kl = self.autoencoder(pixels, noise)

        # loss: pixel reconstruction, plus the KL term that keeps the latent space smooth and bounded
        loss_fn = F.l1_loss if self.options.reconstruction_loss == "l1" else F.mse_loss
        reconstruction_loss = loss_fn(reconstruction.float(), pixels.float())
        kl = kl.mean()
        loss = reconstruction_loss + self.options.kl_weight * kl
        return loss, {"reconstruction_loss": reconstruction_loss.item(), "kl": kl.item()}

    # -- outputs -----------------------------------------------------------------------------------------------------
    def reference_images(self, count: int) -> torch.Tensor:
        """The first `count` training images, unaugmented."""
        source = self.train_dataset.source
        rng = np.random.default_rng(0)
        images = []
        for index in range(min(count, len(source))):
            example = source.get(index, rng)
            pixels = example["pixel_values"]
            images.append(pixels.flip(-1) if example["flipped"] else pixels)
        return torch.stack(images)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        with eval_mode(vae):
            outputs = [
                vae.decode(vae.encode(b.to(self.device)).latent_dist.mode()).sample.cpu() for b in images.split(64)
            ]
        return torch.cat(outputs).clamp(-1, 1)

    def sample(self, num_images: int, seed: int) -> list:
        """Pairs of (training image, its reconstruction), side by side in the grid."""
        from diffusers.image_processor import VaeImageProcessor

        originals = self.reference_images(max(num_images // 2, 1))
        pairs = torch.stack([originals, self.reconstruct(originals)], dim=1).flatten(0, 1)
        return VaeImageProcessor().postprocess(pairs, output_type="pil")

    def evaluate(self, num_images: int, seed: int) -> dict[str, float] | None:
        """Reconstruction error of training images: MSE and PSNR (pixels in [-1, 1])."""
        originals = self.reference_images(num_images)
        mse = F.mse_loss(self.reconstruct(originals), originals).item()
        return {"reconstruction_mse": mse, "psnr_db": 10 * float(np.log10(4.0 / max(mse, 1e-12)))}

    @torch.no_grad()
    def latent_std(self) -> float:
        vae = self.vae
        with eval_mode(vae):
            images = self.reference_images(self.options.scaling_samples)
            latents = [vae.encode(b.to(self.device)).latent_dist.sample() for b in images.split(64)]
        return torch.cat(latents).float().std().item()

    def save(self, output_dir: Path) -> None:
        vae = self.vae
        std = self.latent_std()
        scaling_factor = 1.0 / max(std, 1e-6)
        logger.info(
            "latent std %.4f on %d training images: scaling_factor %.5f",
            std,
            self.options.scaling_samples,
            scaling_factor,
        )
        vae.register_to_config(scaling_factor=scaling_factor)
        vae.save_pretrained(output_dir, safe_serialization=True)

    def card(self) -> dict[str, Any]:
        return {
            "tags": ["autoencoder", "latent-diffusion"],
            "description": "A KL autoencoder (the first stage of latent diffusion); scaling_factor = 1 / latent std.",
            "usage": """
from diffusers import AutoencoderKL

vae = AutoencoderKL.from_pretrained("OUTPUT_DIR_OR_REPO_ID")
latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
""",
        }
