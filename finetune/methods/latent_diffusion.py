"""Latent diffusion from scratch (Rombach et al. 2022): a text-conditioned UNet on a trained autoencoder's latents.

Trains: a new `UNet2DConditionModel` on the scaled latents of an `AutoencoderKL` (`vae`: the `autoencoder` method's
output, or any pipeline's VAE), conditioned through cross-attention on a CLIP text encoder: a new one built from
the text_* options with the given tokenizer (trained with the UNet, or frozen at its random initialisation), or a
pretrained one. Loss: the family's diffusion objective (DDPM) on latents. Saves: a complete
`StableDiffusionPipeline` folder that plain diffusers loads and samples, and that every fine-tuning method here
(LoRA, DreamBooth, Textual Inversion) takes as its base model.

On the embedded digits the captions are written from each image's label with `caption_templates` ("a handwritten
digit seven", "the number seven", ...; a template without '{}' is a generic caption), and `holdout_digits` keeps
whole classes out of training: the miniature model of `finetune/recipes/digits_text_to_image.yaml`, on which
`benchmarks/bench_digits_finetune.py` measures what each fine-tuning method teaches.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.config import Config, ConfigError, option
from finetune.data import build_image_source
from finetune.digits import DIGIT_NAMES
from finetune.families import get_family
from finetune.methods.autoencoder import load_autoencoder
from finetune.methods.base import eval_mode
from finetune.text_to_image import TextToImageMethod, TextToImageOptions

logger = logging.getLogger(__name__)

DIGIT_CAPTION_TEMPLATES = [
    "a handwritten digit {}",
    "a drawing of the number {}",
    "the digit {}",
    "a picture of a handwritten {}",
    "the number {}, handwritten",
    "a handwritten digit",
]


@dataclass
class LatentDiffusionOptions(TextToImageOptions):
    vae: str | None = option(
        None,
        "The autoencoder: an AutoencoderKL folder (the 'autoencoder' method's output) or a pipeline folder / Hub id "
        "with a 'vae' subfolder. Required.",
    )
    tokenizer: str = option(
        "openai/clip-vit-large-patch14",
        "CLIPTokenizer folder or Hub id (a pipeline folder's 'tokenizer' subfolder is found too).",
    )
    text_encoder: str | None = option(
        None,
        "A pretrained CLIPTextModel (folder or Hub id, or a pipeline's). None: a new one from the text_* options.",
    )
    max_text_length: int | None = option(
        None,
        "Prompt length in tokens (the tokenizer's model_max_length, saved with it, and a new text encoder's "
        "positions). None: the tokenizer's own (CLIP: 77). Short captions train several times faster with 16.",
    )
    train_text_encoder: bool = option(True, "Train the text encoder with the UNet (False: keep it frozen).")
    text_hidden_size: int = option(64, "Width of a new text encoder (also the UNet's cross-attention width).")
    text_layers: int = option(2, "Transformer layers of a new text encoder.")
    text_heads: int = option(4, "Attention heads of a new text encoder.")
    text_intermediate_size: int = option(256, "MLP width of a new text encoder.")
    block_out_channels: list[int] = option(
        default_factory=lambda: [64, 128], help="UNet channels per resolution level (each halves the latent size)."
    )
    layers_per_block: int = option(1, "UNet ResNet layers per level.")
    attention_head_dim: int = option(8, "UNet attention head width.")
    norm_num_groups: int = option(32, "UNet GroupNorm groups (must divide every channel count).")
    cross_attention_levels: list[bool] | None = option(
        None, "Which UNet levels (down, from the top) have cross-attention. None: all of them."
    )
    caption_templates: list[str] = option(
        default_factory=lambda: list(DIGIT_CAPTION_TEMPLATES),
        help="Digits only: captions written from each image's label, '{}' marking the digit's name ('seven'); one "
        "is drawn per example. A template without '{}' is a generic caption.",
    )
    holdout_digits: list[int] = option(
        default_factory=list, help="Digits only: classes kept out of training entirely (e.g. [9])."
    )

    def __post_init__(self):
        TextToImageOptions.__post_init__(self)
        if not self.vae:
            raise ConfigError(
                "latent_diffusion.vae is required: an AutoencoderKL folder, e.g. the output of "
                "finetune/recipes/digits_autoencoder.yaml"
            )
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(
                f"latent_diffusion.norm_num_groups={self.norm_num_groups} must divide every channel count of "
                f"block_out_channels={self.block_out_channels}"
            )
        if self.cross_attention_levels is not None and len(self.cross_attention_levels) != len(
            self.block_out_channels
        ):
            raise ConfigError(
                f"latent_diffusion.cross_attention_levels has {len(self.cross_attention_levels)} entries for "
                f"{len(self.block_out_channels)} levels of block_out_channels"
            )
        if self.text_hidden_size % self.text_heads:
            raise ConfigError(
                f"latent_diffusion.text_hidden_size={self.text_hidden_size} must be divisible by "
                f"text_heads={self.text_heads}"
            )
        bad = [d for d in self.holdout_digits if d not in range(10)]
        if bad:
            raise ConfigError(f"latent_diffusion.holdout_digits must be digits 0-9, got {bad}")
        if self.max_text_length is not None and self.max_text_length < 4:
            raise ConfigError(f"latent_diffusion.max_text_length must be >= 4 tokens, got {self.max_text_length}")
        if len(set(self.holdout_digits)) == 10:
            raise ConfigError("latent_diffusion.holdout_digits holds out every digit: nothing is left to train on")
        if not self.caption_templates:
            raise ConfigError("latent_diffusion.caption_templates is empty: give at least one, e.g. 'the digit {}'")


def digit_prompt(digit: int, template: str = DIGIT_CAPTION_TEMPLATES[0]) -> str:
    """The caption of a digit class ("a handwritten digit seven")."""
    return template.format(DIGIT_NAMES[digit])


@torch.no_grad()
def generate_images(
    pipe, prompts: list[str], seed: int, steps: int, guidance_scale: float, resolution: int, batch_size: int = 64
) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] from a text-to-image pipeline, one per prompt; image i uses seed + i, so a
    prompt's image does not depend on the batch it is drawn in."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator(pipe.device).manual_seed(seed + start + i) for i in range(len(chunk))]
        output = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=resolution,
            width=resolution,
            output_type="pt",
        ).images
        images.append(output.float().cpu() * 2 - 1)
    return torch.cat(images)


class LatentDiffusion(TextToImageMethod):
    name = "latent_diffusion"
    summary = "text-to-image latent diffusion from scratch (UNet2DConditionModel + CLIP text encoder on a VAE)"
    Options = LatentDiffusionOptions

    @classmethod
    def check_config(cls, config: Config) -> None:
        super().check_config(config)
        options = config.method_options
        if options.holdout_digits and config.data.dataset != "digits":
            raise ConfigError(
                f"latent_diffusion.holdout_digits={options.holdout_digits} only applies to data.dataset=digits"
            )

    @property
    def digits(self) -> bool:
        return self.config.data.dataset == "digits"

    @property
    def trained_digits(self) -> list[int]:
        return [d for d in range(10) if d not in self.options.holdout_digits]

    # -- data --------------------------------------------------------------------------------------------------------
    def build_source(self):
        if self.digits:
            return build_image_source(self.config.data, exclude_labels=self.options.holdout_digits)
        return super().build_source()

    def caption_for(self, example: dict, rng: np.random.Generator) -> str:
        if not self.digits:
            return super().caption_for(example, rng)
        templates = self.options.caption_templates
        return digit_prompt(example["label"], templates[int(rng.integers(len(templates)))])

    def all_captions(self) -> list[str]:
        if not self.digits:
            return super().all_captions()
        return sorted({digit_prompt(d, t) for d in self.trained_digits for t in self.options.caption_templates})

    def validation_prompts(self) -> list[str]:
        if self.options.validation_prompts or not self.digits:
            return super().validation_prompts()
        return [digit_prompt(d) for d in self.trained_digits]

    def default_prompt(self) -> str:
        captions = self.all_captions()
        return captions[0] if captions else "a photo"

    # -- models ------------------------------------------------------------------------------------------------------
    def resolve_family(self):
        """A model built here is a Stable Diffusion 1.x-shaped pipeline (one CLIP encoder, a UNet, a VAE)."""
        return get_family("sd")

    def load_components(self) -> dict[str, Any]:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        options, model = self.options, self.config.model
        tokenizer = CLIPTokenizer.from_pretrained(
            options.tokenizer, subfolder="tokenizer" if (Path(options.tokenizer) / "tokenizer").is_dir() else ""
        )
        if tokenizer.model_max_length > 100_000:  # saved without one: CLIP's 77
            tokenizer.model_max_length = 77
        if options.max_text_length:
            tokenizer.model_max_length = options.max_text_length
        if options.text_encoder:
            local = Path(options.text_encoder)
            text_encoder = CLIPTextModel.from_pretrained(
                options.text_encoder,
                subfolder="text_encoder" if (local / "text_encoder").is_dir() else "",
                use_safetensors=None if model.allow_pickle else True,
            )
            positions = text_encoder.config.max_position_embeddings
            if tokenizer.model_max_length > positions:
                raise ConfigError(
                    f"latent_diffusion.max_text_length / the tokenizer's model_max_length "
                    f"({tokenizer.model_max_length}) exceeds the text encoder's {positions} positions"
                )
        else:
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=options.text_hidden_size,
                    intermediate_size=options.text_intermediate_size,
                    num_hidden_layers=options.text_layers,
                    num_attention_heads=options.text_heads,
                    max_position_embeddings=tokenizer.model_max_length,
                    projection_dim=options.text_hidden_size,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            )
        vae = load_autoencoder(options.vae, allow_pickle=model.allow_pickle)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        resolution = self.config.data.resolution
        levels = len(options.block_out_channels)
        latent_size = resolution // factor
        if resolution % factor or latent_size % 2 ** (levels - 1):
            raise ConfigError(
                f"data.resolution={resolution} gives {resolution / factor:g}x{resolution / factor:g} latents (the VAE "
                f"downsamples by {factor}); the UNet's {levels} levels need a latent size divisible by "
                f"{2 ** (levels - 1)}"
            )
        cross = options.cross_attention_levels or [True] * levels
        unet = UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels,
            block_out_channels=tuple(options.block_out_channels),
            layers_per_block=options.layers_per_block,
            down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
            up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)),
            cross_attention_dim=text_encoder.config.hidden_size,
            attention_head_dim=options.attention_head_dim,
            norm_num_groups=options.norm_num_groups,
        )
        diffusion = self.config.diffusion
        noise_scheduler = DDPMScheduler(
            num_train_timesteps=diffusion.num_train_timesteps,
            beta_schedule=diffusion.beta_schedule,
            prediction_type=diffusion.prediction_type or "epsilon",
        )
        if self.digits and vae.config.in_channels != self.config.data.channels:
            raise ConfigError(
                f"the autoencoder takes {vae.config.in_channels}-channel images: set "
                f"data.channels={vae.config.in_channels}"
            )
        return dict(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, noise_scheduler=noise_scheduler
        )

    def cache_fingerprint(self) -> str:
        # the latents come from this run's autoencoder, not from a base model: a disk cache must name it
        key = [super().cache_fingerprint(), str(Path(self.options.vae).resolve()), self.options.max_text_length]
        return hashlib.sha256(repr(key).encode()).hexdigest()

    def configure_trainable(self) -> None:
        self.unet.requires_grad_(True)
        self.unet.train()
        if self.options.train_text_encoder:
            self.text_encoder.requires_grad_(True)
            self.text_encoder.train()

    # -- outputs -----------------------------------------------------------------------------------------------------
    def evaluate(self, num_images: int, seed: int) -> dict[str, float] | None:
        """Digits: samples for each trained digit's prompt in turn, scored by the digits classifier (class accuracy:
        the fraction read as the digit asked for), with FD/KID against real digits."""
        if not self.digits:
            return None
        from finetune.evaluate import DigitsEvaluator

        if getattr(self, "_evaluator", None) is None:
            self._evaluator = DigitsEvaluator(resolution=self.config.data.resolution)
        labels = [self.trained_digits[i % len(self.trained_digits)] for i in range(num_images)]
        with eval_mode(self.unwrap(self.unet), self.unwrap(self.text_encoder)):
            pipe = self.pipeline()
            pipe.set_progress_bar_config(disable=True)
            images = generate_images(
                pipe,
                [digit_prompt(d) for d in labels],
                seed,
                self.config.diffusion.num_inference_steps,
                self.options.validation_guidance_scale,
                self.config.data.resolution,
            )
        scores = self._evaluator.score(images, labels)
        return {key: scores[key] for key in ("class_accuracy", "fd", "kid_mean", "confident_fraction")}

    def save(self, output_dir: Path) -> None:
        # the validation pipeline is the model itself (DDIM sampling), with frozen parts back in fp32
        self.vae.float()
        self.unwrap(self.text_encoder).float()
        self.pipeline().save_pretrained(output_dir, safe_serialization=True)

    def card(self) -> dict[str, Any]:
        resolution = self.config.data.resolution
        held_out = (
            f" Digits held out of training: {', '.join(DIGIT_NAMES[d] for d in self.options.holdout_digits)}."
            if self.options.holdout_digits
            else ""
        )
        return {
            "tags": ["text-to-image", "latent-diffusion", "stable-diffusion"],
            "description": (
                f"A latent diffusion model trained from scratch on `{self.config.data.dataset}` at {resolution} px: "
                f"UNet2DConditionModel on the latents of `{self.options.vae}`, CLIP text encoder "
                f"({'trained' if self.options.train_text_encoder else 'frozen'}).{held_out}"
            ),
            "usage": f"""
{self.usage_loading("OUTPUT_DIR_OR_REPO_ID")}
image = pipe("{self.validation_prompts()[0]}", height={resolution}, width={resolution}, guidance_scale=3.0).images[0]
""",
        }
