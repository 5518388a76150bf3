"""Progressive distillation (Salimans & Ho 2022): a DDPM/DDIM teacher (any `DDPMPipeline` folder or Hub id) is
distilled into a student that samples in half the steps, and again, e.g. 16 -> 8 -> 4 -> 2 -> 1.

Trains: every parameter of the student, which starts as a copy of the teacher's UNet. Loss: at a timestep t of the
student's N-step grid, the teacher takes two deterministic DDIM steps t -> t' -> t'' (Song et al. 2021, eq. 12,
eta = 0) from z_t; the student's x0 prediction is regressed onto x~, the x0 with which ONE DDIM step t -> t'' lands
exactly on the teacher's z_t'' (Algorithm 2). The student predicts v (default) or x0 and the x-space error is weighted
by SNR + 1 or max(SNR, 1). Saves: `student-<N>-steps/` after every halving (and the last student at the top of the
output folder), each a `DDIMPipeline` folder with a DDIMScheduler set up for the student; `DDIMPipeline` and
`DDPMPipeline.from_pretrained` both load it, and `num_inference_steps=N` samples on exactly the grid it was trained on.

Stages. The one training loop runs halvings x iterations_per_halving optimizer steps; the stage is a function of the
step. When a stage ends (the loop's on_step_end hook after the stage's last step and its EMA update) the finished
student (its EMA when ema.use_ema) is saved as its stage folder, becomes the frozen teacher of the next stage and the
start of the next student; the EMA restarts from it (warm-up included). This follows the paper's Algorithm 2 (student
initialised from the teacher at every halving); the authors' released configs distil without averaging (EMA decay 0),
which is `ema.use_ema: false`. With `optim.lr_scheduler: cosine_with_restarts` and `lr_num_cycles` = halvings the
learning rate restarts and anneals once per stage. Adam's moments carry over from stage to stage.

Timesteps. Everything is in the teacher scheduler's discrete timesteps (alphas_cumprod, T of them). The N-step student
grid is t_i = (i + 1) * (T // N) - 1, i = 0..N-1; every DDIM step goes from t to t - T // N, the last one to t < 0,
which DDIMScheduler maps to `final_alpha_cumprod` (1 with set_alpha_to_one: the step outputs x0). The saved
DDIMScheduler reproduces this exactly: `timestep_spacing="trailing"` when N divides T, otherwise "leading" with
`steps_offset = T // N - 1` (its set_timesteps is checked against the grid at start-up). The teacher's midpoint is
t' = t - T // (2N), on the previous student's grid whenever T // N = 2 * (T // 2N). With T = 1000 that holds for
32 -> 16 and for 8 -> 4 -> 2 -> 1, not for 16 -> 8, which evaluates the distilled 16-step teacher up to 8 timesteps
off its grid (a warning says so; on the digits the 8-step student still ends 0.02 FD from its 16-step teacher). The
original model knows every timestep, so the first halving can start anywhere.

The original teacher steps as its own DDIMScheduler would: x0 clipped to [-1, 1] when its scheduler config says
clip_sample (an epsilon teacher needs it at the top of a cosine schedule, where alpha_t ~ 5e-5 turns any error in eps
into a huge x0), with the raw eps (diffusers' use_clipped_model_output=False). `teacher_clip_snr` limits the clipping
to high noise: at low noise the clamp bends the teacher's step at every pixel that sits at the data's bound (much of
a digit image is background at -1), and no smooth student can copy that kink. Measured on the digits (32 -> 16, 500
iterations): clipping everywhere leaves a loss of 0.085 and a 16-step student at FD 1.22 (1,500 iterations: 1.21);
clipping where SNR < 0.1 gives 0.048 and FD 0.76 (benchmarks/bench_distillation.py, teacher at 50 steps: 0.70).
Distilled teachers never clip: their targets x~ are not images and their pipelines do not clip either.

Student data. `student_data: data` noises training images by q(z_t | x) (Algorithm 2). `student_data: noise` is
data-free: z_t is where the teacher's own deterministic sampler puts pure noise at t (the states the student meets when
sampling); it costs up to N extra teacher evaluations per step, and the dataset then only supplies example seeds.

Resume is exact: the stage follows from the step (each checkpoint records it too, as JSON, and a mismatch is refused),
and a resumed run reloads its teacher from the last saved stage folder (stage 0: the original model).
Every random draw (noise, grid index) comes from the example's seed.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from finetune import atomic, diffusion
from finetune.config import Config, ConfigError, option
from finetune.errors import InputError
from finetune.methods.ddpm_finetune import DDPMFinetune

logger = logging.getLogger(__name__)


@dataclass
class DistillationOptions:
    initial_steps: int = option(
        16,
        "DDIM steps of the teacher's sampler that the first student halves (two teacher steps -> one student step).",
    )
    final_steps: int = option(
        1, "Steps of the last student. initial_steps / final_steps must be a power of two: its log2 is the halvings."
    )
    iterations_per_halving: int | None = option(
        None,
        "Optimizer steps per halving. None: train.max_train_steps / halvings. When set, train.max_train_steps must be "
        "halvings x iterations_per_halving.",
    )
    prediction_type: Literal["v_prediction", "sample"] = option(
        "v_prediction",
        "What the student predicts: v (Salimans & Ho 2022, sec. 4) or x0 ('sample'). An epsilon student cannot take "
        "a step from pure noise.",
    )
    loss_weighting: Literal["snr_plus_one", "truncated_snr"] = option(
        "snr_plus_one", "Weight of the x-space error: SNR + 1, or max(SNR, 1) ('truncated SNR'); Salimans & Ho 2022."
    )
    student_data: Literal["data", "noise"] = option(
        "data",
        "What the student sees at t: training images noised by q(z_t|x) ('data'), or where the teacher's DDIM sampler "
        "takes pure noise ('noise': data-free; the dataset only supplies example seeds).",
    )
    teacher_clip_snr: float | None = option(
        None,
        "When the original teacher's scheduler clips x0 (clip_sample), clip it only at timesteps whose SNR "
        "alpha^2 / sigma^2 is below this, e.g. 0.1 (t > ~800 of a cosine schedule), where an epsilon model's "
        "x0 = (z - sigma eps) / alpha amplifies its errors. Clipping at low noise bends the teacher's steps at every "
        "pixel that lies at the data's bound (the digits' background), a kink the student cannot learn. "
        "None: clip at every timestep, as the teacher's own DDIM sampler does.",
    )

    def __post_init__(self):
        if self.final_steps < 1:
            raise ConfigError(f"distillation.final_steps must be >= 1, got {self.final_steps}")
        ratio = self.initial_steps / self.final_steps
        if self.initial_steps <= self.final_steps or ratio != int(ratio) or int(ratio) & (int(ratio) - 1):
            raise ConfigError(
                f"distillation.initial_steps ({self.initial_steps}) must be final_steps ({self.final_steps}) times a "
                "power of two (2, 4, 8, ...), e.g. initial_steps=16 final_steps=1"
            )
        if self.iterations_per_halving is not None and self.iterations_per_halving < 1:
            raise ConfigError(f"distillation.iterations_per_halving must be >= 1, got {self.iterations_per_halving}")
        if self.teacher_clip_snr is not None and self.teacher_clip_snr <= 0:
            raise ConfigError(f"distillation.teacher_clip_snr must be > 0 (or null), got {self.teacher_clip_snr}")

    @property
    def halvings(self) -> int:
        return int(math.log2(self.initial_steps // self.final_steps))


def student_grid(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """The timesteps an N-step student is trained on, ascending: (i + 1) * (T // N) - 1 for i = 0..N-1."""
    return torch.arange(1, num_steps + 1) * (num_train_timesteps // num_steps) - 1


def student_scheduler(
    base_config: dict, num_steps: int, prediction_type: str, clip_sample: bool = False
) -> DDIMScheduler:
    """A DDIMScheduler whose `set_timesteps(num_steps)` visits exactly `student_grid` (checked), without thresholding
    or (by default) clipping, so that a pipeline with this scheduler takes the steps the student was trained for."""
    T = base_config["num_train_timesteps"]
    if T % num_steps == 0:
        spacing = {"timestep_spacing": "trailing", "steps_offset": 0}
    else:  # "trailing" rounds an uneven grid, which DDIMScheduler.step (t - T // N) would not follow
        spacing = {"timestep_spacing": "leading", "steps_offset": T // num_steps - 1}
    scheduler = DDIMScheduler.from_config(
        base_config, prediction_type=prediction_type, clip_sample=clip_sample, thresholding=False, **spacing
    )
    check = DDIMScheduler.from_config(scheduler.config)
    check.set_timesteps(num_steps)
    expected = student_grid(T, num_steps).flip(0)
    if not torch.equal(check.timesteps.cpu().long(), expected):
        raise RuntimeError(
            f"DDIMScheduler.set_timesteps({num_steps}) gives {check.timesteps.tolist()[:5]}..., not the distillation "
            f"grid {expected.tolist()[:5]}...: this diffusers version spaces timesteps differently"
        )
    return scheduler


class StageProgress:
    """The stage whose teacher is in use. Saved with each checkpoint as JSON (in its trainer_state.json: never a
    pickle, which accelerate's register_for_checkpointing would write and load with weights_only=False)."""

    def __init__(self, teacher_stage: int = 0):
        self.teacher_stage = teacher_stage

    def state_dict(self) -> dict[str, int]:
        return {"teacher_stage": self.teacher_stage}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.teacher_stage = int(state["teacher_stage"])

    @classmethod
    def at_step(cls, step: int, iterations: int, halvings: int) -> StageProgress:
        """The progress after `step` optimizer steps: a stage ends (and the next teacher takes over) at the end of
        its last step."""
        return cls(min(step // iterations, halvings - 1))


class ProgressiveDistillation(DDPMFinetune):
    name = "distillation"
    summary = "progressive distillation (Salimans & Ho 2022) of a DDPMPipeline teacher into few-step DDIM students"
    Options = DistillationOptions

    @classmethod
    def check_config(cls, config: Config) -> None:
        if not config.model.pretrained_model_name_or_path:
            raise ConfigError(
                "model.pretrained_model_name_or_path is required for distillation: the teacher, a DDPMPipeline folder "
                "(e.g. outputs/digits-unconditional from `make demo`) or Hub id (e.g. google/ddpm-celebahq-256)"
            )
        options, diffusion_config, optim = config.method_options, config.diffusion, config.optim
        halvings = options.halvings
        steps = config.train.max_train_steps
        if config.train.num_train_epochs is not None:
            raise ConfigError(
                "train.num_train_epochs: distillation counts optimizer steps per halving; set train.max_train_steps "
                "(or distillation.iterations_per_halving) and remove train.num_train_epochs"
            )
        if options.iterations_per_halving is None:
            if steps % halvings:
                raise ConfigError(
                    f"train.max_train_steps={steps} must be a multiple of the {halvings} halvings "
                    f"({options.initial_steps} -> {options.final_steps} steps), or set "
                    "distillation.iterations_per_halving"
                )
        elif steps != halvings * options.iterations_per_halving:
            raise ConfigError(
                f"train.max_train_steps={steps} must be halvings x iterations_per_halving = {halvings} x "
                f"{options.iterations_per_halving} = {halvings * options.iterations_per_halving}"
            )
        if diffusion_config.prediction_type is not None:
            raise ConfigError(
                "diffusion.prediction_type must stay null for distillation: the teacher's comes from its scheduler; "
                "set the student's with distillation.prediction_type"
            )
        if diffusion_config.snr_gamma is not None or diffusion_config.noise_offset:
            raise ConfigError(
                "diffusion.snr_gamma and diffusion.noise_offset do not apply to distillation; use "
                "distillation.loss_weighting"
            )
        if optim.lr_scheduler == "cosine_with_restarts" and (optim.lr_num_cycles != halvings or optim.lr_warmup_steps):
            raise ConfigError(
                f"with optim.lr_scheduler=cosine_with_restarts set optim.lr_num_cycles={halvings} (the halvings) and "
                f"optim.lr_warmup_steps=0 (got {optim.lr_num_cycles} and {optim.lr_warmup_steps}), so that the "
                "learning rate restarts exactly at the stage boundaries"
            )

    # -- set-up ------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()  # the teacher's pipeline: self.unet (the student, trained) and its noise scheduler
        options = self.options
        self.halvings = options.halvings
        self.iterations = options.iterations_per_halving or self.config.train.max_train_steps // self.halvings
        self.base_scheduler_config = dict(self.noise_scheduler.config)
        self.num_train_timesteps = self.base_scheduler_config["num_train_timesteps"]
        if options.initial_steps > self.num_train_timesteps // 2:
            raise ConfigError(
                f"distillation.initial_steps={options.initial_steps}: the teacher has {self.num_train_timesteps} "
                f"timesteps, so at most {self.num_train_timesteps // 2} teacher steps can be halved"
            )
        if self.base_scheduler_config.get("thresholding"):
            logger.warning(
                "the teacher's scheduler uses dynamic thresholding; distillation steps it with clipping only"
            )
        self.original_teacher = {
            "prediction_type": self.base_scheduler_config.get("prediction_type", "epsilon"),
            "clip_range": self.base_scheduler_config.get("clip_sample_range", 1.0)
            if self.base_scheduler_config.get("clip_sample", True)
            else None,
        }
        self.prediction_type = options.prediction_type  # the student's
        self.teacher = copy.deepcopy(self.unet).requires_grad_(False).eval().to(self.device)
        self.progress = StageProgress()
        self._use_teacher_of(0)
        for stage in range(self.halvings):  # fail now, not after hours, if diffusers cannot reproduce a grid
            student_scheduler(self.base_scheduler_config, self.stage_student_steps(stage), self.prediction_type)

    # -- checkpointed state (the training loop stores it in trainer_state.json) ------------------------------------
    def checkpoint_state(self) -> dict[str, int]:
        return self.progress.state_dict()

    def load_checkpoint_state(self, state: dict[str, int] | None, global_step: int) -> None:
        """The stage follows from the step; the checkpoint's record of it is checked, and a stage after the first
        gets its teacher back from the folder the previous stage's student was saved to."""
        self.progress = StageProgress.at_step(global_step, self.iterations, self.halvings)
        recorded = (state or {}).get("teacher_stage", self.progress.teacher_stage)
        if recorded != self.progress.teacher_stage:
            raise InputError(
                f"the checkpoint at step {global_step} records distillation stage {recorded!r}, but this recipe "
                f"({self.iterations} iterations per halving) puts step {global_step} in stage "
                f"{self.progress.teacher_stage}: resume with the options that wrote it"
            )
        if self.progress.teacher_stage > 0:
            self._load_teacher(self.progress.teacher_stage)

    # -- stages ------------------------------------------------------------------------------------------------------
    def stage_student_steps(self, stage: int) -> int:
        return self.options.initial_steps // 2 ** (stage + 1)

    @property
    def student_steps(self) -> int:
        return self.stage_student_steps(self.progress.teacher_stage)

    def stage_folder(self, output_dir: Path, stage: int) -> Path:
        return Path(output_dir) / f"student-{self.stage_student_steps(stage)}-steps"

    def _use_teacher_of(self, stage: int) -> None:
        """The grid, noise levels and teacher semantics of `stage` (the weights are loaded separately)."""
        steps = self.stage_student_steps(stage)
        scheduler = student_scheduler(self.base_scheduler_config, steps, self.prediction_type)
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        self.final_alpha_cumprod = float(scheduler.final_alpha_cumprod)
        self.grid = student_grid(self.num_train_timesteps, steps)
        self.step_size = self.num_train_timesteps // steps  # one student step: t -> t - step_size
        self.teacher_step_size = self.num_train_timesteps // (2 * steps)  # the teacher's first step: t -> t'
        if stage == 0:
            self.teacher_prediction_type = self.original_teacher["prediction_type"]
            self.teacher_clip_range = self.original_teacher["clip_range"]
        else:  # a distilled student: no clipping, as in its pipeline
            self.teacher_prediction_type, self.teacher_clip_range = self.prediction_type, None
            if self.step_size != 2 * self.teacher_step_size:
                logger.warning(
                    "stage %d (%d -> %d steps): T=%d is not divisible so that the grids nest; the %d-step teacher is "
                    "evaluated up to %d timesteps off the grid it was distilled on",
                    stage,
                    2 * steps,
                    steps,
                    self.num_train_timesteps,
                    2 * steps,
                    steps * (self.step_size - 2 * self.teacher_step_size),
                )

    def on_step_end(self, step: int, ema) -> None:
        """A stage ends at the end of its last step, after the loop's EMA update: the student (its EMA) is saved and
        becomes the next stage's teacher, before the loop logs or checkpoints this step."""
        stage = min(step // self.iterations, self.halvings - 1)
        if stage > self.progress.teacher_stage:
            if stage != self.progress.teacher_stage + 1:
                raise RuntimeError(f"stage {self.progress.teacher_stage} -> {stage}: a stage switch was skipped")
            self._finish_stage(self.progress.teacher_stage, ema)

    def _finish_stage(self, stage: int, ema) -> None:
        """Save the stage's student (its EMA when there is one): the next teacher and the next student's start."""
        parameters = self.trainable_parameters()
        if ema is not None:
            ema.copy_to(parameters)
        if self.accelerator.is_main_process:
            self.save_stage(self.config.train.output_dir)
            logger.info(
                "stage %d done: %d-step student saved to %s",
                stage,
                self.student_steps,
                self.stage_folder(self.config.train.output_dir, stage),
            )
        self.accelerator.wait_for_everyone()
        self.teacher.load_state_dict(self.unwrap(self.unet).state_dict())
        if ema is not None:  # restart the average (and its warm-up) from the new starting point
            for shadow, parameter in zip(ema.shadow_params, parameters):
                shadow.data.copy_(parameter.data)
            ema.optimization_step = 0
        self.progress.teacher_stage = stage + 1
        self._use_teacher_of(stage + 1)

    def _load_teacher(self, stage: int) -> None:
        if stage == 0:
            raise RuntimeError("the original teacher is only loaded at set-up")
        folder = self.stage_folder(self.config.train.output_dir, stage - 1)
        if not (folder / "unet").is_dir():
            raise InputError(
                f"resuming stage {stage} needs the teacher saved when stage {stage - 1} ended, {folder}, which is "
                "missing: resume in the output folder of the run that wrote the checkpoint"
            )
        teacher = UNet2DModel.from_pretrained(folder / "unet")
        self.teacher.load_state_dict(teacher.state_dict())
        self._use_teacher_of(stage)
        logger.info("stage %d: teacher reloaded from %s", stage, folder)

    # -- training ----------------------------------------------------------------------------------------------------
    def alphas_sigmas(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return diffusion.alphas_sigmas_or_final(self.alphas_cumprod, timesteps, self.final_alpha_cumprod)

    @torch.no_grad()
    def teacher_two_steps(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """z_t'' (float64) after two deterministic DDIM steps of the teacher, t -> t' -> t''."""
        z = noisy.double()
        middle, end = timesteps - self.teacher_step_size, timesteps - self.step_size
        for start, stop in ((timesteps, middle), (middle, end)):
            output = self.teacher(z.float(), start).sample.double()
            alpha, sigma = self.alphas_sigmas(start)
            clean, noise = diffusion.prediction_to_clean_and_noise(
                output, z, alpha, sigma, self.teacher_prediction_type
            )
            if self.teacher_clip_range is not None:
                clipped = clean.clamp(-self.teacher_clip_range, self.teacher_clip_range)
                if self.options.teacher_clip_snr is None:
                    clean = clipped
                else:  # clip at high noise only
                    high_noise = (alpha / sigma) ** 2 < self.options.teacher_clip_snr  # [B]
                    clean = torch.where(high_noise.view(-1, *[1] * (clean.ndim - 1)), clipped, clean)
            z = diffusion.ddim_step(clean, noise, *self.alphas_sigmas(stop))
        return z

    @torch.no_grad()
    def teacher_trajectory(self, noise: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Where the teacher's sampler takes pure noise (at the top of the grid) by grid point `indices`."""
        z = noise.double()
        for level in range(len(self.grid) - 1, 0, -1):
            moving = indices < level
            if moving.any():
                timesteps = self.grid.to(z.device)[level].expand(int(moving.sum()))
                z[moving] = self.teacher_two_steps(z[moving], timesteps)
        return z.float()

    def target(self, clean, noise, noisy, timesteps, batch) -> torch.Tensor:
        """The student output whose x0 is x~: one student step from z_t lands where two teacher steps land."""
        z = noisy.double()
        teacher_z = self.teacher_two_steps(noisy, timesteps)
        alpha, sigma = self.alphas_sigmas(timesteps)
        x_target = diffusion.distillation_target(
            z, teacher_z, alpha, sigma, *self.alphas_sigmas(timesteps - self.step_size)
        )
        return diffusion.clean_to_prediction(x_target, z, alpha, sigma, self.prediction_type).float()

    def loss_weights(self, timesteps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        weights = diffusion.distillation_loss_weights(
            *self.alphas_sigmas(timesteps), self.options.loss_weighting, self.prediction_type
        ).float()
        if "loss_weight" in batch:
            weights = weights * batch["loss_weight"].to(weights.device, torch.float32)
        return weights

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:

        # encode: the clean examples (pixels); with student_data=noise only their shape is used
        clean = self.encode(batch).float()

        # sample noise and a point of the student's grid per example, from the example's own seed: identical across
        # resumes and process counts
        generators = diffusion.example_generators(batch["seed"])
        noise = diffusion.seeded_noise(generators, tuple(clean.shape[1:]))
        indices = diffusion.seeded_timesteps(generators, len(self.grid))  # uniform grid index in [0, N)
        noise, indices = noise.to(clean.device), indices.to(clean.device)
        timesteps = self.grid.to(clean.device)[indices]

        # add noise: q(z_t | x) on the data, or the teacher's own sampling trajectory from pure noise
        if self.options.student_data == "data":
            alpha, sigma = self.alphas_sigmas(timesteps)
            noisy = diffusion.ddim_step(clean.double(), noise.double(), alpha, sigma).float()
        else:
            noisy = self.teacher_trajectory(noise, indices)

        # predict v (or x0) with the student; the target comes from two DDIM steps of the frozen teacher
        prediction = self.predict(noisy, timesteps, batch).float()
        target = self.target(clean, noise, noisy, timesteps, batch).float()

        # loss: per-example MSE, weighted to SNR + 1 or truncated SNR in x space, averaged over the batch
        per_example = F.mse_loss(prediction, target, reduction="none").mean(dim=tuple(range(1, prediction.ndim)))
        loss = (per_example * self.loss_weights(timesteps, batch)).mean()
        return loss, {"student_steps": self.student_steps}

    # -- outputs -----------------------------------------------------------------------------------------------------
    def pipeline(self) -> DDIMPipeline:
        scheduler = student_scheduler(self.base_scheduler_config, self.student_steps, self.prediction_type)
        return DDIMPipeline(unet=self.unwrap(self.unet), scheduler=scheduler)

    def inference_steps(self) -> int:
        """Sample grids and evaluation use the current student's own number of steps."""
        return self.student_steps

    def save_stage(self, output_dir: str | Path) -> Path:
        """The current student as `student-<N>-steps/`, written into a staging folder and renamed when complete: the
        next stage's teacher is never read from a half-written folder."""
        folder = self.stage_folder(output_dir, self.progress.teacher_stage)
        then = "resume with checkpoint.resume_from_checkpoint=latest"
        with atomic.staged_folder(folder, then) as staging:
            self.pipeline().save_pretrained(staging, safe_serialization=True)
        return folder

    def save(self, output_dir: Path) -> None:
        self.save_stage(output_dir)
        self.pipeline().save_pretrained(output_dir, safe_serialization=True)

    def card(self) -> dict[str, Any]:
        steps = self.student_steps
        stages = ", ".join(f"`student-{self.stage_student_steps(s)}-steps/`" for s in range(self.halvings))
        return {
            "base_model": self.config.model.pretrained_model_name_or_path,
            "tags": ["unconditional-image-generation", "progressive-distillation"],
            "pipeline_tag": "unconditional-image-generation",
            "description": (
                f"Progressive distillation (Salimans & Ho 2022) of a {self.options.initial_steps}-step DDIM sampler "
                f"into a {steps}-step student, trained with difftune method `distillation`. "
                f"Every halving is saved as its own pipeline folder: {stages}."
            ),
            "usage": f"""
from diffusers import DDIMPipeline

pipe = DDIMPipeline.from_pretrained("OUTPUT_DIR_OR_REPO_ID")  # or a student-<N>-steps folder, with N steps
images = pipe(batch_size=16, num_inference_steps={steps}).images
""",
        }
