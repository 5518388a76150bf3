"""Diffusion maths as small pure functions. Schedulers and SNR come from diffusers; this adds what it lacks."""

from __future__ import annotations

import math

import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3, compute_snr

__all__ = [
    "compute_snr",
    "seeded_noise",
    "seeded_timesteps",
    "training_target",
    "min_snr_loss_weights",
    "shifted_cosine_betas",
]


def shifted_cosine_log_snr(t: torch.Tensor, shift: float) -> torch.Tensor:
    """log SNR(t) = -2 log tan(pi t / 2) + 2 log(shift): the cosine schedule shifted for resolution (Hoogeboom et al.
    2023, "simple diffusion": shift = 64 / d for d px images over 64; shift > 1 keeps more signal at every t)."""
    return -2.0 * torch.log(torch.tan(math.pi * t / 2)) + 2.0 * math.log(shift)


def shifted_cosine_betas(num_train_timesteps: int, shift: float, max_beta: float = 0.999) -> torch.Tensor:
    """Discrete betas of the shifted cosine schedule: beta_i = 1 - alphabar(t_i+1) / alphabar(t_i), alphabar =
    sigmoid(log SNR) (Nichol & Dhariwal 2021, eq. 17's discretisation; clipped at `max_beta` like theirs)."""
    t = torch.linspace(0, 1, num_train_timesteps + 1, dtype=torch.float64)
    alphas_cumprod = torch.sigmoid(shifted_cosine_log_snr(t, shift))
    alphas_cumprod[0], alphas_cumprod[-1] = 1.0, 0.0  # the limits at t = 0 and t = 1 (tan is 0 and infinite there)
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


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


# ---------------------------------------------------------------------------------------------------------------------
# deterministic DDIM and progressive distillation, in (alpha_t, sigma_t) form: z_t = alpha_t x + sigma_t eps
# ---------------------------------------------------------------------------------------------------------------------
def _per_example(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] coefficients viewed as [B, 1, 1, ...] to scale [B, ...] tensors (scalars and broadcastable shapes pass)."""
    coefficient = torch.as_tensor(coefficient, device=like.device)
    if coefficient.ndim == 1 and like.ndim > 1:
        coefficient = coefficient.view(-1, *([1] * (like.ndim - 1)))
    return coefficient.to(like.dtype)


def alphas_sigmas_or_final(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, final_alpha_cumprod: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t, sigma_t (float64) at `timesteps`, where t < 0 is the end of sampling and uses `final_alpha_cumprod`, as
    diffusers' DDIMScheduler does for the last step (1 with set_alpha_to_one: the x0 of Song et al. 2021, eq. 12)."""
    alphas_cumprod = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)
    final = torch.as_tensor(final_alpha_cumprod, dtype=torch.float64, device=timesteps.device)
    abar = torch.where(timesteps >= 0, alphas_cumprod[timesteps.clamp(min=0)], final)
    return abar.sqrt(), (1 - abar).clamp(min=0).sqrt()


