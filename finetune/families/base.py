"""What a model family is: the components of its pipeline folder and how they load, text -> conditioning, the
denoiser call, the pipeline classes, and the layout of LoRA weights and embeddings.

The text-to-image methods (`finetune.text_to_image.TextToImageMethod` and the methods on it) only talk to this
interface, so a new family is one file with one subclass and its recipes. A family holds no state: the components it
loads live on the method (which the training loop prepares and wraps), and are handed back to the family as a
mapping `parts` (component name -> module) when it encodes text, calls the denoiser or builds a pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch

from finetune.config import Config, ConfigError

logger = logging.getLogger(__name__)

MODEL_KEY = "model.pretrained_model_name_or_path"


class Family:
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    # model_index.json `_class_name`s of this family's pipeline folders (text-to-image, inpainting, img2img)
    pipeline_classes: ClassVar[tuple[str, ...]]
    text_to_image_pipeline: ClassVar[str]
    inpainting_pipeline: ClassVar[str | None] = None
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    # text encoders a run may leave out (model.drop_text_encoders), as the family's pipeline allows: SD3's T5
    optional_text_encoders: ClassVar[tuple[str, ...]] = ()
    # text encoders that train with train_text_encoder (a LoRA the family's pipeline loads, or all weights in a full
    # fine-tune): None, all of them; SD3 and Flux train their CLIP encoders, not T5
    trainable_text_encoders: ClassVar[tuple[str, ...] | None] = None
    # the denoiser's component name and diffusers class
    denoiser: ClassVar[str] = "unet"
    denoiser_class: ClassVar[str] = "UNet2DConditionModel"
    # the scheduler class that noises training examples (from the folder's scheduler config)
    training_scheduler: ClassVar[str] = "DDPMScheduler"
    # DDPM (noise, v or x0 targets) or rectified flow (velocity targets; FlowMatchEulerDiscreteScheduler)
    flow_matching: ClassVar[bool] = False
    # latent sides must be a multiple of this many pixels (the VAE's 8x; Flux packs 2x2 latents: 16)
    latent_multiple: ClassVar[int] = 8
    # kohya / WebUI key prefix of each LoRA'd component (lora_unet_..., lora_te_...); None: no standard layout
    kohya_prefixes: ClassVar[dict[str, str] | None] = {"unet": "lora_unet", "text_encoder": "lora_te"}
    # textual inversion: whether the family's pipeline loads embeddings (`load_textual_inversion`), and the file's
    # layout: text encoder -> key of its embedding (None: one encoder, `{token: tensor}` as diffusers'
    # textual_inversion.py writes it)
    textual_inversion: ClassVar[bool] = True
    embedding_keys: ClassVar[dict[str, str] | None] = None
    # ControlNet (Zhang et al. 2023): the diffusers class of the family's ControlNet and the pipeline that samples
    # with one; None where difftune does not train one for the family
    controlnet_class: ClassVar[str | None] = None
    controlnet_pipeline: ClassVar[str | None] = None
    default_model: ClassVar[str]
    # the model card's licence: Hub metadata id ("other" when the family's checkpoints differ) and a note on the
    # licences of its usual base models, which weights trained from them inherit
    license: ClassVar[str] = "other"
    license_note: ClassVar[str] = ""
    license_name: ClassVar[str | None] = None  # with license "other": the Hub's license_name and license_link
    license_link: ClassVar[str | None] = None

    def trainable_text_encoder_names(self) -> tuple[str, ...]:
        return self.text_encoders if self.trainable_text_encoders is None else self.trainable_text_encoders

    def loaded_text_encoders(self, config: Config) -> tuple[str, ...]:
        """The text encoders this run loads (all but those model.drop_text_encoders leaves out)."""
        return tuple(name for name in self.text_encoders if name not in config.model.drop_text_encoders)

    def tokenizer_of(self, text_encoder: str) -> str:
        return self.tokenizers[self.text_encoders.index(text_encoder)]

    # -- loading -----------------------------------------------------------------------------------------------------
    # transformers class of each tokenizer and text encoder (the VAE, UNet and scheduler are diffusers' everywhere)
    text_classes: ClassVar[dict[str, str]] = {"tokenizer": "CLIPTokenizer", "text_encoder": "CLIPTextModel"}

    def load(self, config: Config) -> dict[str, Any]:
        """Every component of the base pipeline: tokenizers, text encoders, vae, unet and the training noise
        scheduler (`noise_scheduler`). Weights load from safetensors only unless model.allow_pickle is set."""
        from finetune.preflight import check_model_path

        model = config.model
        pickle_hint = "" if model.allow_pickle else "set model.allow_pickle=true if you trust their source"
        # a missing folder or subfolder, corrupt weights, offline without the files: one line before any load
        path, subfolders = model.pretrained_model_name_or_path, self.subfolders(config)
        check_model_path(path, MODEL_KEY, "pipeline", pickle_hint, model.revision, subfolders)
        encoders = self.loaded_text_encoders(config)
        names = [*encoders, *map(self.tokenizer_of, encoders), "vae", self.denoiser, "noise_scheduler"]
        parts = {name: self.load_component(config, name) for name in names}
        for encoder in encoders:
            tokenizer = self.tokenizer_of(encoder)
            if parts[tokenizer].model_max_length > 100_000:  # a tokenizer saved without it defaults to ~1e30
                limit = getattr(parts[encoder].config, "max_position_embeddings", None)
                parts[tokenizer].model_max_length = limit or getattr(self, "max_sequence_length", 512)
        for encoder in set(self.text_encoders) - set(encoders):  # left out: the pipeline takes None
            parts[encoder] = parts[self.tokenizer_of(encoder)] = None
        return parts

    def load_component(self, config: Config, name: str) -> Any:
        """One component as the base model has it (in its stored precision); a failure is one line naming the path,
        the part and the fix."""
        import diffusers
        import transformers

        from finetune.preflight import describe_load_error

        model = config.model
        path, subfolder = model.pretrained_model_name_or_path, "scheduler" if name == "noise_scheduler" else name
        weights = dict(revision=model.revision, variant=model.variant)
        weights["use_safetensors"] = None if model.allow_pickle else True
        if name == "noise_scheduler":  # the folder's schedule (betas and prediction type, or the flow shift)
            cls = getattr(diffusers, self.training_scheduler)
            load = lambda: cls.from_pretrained(path, subfolder=subfolder, revision=model.revision)  # noqa: E731
        elif name == "vae" and model.vae:  # a replacement VAE folder or Hub id (e.g. SDXL's fp16 fix)
            path, subfolder = model.vae, None
            load = lambda: diffusers.AutoencoderKL.from_pretrained(path, **weights)  # noqa: E731
        elif name == "vae":
            load = lambda: diffusers.AutoencoderKL.from_pretrained(path, subfolder=subfolder, **weights)  # noqa: E731
        elif name == self.denoiser:
            cls = getattr(diffusers, self.denoiser_class)
            weights.update(self.quantization(config))
            load = lambda: cls.from_pretrained(path, subfolder=subfolder, **weights)  # noqa: E731
        elif name in self.tokenizers:
            cls = getattr(transformers, self.text_classes[name])
            load = lambda: cls.from_pretrained(path, subfolder=subfolder, revision=model.revision)  # noqa: E731
        else:
            cls = getattr(transformers, self.text_classes[name])
            load = lambda: cls.from_pretrained(path, subfolder=subfolder, **weights)  # noqa: E731
        try:
            part = load()
        except Exception as err:  # noqa: BLE001 - OSError, ValueError, SafetensorError, hub errors: one line each
            pickle_hint = "" if model.allow_pickle else "set model.allow_pickle=true if you trust their source"
            raise ConfigError(describe_load_error(err, str(path), MODEL_KEY, subfolder or name, pickle_hint)) from err
        if name == "noise_scheduler" and config.diffusion.prediction_type is not None:
            if "prediction_type" not in part.config:
                raise ConfigError(
                    f"diffusion.prediction_type: the {self.name} family trains with flow matching (the velocity is "
                    "the target); remove diffusion.prediction_type"
                )
            part.register_to_config(prediction_type=config.diffusion.prediction_type)
        return part

    def quantization(self, config: Config) -> dict[str, Any]:
        """from_pretrained arguments that load the frozen denoiser quantized (model.quantize: nf4 through
        bitsandbytes, QLoRA, Dettmers et al. 2023); empty when it loads as stored."""
        if config.model.quantize == "none":
            return {}
        from finetune.compat import require_bitsandbytes_4bit

        require_bitsandbytes_4bit(config.model.quantize)
        from diffusers import BitsAndBytesConfig

        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.mixed_precision, torch.float32)
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        return {"quantization_config": quantization, "torch_dtype": compute}

    def denoiser_input_channels(self, latent_channels: int, inpainting: bool) -> int:
        """Channels the denoiser takes: the latents, or for an inpainting UNet twice them plus the mask."""
        return 2 * latent_channels + 1 if inpainting else latent_channels

    def vae_dtype(self, config: Config, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype the frozen VAE runs in (the mixed-precision one unless the family's VAE cannot take it)."""
        return weight_dtype

    # -- text --------------------------------------------------------------------------------------------------------
    def tokenize(self, tokenizer, texts: list[str]) -> torch.Tensor:
        return tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def encode_prompt(self, parts: dict[str, Any], texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Conditioning of each text, as tensors with the batch first (the latent cache stores one row of each)."""
        raise NotImplementedError

    def freeze_unused(self, parts: dict[str, Any]) -> list[str]:
        """Freeze trainable parameters that never reach the denoiser's input (their gradient would stay None, which
        DDP refuses); return their names. Nothing is unused in one-encoder families."""
        return []

    # -- the objective and the denoiser ------------------------------------------------------------------------------
    def objective(self, noise_scheduler, prediction_type: str, diffusion_config):
        """How examples are noised and what the denoiser is regressed onto: DDPM for the UNet families, rectified
        flow for the transformer families (their scheduler is a FlowMatchEulerDiscreteScheduler)."""
        from finetune.objectives import DDPMObjective, FlowMatchingObjective

        if self.flow_matching:
            return FlowMatchingObjective(
                noise_scheduler,
                diffusion_config.weighting_scheme,
                diffusion_config.logit_mean,
                diffusion_config.logit_std,
                diffusion_config.mode_scale,
                diffusion_config.flow_loss_weighting,
                dynamic_shift=bool(noise_scheduler.config.get("use_dynamic_shifting", False)),
            )
        return DDPMObjective(
            noise_scheduler, prediction_type, diffusion_config.snr_gamma, diffusion_config.noise_offset
        )

    def sampling_scheduler(self, noise_scheduler):
        """The scheduler of validation samples: DDIM on the training schedule for the DDPM families, the flow
        families' own Euler scheduler."""
        import diffusers

        sampler = diffusers.FlowMatchEulerDiscreteScheduler if self.flow_matching else diffusers.DDIMScheduler
        return sampler.from_config(noise_scheduler.config)

    def denoiser_inputs(self, config: Config, parts: dict[str, Any]) -> dict[str, Any]:
        """Constant inputs of the denoiser call in training, besides the text (Flux-dev's guidance scale), from the
        config and the loaded (unwrapped) components."""
        return {}

    def denoise(
        self,
        denoiser: torch.nn.Module,
        model_input: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        batch: dict[str, Any],
    ) -> torch.Tensor:
        raise NotImplementedError

    # -- ControlNet --------------------------------------------------------------------------------------------------
    def denoiser_kwargs(self, model_input: torch.Tensor, conditioning: dict[str, torch.Tensor], batch) -> dict:
        """The conditioning keyword arguments of the denoiser call, which a ControlNet takes too (UNet families)."""
        raise NotImplementedError

    def make_controlnet(
        self, denoiser: torch.nn.Module, vae: torch.nn.Module, pretrained: str | None = None, **load
    ) -> torch.nn.Module:
        """A ControlNet for the denoiser: copied from it with zero convolutions (`from_unet`, Zhang et al. 2023,
        section 3.2), its control encoder downsampling as much as the VAE (3 times for SD's 8x, fewer for a small
        VAE); or a pretrained one (a folder or Hub id, `subfolder`/`revision` in `load`) to train further."""
        import diffusers

        cls = getattr(diffusers, self.controlnet_class)
        if pretrained is not None:
            return cls.from_pretrained(pretrained, **load)
        downsamplings = len(vae.config.block_out_channels) - 1  # the VAE halves the image this many times
        channels = (16, 32, 96, 256, 256, 256)[: downsamplings + 1]  # diffusers' default for 8x: (16, 32, 96, 256)
        return cls.from_unet(denoiser, conditioning_embedding_out_channels=channels)

    def denoise_with_controlnet(
        self,
        denoiser: torch.nn.Module,
        controlnet: torch.nn.Module,
        model_input: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        batch: dict[str, Any],
        control: torch.Tensor,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """The denoiser with the ControlNet's residuals added to its skip connections and middle block, as the
        family's ControlNet pipeline calls them (Zhang et al. 2023, eq. 2); `control` is [B, 3, H, W] in [0, 1]."""
        kwargs = self.denoiser_kwargs(model_input, conditioning, batch)
        down, mid = controlnet(
            model_input,
            timesteps,
            controlnet_cond=control.to(model_input.dtype),
            conditioning_scale=scale,
            return_dict=False,
            **kwargs,
        )
        dtype = next(denoiser.parameters()).dtype
        return denoiser(
            model_input,
            timesteps,
            down_block_additional_residuals=[residual.to(dtype) for residual in down],
            mid_block_additional_residual=mid.to(dtype),
            **kwargs,
        ).sample

    # -- pipelines and files -----------------------------------------------------------------------------------------
    def pipeline_class(self, inpainting: bool = False, controlnet: bool = False):
        import diffusers

        if controlnet:
            if self.controlnet_pipeline is None:
                raise ConfigError(f"the {self.name} family has no ControlNet pipeline in difftune")
            return getattr(diffusers, self.controlnet_pipeline)
        name = self.inpainting_pipeline if inpainting else self.text_to_image_pipeline
        if name is None:
            raise ConfigError(f"the {self.name} family has no inpainting pipeline")
        return getattr(diffusers, name)

    def is_inpainting(self, pipeline_class: str | None) -> bool:
        """Whether a pipeline folder's model_index.json `_class_name` is this family's inpainting pipeline."""
        return pipeline_class is not None and pipeline_class == self.inpainting_pipeline

    def pipeline(self, parts: dict[str, Any], scheduler, inpainting: bool = False, controlnet=None):
        """A plain diffusers pipeline from (unwrapped) components and a sampling scheduler (the family's ControlNet
        pipeline when a ControlNet is given)."""
        raise NotImplementedError

    def kohya_state_dict(self, modules: dict[str, torch.nn.Module | None]) -> dict[str, torch.Tensor]:
        """The LoRA'd modules' adapters in kohya's key layout (`kohya_prefixes` + the module path with `_`)."""
        from finetune.lora_layers import kohya_state_dict

        return kohya_state_dict(modules, self.kohya_prefixes)

    def save_lora(
        self,
        output_dir: Path,
        layers: dict[str, dict[str, torch.Tensor]],
        metadata: dict[str, dict | None],
        inpainting: bool = False,
    ) -> Path:
        """`pytorch_lora_weights.safetensors` in the layout the family's pipeline `load_lora_weights` reads:
        `layers`/`metadata` map a component (unet, text_encoder, text_encoder_2) to its diffusers-keyed LoRA state
        and its peft config (alpha)."""
        kwargs = {}
        for component, state in layers.items():
            kwargs[f"{component}_lora_layers"] = state
            kwargs[f"{component}_lora_adapter_metadata"] = metadata.get(component)
        self.pipeline_class(inpainting).save_lora_weights(
            save_directory=str(output_dir), safe_serialization=True, **kwargs
        )
        return Path(output_dir) / "pytorch_lora_weights.safetensors"

    def subfolders(self, config: Config) -> tuple[str, ...]:
        """The component subfolders of a pipeline folder this family loads (the VAE's unless model.vae replaces it)."""
        encoders = self.loaded_text_encoders(config)
        tokenizers = tuple(map(self.tokenizer_of, encoders))
        return (*tokenizers, *encoders, self.denoiser, "scheduler", *(() if config.model.vae else ("vae",)))
