"""Training objectives: how clean examples become a noised input, a timestep and a regression target, and how the
per-example losses are weighted. A family picks its objective (DDPM for SD 1.x/2.x and SDXL; flow matching for the
families after them), so a method computes its loss without knowing which one it trains.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from finetune import diffusion


class DDPMObjective:
    """Denoising diffusion (Ho et al. 2020): x_t = alpha_t x0 + sigma_t eps at a uniform timestep, the model regressed
    onto eps, v or x0 (the scheduler's prediction_type), optionally min-SNR-gamma weighted (Hang et al. 2023)."""

    def __init__(self, noise_scheduler, prediction_type: str, snr_gamma: float | None = None, noise_offset: float = 0):
        self.noise_scheduler, self.prediction_type = noise_scheduler, prediction_type
        self.snr_gamma, self.noise_offset = snr_gamma, noise_offset

    def noised(self, clean: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, eps) from each example's own seed: identical across resumes and process counts."""
        generators = diffusion.example_generators(seeds)
        noise = diffusion.seeded_noise(generators, tuple(clean.shape[1:]), self.noise_offset).to(clean.device)
        timesteps = diffusion.seeded_timesteps(generators, self.noise_scheduler.config.num_train_timesteps)
        timesteps = timesteps.to(clean.device)
        return self.noise_scheduler.add_noise(clean, noise, timesteps), timesteps, noise

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return diffusion.training_target(self.noise_scheduler, clean, noise, timesteps, self.prediction_type)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.snr_gamma is None:
            return None
        snr = diffusion.compute_snr(self.noise_scheduler, timesteps)
        return diffusion.min_snr_loss_weights(snr, self.snr_gamma, self.prediction_type)


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


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-example MSE averaged over the batch, each example multiplied by its weight (None: unweighted)."""
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_example = per_example.mean(dim=tuple(range(1, per_example.ndim)))
    if weights is None:
        return per_example.mean()
    return (per_example * weights.to(per_example.device)).mean()


def batch_weights(batch: dict[str, Any]) -> torch.Tensor | None:
    """The per-example weight a batch carries (prior preservation gives class images `prior_loss_weight`)."""
    return batch.get("loss_weight")
