"""Flow-matching maths (finetune.diffusion) and FlowMatchingObjective: the interpolant and velocity, sigma densities
against their closed forms, seeds per example, the shifts against FlowMatchEulerDiscreteScheduler's own sigmas, an
Euler step with the true velocity, and the SD3 loss weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from finetune import diffusion
from finetune.objectives import FlowMatchingObjective

# Flux's scheduler config (black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json): shift is set but unused,
# since use_dynamic_shifting makes the pipeline shift from the image's token count instead.
FLUX_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
# Kolmogorov-Smirnov critical value at alpha = 0.001 is 1.95 / sqrt(n): with fixed seeds a correct sampler passes
# deterministically, while a wrong density (a missing std, a sign, a swapped cos) moves the statistic far beyond it.
KS_CRITICAL = 1.95
N_DRAWS = 4000


def generators_for(seeds) -> list[torch.Generator]:
    return diffusion.example_generators(torch.as_tensor(seeds))


def ks_statistic(samples: torch.Tensor, cdf) -> float:
    """sup |F_n(x) - F(x)| of the samples against a closed-form CDF."""
    x = torch.sort(samples.double()).values
    n = len(x)
    f = cdf(x)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    below = f - torch.arange(0, n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def f_mode(u: torch.Tensor, scale: float) -> torch.Tensor:
    return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def mode_cdf(scale: float):
    """P(sigma <= x) = 1 - f_mode^-1(x), f_mode decreasing on [0, 1]: inverted by bisection."""

    def cdf(x: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.zeros_like(x), torch.ones_like(x)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = f_mode(mid, scale) > x  # f decreasing: the inverse lies right of mid
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 1 - (lo + hi) / 2

    return cdf


# ---------------------------------------------------------------------------------------------------------------------
# interpolant and velocity
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (3, 16, 12), (3, 2, 4, 6, 6)])
def test_interpolant_and_velocity_formulas_broadcast_over_any_latent_rank(shape):
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    sigmas = torch.tensor([0.0, 0.3, 1.0])
    x_t = diffusion.rectified_flow_interpolant(clean, noise, sigmas)
    for i, sigma in enumerate(sigmas.tolist()):
        torch.testing.assert_close(x_t[i], (1 - sigma) * clean[i] + sigma * noise[i])
    torch.testing.assert_close(x_t[0], clean[0])  # sigma = 0 is the data
    torch.testing.assert_close(x_t[2], noise[2])  # sigma = 1 is pure noise
    velocity = diffusion.rectified_flow_velocity(clean, noise)
    torch.testing.assert_close(velocity, noise - clean)
    # the velocity is the derivative of the path in sigma: a finite difference along it recovers it
    step = 1e-3
    moved = diffusion.rectified_flow_interpolant(clean.double(), noise.double(), sigmas.double() + step)
    finite_difference = (moved - x_t.double()) / step
    torch.testing.assert_close(finite_difference, velocity.double(), rtol=1e-4, atol=1e-4)


def test_interpolant_is_the_schedulers_forward_process():
    """FlowMatchEulerDiscreteScheduler.scale_noise (its img2img forward process) gives the same x_sigma at its own
    training timesteps."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    generator = torch.Generator().manual_seed(1)
    clean, noise = torch.randn(4, 16, 8, 8, generator=generator), torch.randn(4, 16, 8, 8, generator=generator)
    indices = torch.tensor([0, 10, 500, 999])
    timesteps = scheduler.timesteps[indices]
    expected = scheduler.scale_noise(clean, timesteps, noise)
    actual = diffusion.rectified_flow_interpolant(clean, noise, scheduler.sigmas[indices])
    torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------------------------------
# sigma densities
# ---------------------------------------------------------------------------------------------------------------------
def test_uniform_sigmas_follow_the_uniform_density():
    sigmas = diffusion.seeded_flow_sigmas(generators_for(range(N_DRAWS)), "uniform")
    assert sigmas.shape == (N_DRAWS,) and ((sigmas >= 0) & (sigmas < 1)).all()
    assert ks_statistic(sigmas, lambda x: x) < KS_CRITICAL / math.sqrt(N_DRAWS)


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.6), (-1.0, 1.5)])
def test_logit_normal_sigmas_follow_their_closed_form(mean, std):
    sigmas = diffusion.seeded_flow_sigmas(
        generators_for(range(N_DRAWS)), "logit_normal", logit_mean=mean, logit_std=std
    )
    logits = torch.logit(sigmas.double())
    # logit(sigma) ~ N(mean, std): its sample mean within 4 standard errors, its CDF within the KS bound
    assert abs(logits.mean().item() - mean) < 4 * std / math.sqrt(N_DRAWS)
    assert abs(logits.std().item() / std - 1) < 0.05
    assert ks_statistic(sigmas, lambda x: normal_cdf((torch.logit(x) - mean) / std)) < KS_CRITICAL / math.sqrt(N_DRAWS)
    # the paper's convention: a positive mean puts more weight on noisy samples (sigma near 1)
    assert (sigmas.mean().item() - 0.5) * mean >= 0


