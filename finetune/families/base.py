"""What a model family is: the components of its pipeline folder and how they load, text -> conditioning, the
denoiser call, the pipeline classes, and the layout of LoRA weights and embeddings.

The text-to-image methods (`finetune.text_to_image.TextToImageMethod` and the methods on it) only talk to this
interface, so a new family is one file with one subclass and its recipes. A family holds no state: the components it
loads live on the method (which the training loop prepares and wraps), and are handed back to the family as a
mapping `parts` (component name -> module) when it encodes text, calls the denoiser or builds a pipeline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch

from finetune.config import Config, ConfigError

logger = logging.getLogger(__name__)

MODEL_KEY = "model.pretrained_model_name_or_path"


def pipeline_class_name(path: str, revision: str | None = None) -> str | None:
    """model_index.json's `_class_name` of a local folder or a Hub id (from the Hub cache when offline); None when
    the file cannot be read, which the component loaders then report with their own clear message."""
    local = Path(path).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            return None
        try:
            return json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "model_index.json", revision=revision)).read_text()).get(
            "_class_name"
        )
    except Exception:  # noqa: BLE001 - offline, no such repo: the loaders say which, with the fix
        return None


class Family:
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    # model_index.json `_class_name`s of this family's pipeline folders (text-to-image, inpainting, img2img)
    pipeline_classes: ClassVar[tuple[str, ...]]
    text_to_image_pipeline: ClassVar[str]
    inpainting_pipeline: ClassVar[str | None] = None
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    # kohya / WebUI key prefix of each LoRA'd component (lora_unet_..., lora_te_...)
    kohya_prefixes: ClassVar[dict[str, str]] = {"unet": "lora_unet", "text_encoder": "lora_te"}
    # textual inversion file: text encoder -> key of its embedding (None: one encoder, `{token: tensor}` as diffusers'
    # textual_inversion.py writes it)
    embedding_keys: ClassVar[dict[str, str] | None] = None
    default_model: ClassVar[str]

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
        names = [*self.text_encoders, *self.tokenizers, "vae", "unet", "noise_scheduler"]
        parts = {name: self.load_component(config, name) for name in names}
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            if parts[tokenizer].model_max_length > 100_000:  # a tokenizer saved without it defaults to ~1e30
                parts[tokenizer].model_max_length = parts[encoder].config.max_position_embeddings
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
        if name == "noise_scheduler":  # the folder's betas and prediction type, for training
            load = lambda: diffusers.DDPMScheduler.from_pretrained(path, subfolder=subfolder, revision=model.revision)  # noqa: E731
        elif name == "vae" and model.vae:  # a replacement VAE folder or Hub id (e.g. SDXL's fp16 fix)
            path, subfolder = model.vae, None
            load = lambda: diffusers.AutoencoderKL.from_pretrained(path, **weights)  # noqa: E731
        elif name in ("vae", "unet"):
            cls = diffusers.AutoencoderKL if name == "vae" else diffusers.UNet2DConditionModel
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
            part.register_to_config(prediction_type=config.diffusion.prediction_type)
        return part

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
        """How examples are noised and what the denoiser is regressed onto: DDPM for the UNet families."""
        from finetune.objectives import DDPMObjective

        return DDPMObjective(
            noise_scheduler, prediction_type, diffusion_config.snr_gamma, diffusion_config.noise_offset
        )

    def denoise(
        self,
        unet: torch.nn.Module,
        model_input: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        batch: dict[str, Any],
    ) -> torch.Tensor:
        raise NotImplementedError

    # -- pipelines and files -----------------------------------------------------------------------------------------
    def pipeline_class(self, inpainting: bool = False):
        import diffusers

        name = self.inpainting_pipeline if inpainting else self.text_to_image_pipeline
        if name is None:
            raise ConfigError(f"the {self.name} family has no inpainting pipeline")
        return getattr(diffusers, name)

    def is_inpainting(self, pipeline_class: str | None) -> bool:
        """Whether a pipeline folder's model_index.json `_class_name` is this family's inpainting pipeline."""
        return pipeline_class is not None and pipeline_class == self.inpainting_pipeline

    def pipeline(self, parts: dict[str, Any], scheduler, inpainting: bool = False):
        """A plain diffusers pipeline from (unwrapped) components and a sampling scheduler."""
        raise NotImplementedError

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
        return (*self.tokenizers, *self.text_encoders, "unet", "scheduler", *(() if config.model.vae else ("vae",)))
