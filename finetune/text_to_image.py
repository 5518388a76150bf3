"""What every text-to-image method shares, whatever the model family: loading the family's components, text
conditioning, latent and text-embedding caches, the denoiser call, and validation through the family's plain
diffusers pipeline built from the modules being trained.

A method subclasses `TextToImageMethod` and says which parameters train (`configure_trainable`), where its images
and captions come from (`build_source`, `caption_for`) and what it saves. It never names a family or a pipeline
class: `self.family` (finetune/families/) answers for SD 1.x/2.x, SDXL and the families after them.

Inpainting is a variant of every method, not a method: when the base model's denoiser also takes a mask and the
masked image's latents (an inpainting checkpoint), each example gets a mask from the data layer (finetune/masks.py),
the denoiser gets the channels the family's inpainting pipeline builds, and the outputs are for that pipeline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from finetune import atomic, diffusion, speed
from finetune import latent_cache as lc
from finetune.config import Config, ConfigError, option
from finetune.data import TrainingExamples, build_image_source
from finetune.families import local_family, pipeline_class_name, resolve_family
from finetune.families.base import Family
from finetune.file_pages import replace_tensors
from finetune.imaging import record_path
from finetune.latent_cache import LatentCache, tokenizer_identity
from finetune.masks import InpaintingMaskOptions, InpaintingMasks, find_user_masks, pixel_loss_weights
from finetune.methods.base import Method, eval_mode
from finetune.objectives import batch_weights, combined_weights, weighted_mse

logger = logging.getLogger(__name__)

TEXT_BATCH = 32  # captions encoded at once for the text cache


def input_embeddings_train(module: torch.nn.Module) -> tuple[bool, bool]:
    """Whether a transformers model's input embeddings train, and whether anything else in it does."""
    embeddings = getattr(module, "get_input_embeddings", lambda: None)()
    if embeddings is None or not any(p.requires_grad for p in embeddings.parameters()):
        return False, False
    rows = {id(p) for p in embeddings.parameters()}
    return True, any(p.requires_grad for p in module.parameters() if id(p) not in rows)


def frozen_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a model's frozen weights under mixed precision `dtype`: `dtype`, except in a text encoder that
    trains whole (full DreamBooth), whose few frozen parts (the layers after the one the denoiser reads) stay fp32
    beside the fp32 weights that feed them: a CPU's bf16 layer norms refuse fp32 features."""
    embeddings_train, rest_trains = input_embeddings_train(module)
    return torch.float32 if embeddings_train and rest_trains else dtype