@pytest.mark.parametrize("scale", [1.29, 0.0, -0.5])
def test_mode_sigmas_follow_their_closed_form(scale):
    sigmas = diffusion.seeded_flow_sigmas(generators_for(range(N_DRAWS)), "mode", mode_scale=scale)
    assert ((sigmas >= 0) & (sigmas <= 1)).all()
    assert ks_statistic(sigmas, mode_cdf(scale)) < KS_CRITICAL / math.sqrt(N_DRAWS)


def test_the_ks_check_tells_the_densities_apart():
    """The statistical checks above have power: each density fails the others' closed form, or its own with a wrong
    parameter."""
    seeds = range(N_DRAWS)
    logit_normal = diffusion.seeded_flow_sigmas(generators_for(seeds), "logit_normal")
    mode = diffusion.seeded_flow_sigmas(generators_for(seeds), "mode", mode_scale=1.29)
    bound = KS_CRITICAL / math.sqrt(N_DRAWS)
    assert ks_statistic(logit_normal, lambda x: x) > bound
    assert ks_statistic(mode, lambda x: x) > bound
    assert ks_statistic(logit_normal, lambda x: normal_cdf(torch.logit(x) / 0.8)) > bound  # wrong std
    assert ks_statistic(mode, mode_cdf(0.5)) > bound  # wrong scale


@pytest.mark.parametrize(
    ("scheme", "kwargs"),
    [
        ("uniform", {}),
        ("logit_normal", {"logit_mean": 0.3, "logit_std": 1.2}),
        ("mode", {"mode_scale": 1.29}),
    ],
)
def test_each_examples_sigma_is_diffusers_draw_from_its_own_seed(scheme, kwargs):
    """compute_density_for_timestep_sampling draws a batch from the global RNG; seeded with an example's seed and
    asked for one value, it gives exactly that example's sigma (same torch calls, same order)."""
    seeds = [0, 7, 123456789, 2**40 + 3]
    ours = diffusion.seeded_flow_sigmas(generators_for(seeds), scheme, **kwargs)
    defaults = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}
    for seed, sigma in zip(seeds, ours):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected = compute_density_for_timestep_sampling(
                "none" if scheme == "uniform" else scheme, batch_size=1, **{**defaults, **kwargs}
            )
        assert sigma.item() == expected.item()


def test_unknown_schemes_and_scales_are_refused():
    with pytest.raises(ValueError, match="weighting_scheme"):
        diffusion.seeded_flow_sigmas(generators_for([0]), "logit-normal")
    with pytest.raises(ValueError, match="mode_scale"):
        diffusion.seeded_flow_sigmas(generators_for([0]), "mode", mode_scale=2.0)
    with pytest.raises(ValueError, match="loss weighting"):
        diffusion.flow_loss_weights(torch.tensor([0.5]), "cos_map")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    with pytest.raises(ValueError, match="weighting_scheme"):
        FlowMatchingObjective(scheduler, weighting_scheme="none")
    with pytest.raises(ValueError, match="loss weighting"):
        FlowMatchingObjective(scheduler, loss_weighting="sigma")
    with pytest.raises(ValueError, match="mode_scale"):
        FlowMatchingObjective(scheduler, weighting_scheme="mode", mode_scale=-1.5)
    FlowMatchingObjective(scheduler, weighting_scheme="logit_normal", mode_scale=5.0)  # unused: not refused


# ---------------------------------------------------------------------------------------------------------------------
# seeds per example
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_the_same_seeds_give_the_same_draws_in_any_batch_order_or_split(scheme):
    objective = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(shift=3.0), weighting_scheme=scheme)
    clean = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    seeds = torch.tensor([11, 12, 13, 14, 15, 16])
    x_t, timesteps, noise = objective.noised(clean, seeds)
    assert len(set(timesteps.tolist())) == 6 and not torch.equal(noise[0], noise[1])
    order = torch.tensor([4, 1, 5])
    for part in (order, torch.tensor([0, 2, 3])):
        part_x_t, part_timesteps, part_noise = objective.noised(clean[part], seeds[part])
        assert torch.equal(part_noise, noise[part])
        assert torch.equal(part_timesteps, timesteps[part])
        assert torch.equal(part_x_t, x_t[part])
    other_x_t, other_timesteps, _ = objective.noised(clean, seeds + 100)
    assert not torch.equal(other_timesteps, timesteps) and not torch.equal(other_x_t, x_t)


