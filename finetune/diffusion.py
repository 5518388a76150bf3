"""Diffusion maths as small pure functions. Schedulers and SNR come from diffusers; this adds what it lacks."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_snr

__all__ = ["compute_snr", "seeded_noise", "seeded_timesteps", "training_target", "min_snr_loss_weights"]


def example_generators(seeds: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per example, so every example's draws depend only on its own seed."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds.tolist()]


def seeded_noise(generators: list[torch.Generator], shape: tuple[int, ...], noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise [B, *shape], one draw per generator; with an offset (Guttenberg 2023, "noise offset") a random
    per-channel constant is added so the model can learn to change an image's mean brightness."""
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    if noise_offset:
        offsets = torch.stack([torch.randn(shape[0], generator=g) for g in generators])
        noise = noise + noise_offset * offsets.view(len(generators), shape[0], *([1] * (len(shape) - 1)))
    return noise


def seeded_timesteps(generators: list[torch.Generator], num_train_timesteps: int) -> torch.Tensor:
    """Uniform training timesteps in [0, T), one draw per generator (Ho et al. 2020, Algorithm 1 line 3)."""
    return torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g) for g in generators])


def training_target(
    scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The regression target: eps (Ho et al. 2020, eq. 14), v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, sec. 4),
    or the clean sample x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    if prediction_type == "sample":
        return clean
    raise ValueError(f"unknown prediction_type {prediction_type!r}: use 'epsilon', 'v_prediction' or 'sample'")


def min_snr_loss_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023, eq. 10) expressed for the eps-, v- or x0-prediction loss."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def alphas_sigmas(scheduler, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t = sqrt(alphabar_t) and sigma_t = sqrt(1 - alphabar_t) of a variance-preserving process (Ho et al. 2020,
    eq. 4), gathered at `timesteps`."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)
    abar = alphas_cumprod[timesteps]
    return abar.sqrt(), (1 - abar).sqrt()
