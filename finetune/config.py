"""Typed configuration: the dataclass sections of a recipe, with help text and checks.

A leaf: it imports nothing of ours but the errors, so methods, families and the data layer can all use it. Reading a
recipe file and its command-line overrides into these dataclasses (which needs the method registry) is
`finetune.recipe`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune.errors import InputError


class ConfigError(InputError):
    """A recipe or override that cannot be used; the message names the key and says how to fix it."""


def option(default: Any = dataclasses.MISSING, help: str = "", default_factory: Any = dataclasses.MISSING):
    """A dataclass field with help text (shown by `--help`)."""
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ---------------------------------------------------------------------------------------------------------------------
# sections shared by every method
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str | None = option(
        None, "Hub id or local folder of the base model (a diffusers pipeline folder). None: build from scratch."
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the base model.")
    variant: str | None = option(None, "Weights variant to load, e.g. 'fp16' for *.fp16.safetensors.")
    allow_pickle: bool = option(
        False, "Allow loading .bin/.ckpt pickle weights. Off: only safetensors load (pickle files can run code)."
    )
    family: str = option(
        "auto",
        "Model family of the base model: 'auto' (read from its model_index.json), or the one a recipe is written for "
        "('sd' for SD 1.x/2.x, 'sdxl', 'sd3', 'flux'); a base model of another family is then refused with the "
        "recipe to use.",
    )
    vae: str | None = option(
        None,
        "A VAE folder or Hub id that replaces the base model's, e.g. madebyollin/sdxl-vae-fp16-fix (SDXL's own VAE "
        "overflows in fp16: without a fixed VAE it runs in fp32 when mixed precision is fp16).",
    )
    drop_text_encoders: list[str] = option(
        default_factory=list,
        help="Text encoders to leave out where the family's pipeline allows it, e.g. [text_encoder_3] (SD3's T5, "
        "~4.7B parameters): its conditioning is then zeros, in training and in the saved pipeline.",
    )
    quantize: Literal["none", "nf4"] = option(
        "none",
        "Load the frozen denoiser in 4-bit NF4 (bitsandbytes; QLoRA, Dettmers et al. 2023) and train LoRA on top: "
        "FLUX.1-dev's 12B transformer in ~7 GB. LoRA methods only.",
    )


@dataclass
class DataConfig:
    dataset: str = option(
        "digits",
        "'digits' (scikit-learn's bundled 8x8 digits), a local image folder (optionally with metadata.jsonl or .txt "
        "captions), or a Hub dataset id.",
    )
    dataset_config_name: str | None = option(None, "Config name of a Hub dataset.")
    split: str = option("train", "Dataset split to train on.")
    image_column: str = option("image", "Column holding the images.")
    caption_column: str = option("text", "Column holding the captions (text-conditioned methods).")
    label_column: str = option("label", "Column holding integer class labels (class-conditional methods).")
    resolution: int = option(
        16,
        "Training resolution in pixels (images are resized, then cropped to a square; with data.aspect_buckets, to "
        "their bucket of about resolution^2 pixels).",
    )
    center_crop: bool = option(True, "Center crop after resizing (False: random crop).")
    random_flip: bool = option(False, "Randomly flip images horizontally.")
    channels: int | None = option(None, "Image channels (1 or 3). None: 1 for digits, 3 otherwise.")
    max_samples: int | None = option(None, "Use only the first N examples (quick experiments, tests).")
    repeats: int = option(1, "Repeat the dataset N times per epoch (small DreamBooth sets).")
    verify_images: bool = option(True, "Decode every image once at start and skip unreadable ones (with a count).")
    num_workers: int = option(0, "DataLoader worker processes (decode and augment images beside the training step).")
    pin_memory: bool | None = option(
        None, "Page-locked batches, copied to the GPU without blocking. None: on when a CUDA GPU is present."
    )
    persistent_workers: bool = option(
        True, "Keep the data.num_workers workers alive between epochs instead of starting them again each epoch."
    )
    prefetch_factor: int | None = option(None, "Batches each worker prepares ahead (None: torch's default, 2).")
    bad_metadata: Literal["skip", "error"] = option(
        "skip",
        "A bad line of metadata.jsonl/.csv (not JSON, not UTF-8, no file_name, a missing file, a duplicate, a caption "
        "that is not text when the method uses captions) or an unreadable .txt caption: 'skip' it (reported with its "
        "line number and counted), or 'error': stop at the first one.",
    )
    # 'use' by default: kohya's scripts train an image that has no .txt caption (with the empty/default caption), and
    # an image a user put in the folder is meant to be trained on; `datasets`' imagefolder drops it without a word,
    # which is the surprise this replaces. The summary at start names them either way.
    unlisted_images: Literal["use", "skip"] = option(
        "use",
        "Images of a folder that metadata.jsonl/.csv does not list (or, with .txt captions, that have no .txt): "
        "'use' them without a caption (the empty prompt; DreamBooth's instance_prompt), or 'skip' them. Counted and "
        "named in the summary at start.",
    )
    max_image_pixels: int | None = option(
        64_000_000,
        "Largest image (width x height) to train on: a larger JPEG is decoded at 1/2, 1/4 or 1/8 scale when that "
        "brings it under the limit, any other is skipped and counted, never decoded. null: no limit of ours (PIL's "
        "decompression-bomb limit still applies).",
    )
    # aspect-ratio buckets (finetune/buckets.py); kohya's names for the same settings are in the README
    aspect_buckets: bool = option(
        False,
        "Train on aspect-ratio buckets (kohya's --enable_bucket): each image goes to the bucket of about "
        "data.resolution^2 pixels nearest its aspect ratio, is resized to cover it and cropped (data.center_crop), "
        "and every batch holds one bucket. Off: every image is cropped to a data.resolution square.",
    )
    bucket_min_aspect: float = option(
        0.5, "Tallest bucket, as width / height (0.5: 1:2 portrait). At most 1 (the square bucket is always there)."
    )
    bucket_max_aspect: float = option(2.0, "Widest bucket, as width / height (2.0: 2:1 landscape). At least 1.")
    bucket_step: int | None = option(
        None,
        "Bucket sides are multiples of this many pixels (kohya's --bucket_reso_steps). None: what the model family's "
        "latents need (8 px for Stable Diffusion's VAE). Must be a multiple of 8.",
    )
    bucket_no_upscale: bool = option(
        False,
        "Never enlarge an image (kohya's --bucket_no_upscale): one smaller than its bucket gets a smaller bucket of "
        "the same shape, the largest it covers (sides rounded down to data.bucket_step).",
    )
    masked_loss: bool = option(
        False,
        "Weight the loss per pixel by each image's mask (white = the subject, trained; kohya's --masked_loss): a "
        "mask file named in the data.loss_mask_column of metadata, else <name>.mask.png beside the image, else the "
        "image's alpha channel; an image without one trains everywhere. Mask files are not read as training images.",
    )
    loss_mask_column: str = option("mask", "Metadata column naming each image's loss-mask file (data.masked_loss).")
    unmasked_weight: float = option(
        0.0, "Loss weight of the area outside the mask (data.masked_loss): 0 ignores it, 1 turns masking off."
    )
    conditioning_image_column: str = option(
        "conditioning_image",
        "Column holding each image's conditioning image (method controlnet): in a folder's metadata, a path relative "
        "to the folder (e.g. conditioning/0001.png); the files it names, and the subfolders holding them, are not "
        "read as training images.",
    )

    def __post_init__(self):
        if not 0 <= self.unmasked_weight <= 1:
            raise ConfigError(f"data.unmasked_weight must be in [0, 1], got {self.unmasked_weight}")
        if self.masked_loss and self.dataset == "digits":
            raise ConfigError("data.masked_loss needs images with masks: the digits have none (use an image folder)")
        if self.resolution < 8:
            raise ConfigError(f"data.resolution must be at least 8, got {self.resolution}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"data.channels must be 1, 3 or null, got {self.channels}")
        if self.repeats < 1:
            raise ConfigError(f"data.repeats must be >= 1, got {self.repeats}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor is not None and (self.prefetch_factor < 1 or not self.num_workers):
            raise ConfigError(
                f"data.prefetch_factor must be >= 1 and needs data.num_workers > 0, got {self.prefetch_factor} with "
                f"{self.num_workers} workers"
            )
        if self.max_image_pixels is not None and self.max_image_pixels < self.resolution**2:
            raise ConfigError(
                f"data.max_image_pixels must be null or at least data.resolution^2 = {self.resolution**2}, got "
                f"{self.max_image_pixels}"
            )
        if not 0 < self.bucket_min_aspect <= 1:
            raise ConfigError(
                f"data.bucket_min_aspect must be in (0, 1] (width / height of the tallest bucket), got "
                f"{self.bucket_min_aspect}"
            )
        if self.bucket_max_aspect < 1:
            raise ConfigError(
                f"data.bucket_max_aspect must be >= 1 (width / height of the widest bucket), got "
                f"{self.bucket_max_aspect}"
            )
        if self.bucket_step is not None and (self.bucket_step < 8 or self.bucket_step % 8):
            raise ConfigError(f"data.bucket_step must be a multiple of 8 (or null), got {self.bucket_step}")


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adamw8bit"] = option("adamw", "torch AdamW, or bitsandbytes AdamW8bit.")
    adamw_implementation: Literal["auto", "fused", "foreach", "for_loop"] = option(
        "auto",
        "torch AdamW's kernels: 'fused' (one kernel for all parameters; CUDA, and CPU in torch >= 2.4), 'foreach' "
        "(batched per-parameter ops), 'for_loop' (one parameter at a time), or 'auto': fused on a CUDA GPU, foreach "
        "elsewhere (torch's own choice on a CPU is the loop: foreach gives the same weights to the bit, faster).",
    )
    lr: float = option(1e-4, "Peak learning rate.")
    scale_lr: bool = option(False, "Multiply lr by the global batch size (per-process batch x processes x accum).")
    adam_beta1: float = option(0.9, "Adam beta1.")
    adam_beta2: float = option(0.999, "Adam beta2.")
    adam_epsilon: float = option(1e-8, "Adam epsilon.")
    weight_decay: float = option(1e-2, "Decoupled weight decay.")
    max_grad_norm: float | None = option(1.0, "Clip the gradient norm to this value (null: no clipping).")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = option("constant_with_warmup", "LR schedule (diffusers.optimization.get_scheduler).")
    lr_warmup_steps: int = option(0, "Optimizer steps of linear warmup.")
    lr_num_cycles: int = option(1, "Cycles of cosine_with_restarts.")
    lr_power: float = option(1.0, "Power of the polynomial schedule.")

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"optim.lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = option(1000, "Diffusion timesteps (from-scratch models).")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = option(
        "linear", "Noise schedule of from-scratch models ('squaredcos_cap_v2' is the cosine schedule)."
    )
    schedule_shift: float = option(
        1.0,
        "From-scratch models, cosine schedule only: shift its log-SNR by 2 log(shift) (Hoogeboom et al. 2023, "
        "'simple diffusion', who shift by 64 / resolution to add noise for images over 64 px; shift > 1 keeps more "
        "signal at every timestep). On the 16 px digits both 2 and 0.5 scored worse than 1 (README).",
    )
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = option(
        None, "What the model predicts. None: keep the base model's scheduler setting (epsilon from scratch)."
    )
    snr_gamma: float | None = option(None, "Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is usual.")
    noise_offset: float = option(0.0, "Noise offset (per-channel constant added to the noise); 0.05-0.1 is usual.")
    sampler: Literal["ddim", "ddpm"] = option("ddim", "Scheduler used for sample grids and saved pipelines.")
    num_inference_steps: int = option(50, "Sampling steps for sample grids and validation.")
    timestep_spacing: Literal["leading", "trailing", "linspace"] | None = option(
        None,
        "Pixel-space DDPMs: how the saved pipeline's scheduler spaces its sampling steps. 'trailing' starts at the "
        "last training timestep, pure noise (Lin et al. 2023, section 3.3); 'leading' (diffusers' default) starts "
        "T / steps - 1 earlier. None: the scheduler's default.",
    )
    # flow-matching families (SD3, Flux): how sigma is drawn and the loss weighted, as diffusers' scripts name them
    weighting_scheme: Literal["logit_normal", "uniform", "mode"] = option(
        "logit_normal",
        "Flow matching (SD3, Flux): density of the training sigmas (Esser et al. 2024, section 3.1): logit-normal, "
        "uniform, or mode (heavy tails).",
    )
    logit_mean: float = option(0.0, "Flow matching: mean of the logit-normal density.")
    logit_std: float = option(1.0, "Flow matching: standard deviation of the logit-normal density.")
    mode_scale: float = option(1.29, "Flow matching: scale of the mode density.")
    flow_loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = option(
        "none", "Flow matching: per-example loss weighting (diffusers' compute_loss_weighting_for_sd3)."
    )
    guidance_scale: float = option(
        3.5,
        "Guidance-distilled transformers (FLUX.1-dev): the guidance value the transformer is given in training, as "
        "diffusers' train_dreambooth_lora_flux.py (--guidance_scale).",
    )

    def __post_init__(self):
        if self.logit_std <= 0:
            raise ConfigError(f"diffusion.logit_std must be positive, got {self.logit_std}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"diffusion.snr_gamma must be positive or null, got {self.snr_gamma}")
        if self.noise_offset < 0:
            raise ConfigError(f"diffusion.noise_offset must be >= 0, got {self.noise_offset}")
        if self.schedule_shift <= 0:
            raise ConfigError(f"diffusion.schedule_shift must be positive, got {self.schedule_shift}")
        if self.schedule_shift != 1.0 and self.beta_schedule != "squaredcos_cap_v2":
            raise ConfigError(
                f"diffusion.schedule_shift={self.schedule_shift} shifts the cosine schedule only: set "
                f"diffusion.beta_schedule=squaredcos_cap_v2 or leave schedule_shift at 1.0"
            )

    def from_scratch_scheduler_kwargs(self) -> dict:
        """DDPMScheduler arguments of a model trained from scratch; a shifted cosine travels as `trained_betas`, which
        diffusers saves in scheduler_config.json, so every `from_pretrained` samples on the schedule it trained on."""
        kwargs = dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type or "epsilon",
        )
        if self.schedule_shift != 1.0:
            from finetune.diffusion import shifted_cosine_betas

            kwargs["trained_betas"] = shifted_cosine_betas(self.num_train_timesteps, self.schedule_shift).tolist()
        return kwargs


@dataclass
class EMAConfig:
    use_ema: bool = option(False, "Keep an exponential moving average of the trained weights and save it.")
    decay: float = option(0.9999, "Maximum EMA decay.")
    use_ema_warmup: bool = option(True, "Ramp the decay up (1 - (1 + step/inv_gamma)^-power).")
    inv_gamma: float = option(1.0, "EMA warmup inv_gamma.")
    power: float = option(0.75, "EMA warmup power (3/4 suits short runs, 2/3 long ones).")
    update_after_step: int = option(0, "Start averaging after this many optimizer steps.")

    def __post_init__(self):
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"ema.decay must be in (0, 1), got {self.decay}")


@dataclass
class TrainConfig:
    output_dir: str = option("outputs/run", "Folder for checkpoints, samples, logs and the final model.")
    seed: int = option(0, "Seed of everything random: data order, augmentation, noise, init.")
    max_train_steps: int = option(1000, "Optimizer steps to train (unless train.num_train_epochs is set).")
    num_train_epochs: int | None = option(
        None,
        "Train for this many passes over the data instead of train.max_train_steps: the steps are worked out from "
        "the examples, the global batch and the accumulation once the data is read (printed at start).",
    )
    train_batch_size: int = option(16, "Batch size per process.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = option(
        None, "Mixed precision. None: accelerate's setting (launch flag / config file). Trainable weights stay fp32."
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    allow_tf32: bool = option(True, "Allow TF32 matmuls on Ampere+ GPUs.")
    compile: bool = option(
        False,
        "torch.compile the denoiser regionally: each of its repeated blocks (diffusers' compile_repeated_blocks: the "
        "UNet's transformer blocks, Flux's double and single blocks), compiled once and reused, so compile time stays "
        "seconds to a minute; a model without repeated blocks is compiled whole. Pays on a GPU; on a CPU the first "
        "steps are slow.",
    )
    compile_backend: str = option("inductor", "torch.compile backend of train.compile ('inductor', 'aot_eager', ...).")
    compile_mode: str | None = option(
        None, "torch.compile mode of train.compile: None (default), 'max-autotune-no-cudagraphs', 'reduce-overhead'."
    )
    channels_last: bool = option(
        False,
        "Keep the denoiser's convolution weights and activations in channels-last memory order (GPU tensor cores).",
    )
    attention_backend: Literal["auto", "math", "flash", "efficient", "cudnn"] = option(
        "auto",
        "torch's scaled-dot-product attention kernel for the training step: 'auto' (torch picks per call), 'math' "
        "(plain matmuls, any device and dtype), 'flash' (FlashAttention-2: CUDA fp16/bf16, sm80+; also a CPU "
        "kernel), 'efficient' (memory-efficient attention, CUDA), 'cudnn' (cuDNN attention, CUDA sm80+). A kernel the "
        "device cannot run with this mixed precision is refused before the models load.",
    )
    log_every: int = option(10, "Log loss and lr every N optimizer steps.")
    sample_every: int = option(0, "Write a sample grid every N steps (0: only at the end; -1: never).")
    num_samples: int = option(16, "Images in each sample grid (0: no sample grids at all, the final one included).")
    eval_every: int = option(0, "Evaluate samples against real data every N steps (0: off).")
    eval_num_samples: int = option(256, "Images generated for each evaluation.")
    report_to: Literal["auto", "tensorboard", "wandb", "jsonl", "none"] = option(
        "auto",
        "Tracker: 'auto' is tensorboard when installed, otherwise a JSONL log; 'tensorboard' and 'wandb' must be "
        "installed (pip install -e '.[tensorboard]' or '.[wandb]'). train_log.jsonl is always written.",
    )
    tracker_project_name: str = option(
        "difftune",
        "Project name given to the tracker (the wandb project; TensorBoard's run folder under logs/).",
    )
    run_name: str | None = option(
        None, "Name of this run in the tracker (wandb's run name). None: the output folder's name."
    )
    process_group_timeout_s: int = option(
        1800, "Seconds a rank waits for the others (validation, saving) before failing with an error."
    )
    progress_bar: bool = option(True, "Show a tqdm progress bar.")

    def __post_init__(self):
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("log_every", "eval_every", "num_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.num_train_epochs is not None and self.num_train_epochs < 1:
            raise ConfigError(f"train.num_train_epochs must be >= 1 or null, got {self.num_train_epochs}")
        if not self.tracker_project_name.strip():
            raise ConfigError("train.tracker_project_name must not be empty")
        if self.sample_every < -1:
            raise ConfigError(f"train.sample_every must be >= 0, or -1 for no samples, got {self.sample_every}")

    @property
    def samples_on(self) -> bool:
        """Whether any sample grid is written (train.num_samples=0 or train.sample_every=-1 turn them all off)."""
        return self.num_samples > 0 and self.sample_every >= 0


@dataclass
class CheckpointConfig:
    checkpointing_steps: int = option(500, "Save a resumable checkpoint-<step> folder every N steps (0: never).")
    checkpoints_total_limit: int | None = option(None, "Keep at most N checkpoints; older ones are deleted.")
    resume_from_checkpoint: str | None = option(
        None, "'latest' (the newest checkpoint in output_dir, if any) or a checkpoint folder to resume from."
    )

    def __post_init__(self):
        if self.checkpointing_steps < 0:
            raise ConfigError(f"checkpoint.checkpointing_steps must be >= 0, got {self.checkpointing_steps}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError("checkpoint.checkpoints_total_limit must be >= 1 or null")


@dataclass
class HubConfig:
    push_to_hub: bool = option(
        False,
        "Upload the final output folder (checkpoints excluded). The token comes from HF_TOKEN or `hf auth login`.",
    )
    hub_model_id: str | None = option(None, "Repository id, e.g. 'user/my-lora'. None: the output folder's name.")
    private: bool = option(False, "Create the repository as private.")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "diffusion": DiffusionConfig,
    "ema": EMAConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "hub": HubConfig,
}


@dataclass
class Config:
    method: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    method_options: Any = None  # the method's own dataclass, read from the section named after the method

    def to_dict(self) -> dict:
        out = {"method": self.method}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        if self.method_options is not None and dataclasses.fields(self.method_options):
            out[self.method] = dataclasses.asdict(self.method_options)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