def round_learnt_rows(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Where only the input embeddings train (Textual Inversion's text encoders), their output is cast to the frozen
    weights' `dtype`: the fp32 rows being learnt would otherwise turn every activation after them fp32. The rows
    stay fp32 (the optimizer's master copy); only their use in the forward is rounded, as autocast rounds a weight."""
    embeddings_train, rest_trains = input_embeddings_train(module)
    if embeddings_train and not rest_trains and dtype != torch.float32:
        module.get_input_embeddings().register_forward_hook(lambda _module, _args, output: output.to(dtype))


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)` without diffusers' warning about modules to keep in float32 when the model has none (it warns
    on every cast, naming `[]`); a model that does keep modules in float32 still gets the warning."""
    from diffusers.utils import logging as diffusers_logging

    if getattr(model, "_keep_in_fp32_modules", None):
        model.to(dtype=dtype)
        return
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        model.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)


@dataclass
class TextToImageOptions(InpaintingMaskOptions):
    cache: Literal["none", "memory", "disk"] = option(
        "none",
        "Encode every image with the VAE (and every caption with frozen text encoders) once before training: "
        "'memory', or 'disk' (safetensors reused by later runs on the same data).",
    )
    cache_dir: str | None = option(
        None,
        "Folder of the disk cache (share one between runs on the same data). None: <output_dir>/.cache.",
    )
    cache_shard_mb: float = option(
        128.0,
        "Disk cache: the most a shard file holds (MB, and at most 1024 images or captions: latents and text "
        "conditioning have shards of their own); each is written as it fills and kept if the run is killed.",
    )
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
        InpaintingMaskOptions.__post_init__(self)
        if self.cache_shard_mb <= 0:
            raise ConfigError(f"cache_shard_mb must be positive, got {self.cache_shard_mb}")
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


class TextToImageMethod(Method):
    """A denoiser on VAE latents conditioned on text (Rombach et al. 2022), through a model family."""

    # True once the base model is known to be an inpainting model (its denoiser also takes a mask and the masked
    # image's latents): set in setup from model_index.json and the denoiser's input channels
    inpainting: bool = False
    masks: InpaintingMasks | None = None

    @classmethod
    def check_config(cls, config: Config) -> None:
        options, section = config.method_options, config.method
        if config.data.resolution % 8:
            raise ConfigError(
                f"data.resolution={config.data.resolution} must be a multiple of 8 (the VAE downsamples by 8)"
            )
        if options.cache != "none" and not config.data.center_crop:
            raise ConfigError(
                f"{section}.cache needs data.center_crop=true: a random crop differs every epoch and cannot be "
                "cached. Turn off the cache or use center crops."
            )
        if (options.mask_data_dir or options.mask_column) and not config.data.center_crop:
            raise ConfigError(
                "user masks need data.center_crop=true: a random crop of the image cannot be repeated on its mask"
            )
        images = cls.image_folder(config)
        if options.mask_data_dir and images is not None:
            images, masks = images.expanduser().resolve(), Path(options.mask_data_dir).expanduser().resolve()
            if masks == images or images in masks.parents:
                raise ConfigError(
                    f"{section}.mask_data_dir is inside the training image folder {str(images)!r}: the masks would "
                    "be read as training images. Use a folder outside it."
                )

    @classmethod
    def image_folder(cls, config: Config) -> Path | None:
        """The local folder of the training images (None: not a folder)."""
        folder = Path(config.data.dataset).expanduser()
        return folder if folder.is_dir() else None

    # -- what a method decides ---------------------------------------------------------------------------------------
    @property
    def needs_pixels_with_cache(self) -> bool:
        """True when the loss uses the images themselves even with cached latents (the masked image of inpainting
        changes with every example's mask)."""
        return self.inpainting

    def build_source(self):
        """Images with a caption column (the LoRA / fine-tuning data), and the mask column when masks are listed."""
        columns = [self.config.data.caption_column, *self.mask_columns()]
        return build_image_source(self.config.data, columns=columns, verify_memo=self.verify_memo)

    @property
    def verify_memo(self) -> Path | None:
        """With a disk cache, data.verify_images keeps its verdicts in it (`verified-images.json`, one per
        data.max_image_pixels: its 'too large' verdicts): a reused cache's run opens only the images changed since
        (their size or modification time)."""
        if getattr(self.options, "cache", "none") != "disk":
            return None
        limit = self.config.data.max_image_pixels
        return self.cache_dir / ("verified-images.json" if limit is None else f"verified-images-max{limit}.json")

    @property
    def cache_dir(self) -> Path:
        return Path(self.options.cache_dir or Path(self.config.train.output_dir) / ".cache")

    def mask_columns(self) -> list[str]:
        return [self.options.mask_column] if self.options.mask_column else []

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
    def denoiser(self) -> torch.nn.Module:
        """The family's denoiser (the UNet of SD 1.x/2.x and SDXL, the transformer of SD3 and Flux)."""
        return getattr(self, self.family.denoiser)

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The family's text encoders this run loaded, by component name (text_encoder, text_encoder_2, ...)."""
        return {name: getattr(self, name) for name in self.family.text_encoders if getattr(self, name) is not None}

    def parts(self, unwrap: bool = False) -> dict[str, Any]:
        """Every component by name, as the family takes them (unwrapped from DDP for pipelines and saving); a text
        encoder left out (or freed after caching) is None."""
        names = [*self.family.tokenizers, *self.family.text_encoders, "vae", self.family.denoiser]
        modules = {name: getattr(self, name, None) for name in names}
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
        self.check_family()
        source = self.build_source()
        self.inpainting = self.family.is_inpainting(self.base_pipeline_class())
        self.prepare_masks(source)  # user masks are checked before the models load
        if self.config.data.masked_loss:  # loss masks too (the prior-preservation wrapper adds class images later)
            _ = source.loss_masks
        for name, part in self.load_components().items():
            setattr(self, name, part)
        # DDPM families predict epsilon, v or x0; flow matching always the velocity
        self.prediction_type = getattr(self.noise_scheduler.config, "prediction_type", None) or "flow"
        self.denoiser_inputs = self.family.denoiser_inputs(self.config, self.parts())
        self.objective = self.family.objective(self.noise_scheduler, self.prediction_type, self.config.diffusion)
        self.check_models()
        self.prepare_masks(source)  # (an inpainting UNet in a folder whose model_index.json does not say so)
        self.vae.requires_grad_(False)
        vae_dtype = self.family.vae_dtype(self.config, self.weight_dtype)
        if self.vae.dtype != vae_dtype:  # (before the move: the device never holds the VAE in two precisions)
            cast_model(self.vae, vae_dtype)
        self.vae.to(self.device).eval()
        denoiser_and_text = [self.denoiser, *self.text_encoders.values()]
        for module in denoiser_and_text:
            module.requires_grad_(False)
            module.eval()
        self.configure_trainable()
        unused = self.family.freeze_unused(self.parts())
        if unused:
            logger.info("%d parameters never reach the denoiser and stay frozen, e.g. %s", len(unused), unused[0])
        for module in denoiser_and_text:
            # frozen weights in the mixed-precision dtype, trainable ones in fp32, never rounded through fp16 first;
            # each cast as it moves, so the device never holds a frozen fp32 copy (a stored-precision Flux
            # transformer is 48 GB in fp32, 24 in bf16), and the host gives back each weight's pages of the
            # memory-mapped file once it is copied (SD 1.5 at 256 px in bf16: peak RSS 5.6 -> 2.4 GB)
            if getattr(module, "is_quantized", False):  # (4-bit weights: moved as bitsandbytes packed them, first)
                module.to(self.device)
            frozen = frozen_dtype(module, self.weight_dtype)

            def placed(tensor: torch.Tensor, frozen: torch.dtype = frozen) -> torch.Tensor:
                if isinstance(tensor, torch.nn.Parameter) and tensor.dtype.is_floating_point:
                    return tensor.data.to(self.device, torch.float32 if tensor.requires_grad else frozen)
                return tensor.data.to(self.device)  # (buffers keep their dtype, as `module.to(device)` does)

            replace_tensors(module, placed)
            round_learnt_rows(module, self.weight_dtype)
        if self.config.train.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
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

    @classmethod
    def model_subfolders(cls, config: Config) -> tuple[str, ...]:
        return local_family(config).subfolders(config)

    def data_source(self):
        self.family = self.resolve_family()  # (build_source asks the family for its columns and sizes)
        self.check_family()
        return self.build_source()

    def resolve_family(self) -> Family:
        return resolve_family(self.config)

    def check_family(self) -> None:
        """What this run asks of the family, checked before anything loads: one line naming the option and what
        the family supports."""
        family, model, section = self.family, self.config.model, self.config.method
        dropped = sorted(set(model.drop_text_encoders) - set(family.optional_text_encoders))
        if dropped:
            allowed = ", ".join(family.optional_text_encoders) or "none"
            raise ConfigError(
                f"model.drop_text_encoders: a {family.name} model cannot leave out {', '.join(dropped)} (it may "
                f"leave out: {allowed})"
            )
        if getattr(self.options, "export_kohya", False) and family.kohya_prefixes is None:
            raise ConfigError(
                f"{section}.export_kohya: there is no standard kohya key layout for {family.name} LoRAs; the "
                "diffusers file pytorch_lora_weights.safetensors loads in ComfyUI and Forge as it is. Remove "
                "export_kohya."
            )
        if model.quantize != "none":
            from finetune.compat import require_bitsandbytes_4bit

            require_bitsandbytes_4bit(model.quantize)
        if model.quantize != "none" and not getattr(self.options, "use_lora", True):
            raise ConfigError(
                f"model.quantize={model.quantize} freezes the {family.denoiser} in 4 bits: train LoRA on top "
                f"({section}.use_lora=true), or set model.quantize=none for a full fine-tune"
            )

    def base_pipeline_class(self) -> str | None:
        model = self.config.model
        if not model.pretrained_model_name_or_path:  # trained from scratch: nothing to ask the Hub about
            return None
        return pipeline_class_name(str(model.pretrained_model_name_or_path), model.revision)

    def prepare_masks(self, source) -> None:
        """An inpainting model's masks (user masks found and checked); a mask option for a text-to-image model is a
        mistake worth one line."""
        section = self.config.method
        if not self.inpainting:
            if self.options.user_masks_given():
                raise ConfigError(
                    f"{section}.mask_data_dir / mask_column / validation_image / validation_mask are for inpainting "
                    f"models, and {self.config.model.pretrained_model_name_or_path!r} is a text-to-image model: "
                    "remove them, or train an inpainting checkpoint"
                )
            return
        if self.masks is None:
            user_masks = find_user_masks(source, self.image_folder(self.config), self.options, section)
            self.masks = InpaintingMasks(self.options, self.config.data.resolution, user_masks)
            self.mask_records = source

    def load_components(self) -> dict[str, Any]:
        """The base pipeline's components, from the family (a method that builds new ones, such as latent diffusion
        from scratch, overrides this). They load as stored: safetensors are memory-mapped, so nothing is read until
        set-up casts each frozen weight on its way to the device. (Loading straight into bf16 was measured: it reads
        the whole fp32 file first and raised SD 1.5's peak resident memory by 150 MB.)"""
        return self.family.load(self.config)

    def check_models(self) -> None:
        """The denoiser takes the VAE's latents (text-to-image) or twice them plus a mask (inpainting)."""
        latent, channels = self.vae.config.latent_channels, self.denoiser.config.in_channels
        inpainting_channels = self.family.denoiser_input_channels(latent, inpainting=True)
        if channels == inpainting_channels and self.family.inpainting_pipeline:
            self.inpainting = True
        elif channels == self.family.denoiser_input_channels(latent, inpainting=False):
            if self.inpainting:
                raise ConfigError(
                    f"{self.config.model.pretrained_model_name_or_path!r} is an inpainting pipeline, but its UNet "
                    f"takes {channels} input channels (an inpainting UNet takes {2 * latent + 1}: noisy latents, "
                    "mask, masked-image latents)"
                )
        else:
            expected = self.family.denoiser_input_channels(latent, inpainting=False)
            raise ConfigError(
                f"the {self.family.denoiser} of {self.config.model.pretrained_model_name_or_path!r} takes {channels} "
                f"input channels; the VAE's latents have {latent} (a {self.family.name} text-to-image model takes "
                f"{expected})"
            )

    def make_example(self, example: dict, rng: np.random.Generator) -> dict:
        is_class = bool(example.get("prior", False))  # (caption_for takes it off)
        for column in self.mask_columns():
            example.pop(column, None)
        text = self.caption_for(example, rng)
        if self.options.caption_dropout and rng.random() < self.options.caption_dropout:
            text = ""  # classifier-free guidance: sometimes train unconditioned
        example["text"] = text
        if self.masks is not None:
            height, width = (int(side) for side in example["target_size"])  # the example's bucket, or the square
            example["mask"] = self.masks.mask_for(example["row"], example["flipped"], is_class, rng, (width, height))
        return example

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        modules = {}
        for name, module in {self.family.denoiser: self.denoiser, **self.text_encoders}.items():
            if any(p.requires_grad for p in self.unwrap(module).parameters()):
                modules[name] = module
        return modules

    def compute_modules(self) -> list[torch.nn.Module]:
        """The denoiser, trained or frozen (Textual Inversion trains an embedding but runs the UNet every step)."""
        return [self.denoiser]

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
        cache_dir = self.cache_dir
        if self.options.cache == "disk":
            cache = LatentCache(self.disk_moments(cache_dir))
        else:
            cache = LatentCache(self.memory_moments())
        if not self.text_encoder_trains:
            cache.text = self.text_cache(cache_dir if self.options.cache == "disk" else None)
        self.cache = cache
        logger.info("cached %d latents and %d text embeddings", len(cache.moments), len(cache.text))
        source = self.train_dataset.source
        if not self.needs_pixels_with_cache and hasattr(source, "decode_pixels"):
            source.decode_pixels = False  # the latents come from the cache: stop decoding and resizing every step
        if cache.text:
            self.free_text_encoders()

    @property
    def cache_flips(self) -> tuple[bool, ...]:
        return (False, True) if self.config.data.random_flip else (False,)

    def memory_moments(self) -> dict[tuple[int, bool], torch.Tensor]:
        """Every example's moments in RAM (cache=memory), in the training dtype; every process encodes them all."""
        source, moments = self.train_dataset.source, {}
        main = self.accelerator.is_main_process
        if main:
            logger.info("cache: encoding the latents of %d images (in memory)", len(source))
        bar = lc.progress_bar(len(source), "caching latents", main and self.config.train.progress_bar)
        start = time.perf_counter()
        for keys, values, count in self.encode_examples(list(range(len(source)))):
            moments.update({key: value.to(self.weight_dtype) for key, value in zip(keys, values)})
            bar.update(count)
        bar.close()
        if main:
            logger.info("cache: encoded %s", lc.format_rate(len(source), time.perf_counter() - start))
        return moments

    def disk_moments(self, cache_dir: Path) -> lc.ShardedMoments:
        """The sharded disk cache (finetune/latent_cache.py): the shards not on disk yet are encoded, each process its
        share, then every process reads all of them lazily."""
        accelerator = self.accelerator
        fingerprint = self.cache_fingerprint()
        folder = cache_dir / f"latents-{fingerprint[:16]}"
        shards = lc.plan_shards(self.example_bytes(), int(self.options.cache_shard_mb * 2**20))
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            atomic.remove_stale_temporaries(folder, cache_dir)  # a killed run's half-written shard (or text cache)
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        done = lc.write_shards(
            folder,
            shards,
            fingerprint,
            self.encode_examples,
            self.weight_dtype,
            accelerator.process_index,
            accelerator.num_processes,
            progress=self.config.train.progress_bar,
            barrier=accelerator.wait_for_everyone,
        )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            seconds = time.perf_counter() - start
            logger.info(
                "cache: encoded %s on %d process(es), %d of %d shards reused; %s holds %.1f MB",
                lc.format_rate(done["images"], seconds),
                accelerator.num_processes,
                done["reused"],
                done["shards"],
                folder,
                lc.disk_size(folder) / 1e6,
            )
        return lc.ShardedMoments(folder, shards)

    def example_bytes(self) -> list[int]:
        """The bytes each example's cached moments take (both flips with data.random_flip), in source order."""
        source = self.train_dataset.source
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        channels = 2 * self.vae.config.latent_channels
        per_value = torch.empty((), dtype=self.weight_dtype).element_size() * channels * len(self.cache_flips)
        if self.config.data.aspect_buckets:
            return [per_value * (w // factor) * (h // factor) for w, h in source.example_buckets()]
        side = self.config.data.resolution // factor
        return [per_value * side * side] * len(source)

    def text_cache(self, cache_dir: Path | None) -> MutableMapping[str, dict[str, torch.Tensor]]:
        """Every caption's conditioning (and the empty prompt's): in memory (each process encodes them all), or with
        a disk cache, the sharded `text-<fingerprint>/` folder, written and read as the latents are (`disk_texts`)."""
        texts = sorted({""} | set(self.all_captions()))
        if cache_dir is not None:
            return self.disk_texts(cache_dir, texts)
        main = self.accelerator.is_main_process
        start, text = time.perf_counter(), {}
        for first in range(0, len(texts), TEXT_BATCH):  # in batches: 100k captions one by one take hours
            chunk = texts[first : first + TEXT_BATCH]
            encoded = self.encode_text(chunk)
            for i, t in enumerate(chunk):
                text[t] = {key: value[i].cpu().clone() for key, value in encoded.items()}
        if main:
            rate = lc.format_rate(len(texts), time.perf_counter() - start, "captions")
            logger.info("cache: encoded %s (in memory)", rate)
        return text

    def disk_texts(self, cache_dir: Path, texts: list[str]) -> lc.ShardedTexts:
        """The sharded text cache: captions (sorted) planned into shards of at most cache_shard_mb, the shards not on
        disk yet encoded (each process its share), then every process reads all of them lazily (`ShardedTexts`):
        at Stable Diffusion's sizes (77 x 768 fp32 per caption) 100k captions are 23 GB, which no process holds."""
        accelerator = self.accelerator
        fingerprint = self.text_fingerprint(texts)
        folder = cache_dir / f"text-{fingerprint[:16]}"
        sample = self.encode_text([""])  # every caption's conditioning has the same shapes: one says the size
        text_bytes = sum(value[0].numel() * value.element_size() for value in sample.values())
        shards = lc.plan_shards([text_bytes] * len(texts), int(self.options.cache_shard_mb * 2**20))
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            atomic.remove_stale_temporaries(folder)  # a killed run's half-written shard
        accelerator.wait_for_everyone()

        def encode_captions(positions: list[int]):
            for first in range(0, len(positions), TEXT_BATCH):  # in batches: 100k captions one by one take hours
                chunk = positions[first : first + TEXT_BATCH]
                encoded = self.encode_text([texts[p] for p in chunk])
                named = {
                    lc.text_key(p, key): value[i].cpu().contiguous()
                    for i, p in enumerate(chunk)
                    for key, value in encoded.items()
                }
                yield named, len(chunk)

        start = time.perf_counter()
        done = lc.write_tensor_shards(
            folder,
            shards,
            fingerprint,
            encode_captions,
            accelerator.process_index,
            accelerator.num_processes,
            progress=self.config.train.progress_bar,
            what="text conditioning",
            unit="captions",
            barrier=accelerator.wait_for_everyone,
        )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            logger.info(
                "cache: encoded %s on %d process(es), %d of %d shards reused; %s holds %.1f MB",
                lc.format_rate(done["images"], time.perf_counter() - start, "captions"),
                accelerator.num_processes,
                done["reused"],
                done["shards"],
                folder,
                lc.disk_size(folder) / 1e6,
            )
        return lc.ShardedTexts(folder, shards, texts)

    @torch.no_grad()
    def free_text_encoders(self) -> None:
        """With every caption's conditioning cached (frozen text encoders), the encoders are no longer needed: the
        validation prompts are encoded once more, then the encoders are dropped (T5-XXL alone is ~9 GB in bf16).
        Samples use the cached conditioning; a saved full pipeline reloads them from the base model."""
        for text in [*self.validation_prompts(), ""]:
            if text not in self.cache.text:
                self.cache.text[text] = {key: value[0].cpu() for key, value in self.encode_text([text]).items()}
        freed = 0
        for name, module in self.text_encoders.items():
            freed += sum(p.numel() * p.element_size() for p in module.parameters())
            setattr(self, name, None)
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info(
            "text conditioning cached: freed the text encoders (%s, %.2f GB)",
            ", ".join(self.family.text_encoders),
            freed / 1e9,
        )

    @property
    def text_encoders_freed(self) -> bool:
        return self.cache is not None and bool(self.cache.text) and not self.text_encoders

    def cache_fingerprint(self) -> str:
        """Everything that changes the cached latents: the VAE (its weights and dtype), the images (paths, sizes,
        modification times, in order), how they are cut (resolution or each example's bucket, crop, flip, pixel
        limit) and the storage dtype. Methods with more inputs extend it."""
        data = self.config.data
        source = self.train_dataset.source
        key = {
            "vae": lc.module_digest(self.vae),
            "family": self.family.name,
            "dataset": [data.dataset, data.dataset_config_name, data.split],
            "images": lc.files_digest(source_paths(source)),
            "examples": len(source),
            "resolution": data.resolution,
            "center_crop": data.center_crop,
            "flips": self.cache_flips,
            "channels": data.channels,
            "max_image_pixels": data.max_image_pixels,
            "dtype": str(self.weight_dtype),
        }
        if data.aspect_buckets:  # the latents' shapes: every example's bucket
            key["buckets"] = [list(bucket) for bucket in source.example_buckets()]
        return lc.digest(key)

    def text_fingerprint(self, texts: list[str]) -> str:
        """Everything that changes the cached text conditioning: the text encoders (the base model, which of them,
        their configs, weights and dtype), the tokenizers (vocabulary, max length) and the texts: prompts and
        captions, which is why they are not in the latents' fingerprint."""
        model = self.config.model
        key = {
            "model": [model.pretrained_model_name_or_path, model.revision, sorted(model.drop_text_encoders)],
            "family": self.family.name,
            "encoders": {name: lc.module_digest(m) for name, m in self.text_encoders.items()},
            "tokenizers": {name: tokenizer_identity(getattr(self, name, None)) for name in self.family.tokenizers},
            "dtype": str(self.weight_dtype),
            "texts": lc.digest(texts),
        }
        return lc.digest(key)

    @torch.no_grad()
    def encode_examples(self, indices: list[int]):
        """Yield (keys (row, flipped), moments [B, 2C, h, w] in fp32 on the CPU, images) per VAE batch of up to 16,
        for the examples `indices` of the source; a new bucket shape starts a new batch."""
        source = self.train_dataset.source
        flips = self.cache_flips
        rng = np.random.default_rng(0)  # unused by center crops; flips are applied explicitly below
        keys: list[tuple[int, bool]] = []
        batch: list[torch.Tensor] = []

        def flush():
            pixels = torch.stack(batch).to(self.device, self.vae.dtype)
            moments = self.vae.encode(pixels).latent_dist.parameters.float().cpu()
            done = (list(keys), moments, len(keys) // len(flips))
            keys.clear()
            batch.clear()
            return done

        for index in indices:
            example = source.get(index, rng)
            pixels = example["pixel_values"].flip(-1) if example["flipped"] else example["pixel_values"]
            if batch and pixels.shape != batch[0].shape:  # another bucket: encode the ones so far
                yield flush()
            for flip in flips:
                keys.append((example["row"], flip))
                batch.append(pixels.flip(-1) if flip else pixels)
                if len(keys) == 16:
                    yield flush()
        if keys:
            yield flush()

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
            moments = [self.cache.moments[(row, bool(flip))] for row, flip in keys]
            return speed.host_to_device(torch.stack(moments), self.device, torch.float32)
        with torch.no_grad():
            pixels = batch["pixel_values"].to(self.device, self.vae.dtype)
            return self.vae.encode(pixels).latent_dist.parameters.float()

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        # sample the VAE posterior with the example's own seed, so cached and uncached runs see the same latents
        mean, logvar = self.latent_moments(batch).chunk(2, dim=1)
        generators = diffusion.example_generators(batch["seed"] + 1)
        eps = speed.host_to_device(diffusion.seeded_noise(generators, tuple(mean.shape[1:])), mean.device)
        latents = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def text_conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.cache is not None and self.cache.text:
            rows = [self.cache.text[text] for text in batch["text"]]
            return {key: speed.host_to_device(torch.stack([row[key] for row in rows]), self.device) for key in rows[0]}
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

        # loss: per-example MSE, weighted (min-SNR, prior preservation; per pixel by the loss masks), batch-averaged
        pixel_weights = None
        if "loss_mask" in batch:
            size = tuple(target.shape[-2:])
            pixel_weights = pixel_loss_weights(batch["loss_mask"], size, self.config.data.unmasked_weight)
        return weighted_mse(prediction, target, self.loss_weights(timesteps, batch), pixel_weights), {}

    def model_input(self, noisy: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """What the denoiser takes besides the time and the text: the noisy latents, and for an inpainting model the
        mask and the masked image's latents."""
        if not self.inpainting:
            return noisy
        return torch.cat([noisy, self.inpainting_conditioning(batch, tuple(noisy.shape[-2:]))], dim=1)

    def inpainting_conditioning(self, batch: dict[str, Any], latent_size: tuple[int, int]) -> torch.Tensor:
        """[mask at latent size (nearest), masked-image latents]: the channels the inpainting pipelines append to the
        noisy latents. The masked image is image x (mask < 0.5) in [-1, 1]; its latents are the VAE posterior mean
        (the pipelines sample the posterior: the difference is the VAE's tiny posterior noise)."""
        mask = batch["mask"].to(self.device, torch.float32)
        pixels = batch["pixel_values"].to(self.device, torch.float32)
        masked = pixels * (mask < 0.5)
        with torch.no_grad():
            latents = self.vae.encode(masked.to(self.vae.dtype)).latent_dist.mode().float()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        masked_latents = (latents - shift) * self.vae.config.scaling_factor
        return torch.cat([F.interpolate(mask, size=latent_size), masked_latents], dim=1)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        conditioning = self.text_conditioning(batch)
        conditioning = {**conditioning, **self.denoiser_inputs}
        model_input = self.model_input(noisy, batch)
        with self.denoiser_autocast():
            return self.family.denoise(self.denoiser, model_input, timesteps, conditioning, batch)

    def denoiser_autocast(self):
        """The mixed-precision autocast around the denoiser's call. accelerate autocasts the forward of the modules it
        prepared, the trained ones; a frozen low-precision UNet beside a trained text encoder (Textual Inversion) or
        ControlNet would otherwise meet fp32 inputs. (Not the VAE's encodes: SDXL's VAE stays fp32 for a reason.)"""
        return self.accelerator.autocast()

    # -- outputs -----------------------------------------------------------------------------------------------------
    def pipeline_class(self):
        """The family's diffusers pipeline class for this method (text-to-image or inpainting)."""
        return self.family.pipeline_class(self.inpainting)

    def pipeline(self):
        """Validation (and class-image) pipeline from the modules being trained, with the family's sampler."""
        scheduler = self.family.sampling_scheduler(self.noise_scheduler)
        return self.family.pipeline(self.parts(unwrap=True), scheduler, inpainting=self.inpainting)

    def validation_prompts(self) -> list[str]:
        return self.options.validation_prompts or [self.default_prompt()]

    def validation_inputs(
        self, num_images: int, size: tuple[int, int] | None = None, indices: list[int] | None = None
    ) -> dict[str, Any]:
        """Pipeline arguments of sample grids besides prompts, steps and seed, for the images `indices` of the grid
        (an inpainting pipeline needs an image and a mask, cut to the grid's size (w, h))."""
        if not self.inpainting:
            return {}
        pairs = self.__dict__.setdefault("_validation_pairs", {})
        if size not in pairs:
            pairs[size] = self.masks.validation_pair(self.mask_records, size)
        image, mask = pairs[size]
        return {"image": [image] * num_images, "mask_image": [mask] * num_images}

    def generation_inputs(self, num_images: int) -> dict[str, Any]:
        """Pipeline arguments that draw whole new images (class images of prior preservation): none for text to
        image, a full mask for inpainting."""
        if not self.inpainting:
            return {}
        return InpaintingMasks.class_generation_inputs(num_images, self.config.data.resolution)

    @torch.no_grad()
    def sample(self, num_images: int, seed: int) -> list:
        """Image i has prompt i and size i of the cycled validation prompts and sizes; one pipeline call per size,
        the k-th seeded with seed + k."""
        prompts = self.validation_prompts()
        resolution = self.config.data.resolution
        sizes = parse_sizes(self.options.validation_sizes) or [(resolution, resolution)]
        parts = self.parts(unwrap=True)
        images: list = [None] * num_images
        with eval_mode(parts[self.family.denoiser], *self.text_encoders.values()):
            pipe = self.pipeline()
            pipe.set_progress_bar_config(disable=True)
            for k, (width, height) in enumerate(sizes):
                picked = list(range(k, num_images, len(sizes)))
                if not picked:
                    continue
                generator = torch.Generator(self.device).manual_seed(seed + k)
                texts = [prompts[i % len(prompts)] for i in picked]
                prompt = {"prompt": texts}
                if self.text_encoders_freed:  # the pipeline takes the cached conditioning (and the empty prompt's)
                    prompt = self.cached_prompt_embeddings(texts)
                with self.accelerator.autocast():
                    made = pipe(
                        **prompt,
                        num_inference_steps=self.config.diffusion.num_inference_steps,
                        guidance_scale=self.options.validation_guidance_scale,
                        generator=generator,
                        height=height,
                        width=width,
                        **self.validation_inputs(len(picked), (width, height), picked),
                    ).images
                for i, image in zip(picked, made):
                    images[i] = image
        return images

    def sample_labels(self, num_images: int) -> list[str]:
        """Image i's prompt (and its size when the grid cycles several), as `sample` draws it."""
        prompts = self.validation_prompts()
        sizes = parse_sizes(self.options.validation_sizes)
        return [
            prompts[i % len(prompts)] + (f" ({'x'.join(map(str, sizes[i % len(sizes)]))})" if len(sizes) > 1 else "")
            for i in range(num_images)
        ]

    def cached_prompt_embeddings(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Pipeline arguments from cached conditioning: prompt_embeds (pooled_prompt_embeds ...) of the texts and
        negative_* of the empty prompt, the names every family's pipeline takes."""
        rows, empty = [self.cache.text[t] for t in texts], self.cache.text[""]
        dtype = self.weight_dtype
        kwargs = {key: torch.stack([row[key] for row in rows]).to(self.device, dtype) for key in rows[0]}
        for key, value in empty.items():
            kwargs[f"negative_{key}"] = value[None].expand(len(texts), *value.shape).to(self.device, dtype)
        return kwargs

    def usage_loading(self, base: str, output: str = "OUTPUT_DIR_OR_REPO_ID") -> str:
        """The model card's lines that build the pipeline: `from diffusers import ...` and `pipe = ...`."""
        cls = self.pipeline_class().__name__
        imports = "\nfrom diffusers.utils import load_image" if self.inpainting else ""
        return f'from diffusers import {cls}{imports}\n\npipe = {cls}.from_pretrained("{base}")'

    def usage_call(self, prompt: str) -> str:
        """The model card's generation line."""
        guidance = self.options.validation_guidance_scale  # (FLUX.1-dev: its guidance input, 3.5 in its recipes)
        if not self.inpainting:
            return f'image = pipe("{prompt}", num_inference_steps=30, guidance_scale={guidance}).images[0]'
        return f"""image = load_image("photo.png")
mask = load_image("mask.png")  # white = repaint, black = keep
result = pipe("{prompt}", image=image, mask_image=mask, num_inference_steps=30, guidance_scale={guidance}).images[0]
# keep the unmasked pixels exactly: result = pipe.image_processor.apply_overlay(mask, image, result)"""

    def license_facts(self) -> dict[str, str]:
        """The model card's licence: the base model's, as far as the family knows it."""
        base = self.config.model.pretrained_model_name_or_path
        note = f"Inherits the licence of the base model `{base}`. {self.family.license_note}".strip()
        facts = {"license": self.family.license, "license_note": note}
        if self.family.license_name:
            facts.update(license_name=self.family.license_name, license_link=self.family.license_link)
        return facts

    def card_prompt(self) -> str:
        """The prompt of the model card's usage line and metadata: one this run trained on (a caption of its data,
        the instance prompt), not a recipe's stock validation prompt."""
        return self.default_prompt()

    def card_tags(self) -> list[str]:
        """The task tags of the model card: the pipeline's task and the family."""
        return ["inpainting" if self.inpainting else "text-to-image", self.family.name]

    def pipeline_tag(self) -> str:
        """The Hub task of the model card's metadata."""
        return "image-to-image" if self.inpainting else "text-to-image"


def source_paths(source) -> list[str | None]:
    """The image files of a source's examples, in order (instance then class images with prior preservation); a
    record without a file (Hub bytes, the embedded digits) counts by its position."""
    if hasattr(source, "instance") and hasattr(source, "classes"):
        return [*source_paths(source.instance), None, *source_paths(source.classes)]
    if hasattr(source, "image_sources") and hasattr(source, "indices"):
        return [record_path(source.image_sources[row]) for row in source.indices]
    return [None] * len(source)
