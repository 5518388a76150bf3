"""Progressive distillation: the x~ target maths, the student grid against DDIMScheduler, and tiny stages end to end
(both stage folders load and sample; a resumed run equals an uninterrupted one)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler
from safetensors.torch import load_file

from finetune import diffusion
from finetune.config import ConfigError
from finetune.methods.distillation import student_grid, student_scheduler
from finetune.recipe import load_config
from tests.helpers import assert_same_tensors, reset_accelerate, run_training, safetensors_in, tiny_ddpm_recipe
from tests.tiny_models import make_tiny_ddpm_pipeline

COSINE = dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").config)


def alphas_sigmas(scheduler, timesteps):
    return diffusion.alphas_sigmas_or_final(scheduler.alphas_cumprod, timesteps, scheduler.final_alpha_cumprod)


@pytest.mark.parametrize("teacher_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("student_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("num_steps", [1, 4, 16])
def test_one_student_step_equals_two_teacher_steps(teacher_type, student_type, num_steps):
    """For random z_t and random teacher outputs, a student DDIM step t -> t'' taking x~ as its x0 (through the
    student's own output parametrisation) lands on the teacher's two DDIM steps t -> t' -> t'', the last step too."""
    scheduler = student_scheduler(COSINE, num_steps, student_type)
    generator = torch.Generator().manual_seed(num_steps)
    step = 1000 // num_steps
    timesteps = student_grid(1000, num_steps).repeat(2)  # every grid point, the last step to t < 0 included
    shape = (len(timesteps), 3, 4, 4)
    z = torch.randn(shape, generator=generator, dtype=torch.float64)
    middle, end = timesteps - step // 2, timesteps - step

    teacher_z = z
    for start, stop in ((timesteps, middle), (middle, end)):
        output = torch.randn(shape, generator=generator, dtype=torch.float64)
        clean, noise = diffusion.prediction_to_clean_and_noise(
            output, teacher_z, *alphas_sigmas(scheduler, start), teacher_type
        )
        teacher_z = diffusion.ddim_step(clean, noise, *alphas_sigmas(scheduler, stop))

    alpha, sigma = alphas_sigmas(scheduler, timesteps)
    alpha_end, sigma_end = alphas_sigmas(scheduler, end)
    x_target = diffusion.distillation_target(z, teacher_z, alpha, sigma, alpha_end, sigma_end)
    student_output = diffusion.clean_to_prediction(x_target, z, alpha, sigma, student_type)
    clean, noise = diffusion.prediction_to_clean_and_noise(student_output, z, alpha, sigma, student_type)
    student_z = diffusion.ddim_step(clean, noise, alpha_end, sigma_end)
    torch.testing.assert_close(student_z, teacher_z, rtol=1e-9, atol=1e-9)
    # with set_alpha_to_one the last step ends at sigma = 0: the target is the teacher's result itself
    last = end < 0
    assert last.any() and (sigma_end[last] == 0).all()
    torch.testing.assert_close(x_target[last], teacher_z[last], rtol=1e-12, atol=1e-12)


def test_loss_weights_are_snr_plus_one_and_truncated_snr_in_x_space():
    alpha = torch.tensor([0.1, 0.6, 0.95], dtype=torch.float64)
    sigma = (1 - alpha**2).sqrt()
    snr = alpha**2 / sigma**2
    # the v error is sigma x the x error: (SNR + 1) sigma^2 = 1, max(SNR, 1) sigma^2 = max(alpha^2, sigma^2)
    torch.testing.assert_close(
        diffusion.distillation_loss_weights(alpha, sigma, "snr_plus_one", "v_prediction"), torch.ones(3).double()
    )
    torch.testing.assert_close(
        diffusion.distillation_loss_weights(alpha, sigma, "truncated_snr", "v_prediction"),
        torch.maximum(alpha**2, sigma**2),
    )
    torch.testing.assert_close(diffusion.distillation_loss_weights(alpha, sigma, "snr_plus_one", "sample"), snr + 1)
    torch.testing.assert_close(
        diffusion.distillation_loss_weights(alpha, sigma, "truncated_snr", "sample"), snr.clamp(min=1)
    )


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 16, 32, 64])
def test_saved_scheduler_steps_on_the_training_grid(num_steps):
    """DDIMScheduler.set_timesteps(N) visits exactly the student grid, and each of its steps (the last one to
    final_alpha_cumprod included) is the (alpha, sigma) DDIM step the training maths takes."""
    scheduler = student_scheduler(COSINE, num_steps, "v_prediction")
    scheduler.set_timesteps(num_steps)
    grid = student_grid(1000, num_steps)
    assert scheduler.timesteps.tolist() == grid.flip(0).tolist()
    generator = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps:
        z, v = torch.randn(2, 1, 2, 4, 4, generator=generator)
        stepped = scheduler.step(v, t, z).prev_sample
        alpha, sigma = alphas_sigmas(scheduler, t.view(1))
        clean, noise = diffusion.prediction_to_clean_and_noise(v.double(), z.double(), alpha, sigma, "v_prediction")
        expected = diffusion.ddim_step(clean, noise, *alphas_sigmas(scheduler, t.view(1) - 1000 // num_steps))
        torch.testing.assert_close(stepped.double(), expected, rtol=1e-5, atol=1e-5)


def distillation_recipe(tmp_path, teacher, name="run", **sections):
    recipe = tiny_ddpm_recipe(
        tmp_path / name,
        method="distillation",
        model={"pretrained_model_name_or_path": str(teacher)},
        optim={"lr": 1e-3, "lr_scheduler": "cosine_with_restarts", "lr_num_cycles": 2},
        train={"max_train_steps": 6, "num_samples": 2},
    )
    recipe["distillation"] = {"initial_steps": 4, "final_steps": 1}
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_ddpm_pipeline(tmp_path_factory.mktemp("teacher") / "ddpm", resolution=8)


EMA = {"use_ema": True, "decay": 0.9}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, teacher):
    """4 -> 2 -> 1 steps, 3 iterations per halving, EMA on, a checkpoint after every step."""
    recipe = distillation_recipe(
        tmp_path_factory.mktemp("straight"), teacher, checkpoint={"checkpointing_steps": 1}, ema=EMA
    )
    return run_training(recipe)


def test_two_halvings_save_pipelines_that_load_and_sample(straight_run, teacher):
    out = straight_run
    teacher_unet = DDPMPipeline.from_pretrained(teacher).unet
    for steps in (2, 1):
        folder = out / f"student-{steps}-steps"
        for pipeline_class in (DDIMPipeline, DDPMPipeline):
            pipe = pipeline_class.from_pretrained(folder)
            assert isinstance(pipe.scheduler, DDIMScheduler)
            assert pipe.scheduler.config.prediction_type == "v_prediction" and not pipe.scheduler.config.clip_sample
            images = pipe(batch_size=2, num_inference_steps=steps, generator=torch.manual_seed(0), output_type="np")
            assert images.images.shape == (2, 8, 8, 1) and np.isfinite(images.images).all()
            assert pipe.scheduler.timesteps.tolist() == student_grid(1000, steps).flip(0).tolist()
        moved = [
            (p - dict(teacher_unet.named_parameters())[n]).abs().max().item()
            for n, p in DDIMPipeline.from_pretrained(folder).unet.named_parameters()
        ]
        assert max(moved) > 0, f"the {steps}-step student did not train"
    # a stage's result is the student's EMA at the end of the stage
    names = [name for name, _ in teacher_unet.named_parameters()]
    saved = load_file(str(out / "student-2-steps" / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(out / "checkpoint-3" / "ema.safetensors"))
    for i, name in enumerate(names):
        torch.testing.assert_close(saved[name], ema[f"shadow.{i}"], rtol=0, atol=0)
    final = DDIMPipeline.from_pretrained(out)
    assert_same_tensors(safetensors_in(out / "unet"), safetensors_in(out / "student-1-steps" / "unet"))
    assert final(batch_size=1, num_inference_steps=1, output_type="np").images.shape == (1, 8, 8, 1)
    assert "num_inference_steps=1" in (out / "README.md").read_text()


@pytest.mark.parametrize("resume_at", [3, 4])  # 3: the checkpoint of the step that ended stage 1; 4: inside stage 2
def test_resume_equals_uninterrupted_run(tmp_path, teacher, straight_run, resume_at):
    # an interrupted run: what the straight run had written by the checkpoint (stage 1 ends with step 3, and its
    # student is saved before that step's checkpoint)
    resumed_dir = tmp_path / "run"
    shutil.copytree(straight_run / f"checkpoint-{resume_at}", resumed_dir / f"checkpoint-{resume_at}")
    shutil.copytree(straight_run / "student-2-steps", resumed_dir / "student-2-steps")
    recipe = distillation_recipe(
        tmp_path, teacher, checkpoint={"checkpointing_steps": 0, "resume_from_checkpoint": "latest"}, ema=EMA
    )
    resumed = run_training(recipe)
    assert resumed == resumed_dir
    for folder in ("student-2-steps", "student-1-steps", "unet"):
        assert_same_tensors(safetensors_in(resumed / folder), safetensors_in(straight_run / folder), atol=0)


@pytest.mark.parametrize("clip_snr", [None, 0.1])
def test_the_first_teacher_steps_as_its_own_ddim_sampler(tmp_path, teacher, clip_snr):
    """The original (epsilon, clip_sample) teacher's two steps are two steps of its own DDIMScheduler on the 2N grid,
    x0 clipped at every step, or with teacher_clip_snr only at the steps whose SNR is below it."""
    from accelerate import Accelerator

    from finetune.methods import get_method_class

    reset_accelerate()
    recipe = distillation_recipe(tmp_path, teacher)
    recipe["distillation"].update(teacher_clip_snr=clip_snr)  # 4 -> 2 -> 1: the first teacher steps the 4-step grid
    method = get_method_class("distillation")(load_config(recipe), Accelerator(cpu=True))
    method.setup()
    pipe = DDPMPipeline.from_pretrained(teacher)
    assert pipe.scheduler.config.clip_sample and pipe.scheduler.config.prediction_type == "epsilon"
    schedulers = {}
    for clip in (True, False):
        schedulers[clip] = student_scheduler(dict(pipe.scheduler.config), 4, "epsilon", clip_sample=clip)
        schedulers[clip].set_timesteps(4)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    clipped_steps = 0
    for t in student_grid(1000, 2):  # 499 and 999; the teacher steps t -> t - 250 -> t - 500
        expected = z
        for start in (t, t - 250):
            alpha, sigma = alphas_sigmas(schedulers[True], start.view(1))
            clip = clip_snr is None or (alpha / sigma).item() ** 2 < clip_snr
            clipped_steps += clip
            with torch.no_grad():
                expected = schedulers[clip].step(pipe.unet(expected, start).sample, start, expected).prev_sample
        stepped = method.teacher_two_steps(z, t.repeat(2)).float()
        torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)
    # with SNR < 0.1 (the tiny teacher's linear schedule) the steps from t = 999, 749 and 499 clip, from 249 not
    assert clipped_steps == 4 if clip_snr is None else 0 < clipped_steps < 4
    # and the clipping matters here: stepping unclipped everywhere lands elsewhere
    with torch.no_grad():
        unclipped = schedulers[False].step(pipe.unet(z, 999).sample, 999, z).prev_sample
        clipped = schedulers[True].step(pipe.unet(z, 999).sample, 999, z).prev_sample
    assert not torch.allclose(unclipped, clipped, atol=1e-3)


def test_data_free_students_train_from_the_teachers_own_samples(tmp_path, teacher):
    recipe = distillation_recipe(tmp_path, teacher, train={"max_train_steps": 2})
    recipe["distillation"].update(student_data="noise", initial_steps=8, final_steps=4, prediction_type="sample")
    recipe["optim"].update(lr_scheduler="constant")
    out = run_training(recipe)
    pipe = DDPMPipeline.from_pretrained(out / "student-4-steps")
    assert pipe.scheduler.config.prediction_type == "sample"
    assert np.isfinite(pipe(batch_size=1, num_inference_steps=4, output_type="np").images).all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distillation.initial_steps=12"], "must be final_steps (1) times a power of two"),
        (["train.max_train_steps=7"], "must be a multiple of the 2 halvings"),
        (["distillation.iterations_per_halving=2"], "must be halvings x iterations_per_halving = 2 x 2 = 4"),
        (["diffusion.prediction_type=epsilon"], "diffusion.prediction_type must stay null"),
        (["optim.lr_num_cycles=3"], "optim.lr_num_cycles=2"),
        (["distillation.prediction_type=epsilon"], "is not one of ['v_prediction', 'sample']"),
        (["distillation.teacher_clip_snr=0"], "teacher_clip_snr must be > 0"),
    ],
)
def test_bad_settings_are_rejected_before_anything_loads(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(distillation_recipe(tmp_path, tmp_path / "absent"), overrides)
    assert message in str(err.value)