def prediction_to_clean_and_noise(
    model_output: torch.Tensor, noisy: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by a model output at z_t: eps-prediction x0 = (z - sigma eps) / alpha (Ho et al. 2020, eq. 4),
    v-prediction x0 = alpha z - sigma v, eps = alpha v + sigma z (Salimans & Ho 2022, sec. 4 and App. D), or x0."""
    a, s = _per_example(alpha, noisy), _per_example(sigma, noisy)
    if prediction_type == "epsilon":
        return (noisy - s * model_output) / a, model_output
    if prediction_type == "v_prediction":
        return a * noisy - s * model_output, a * model_output + s * noisy
    if prediction_type == "sample":
        return model_output, (noisy - a * model_output) / s
    raise ValueError(f"unknown prediction_type {prediction_type!r}: use 'epsilon', 'v_prediction' or 'sample'")


def clean_to_prediction(
    clean: torch.Tensor, noisy: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The model output whose x0 at z_t is `clean`: eps = (z - alpha x0) / sigma, v = (alpha z - x0) / sigma
    (= alpha eps - sigma x0, Salimans & Ho 2022, sec. 4), or x0 itself."""
    a, s = _per_example(alpha, noisy), _per_example(sigma, noisy)
    if prediction_type == "epsilon":
        return (noisy - a * clean) / s
    if prediction_type == "v_prediction":
        return (a * noisy - clean) / s
    if prediction_type == "sample":
        return clean
    raise ValueError(f"unknown prediction_type {prediction_type!r}: use 'epsilon', 'v_prediction' or 'sample'")


def noise_from_clean(clean: torch.Tensor, noisy: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
    """eps = (z_t - alpha_t x0) / sigma_t: the noise a clean-sample prediction implies (Song et al. 2021, eq. 12)."""
    return (noisy - _per_example(alpha, noisy) * clean) / _per_example(sigma, noisy)


def ddim_step(clean: torch.Tensor, noise: torch.Tensor, alpha_next: torch.Tensor, sigma_next: torch.Tensor):
    """One deterministic DDIM step: z_s = alpha_s x0_hat + sigma_s eps_hat (Song et al. 2021, eq. 12 with eta = 0)."""
    return _per_example(alpha_next, clean) * clean + _per_example(sigma_next, noise) * noise


def distillation_target(
    noisy: torch.Tensor,
    teacher_noisy: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    alpha_next: torch.Tensor,
    sigma_next: torch.Tensor,
) -> torch.Tensor:
    """The x-target x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t): one DDIM step
    from z_t with x0 = x~ lands on the teacher's z_t'' after two steps (Salimans & Ho 2022, Algorithm 2)."""
    ratio = _per_example(sigma_next / sigma, noisy)
    return (teacher_noisy - ratio * noisy) / (_per_example(alpha_next, noisy) - ratio * _per_example(alpha, noisy))


def distillation_loss_weights(
    alpha: torch.Tensor, sigma: torch.Tensor, weighting: str, prediction_type: str
) -> torch.Tensor:
    """Per-example weights on the MSE of the student's output that make it the x-space loss weighted by SNR + 1 or by
    max(SNR, 1) ("truncated SNR"), SNR = alpha^2 / sigma^2 (Salimans & Ho 2022, sec. 4): the v-MSE is sigma^2 x-MSE."""
    snr = alpha**2 / sigma**2
    if weighting == "snr_plus_one":
        x_weight = snr + 1
    elif weighting == "truncated_snr":
        x_weight = torch.clamp(snr, min=1.0)
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}: use 'snr_plus_one' or 'truncated_snr'")
    if prediction_type == "v_prediction":
        return x_weight * sigma**2
    if prediction_type == "sample":
        return x_weight
    raise ValueError(f"distillation trains a 'v_prediction' or 'sample' student, not {prediction_type!r}")


# ---------------------------------------------------------------------------------------------------------------------
# flow matching (rectified flow), in diffusers' convention: sigma = 1 is pure noise, sigma = 0 the clean sample.
# Liu et al. 2022 and Esser et al. 2024 (SD3) write the same path with data at t = 0 (SD3) or t = 1 (Liu): sigma = t of
# SD3. Equation numbers are not quoted where they could not be checked offline; sections and formulas are.
# ---------------------------------------------------------------------------------------------------------------------
FLOW_WEIGHTING_SCHEMES = ("uniform", "logit_normal", "mode")
FLOW_LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def rectified_flow_interpolant(clean: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps: the straight path of rectified flow (Esser et al. 2024, sec. 3, "Rectified
    Flow", z_t = (1 - t) x0 + t eps; Liu et al. 2022, eq. 1, X_t = t X_1 + (1 - t) X_0 with time reversed)."""
    s = _per_example(sigmas, clean)
    return (1 - s) * clean + s * noise


def rectified_flow_velocity(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target d x_sigma / d sigma = eps - x0 (Liu et al. 2022, eq. 1: X_1 - X_0 with noise and data
    swapped; Esser et al. 2024, sec. 3, rectified flow's velocity for z_t = (1 - t) x0 + t eps)."""
    return noise - clean


def check_flow_sampling(weighting_scheme: str, mode_scale: float) -> None:
    """Refuse a sigma density that diffusers would silently replace or that leaves [0, 1]."""
    if weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
        # diffusers treats any unknown name as uniform: a typo would silently change the training distribution
        raise ValueError(f"unknown weighting_scheme {weighting_scheme!r}: use one of {FLOW_WEIGHTING_SCHEMES}")
    if weighting_scheme == "mode" and not -1 <= mode_scale <= 2 / (math.pi - 2):
        # outside this range f_mode is not monotone and leaves [0, 1] (Esser et al. 2024, sec. 3.1)
        raise ValueError(f"mode_scale must lie in [-1, 2 / (pi - 2) = 1.75], got {mode_scale}")


def seeded_flow_sigmas(
    generators: list[torch.Generator],
    weighting_scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """sigma in [0, 1] per generator, with the densities of diffusers' compute_density_for_timestep_sampling: uniform,
    logit-normal sigmoid(N(m, s)) (Esser et al. 2024, sec. 3.1, "Logit-Normal Sampling") or f_mode(u) = 1 - u - s
    (cos^2(pi u / 2) - 1 + u) (sec. 3.1, "Mode Sampling with Heavy Tails")."""
    check_flow_sampling(weighting_scheme, mode_scale)
    # One draw from each example's own generator, with the same torch calls diffusers makes for a whole batch from
    # the global RNG, so each example's sigma depends only on its seed (exact resume, N processes = 1).
    if weighting_scheme == "logit_normal":
        u = torch.cat([torch.normal(logit_mean, logit_std, size=(1,), generator=g) for g in generators])
        return torch.sigmoid(u)
    u = torch.cat([torch.rand((1,), generator=g) for g in generators])
    if weighting_scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = shift sigma / (1 + (shift - 1) sigma): more time at high noise for more pixels (Esser et al. 2024, sec.
    5.3.2, resolution-dependent shifting, with shift = sqrt(m / n)); FlowMatchEulerDiscreteScheduler's static shift."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's mu: linear in the image's token count, base_shift at base_seq_len and max_shift at max_seq_len (Flux's
    get_lin_function; diffusers' calculate_shift), extrapolated beyond both."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def time_shift_sigmas(sigmas: torch.Tensor, mu: float, time_shift_type: str = "exponential") -> torch.Tensor:
    """Flux's shift sigma' = e^mu / (e^mu + 1/sigma - 1) (FlowMatchEulerDiscreteScheduler.time_shift, sigma = 1), i.e.
    the static shift of Esser et al. 2024, sec. 5.3.2 with shift = e^mu ("linear": shift = mu)."""
    # Written as shift_sigmas: the same value, without the 1/sigma that is infinite at sigma = 0.
    if time_shift_type == "exponential":
        return shift_sigmas(sigmas, math.exp(mu))
    if time_shift_type == "linear":
        return shift_sigmas(sigmas, mu)
    raise ValueError(f"unknown time_shift_type {time_shift_type!r}: use 'exponential' or 'linear'")


def image_seq_len(latents: torch.Tensor, patch_size: int = 2) -> int:
    """The transformer's image token count: L of packed [B, L, C] latents, (H / p) (W / p) of [B, C, H, W] ones (Flux
    packs 2x2 patches: FluxPipeline passes latents.shape[1] of the packed latents to calculate_shift)."""
    if latents.ndim == 3:
        return latents.shape[1]
    if latents.ndim == 4:
        return (latents.shape[-2] // patch_size) * (latents.shape[-1] // patch_size)
    raise ValueError(f"expected [B, L, C] or [B, C, H, W] latents, got shape {tuple(latents.shape)}")


def flow_loss_weights(sigmas: torch.Tensor, loss_weighting: str) -> torch.Tensor:
    """Per-example weights of the velocity MSE, from diffusers' compute_loss_weighting_for_sd3: 1, sigma^-2
    ("sigma_sqrt") or the CosMap density 2 / (pi (1 - 2 sigma + 2 sigma^2)) (Esser et al. 2024, sec. 3.1, "CosMap")."""
    if loss_weighting not in FLOW_LOSS_WEIGHTINGS:
        # diffusers weights any unknown name by 1: refuse it instead of training unweighted by accident
        raise ValueError(f"unknown loss weighting {loss_weighting!r}: use one of {FLOW_LOSS_WEIGHTINGS}")
    return compute_loss_weighting_for_sd3(loss_weighting, sigmas=sigmas)
