"""What a method is: which parameters train, the loss, how it samples, what is saved.

The training loop (`finetune.train`) only talks to this interface, so a new method is one file with one subclass and
one recipe. `DenoisingMethod` holds the standard diffusion objective shared by every denoiser; a method supplies how
a batch is encoded (pixels or latents), how the model is called, and what it saves.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator

from finetune.config import Config
from finetune.objectives import DDPMObjective, batch_weights, combined_weights, weighted_mse


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Dropout and LoRA dropout off while sampling; each module's own mode comes back afterwards."""
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)


@dataclass
class NoOptions:
    """This method has no options of its own."""


class Method:
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    @classmethod
    def model_subfolders(cls, config: Config) -> tuple[str, ...]:
        """The subfolders a base pipeline folder must have for this method (checked before anything loads)."""
        return ()

    @classmethod
    def check_config(cls, config: Config) -> None:
        """Reject option combinations this method cannot run, before anything loads. Raise ConfigError."""

    def __init__(self, config: Config, accelerator: Accelerator):
        self.config = config
        self.options = config.method_options
        self.accelerator = accelerator
        self.device = accelerator.device
        # frozen parts run in the mixed-precision dtype; trainable parameters stay fp32
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            accelerator.mixed_precision, torch.float32
        )
        self.train_dataset = None

    # -- set-up ------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Check the inputs (cheap checks first), load the models, build `self.train_dataset` (a TrainingExamples)."""
        raise NotImplementedError

    def data_source(self):
        """The training data, read and checked without loading any model (`difftune train --dry-run`): the source
        that setup() wraps in TrainingExamples."""
        build = getattr(self, "build_source", None)
        if build is not None:
            return build()
        from finetune.data import build_image_source

        return build_image_source(self.config.data)

    def plan_lines(self) -> list[str]:
        """What this method will do before training, for `--dry-run`, after data_source(): e.g. class images to
        generate. One line each."""
        return []

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """Attribute name -> module holding the trained parameters; the loop wraps them with accelerator.prepare."""
        raise NotImplementedError

    def use_prepared_modules(self, modules: dict[str, torch.nn.Module]) -> None:
        for attribute, module in modules.items():
            setattr(self, attribute, module)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for module in self.trainable_modules().values() for p in module.parameters() if p.requires_grad]

    def parameter_groups(self, lr_scale: float = 1.0) -> list[dict[str, Any]]:
        """The optimizer's parameter groups; a group may set its own `lr` (times `lr_scale`, optim.scale_lr's factor).
        One group at optim.lr by default."""
        return [{"params": self.trainable_parameters()}]

    def compute_modules(self) -> list[torch.nn.Module]:
        """The modules that do most of a step's work, where train.compile and train.channels_last apply (the
        denoiser); by default the trained ones. Called after setup(), before accelerator.prepare."""
        return list(self.trainable_modules().values())

    def before_training(self, ema: Any | None) -> None:
        """Work done once after the models are prepared, e.g. caching latents. Runs on every process. `ema` is the
        loop's average of the trainable parameters (diffusers EMAModel; None without ema.use_ema)."""

    # -- training ----------------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """After optimizer step number `step` (1-based), before the EMA sees the weights: fix-ups such as restoring
        embedding rows that must not change."""

    def on_step_end(self, step: int, ema: Any | None) -> None:
        """After step `step` and its EMA update, before logs, samples and checkpoints: what a method does between
        steps with the loop's knowledge (a distillation stage ends, its student becomes the teacher)."""

    def checkpoint_state(self) -> dict | None:
        """The method's own progress to keep in each checkpoint (JSON in trainer_state.json, never a pickle)."""
        return None

    def load_checkpoint_state(self, state: dict | None, step: int) -> None:
        """Restore what checkpoint_state() returned (None: the checkpoint has none) when resuming at `step`."""

    # -- outputs -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, num_images: int, seed: int) -> list:
        """A list of PIL images for sample grids and validation. Runs on the main process."""
        raise NotImplementedError

    def sample_labels(self, num_images: int) -> list[str] | None:
        """What image i of `sample` shows (its prompt, its class), written under its row of the sample grid; None:
        the images have no labels (unconditional)."""
        return None

    def evaluate(self, num_images: int, seed: int) -> dict[str, float] | None:
        """Metrics of generated images against real ones, or None where this method has no evaluator."""
        return None

    def save(self, output_dir: Path) -> None:
        """Write the final artifacts (in formats diffusers loads). Main process, EMA weights swapped in."""
        raise NotImplementedError

    def card(self) -> dict[str, Any]:
        """Model-card facts: base_model, tags, how to load (`usage`), trigger words."""
        return {}

    def options_dict(self) -> dict:
        return dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else {}

    def unwrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(module)


class DenoisingMethod(Method):
    """The pixel-space diffusion objective: a model learns to predict noise (or v, or x0) from noised examples (the
    text-to-image methods take theirs from the model family instead, finetune/text_to_image.py).

    Subclasses set `self.noise_scheduler` and `self.prediction_type` in setup() and implement `encode` and `predict`.
    """

    noise_scheduler: Any
    prediction_type: str = "epsilon"

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        """The clean examples x0 in the space the model denoises: pixels, or VAE latents."""
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The model's output for noised inputs, with whatever conditioning the batch carries."""
        raise NotImplementedError

    @property
    def objective(self) -> DDPMObjective:
        """The DDPM objective of this method's noise scheduler and prediction type (with diffusion.snr_gamma)."""
        diffusion_config = self.config.diffusion
        return DDPMObjective(
            self.noise_scheduler, self.prediction_type, diffusion_config.snr_gamma, diffusion_config.noise_offset
        )

    def target(self, clean, noise, noisy, timesteps, batch) -> torch.Tensor:
        """What the model output is regressed onto (distillation replaces this with the teacher's target)."""
        return self.objective.target(clean, noise, timesteps)

    def loss_weights(self, timesteps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor | None:
        """Per-example loss weights: min-SNR-gamma when configured, times any weight the batch carries."""
        return combined_weights(self.objective.loss_weights(timesteps), batch_weights(batch))

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        # encode: images -> the space the model denoises (pixels)
        clean = self.encode(batch).float()

        # add noise: q(x_t | x_0) at a timestep, both drawn from the example's own seed (identical across resumes
        # and process counts)
        noisy, timesteps, noise = self.objective.noised(clean, batch["seed"])

        # predict the noise (or v, or x0) with the model, conditioned as the method requires
        prediction = self.predict(noisy, timesteps, batch)
        target = self.target(clean, noise, noisy, timesteps, batch)

        # loss: per-example MSE, weighted (min-SNR, the batch's own weights), averaged over the batch
        return weighted_mse(prediction, target, self.loss_weights(timesteps, batch)), {}