def test_noised_and_target_match_the_formulas():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    objective = FlowMatchingObjective(scheduler, weighting_scheme="logit_normal", logit_mean=0.2, logit_std=0.9)
    clean = torch.randn(5, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    seeds = torch.arange(5) * 1000
    x_t, timesteps, noise = objective.noised(clean, seeds)

    # each example's generator: sigma first (so it does not depend on the latent shape), then the noise
    generators = diffusion.example_generators(seeds)
    u = torch.sigmoid(torch.cat([torch.normal(0.2, 0.9, (1,), generator=g) for g in generators]))
    expected_noise = torch.stack([torch.randn(clean.shape[1:], generator=g) for g in generators])
    sigmas = 3.0 * u / (1 + 2.0 * u)  # SD3's static shift 3
    assert torch.equal(noise, expected_noise)
    torch.testing.assert_close(timesteps, sigmas * 1000)
    assert timesteps.shape == (5,) and timesteps.dtype == torch.float32
    view = sigmas.view(5, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - view) * clean + view * noise)
    torch.testing.assert_close(objective.target(clean, noise, timesteps), noise - clean)


# ---------------------------------------------------------------------------------------------------------------------
# shifts against FlowMatchEulerDiscreteScheduler
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_static_shift_matches_the_schedulers_sigmas(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    # its training sigmas: the shifted grid t / 1000, t = 1000 ... 1
    grid = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
    torch.testing.assert_close(diffusion.shift_sigmas(grid, shift), scheduler.sigmas)
    # inference sigmas given as FluxPipeline gives them, shifted by set_timesteps (the final 0 appended)
    base = np.linspace(1.0, 1 / 8, 8)
    scheduler.set_timesteps(sigmas=base)
    torch.testing.assert_close(
        diffusion.shift_sigmas(torch.tensor(base, dtype=torch.float32), shift), scheduler.sigmas[:-1]
    )
    # the default schedule: set_timesteps spaces [sigma_max, sigma_min] of the already shifted training sigmas and
    # shifts them again (for shift 3, sigma_min is shift(0.001) before the second shift)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    base = torch.linspace(scheduler.sigma_max, scheduler.sigma_min, 8, dtype=torch.float64)
    scheduler.set_timesteps(8)
    torch.testing.assert_close(diffusion.shift_sigmas(base, shift).float(), scheduler.sigmas[:-1])


@pytest.mark.parametrize("image_seq_len", [16, 256, 1024, 4096, 6000])
def test_resolution_shift_mu_matches_fluxs_calculate_shift(image_seq_len):
    expected = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    assert diffusion.resolution_shift_mu(image_seq_len) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # the end points: base_shift at base_seq_len, max_shift at max_seq_len
    assert diffusion.resolution_shift_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert diffusion.resolution_shift_mu(4096) == pytest.approx(1.15, abs=1e-12)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("image_seq_len", [64, 1024, 4096])
def test_dynamic_shift_matches_the_schedulers_sigmas_with_mu(time_shift_type, image_seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER, time_shift_type=time_shift_type)
    mu = diffusion.resolution_shift_mu(image_seq_len)
    if time_shift_type == "linear":
        mu = mu + 1  # the linear form needs mu > 0 to stay in [0, 1]
    base = np.linspace(1.0, 1 / 10, 10)  # FluxPipeline's default sigmas
    scheduler.set_timesteps(sigmas=base, mu=mu)
    ours = diffusion.time_shift_sigmas(torch.tensor(base, dtype=torch.float64), mu, time_shift_type)
    torch.testing.assert_close(ours.float(), scheduler.sigmas[:-1])
    # and the scheduler's own formula, point by point
    torch.testing.assert_close(ours, scheduler.time_shift(mu, 1.0, torch.tensor(base, dtype=torch.float64)))


def test_image_seq_len_of_packed_and_unpacked_latents():
    latents = torch.zeros(2, 16, 32, 24)
    packed = FluxPipeline._pack_latents(latents, 2, 16, 32, 24)
    assert diffusion.image_seq_len(packed) == packed.shape[1] == 16 * 12
    assert diffusion.image_seq_len(latents, patch_size=2) == 16 * 12
    assert diffusion.image_seq_len(latents, patch_size=1) == 32 * 24
    with pytest.raises(ValueError, match="latents"):
        diffusion.image_seq_len(torch.zeros(2, 3))


def test_objective_shifts_as_its_scheduler_does():
    """SD3 (static shift 3), Flux without dynamic shift (the scheduler's own training sigmas are unshifted), and Flux
    with the shift of the latents' token count, packed or not, or of an explicit image_seq_len."""
    seeds = torch.arange(8)
    u = torch.sigmoid(torch.cat([torch.normal(0.0, 1.0, (1,), generator=g) for g in generators_for(seeds)]))
    latents = torch.zeros(8, 16, 32, 32)
    packed = FluxPipeline._pack_latents(latents, 8, 16, 32, 32)  # [8, 256, 64]

    def sigmas_of(objective, clean):
        return objective.noised(clean, seeds)[1] / 1000

    sd3 = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(shift=3.0))
    torch.testing.assert_close(sigmas_of(sd3, latents), diffusion.shift_sigmas(u, 3.0))
    flux = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    torch.testing.assert_close(sigmas_of(FlowMatchingObjective(flux), packed), u)

    dynamic = FlowMatchingObjective(flux, dynamic_shift=True)
    expected = diffusion.time_shift_sigmas(u, diffusion.resolution_shift_mu(256))
    torch.testing.assert_close(sigmas_of(dynamic, packed), expected)
    torch.testing.assert_close(sigmas_of(dynamic, latents), expected)  # 32x32 latents in 2x2 patches: 256 tokens
    assert not torch.allclose(expected, u) and not torch.allclose(expected, diffusion.shift_sigmas(u, 3.0))
    fixed = FlowMatchingObjective(flux, dynamic_shift=True, image_seq_len=4096)
    torch.testing.assert_close(sigmas_of(fixed, packed), diffusion.time_shift_sigmas(u, 1.15))
    # a larger image is shifted towards noise
    assert (sigmas_of(fixed, packed) > sigmas_of(dynamic, packed)).all()


