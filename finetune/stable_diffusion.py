"""What every Stable Diffusion method shares: loading the components, text conditioning, latent and text-embedding
caches, and validation through a plain `StableDiffusionPipeline` built from the modules being trained.

A method subclasses `TextToImageMethod` and says which parameters train (`configure_trainable`), where its images
and captions come from (`build_source`, `caption_for`) and what it saves.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from finetune import atomic, diffusion
from finetune.config import Config, ConfigError, option
from finetune.data import TrainingExamples, build_image_source
from finetune.methods.base import DenoisingMethod, eval_mode

logger = logging.getLogger(__name__)

COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


@dataclass
class TextToImageOptions:
    cache: Literal["none", "memory", "disk"] = option(
        "none",
        "Encode every image with the VAE (and every caption with a frozen text encoder) once before training: "
        "'memory', or 'disk' (safetensors reused by later runs on the same data).",
    )
    cache_dir: str | None = option(None, "Folder of the disk cache. None: <output_dir>/.cache.")
    caption_dropout: float = option(
        0.0, "Probability of training on the empty prompt, so classifier-free guidance keeps working."
    )
    validation_prompts: list[str] = option(
        default_factory=list, help="Prompts of the sample grids (cycled). Empty: the method's own default prompt."
    )
    validation_guidance_scale: float = option(7.5, "Guidance scale of validation images.")

    def __post_init__(self):
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


def load_components(config: Config, pipeline_name: str = "StableDiffusionPipeline") -> SimpleNamespace:
    """tokenizer, text_encoder, vae, unet and noise scheduler of a Stable Diffusion 1.x/2.x pipeline folder or Hub id.

    Weights load from safetensors only, unless model.allow_pickle is set.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = config.model
    path = model.pretrained_model_name_or_path
    if not path:
        raise ConfigError(
            f"model.pretrained_model_name_or_path is required: a {pipeline_name} folder or Hub id such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    from finetune.preflight import check_model_path, describe_load_error

    key = "model.pretrained_model_name_or_path"
    pickle_hint = "" if model.allow_pickle else "set model.allow_pickle=true if you trust their source"
    # missing folder, no model_index.json, corrupt safetensors, offline without the files: said before any load
    check_model_path(path, key, "pipeline", pickle_hint, model.revision, COMPONENTS)
    local = Path(path).expanduser()
    if local.exists():
        missing = [name for name in COMPONENTS if not (local / name).is_dir()]
        if missing:
            raise ConfigError(
                f"model.pretrained_model_name_or_path: {path!r} is not a complete {pipeline_name} folder: missing "
                f"{', '.join(missing)} (expected subfolders: {', '.join(COMPONENTS)})"
            )
    weights = dict(
        revision=model.revision, variant=model.variant, use_safetensors=None if model.allow_pickle else True
    )
    loaders = {
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=model.revision),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),
        "vae": lambda: AutoencoderKL.from_pretrained(path, subfolder="vae", **weights),
        "unet": lambda: UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights),
        "noise_scheduler": lambda: DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=model.revision),
    }
    parts = {}
    for name, load in loaders.items():
        try:
            parts[name] = load()
        except Exception as err:  # noqa: BLE001 - OSError, ValueError, SafetensorError, hub errors: one line each
            raise ConfigError(describe_load_error(err, str(path), key, name, pickle_hint)) from err
    if parts["tokenizer"].model_max_length > 100_000:  # a tokenizer saved without it defaults to ~1e30
        parts["tokenizer"].model_max_length = parts["text_encoder"].config.max_position_embeddings
    if config.diffusion.prediction_type is not None:
        parts["noise_scheduler"].register_to_config(prediction_type=config.diffusion.prediction_type)
    return SimpleNamespace(**parts)


class LatentCache:
    """VAE posterior moments per (row, flipped), and text embeddings per caption, computed once."""

    def __init__(self):
        self.moments: dict[tuple[int, bool], torch.Tensor] = {}
        self.text: dict[str, torch.Tensor] = {}

    def save(self, path: Path, fingerprint: str) -> None:
        tensors = {f"m/{row}/{int(flip)}": t.contiguous() for (row, flip), t in self.moments.items()}
        texts = sorted(self.text)
        tensors.update({f"t/{i}": self.text[text].contiguous() for i, text in enumerate(texts)})
        then = "run the training again, or keep the cache in memory (e.g. lora.cache=memory)"
        with atomic.atomic_path(path, then=then) as staging:  # a killed job never leaves half a cache to load
            save_file(tensors, str(staging), metadata={"fingerprint": fingerprint, "texts": json.dumps(texts)})

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> LatentCache | None:
        from safetensors import safe_open

        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        if metadata.get("fingerprint") != fingerprint:
            return None
        tensors, cache = load_file(str(path)), cls()
        texts = json.loads(metadata["texts"])
        for key, value in tensors.items():
            kind, *rest = key.split("/")
            if kind == "m":
                cache.moments[(int(rest[0]), bool(int(rest[1])))] = value
            else:
                cache.text[texts[int(rest[0])]] = value
        return cache


