"""Latent diffusion from scratch (Rombach et al. 2022): a text-conditioned denoiser on a trained autoencoder's latents.

The family (`model.family`) names the denoiser, its text encoders, objective and pipeline, as it does for every
text-to-image method:

- `sd` (the default): a new `UNet2DConditionModel` conditioned through cross-attention on a CLIP text encoder (a new
  one built from the text_* options, trained with the UNet or frozen at its random initialisation, or a pretrained
  one); DDPM objective; saves a `StableDiffusionPipeline` folder.
- `sd3`: a new `SD3Transformer2DModel` (MMDiT, Esser et al. 2024) conditioned on two new CLIPTextModelWithProjection
  encoders built from the text_* options (no T5: its sequence is zeros, as StableDiffusion3Pipeline runs without
  one); the family's rectified-flow objective; saves a `StableDiffusion3Pipeline` folder with
  FlowMatchEulerDiscreteScheduler (load it with `text_encoder_3=None, tokenizer_3=None`).

Both train on the scaled latents of an `AutoencoderKL` (`vae`: the `autoencoder` method's output, or any pipeline's
VAE), and the saved folder is one that plain diffusers loads and samples, and that the fine-tuning methods here
(LoRA, DreamBooth) take as their base model.

On the embedded digits the captions are written from each image's label with `caption_templates` ("a handwritten
digit seven", "the number seven", ...; a template without '{}' is a generic caption), and `holdout_digits` keeps
whole classes out of training: the miniature models of `finetune/recipes/digits_text_to_image.yaml` (UNet) and
`finetune/recipes/digits_flow_text_to_image.yaml` (flow-matching transformer), on which
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
        "A pretrained CLIPTextModel (folder or Hub id, or a pipeline's). None: a new one from the text_* options. "
        "Family sd only (sd3 builds its two CLIP encoders from the text_* options).",
    )
    max_text_length: int | None = option(
        None,
        "Prompt length in tokens (the tokenizer's model_max_length, saved with it, and a new text encoder's "
        "positions). None: the tokenizer's own (CLIP: 77). Short captions train several times faster with 16.",
    )
    train_text_encoder: bool = option(
        True, "Train the text encoder(s) with the denoiser (False: keep them frozen at their initialisation)."
    )
    text_hidden_size: int = option(
        64,
        "Width of a new text encoder: the UNet's cross-attention width (sd); each of the two CLIP encoders' width and "
        "projection (sd3: the transformer's joint-attention width is twice it, as is its pooled projection).",
    )
    text_layers: int = option(2, "Transformer layers of a new text encoder.")
    text_heads: int = option(4, "Attention heads of a new text encoder.")
    text_intermediate_size: int = option(256, "MLP width of a new text encoder.")
    block_out_channels: list[int] = option(
        default_factory=lambda: [64, 128],
        help="sd: UNet channels per resolution level (each halves the latent size).",
    )
    layers_per_block: int = option(1, "sd: UNet ResNet layers per level.")
    attention_head_dim: int = option(8, "sd: UNet attention head width.")
    norm_num_groups: int = option(32, "sd: UNet GroupNorm groups (must divide every channel count).")
    cross_attention_levels: list[bool] | None = option(
        None, "sd: which UNet levels (down, from the top) have cross-attention. None: all of them."
    )
    patch_size: int = option(1, "sd3: the transformer's patch side in latent pixels (1: one token per latent pixel).")
    transformer_layers: int = option(4, "sd3: MMDiT blocks of the transformer.")
    transformer_heads: int = option(4, "sd3: attention heads (the width is heads x head dim).")
    transformer_head_dim: int = option(16, "sd3: attention head width.")
    flow_shift: float = option(
        1.0,
        "sd3: the flow-matching scheduler's timestep shift (SD3 uses 3.0 for 128x128 latents; small latents need "
        "little or none). The training sigmas and the saved sampler both use it.",
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
        for name in ("patch_size", "transformer_layers", "transformer_heads", "transformer_head_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"latent_diffusion.{name} must be >= 1, got {getattr(self, name)}")
        if self.flow_shift <= 0:
            raise ConfigError(f"latent_diffusion.flow_shift must be positive, got {self.flow_shift}")
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


def built_family(config: Config) -> str:
    """The family latent_diffusion builds: model.family, or sd when it is 'auto' (there is no base model to read)."""
    return "sd" if config.model.family == "auto" else config.model.family


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


# the families a model can be built for from scratch here, and the denoiser each builds
BUILDS = {"sd": "UNet2DConditionModel", "sd3": "SD3Transformer2DModel"}


class LatentDiffusion(TextToImageMethod):
    name = "latent_diffusion"
    summary = (
        "text-to-image latent diffusion from scratch on a VAE: UNet2DConditionModel + CLIP (family sd), or "
        "SD3Transformer2DModel + two CLIP encoders with flow matching (family sd3)"
    )
    Options = LatentDiffusionOptions

    @classmethod
    def check_config(cls, config: Config) -> None:
        super().check_config(config)
        options = config.method_options
        if options.holdout_digits and config.data.dataset != "digits":
            raise ConfigError(
                f"latent_diffusion.holdout_digits={options.holdout_digits} only applies to data.dataset=digits"
            )
        family = built_family(config)
        if family not in BUILDS:
            builds = ", ".join(f"{name} ({denoiser})" for name, denoiser in BUILDS.items())
            raise ConfigError(f"model.family={family!r}: latent_diffusion builds {builds}")
        if family == "sd3":
            if options.text_encoder:
                raise ConfigError(
                    "latent_diffusion.text_encoder: an sd3 model builds its two CLIP text encoders from the text_* "
                    "options; a pretrained CLIPTextModel is for family sd. Remove latent_diffusion.text_encoder."
                )
            if config.diffusion.prediction_type is not None:
                raise ConfigError(
                    "diffusion.prediction_type: an sd3 model trains with flow matching (the velocity is the target); "
                    "remove diffusion.prediction_type"
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
        """The family of the model built here: model.family (sd, the default: a Stable Diffusion 1.x-shaped pipeline
        with one CLIP encoder and a UNet; or sd3: an SD3 transformer with two CLIP encoders and flow matching)."""
        return get_family(built_family(self.config))

    def base_pipeline_class(self) -> str | None:
        """No base model: the model is built here (and is no inpainting model)."""
        return None

    def load_tokenizer(self):
        from transformers import CLIPTokenizer

        options = self.options
        tokenizer = CLIPTokenizer.from_pretrained(
            options.tokenizer, subfolder="tokenizer" if (Path(options.tokenizer) / "tokenizer").is_dir() else ""
        )
        if tokenizer.model_max_length > 100_000:  # saved without one: CLIP's 77
            tokenizer.model_max_length = 77
        if options.max_text_length:
            tokenizer.model_max_length = options.max_text_length
        return tokenizer

    def new_text_config(self, tokenizer):
        from transformers import CLIPTextConfig

        options = self.options
        return CLIPTextConfig(
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

    def load_vae(self):
        """The autoencoder, and the latent size it gives data.resolution (checked against the denoiser's needs)."""
        options, model = self.options, self.config.model
        vae = load_autoencoder(options.vae, allow_pickle=model.allow_pickle)
        if self.digits and vae.config.in_channels != self.config.data.channels:
            raise ConfigError(
                f"the autoencoder takes {vae.config.in_channels}-channel images: set "
                f"data.channels={vae.config.in_channels}"
            )
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        resolution = self.config.data.resolution
        if self.family.name == "sd3":
            multiple, what = self.options.patch_size, f"the transformer's patch_size={self.options.patch_size}"
        else:
            levels = len(options.block_out_channels)
            multiple, what = 2 ** (levels - 1), f"the UNet's {levels} levels"
        if resolution % factor or (resolution // factor) % multiple:
            raise ConfigError(
                f"data.resolution={resolution} gives {resolution / factor:g}x{resolution / factor:g} latents (the VAE "
                f"downsamples by {factor}); {what} need a latent size divisible by {multiple}"
            )
        return vae, resolution // factor

    def load_components(self) -> dict[str, Any]:
        if self.family.name == "sd3":
            return self.build_sd3()
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        options, model = self.options, self.config.model
        tokenizer = self.load_tokenizer()
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
            text_encoder = CLIPTextModel(self.new_text_config(tokenizer))
        vae, latent_size = self.load_vae()
        levels = len(options.block_out_channels)
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
        noise_scheduler = DDPMScheduler(**diffusion.from_scratch_scheduler_kwargs())
        return dict(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, noise_scheduler=noise_scheduler
        )

    def build_sd3(self) -> dict[str, Any]:
        """An SD3-shaped model from scratch: two new CLIPTextModelWithProjection encoders (penultimate states
        concatenated: the joint-attention width; pooled projections concatenated: the pooled width), no T5 (the
        family gives the transformer zeros in its place, as StableDiffusion3Pipeline does without one), an
        SD3Transformer2DModel on the VAE's latents, and the flow-matching scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection

        options = self.options
        tokenizer, tokenizer_2 = self.load_tokenizer(), self.load_tokenizer()
        text_encoder = CLIPTextModelWithProjection(self.new_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(self.new_text_config(tokenizer_2))
        vae, latent_size = self.load_vae()
        if getattr(vae.config, "shift_factor", None) is None:  # StableDiffusion3Pipeline's decode adds it
            vae.register_to_config(shift_factor=0.0)
        width = options.transformer_heads * options.transformer_head_dim
        transformer = SD3Transformer2DModel(
            sample_size=latent_size,  # the pipeline's default image size is sample_size x the VAE's factor
            patch_size=options.patch_size,
            in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels,
            num_layers=options.transformer_layers,
            attention_head_dim=options.transformer_head_dim,
            num_attention_heads=options.transformer_heads,
            joint_attention_dim=2 * options.text_hidden_size,
            caption_projection_dim=width,
            pooled_projection_dim=2 * options.text_hidden_size,
            pos_embed_max_size=latent_size // options.patch_size,
            qk_norm="rms_norm",  # SD3.5's: steadier attention logits when training from scratch
        )
        noise_scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.config.diffusion.num_train_timesteps, shift=options.flow_shift
        )
        return dict(
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            tokenizer_3=None,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            text_encoder_3=None,
            vae=vae,
            transformer=transformer,
            noise_scheduler=noise_scheduler,
        )

    def cache_fingerprint(self) -> str:
        # the latents come from this run's autoencoder, not from a base model: a disk cache must name it (the prompt
        # length changes the text conditioning only: the tokenizer's max length is in the text fingerprint)
        key = [super().cache_fingerprint(), str(Path(self.options.vae).resolve())]
        return hashlib.sha256(repr(key).encode()).hexdigest()

    def configure_trainable(self) -> None:
        self.denoiser.requires_grad_(True)
        self.denoiser.train()
        if self.options.train_text_encoder:
            for text_encoder in self.text_encoders.values():
                text_encoder.requires_grad_(True)
                text_encoder.train()

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
        modules = [self.denoiser, *self.text_encoders.values()]
        with eval_mode(*map(self.unwrap, modules)):
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
        # the validation pipeline is the model itself (the family's sampler: DDIM, or flow matching's Euler), with
        # frozen parts back in fp32
        self.vae.float()
        for text_encoder in self.text_encoders.values():
            self.unwrap(text_encoder).float()
        self.pipeline().save_pretrained(output_dir, safe_serialization=True)

    def usage_loading(self, base: str, output: str = "OUTPUT_DIR_OR_REPO_ID") -> str:
        loading = super().usage_loading(base, output)
        if self.family.name == "sd3":  # saved without T5: diffusers wants the missing parts named
            loading = loading.removesuffix(")") + ", text_encoder_3=None, tokenizer_3=None)"
        return loading

    def card(self) -> dict[str, Any]:
        resolution = self.config.data.resolution
        held_out = (
            f" Digits held out of training: {', '.join(DIGIT_NAMES[d] for d in self.options.holdout_digits)}."
            if self.options.holdout_digits
            else ""
        )
        trained = "trained" if self.options.train_text_encoder else "frozen"
        if self.family.name == "sd3":
            model = (
                f"SD3Transformer2DModel ({self.options.transformer_layers} blocks, patch {self.options.patch_size}) "
                f"with flow matching on the latents of `{self.options.vae}`, two CLIP text encoders ({trained}), no T5"
            )
            tags = ["text-to-image", "latent-diffusion", "flow-matching", "stable-diffusion-3"]
        else:
            model = f"UNet2DConditionModel on the latents of `{self.options.vae}`, CLIP text encoder ({trained})"
            tags = ["text-to-image", "latent-diffusion", "stable-diffusion"]
        return {
            "tags": tags,
            "pipeline_tag": "text-to-image",
            "prompt": self.validation_prompts()[0],
            "description": (
                f"A latent diffusion model trained from scratch on `{self.config.data.dataset}` at {resolution} px: "
                f"{model}.{held_out}"
            ),
            "usage": f"""
{self.usage_loading("OUTPUT_DIR_OR_REPO_ID")}
image = pipe("{self.validation_prompts()[0]}", height={resolution}, width={resolution}, guidance_scale=3.0).images[0]
""",
        }
