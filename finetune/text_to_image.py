"""What every text-to-image method shares, whatever the model family: loading the family's components, text
conditioning, latent and text-embedding caches, the denoiser call, and validation through the family's plain
diffusers pipeline built from the modules being trained.

A method subclasses `TextToImageMethod` and says which parameters train (`configure_trainable`), where its images
and captions come from (`build_source`, `caption_for`) and what it saves. It never names a family or a pipeline
class: `self.family` (finetune/families/) answers for SD 1.x/2.x, SDXL and the families after them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from finetune import atomic, diffusion
from finetune.config import Config, ConfigError, option
from finetune.data import TrainingExamples, build_image_source
from finetune.families import family_of_pipeline, get_family, supported
from finetune.families.base import MODEL_KEY, Family, pipeline_class_name
from finetune.methods.base import Method, eval_mode
from finetune.objectives import batch_weights, combined_weights, weighted_mse

logger = logging.getLogger(__name__)


@dataclass
class TextToImageOptions:
    cache: Literal["none", "memory", "disk"] = option(
        "none",
        "Encode every image with the VAE (and every caption with frozen text encoders) once before training: "
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
    validation_sizes: list[str] = option(
        default_factory=list,
        help="Sizes 'WxH' of the sample grids' images (cycled, e.g. [832x1216, 1024x1024, 1216x832] with "
        "data.aspect_buckets). Empty: data.resolution squares.",
    )

    def __post_init__(self):
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        parse_sizes(self.validation_sizes)


def parse_sizes(sizes: list[str]) -> list[tuple[int, int]]:
    """validation_sizes as (w, h): 'WxH' each, sides positive multiples of 8."""
    parsed = []
    for size in sizes:
        width, _, height = str(size).lower().partition("x")
        if not (width.strip().isdigit() and height.strip().isdigit()) or int(width) % 8 or int(height) % 8:
            raise ConfigError(
                f"validation_sizes: {size!r} is not 'WxH' with width and height positive multiples of 8, e.g. 512x768"
            )
        if not int(width) or not int(height):
            raise ConfigError(f"validation_sizes: {size!r} has a zero side")
        parsed.append((int(width), int(height)))
    return parsed


def resolve_family(config: Config) -> Family:
    """The family of the base model: read from its model_index.json, checked against `model.family` when a recipe
    names one (an SD 1.5 folder given to an SDXL recipe, or the other way round, is one clear line)."""
    model = config.model
    found = pipeline_class_name(str(model.pretrained_model_name_or_path), model.revision)
    where = f"{MODEL_KEY} {str(model.pretrained_model_name_or_path)!r}"
    detected = family_of_pipeline(found, where) if found else None
    if model.family == "auto":
        if detected is None:  # model_index.json unreadable here: the loaders say why; SD 1.x has the fewest parts
            return get_family("sd")
        return detected
    declared = get_family(model.family)
    if detected is not None and detected.name != declared.name:
        raise ConfigError(
            f"{where} is a {found} (family {detected.name!r}), but model.family is {declared.name!r}: use a "
            f"{detected.name} recipe (finetune/recipes/{detected.name}_*.yaml) or set model.family={detected.name} "
            f"(supported families: {supported()})"
        )
    return declared


def local_family(config: Config) -> Family:
    """The family as far as it is known without a download: a local folder's model_index.json, else the one the
    recipe names, else SD 1.x (what preflight needs to list the subfolders a folder must have)."""
    model = config.model
    local = Path(str(model.pretrained_model_name_or_path or "")).expanduser()
    found = pipeline_class_name(str(local)) if local.is_dir() else None
    if found:
        try:
            return family_of_pipeline(found, MODEL_KEY)
        except ConfigError:
            pass  # resolve_family says so, with the supported families
    return get_family("sd" if model.family == "auto" else model.family)


class LatentCache:
    """VAE posterior moments per (row, flipped), and the text conditioning (a few named tensors) per caption."""

    def __init__(self):
        self.moments: dict[tuple[int, bool], torch.Tensor] = {}
        self.text: dict[str, dict[str, torch.Tensor]] = {}

    def save(self, path: Path, fingerprint: str) -> None:
        tensors = {f"m/{row}/{int(flip)}": t.contiguous() for (row, flip), t in self.moments.items()}
        texts = sorted(self.text)
        for i, text in enumerate(texts):
            tensors.update({f"t/{i}/{key}": value.contiguous() for key, value in self.text[text].items()})
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
                cache.text.setdefault(texts[int(rest[0])], {})[rest[1]] = value
        return cache


class TextToImageMethod(Method):
    """A denoiser on VAE latents conditioned on text (Rombach et al. 2022), through a model family."""

    # True: the family's inpainting pipeline, whose UNet also takes a mask and the masked image's latents
    inpainting: ClassVar[bool] = False

    @classmethod
    def check_config(cls, config: Config) -> None:
        if config.data.resolution % 8:
            raise ConfigError(
                f"data.resolution={config.data.resolution} must be a multiple of 8 (the VAE downsamples by 8)"
            )
        if cls.inpainting and (config.data.aspect_buckets or config.method_options.validation_sizes):
            raise ConfigError(
                f"{config.method}: inpainting trains and samples on data.resolution squares (its masks are square); "
                "set data.aspect_buckets=false and leave validation_sizes empty"
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

    def bucket_multiple(self) -> int:
        """What the sides of aspect-ratio buckets (data.aspect_buckets) must be a multiple of: what the family's
        latents need (8 px for SD's VAE; 16 for Flux's packed latents)."""
        return getattr(self.family, "latent_multiple", 8)

    def configure_trainable(self) -> None:
        """Mark what trains (LoRA layers, the UNet, embedding rows); everything starts frozen."""
        raise NotImplementedError

    def default_prompt(self) -> str:
        return "a photo"

    # -- components --------------------------------------------------------------------------------------------------
    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The family's text encoders by component name (text_encoder, and text_encoder_2 for SDXL)."""
        return {name: getattr(self, name) for name in self.family.text_encoders}

    def parts(self, unwrap: bool = False) -> dict[str, Any]:
        """Every component by name, as the family takes them (unwrapped from DDP for pipelines and saving)."""
        names = [*self.family.tokenizers, *self.family.text_encoders, "vae", "unet"]
        modules = {name: getattr(self, name) for name in names}
        if unwrap:
            modules = {n: self.unwrap(m) if isinstance(m, torch.nn.Module) else m for n, m in modules.items()}
        return modules

    @property
    def text_encoder_trains(self) -> bool:
        return any(p.requires_grad for m in self.text_encoders.values() for p in self.unwrap(m).parameters())

    # -- set-up ------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        # the family (model_index.json), then the data: a wrong recipe, a wrong column or an empty folder fails
        # before the models load (the model path itself was checked before the job started)
        self.family = self.resolve_family()
        source = self.build_source()
        for name, part in self.load_components().items():
            setattr(self, name, part)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.objective = self.family.objective(self.noise_scheduler, self.prediction_type, self.config.diffusion)
        self.check_models()
        self.vae.requires_grad_(False)
        self.vae.to(self.device).eval()
        vae_dtype = self.family.vae_dtype(self.config, self.weight_dtype)
        if self.vae.dtype != vae_dtype:  # (diffusers warns about every dtype cast, even a no-op one)
            self.vae.to(dtype=vae_dtype)
        denoiser_and_text = [self.unet, *self.text_encoders.values()]
        for module in denoiser_and_text:
            module.requires_grad_(False)
            module.eval()
        self.configure_trainable()
        unused = self.family.freeze_unused(self.parts())
        if unused:
            logger.info("%d parameters never reach the denoiser and stay frozen, e.g. %s", len(unused), unused[0])
        for module in denoiser_and_text:
            # frozen weights in the mixed-precision dtype, trainable ones in fp32, never rounded through fp16 first
            module.to(self.device)
            for parameter in module.parameters():
                parameter.data = parameter.data.to(torch.float32 if parameter.requires_grad else self.weight_dtype)
        if self.config.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for module in self.text_encoders.values():
                if any(p.requires_grad for p in module.parameters()):
                    module.gradient_checkpointing_enable()
        self.train_dataset = TrainingExamples(
            source,
            self.config.train.seed,
            self.config.data.repeats,
            transform=self.make_example,
            min_length=self.config.train.train_batch_size * self.accelerator.num_processes,
        )
        self.cache: LatentCache | None = None

    def resolve_family(self) -> Family:
        return resolve_family(self.config)

    def load_components(self) -> dict[str, Any]:
        """The base pipeline's components, from the family (a method that builds new ones, such as latent diffusion
        from scratch, overrides this)."""
        return self.family.load(self.config)

    def check_models(self) -> None:
        expected = self.vae.config.latent_channels
        if self.unet.config.in_channels != expected:
            raise ConfigError(
                f"the UNet of {self.config.model.pretrained_model_name_or_path!r} takes "
                f"{self.unet.config.in_channels} input channels, not the VAE's {expected}: an inpainting model needs "
                "the 'inpainting' method"
            )

    def make_example(self, example: dict, rng: np.random.Generator) -> dict:
        text = self.caption_for(example, rng)
        if self.options.caption_dropout and rng.random() < self.options.caption_dropout:
            text = ""  # classifier-free guidance: sometimes train unconditioned
        example["text"] = text
        return example

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        modules = {}
        for name, module in {"unet": self.unet, **self.text_encoders}.items():
            if any(p.requires_grad for p in self.unwrap(module).parameters()):
                modules[name] = module
        return modules

    def parameter_groups(self, lr_scale: float = 1.0) -> list[dict[str, Any]]:
        """With `text_encoder_lr` (LoRA and DreamBooth options, kohya's setting), the text encoders' parameters learn
        at their own rate; the UNet's at optim.lr."""
        text_lr = getattr(self.options, "text_encoder_lr", None)
        if text_lr is None or not self.text_encoder_trains:
            return super().parameter_groups(lr_scale)
        text = {id(p) for m in self.text_encoders.values() for p in self.unwrap(m).parameters()}
        parameters = self.trainable_parameters()
        return [
            {"params": [p for p in parameters if id(p) not in text]},
            {"params": [p for p in parameters if id(p) in text], "lr": text_lr * lr_scale},
        ]

    # -- caching -----------------------------------------------------------------------------------------------------
    def before_training(self, ema) -> None:
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
            self.config.model.vae,
            self.family.name,
            data.dataset,
            data.resolution,
            data.center_crop,
            data.random_flip,
            str(self.weight_dtype),
            len(rows),
            self.text_encoder_trains,
            type(self).__name__,
        ]
        if data.aspect_buckets:  # the latents' shapes: every example's bucket
            key.append([list(bucket) for bucket in self.train_dataset.example_buckets()])
        return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()

    @torch.no_grad()
    def build_cache(self) -> LatentCache:
        cache = LatentCache()
        source = self.train_dataset.source
        flips = (False, True) if self.config.data.random_flip else (False,)
        rng = np.random.default_rng(0)  # unused by center crops; flips are applied explicitly below
        batch_rows, batch_pixels = [], []

        def flush():
            pixels = torch.stack(batch_pixels).to(self.device, self.vae.dtype)
            moments = self.vae.encode(pixels).latent_dist.parameters.float().cpu()
            for key, value in zip(batch_rows, moments):
                cache.moments[key] = value
            batch_rows.clear()
            batch_pixels.clear()

        for index in range(len(source)):
            example = source.get(index, rng)
            pixels = example["pixel_values"].flip(-1) if example["flipped"] else example["pixel_values"]
            if batch_pixels and pixels.shape != batch_pixels[0].shape:  # another bucket: encode the ones so far
                flush()
            for flip in flips:
                batch_rows.append((example["row"], flip))
                batch_pixels.append(pixels.flip(-1) if flip else pixels)
                if len(batch_rows) == 16:
                    flush()
        if batch_rows:
            flush()
        if not self.text_encoder_trains:
            for text in sorted({""} | set(self.all_captions())):
                cache.text[text] = {key: value[0].cpu() for key, value in self.encode_text([text]).items()}
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
    def encode_text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The family's conditioning of each text (prompt embeddings, and SDXL's pooled embedding)."""
        return self.family.encode_prompt(self.parts(), texts, self.device)

    def latent_moments(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.cache is not None:
            keys = zip(batch["row"].tolist(), batch["flipped"].tolist())
            return torch.stack([self.cache.moments[(row, bool(flip))] for row, flip in keys]).to(self.device)
        with torch.no_grad():
            pixels = batch["pixel_values"].to(self.device, self.vae.dtype)
            return self.vae.encode(pixels).latent_dist.parameters.float()

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        # sample the VAE posterior with the example's own seed, so cached and uncached runs see the same latents
        mean, logvar = self.latent_moments(batch).chunk(2, dim=1)
        generators = diffusion.example_generators(batch["seed"] + 1)
        eps = diffusion.seeded_noise(generators, tuple(mean.shape[1:])).to(mean.device)
        latents = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def text_conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.cache is not None and self.cache.text:
            rows = [self.cache.text[text] for text in batch["text"]]
            return {key: torch.stack([row[key] for row in rows]).to(self.device) for key in rows[0]}
        if self.text_encoder_trains:
            return self.encode_text(batch["text"])
        with torch.no_grad():
            return self.encode_text(batch["text"])

    def loss_weights(self, timesteps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor | None:
        """Per-example loss weights: the objective's (min-SNR), times any weight the batch carries (prior
        preservation gives class images `prior_loss_weight`)."""
        return combined_weights(self.objective.loss_weights(timesteps), batch_weights(batch))

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        # encode: images -> latents (the VAE posterior sampled from the example's own seed; cached or not)
        clean = self.encode(batch).float()

        # add noise: the family's objective noises each example at a timestep drawn from its own seed
        noisy, timesteps, noise = self.objective.noised(clean, batch["seed"])

        # predict with the denoiser, conditioned on the text (and, for inpainting, the mask channels)
        prediction = self.predict(noisy, timesteps, batch)
        target = self.objective.target(clean, noise, timesteps)

        # loss: per-example MSE, weighted (min-SNR, prior preservation), averaged over the batch
        return weighted_mse(prediction, target, self.loss_weights(timesteps, batch)), {}

    def model_input(self, noisy: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """What the denoiser takes besides the time and the text: the noisy latents (inpainting adds its mask and
        masked-image channels)."""
        return noisy

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        conditioning = self.text_conditioning(batch)
        return self.family.denoise(self.unet, self.model_input(noisy, batch), timesteps, conditioning, batch)

    # -- outputs -----------------------------------------------------------------------------------------------------
    def pipeline_class(self):
        """The family's diffusers pipeline class for this method (text-to-image or inpainting)."""
        return self.family.pipeline_class(self.inpainting)

    def pipeline(self):
        """Validation (and class-image) pipeline from the modules being trained, DDIM sampling."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        return self.family.pipeline(self.parts(unwrap=True), scheduler, inpainting=self.inpainting)

    def validation_prompts(self) -> list[str]:
        return self.options.validation_prompts or [self.default_prompt()]

    def validation_inputs(self, num_images: int) -> dict[str, Any]:
        """Pipeline arguments of sample grids besides prompts, steps and seed (an inpainting pipeline needs an image
        and a mask)."""
        return {}

    @torch.no_grad()
    def sample(self, num_images: int, seed: int) -> list:
        """Image i has prompt i and size i of the cycled validation prompts and sizes; one pipeline call per size,
        the k-th seeded with seed + k."""
        prompts = self.validation_prompts()
        resolution = self.config.data.resolution
        sizes = parse_sizes(self.options.validation_sizes) or [(resolution, resolution)]
        parts = self.parts(unwrap=True)
        images: list = [None] * num_images
        with eval_mode(parts["unet"], *(parts[name] for name in self.family.text_encoders)):
            pipe = self.pipeline()
            pipe.set_progress_bar_config(disable=True)
            for k, (width, height) in enumerate(sizes):
                picked = list(range(k, num_images, len(sizes)))
                if not picked:
                    continue
                generator = torch.Generator(self.device).manual_seed(seed + k)
                with self.accelerator.autocast():
                    made = pipe(
                        [prompts[i % len(prompts)] for i in picked],
                        num_inference_steps=self.config.diffusion.num_inference_steps,
                        guidance_scale=self.options.validation_guidance_scale,
                        generator=generator,
                        height=height,
                        width=width,
                        **self.validation_inputs(len(picked)),
                    ).images
                for i, image in zip(picked, made):
                    images[i] = image
        return images

    def usage_loading(self, base: str, output: str = "OUTPUT_DIR_OR_REPO_ID") -> str:
        """The model card's lines that build the pipeline: `from diffusers import ...` and `pipe = ...`."""
        cls = self.pipeline_class().__name__
        return f'from diffusers import {cls}\n\npipe = {cls}.from_pretrained("{base}")'