class TextToImageMethod(DenoisingMethod):
    """A denoiser on VAE latents conditioned on CLIP text embeddings (Rombach et al. 2022)."""

    pipeline_name = "StableDiffusionPipeline"

    @classmethod
    def check_config(cls, config: Config) -> None:
        if config.data.resolution % 8:
            raise ConfigError(
                f"data.resolution={config.data.resolution} must be a multiple of 8 (the VAE downsamples by 8)"
            )
        if config.method_options.cache != "none" and not config.data.center_crop:
            raise ConfigError(
                f"{config.method}.cache needs data.center_crop=true: a random crop differs every epoch and cannot be "
                "cached. Turn off the cache or use center crops."
            )

    # -- what a method decides ---------------------------------------------------------------------------------------
    needs_pixels_with_cache = False  # True when the loss uses the images themselves even with cached latents

    def build_source(self):
        """Images with a caption column (the LoRA / fine-tuning data)."""
        return build_image_source(self.config.data, columns=[self.config.data.caption_column])

    def caption_for(self, example: dict, rng: np.random.Generator) -> str:
        caption = example.pop(self.config.data.caption_column)
        if isinstance(caption, (list, tuple)):  # several captions per image: a different one each time
            caption = caption[int(rng.integers(len(caption)))]
        if not isinstance(caption, str):
            raise ValueError(f"row {example['row']}: caption {caption!r} is not text")
        return caption

    def configure_trainable(self) -> None:
        """Mark what trains (LoRA layers, the UNet, embedding rows); everything starts frozen."""
        raise NotImplementedError

    @property
    def text_encoder_trains(self) -> bool:
        return any(p.requires_grad for p in self.unwrap(self.text_encoder).parameters())

    def default_prompt(self) -> str:
        return "a photo"

    # -- set-up ------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        # data first: a wrong column or an empty folder fails before the models load
        source = self.build_source()
        parts = self.load_components()
        self.tokenizer, self.text_encoder, self.vae = parts.tokenizer, parts.text_encoder, parts.vae
        self.unet, self.noise_scheduler = parts.unet, parts.noise_scheduler
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.check_models()
        for module in (self.vae, self.text_encoder, self.unet):
            module.requires_grad_(False)
            module.to(self.device, dtype=self.weight_dtype)  # frozen weights in the mixed-precision dtype
        self.vae.eval()
        self.text_encoder.eval()
        self.configure_trainable()
        for module in (self.unet, self.text_encoder):
            for parameter in module.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()  # trainable parameters stay fp32
        if self.config.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.text_encoder_trains:
                self.text_encoder.gradient_checkpointing_enable()
        self.train_dataset = TrainingExamples(
            source,
            self.config.train.seed,
            self.config.data.repeats,
            transform=self.make_example,
            min_length=self.config.train.train_batch_size * self.accelerator.num_processes,
        )
        self.cache: LatentCache | None = None

    def load_components(self) -> SimpleNamespace:
        """tokenizer, text_encoder, vae, unet, noise_scheduler: the base pipeline's (a method that builds new ones,
        such as latent diffusion from scratch, overrides this)."""
        return load_components(self.config, self.pipeline_name)

    def check_models(self) -> None:
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise ConfigError(
                f"the UNet of {self.config.model.pretrained_model_name_or_path!r} takes "
                f"{self.unet.config.in_channels} input channels, not the VAE's {self.vae.config.latent_channels}: "
                "an inpainting model needs the 'inpainting' method"
            )

    def make_example(self, example: dict, rng: np.random.Generator) -> dict:
        text = self.caption_for(example, rng)
        if self.options.caption_dropout and rng.random() < self.options.caption_dropout:
            text = ""  # classifier-free guidance: sometimes train unconditioned
        example["text"] = text
        return example

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        modules = {}
        if any(p.requires_grad for p in self.unwrap(self.unet).parameters()):
            modules["unet"] = self.unet
        if self.text_encoder_trains:
            modules["text_encoder"] = self.text_encoder
        return modules

    # -- caching -----------------------------------------------------------------------------------------------------
    def before_training(self) -> None:
        if self.options.cache == "none":
            return
        cache_dir = Path(self.options.cache_dir or Path(self.config.train.output_dir) / ".cache")
        fingerprint = self.cache_fingerprint()
        path = cache_dir / f"latents-{fingerprint[:16]}.safetensors"
        with self.accelerator.main_process_first():
            cache = LatentCache.load(path, fingerprint) if self.options.cache == "disk" else None
            if cache is None:
                cache = self.build_cache()
                if self.options.cache == "disk" and self.accelerator.is_main_process:
                    cache_dir.mkdir(parents=True, exist_ok=True)
                    cache.save(path, fingerprint)
        self.cache = cache
        logger.info("cached %d latents and %d text embeddings", len(cache.moments), len(cache.text))
        source = self.train_dataset.source
        if not self.needs_pixels_with_cache and hasattr(source, "decode_pixels"):
            source.decode_pixels = False  # the latents come from the cache: stop decoding and resizing every step

    def cache_fingerprint(self) -> str:
        data = self.config.data
        source = self.train_dataset.source
        rows = getattr(source, "indices", range(len(source)))
        key = [
            self.config.model.pretrained_model_name_or_path,
            self.config.model.revision,
            data.dataset,
            data.resolution,
            data.center_crop,
            data.random_flip,
            str(self.weight_dtype),
            len(rows),
            self.text_encoder_trains,
            type(self).__name__,
        ]
        return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()

    @torch.no_grad()
    def build_cache(self) -> LatentCache:
        cache = LatentCache()
        source = self.train_dataset.source
        flips = (False, True) if self.config.data.random_flip else (False,)
        rng = np.random.default_rng(0)  # unused by center crops; flips are applied explicitly below
        batch_rows, batch_pixels = [], []

        def flush():
            pixels = torch.stack(batch_pixels).to(self.device, self.weight_dtype)
            moments = self.vae.encode(pixels).latent_dist.parameters.float().cpu()
            for key, value in zip(batch_rows, moments):
                cache.moments[key] = value
            batch_rows.clear()
            batch_pixels.clear()

        for index in range(len(source)):
            example = source.get(index, rng)
            pixels = example["pixel_values"].flip(-1) if example["flipped"] else example["pixel_values"]
            for flip in flips:
                batch_rows.append((example["row"], flip))
                batch_pixels.append(pixels.flip(-1) if flip else pixels)
                if len(batch_rows) == 16:
                    flush()
        if batch_rows:
            flush()
        if not self.text_encoder_trains:
            texts = {""} | set(self.all_captions())
            for text in sorted(texts):
                cache.text[text] = self.encode_text([text])[0].cpu()
        return cache

    def all_captions(self) -> list[str]:
        """Every caption the dataset can produce (for the text-embedding cache)."""
        source, column = self.train_dataset.source, self.config.data.caption_column
        values = getattr(source, "column_values", {}).get(column)
        if values is None:
            return []
        rows = getattr(source, "indices", range(len(values)))
        captions = []
        for row in rows:
            value = values[row]
            captions.extend(value if isinstance(value, (list, tuple)) else [value])
        return [c for c in captions if isinstance(c, str)]

    # -- training ----------------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.text_encoder(self.tokenize(texts).to(self.device))[0]

    def latent_moments(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.cache is not None:
            keys = zip(batch["row"].tolist(), batch["flipped"].tolist())
            return torch.stack([self.cache.moments[(row, bool(flip))] for row, flip in keys]).to(self.device)
        with torch.no_grad():
            pixels = batch["pixel_values"].to(self.device, self.weight_dtype)
            return self.vae.encode(pixels).latent_dist.parameters.float()

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        # sample the VAE posterior with the example's own seed, so cached and uncached runs see the same latents
        mean, logvar = self.latent_moments(batch).chunk(2, dim=1)
        generators = diffusion.example_generators(batch["seed"] + 1)
        eps = diffusion.seeded_noise(generators, tuple(mean.shape[1:])).to(mean.device)
        latents = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def text_conditioning(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.cache is not None and self.cache.text:
            return torch.stack([self.cache.text[text] for text in batch["text"]]).to(self.device)
        if self.text_encoder_trains:
            return self.encode_text(batch["text"])
        with torch.no_grad():
            return self.encode_text(batch["text"])

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return self.unet(noisy, timesteps, encoder_hidden_states=self.text_conditioning(batch)).sample

    # -- outputs -----------------------------------------------------------------------------------------------------
    def pipeline_class(self):
        """The diffusers pipeline class named by `pipeline_name` (text-to-image or inpainting)."""
        import diffusers

        return getattr(diffusers, self.pipeline_name)

    def pipeline(self):
        """Validation (and class-image) pipeline from the modules being trained, DDIM sampling."""
        from diffusers import DDIMScheduler

        return self.pipeline_class()(
            vae=self.vae,
            text_encoder=self.unwrap(self.text_encoder),
            tokenizer=self.tokenizer,
            unet=self.unwrap(self.unet),
            scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )

    def validation_prompts(self) -> list[str]:
        return self.options.validation_prompts or [self.default_prompt()]

    def sampling_inputs(self, num_images: int) -> dict[str, Any]:
        """Pipeline arguments besides prompts, steps and seed (an inpainting pipeline needs an image and a mask)."""
        return {}

    @torch.no_grad()
    def sample(self, num_images: int, seed: int) -> list:
        prompts = self.validation_prompts()
        with eval_mode(self.unwrap(self.unet), self.unwrap(self.text_encoder)):
            pipe = self.pipeline()
            pipe.set_progress_bar_config(disable=True)
            generator = torch.Generator(self.device).manual_seed(seed)
            with self.accelerator.autocast():
                return pipe(
                    [prompts[i % len(prompts)] for i in range(num_images)],
                    num_inference_steps=self.config.diffusion.num_inference_steps,
                    guidance_scale=self.options.validation_guidance_scale,
                    generator=generator,
                    height=self.config.data.resolution,
                    width=self.config.data.resolution,
                    **self.sampling_inputs(num_images),
                ).images