# ---------------------------------------------------------------------------------------------------------------------
# sampling: an Euler step with the true velocity stays on the path
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler_kwargs", [{"shift": 3.0}, FLUX_SCHEDULER])
def test_an_euler_step_with_the_true_velocity_lands_on_the_interpolant(scheduler_kwargs):
    scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_kwargs)
    if scheduler.config.use_dynamic_shifting:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=diffusion.resolution_shift_mu(1024))
    else:
        scheduler.set_timesteps(6)
    generator = torch.Generator().manual_seed(4)
    clean, noise = torch.randn(2, 16, 8, 8, generator=generator), torch.randn(2, 16, 8, 8, generator=generator)
    velocity = diffusion.rectified_flow_velocity(clean, noise)
    for index, timestep in enumerate(scheduler.timesteps):
        sample = diffusion.rectified_flow_interpolant(clean, noise, scheduler.sigmas[index].expand(2))
        stepped = scheduler.step(velocity, timestep, sample, return_dict=False)[0]
        expected = diffusion.rectified_flow_interpolant(clean, noise, scheduler.sigmas[index + 1].expand(2))
        torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stepped, clean, rtol=1e-5, atol=1e-5)  # the last step ends at sigma = 0: the data


# ---------------------------------------------------------------------------------------------------------------------
# loss weights
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_weighting", ["sigma_sqrt", "cosmap"])
def test_loss_weights_agree_with_compute_loss_weighting_for_sd3(loss_weighting):
    objective = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(shift=3.0), loss_weighting=loss_weighting)
    clean = torch.zeros(6, 4, 8, 8)
    _, timesteps, _ = objective.noised(clean, torch.arange(6))
    sigmas = timesteps / 1000
    weights = objective.loss_weights(timesteps)
    assert weights.shape == (6,)
    torch.testing.assert_close(weights, compute_loss_weighting_for_sd3(loss_weighting, sigmas=sigmas))
    closed_form = sigmas**-2 if loss_weighting == "sigma_sqrt" else 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    torch.testing.assert_close(weights, closed_form)


def test_no_loss_weighting_is_none():
    objective = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert objective.loss_weights(torch.tensor([500.0, 20.0])) is None
    torch.testing.assert_close(diffusion.flow_loss_weights(torch.tensor([0.2, 0.9]), "none"), torch.ones(2))


def test_cosmap_weight_is_the_density_of_cosmap_sampling():
    """Weighting by cosmap equals sampling sigma = 1 - 1 / (tan(pi u / 2) + 1) (Esser et al. 2024, sec. 3.1): the
    weight is du/dsigma of that map's inverse u = (2 / pi) atan(sigma / (1 - sigma))."""
    sigmas = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    step = 1e-6

    def inverse(s):
        return 2 / math.pi * torch.atan(s / (1 - s))

    density = (inverse(sigmas + step) - inverse(sigmas - step)) / (2 * step)
    torch.testing.assert_close(diffusion.flow_loss_weights(sigmas, "cosmap"), density, rtol=1e-6, atol=1e-6)
