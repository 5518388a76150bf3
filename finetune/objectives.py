"""Training objectives: how clean examples become a noised input, a timestep and a regression target, and how the
per-example losses are weighted. A family picks its objective (DDPM for SD 1.x/2.x and SDXL; flow matching for the
families after them), so a method computes its loss without knowing which one it trains.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from finetune import diffusion
from finetune.speed import host_to_device


class DDPMObjective:
    """Denoising diffusion (Ho et al. 2020): x_t = alpha_t x0 + sigma_t eps at a uniform timestep, the model regressed
    onto eps, v or x0 (the scheduler's prediction_type), optionally min-SNR-gamma weighted (Hang et al. 2023)."""

    def __init__(self, noise_scheduler, prediction_type: str, snr_gamma: float | None = None, noise_offset: float = 0):
        self.noise_scheduler, self.prediction_type = noise_scheduler, prediction_type
        self.snr_gamma, self.noise_offset = snr_gamma, noise_offset

    def noised(self, clean: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, eps) from each example's own seed: identical across resumes and process counts."""
        generators = diffusion.example_generators(seeds)
        noise = diffusion.seeded_noise(generators, tuple(clean.shape[1:]), self.noise_offset)
        noise = host_to_device(noise, clean.device)
        timesteps = diffusion.seeded_timesteps(generators, self.noise_scheduler.config.num_train_timesteps)
        timesteps = host_to_device(timesteps, clean.device)
        return self.noise_scheduler.add_noise(clean, noise, timesteps), timesteps, noise

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return diffusion.training_target(self.noise_scheduler, clean, noise, timesteps, self.prediction_type)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.snr_gamma is None:
            return None
        snr = diffusion.compute_snr(self.noise_scheduler, timesteps)
        return diffusion.min_snr_loss_weights(snr, self.snr_gamma, self.prediction_type)


class FlowMatchingObjective:
    """Rectified flow (Esser et al. 2024): x_sigma = (1 - sigma) x0 + sigma eps with sigma drawn per example from a
    uniform, logit-normal or mode density, shifted as the scheduler shifts (SD3's static shift, or Flux's shift from
    the image's token count), the model regressed onto the velocity eps - x0, optionally weighted by sigma.

    `noised` returns timesteps = sigma * num_train_timesteps, what SD3Transformer2DModel takes.
    FluxTransformer2DModel multiplies its timestep (and guidance) by 1000 inside, so FluxPipeline passes
    timestep / 1000: a Flux family divides these timesteps by num_train_timesteps before calling its transformer.

    Where diffusers' dreambooth SD3/Flux scripts differ: they snap sigma to the scheduler's 1000 training sigmas
    through `timesteps[(u * T).long()]`, which also maps u to 1 - u (the grid runs from sigma = 1 down), so a
    positive logit_mean there favours clean samples; here sigma is continuous and logit_mean > 0 favours noise, as in
    the paper.
    """

    def __init__(
        self,
        noise_scheduler,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        loss_weighting: str = "none",
        dynamic_shift: bool = False,
        image_seq_len: int | None = None,
        patch_size: int = 2,
    ):
        """`noise_scheduler` is a FlowMatchEulerDiscreteScheduler. Without `dynamic_shift`, sigma gets the shift the
        scheduler gives its own training sigmas (config.shift, none when config.use_dynamic_shifting: diffusers' Flux
        script trains unshifted). With it, Flux's shift from mu, from the latents' token count (`image_seq_len`, or
        derived from each batch: packed [B, L, C] latents, or [B, C, H, W] in `patch_size` patches) and the scheduler's
        base/max shift and base/max image_seq_len."""
        diffusion.check_flow_sampling(weighting_scheme, mode_scale)  # at construction, not at the first step
        if loss_weighting not in diffusion.FLOW_LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {loss_weighting!r}: use one of {diffusion.FLOW_LOSS_WEIGHTINGS}")
        self.noise_scheduler = noise_scheduler
        self.weighting_scheme, self.logit_mean, self.logit_std = weighting_scheme, logit_mean, logit_std
        self.mode_scale, self.loss_weighting = mode_scale, loss_weighting
        self.dynamic_shift, self.image_seq_len, self.patch_size = dynamic_shift, image_seq_len, patch_size
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps

    def shifted(self, sigmas: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """The sampled sigmas shifted for these latents, as the scheduler would shift them."""
        config = self.noise_scheduler.config
        if not self.dynamic_shift:
            return sigmas if config.use_dynamic_shifting else diffusion.shift_sigmas(sigmas, config.shift)
        seq_len = self.image_seq_len or diffusion.image_seq_len(clean, self.patch_size)
        mu = diffusion.resolution_shift_mu(
            seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
        )
        return diffusion.time_shift_sigmas(sigmas, mu, config.time_shift_type)

    def noised(self, clean: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_sigma, sigma * num_train_timesteps, eps) from each example's own seed: identical across resumes and
        process counts. sigma is drawn before the noise, so an example's sigma does not depend on its latent shape
        (a bucket's resolution, packed or not); only the shift does."""
        generators = diffusion.example_generators(seeds)
        sigmas = diffusion.seeded_flow_sigmas(
            generators, self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale
        )
        sigmas = host_to_device(self.shifted(sigmas, clean), clean.device)
        noise = host_to_device(diffusion.seeded_noise(generators, tuple(clean.shape[1:])), clean.device)
        return diffusion.rectified_flow_interpolant(clean, noise, sigmas), sigmas * self.num_train_timesteps, noise

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return diffusion.rectified_flow_velocity(clean, noise)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.loss_weighting == "none":
            return None
        return diffusion.flow_loss_weights(timesteps / self.num_train_timesteps, self.loss_weighting)


def combined_weights(*weights: torch.Tensor | None) -> torch.Tensor | None:
    """The product of the per-example weights given (min-SNR, the prior-preservation weight a class image carries),
    None ones skipped; None when there are none."""
    present = [w.to(torch.float32) for w in weights if w is not None]
    if not present:
        return None
    device = present[0].device
    product = present[0]
    for weight in present[1:]:
        product = product * weight.to(device)
    return product


def weighted_mse(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None,
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example MSE averaged over the batch, each example multiplied by its weight (None: unweighted); with
    `pixel_weights` ([B, 1, h, w], the masked loss) each squared error is weighted where it lies first."""
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if pixel_weights is not None:
        per_example = per_example * pixel_weights.to(per_example.device)
    per_example = per_example.mean(dim=tuple(range(1, per_example.ndim)))
    if weights is None:
        return per_example.mean()
    return (per_example * weights.to(per_example.device)).mean()


def batch_weights(batch: dict[str, Any]) -> torch.Tensor | None:
    """The per-example weight a batch carries (prior preservation gives class images `prior_loss_weight`)."""
    return batch.get("loss_weight")
