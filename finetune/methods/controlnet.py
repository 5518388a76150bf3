"""ControlNet training (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models") on any
family that has a ControlNet (SD 1.x/2.x, SDXL).

Trains: a ControlNet, copied from the base UNet with zero convolutions (`ControlNetModel.from_unet`) or loaded from a
pretrained ControlNet to continue; the UNet, VAE and text encoders stay frozen (bit-identical). Data: captioned
images, each with a conditioning image (`data.conditioning_image_column`) cut with its image (resize, crop, bucket,
flip) and given to the ControlNet in pixel space; captions dropped with `caption_dropout` (0.5, as in the paper) so it
learns from the control alone. Loss: the diffusion objective of the UNet with the ControlNet's residuals added.
Saves: `controlnet/` (`ControlNetModel.from_pretrained(output_dir, subfolder="controlnet")`), for the family's plain
ControlNet pipeline; sample grids show control | generated pairs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from finetune.config import Config, ConfigError, option
from finetune.data import build_image_source
from finetune.families import family_names, get_family
from finetune.imaging import image_to_tensor, open_image
from finetune.masks import tensor_to_image
from finetune.text_to_image import TextToImageMethod, TextToImageOptions


@contextlib.contextmanager
def residuals_in(controlnet: torch.nn.Module, dtype: torch.dtype):
    """The ControlNet's residuals cast to the frozen UNet's dtype while a pipeline samples, as training casts them
    (family.denoise_with_controlnet): the pipelines add them to the UNet's features as they come, and the fp32
    residuals of a ControlNet trained beside a bf16 UNet turn those features fp32, which a CPU's bf16 group norms
    refuse (a GPU's autocast runs the norms in fp32)."""

    def cast(module, args, output):
        if not isinstance(output, tuple):  # (the pipelines ask for return_dict=False)
            return output
        down, mid = output[:2]  # the down blocks' residuals, the mid block's
        return (tuple(r.to(dtype) for r in down), mid.to(dtype), *output[2:])

    handle = controlnet.register_forward_hook(cast) if next(controlnet.parameters()).dtype != dtype else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


@dataclass
class ControlNetOptions(TextToImageOptions):
    controlnet_model_name_or_path: str | None = option(
        None,
        "A pretrained ControlNet to train further: a folder with config.json, a difftune output (its controlnet/ "
        "subfolder is used) or a Hub id. None: copied from the base UNet with zero convolutions (from_unet).",
    )
    caption_dropout: float = option(
        0.5,
        "Probability of training on the empty prompt: the ControlNet paper drops 50% of prompts, so the ControlNet "
        "learns to read the control image alone.",
    )
    validation_images: list[str] = option(
        default_factory=list,
        help="Control images of the sample grids, cycled with validation_prompts. Empty: the first training image's "
        "conditioning image.",
    )
    conditioning_scale: float = option(1.0, "controlnet_conditioning_scale of the sample grids.")

    def __post_init__(self):
        TextToImageOptions.__post_init__(self)
        if self.conditioning_scale < 0:
            raise ConfigError(f"conditioning_scale must be >= 0, got {self.conditioning_scale}")


def controlnet_families() -> list[str]:
    """The families difftune trains a ControlNet for."""
    return [name for name in family_names() if get_family(name).controlnet_class is not None]


def pretrained_controlnet(path: str) -> tuple[str, str | None]:
    """(path, subfolder) of a pretrained ControlNet: a folder with config.json, a difftune output with controlnet/, or
    a Hub id as it is."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return path, None
    if not (folder / "config.json").is_file() and (folder / "controlnet" / "config.json").is_file():
        return str(folder), "controlnet"
    return str(folder), None


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 2) -> Image.Image:
    """Two images next to each other (control | generated), on mid-grey."""
    pair = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (128, 128, 128))
    pair.paste(left.convert("RGB"), (0, 0))
    pair.paste(right.convert("RGB"), (left.width + gap, 0))
    return pair


class ControlNetTraining(TextToImageMethod):
    name = "controlnet"
    summary = "ControlNet (SD 1.x/2.x, SDXL) on captioned images with conditioning images (folder or Hub dataset)"
    Options = ControlNetOptions

    @classmethod
    def check_config(cls, config: Config) -> None:
        super().check_config(config)
        options, data = config.method_options, config.data
        if data.dataset == "digits":
            raise ConfigError(
                "controlnet: data.dataset=digits has no conditioning images; use an image folder whose metadata.jsonl "
                f"names each image's control in {data.conditioning_image_column!r} (python -m captioning.conditioning "
                "builds one), or a Hub dataset with that column"
            )
        if config.model.quantize != "none":
            raise ConfigError(
                f"model.quantize={config.model.quantize}: the ControlNet is copied from the UNet's weights, which a "
                "4-bit UNet does not have in full; set model.quantize=none"
            )
        for image in options.validation_images:
            if not Path(image).expanduser().is_file():
                raise ConfigError(f"controlnet.validation_images: {image!r} does not exist")
        pretrained = options.controlnet_model_name_or_path
        if pretrained and (pretrained.startswith((".", "/", "~")) or Path(pretrained).expanduser().exists()):
            path, subfolder = pretrained_controlnet(pretrained)
            if not (Path(path).expanduser() / (subfolder or "") / "config.json").is_file():
                raise ConfigError(
                    f"controlnet.controlnet_model_name_or_path: {pretrained!r} is not a ControlNet folder (no "
                    "config.json, nor controlnet/config.json)"
                )

    def check_family(self) -> None:
        super().check_family()
        family, base = self.family, self.config.model.pretrained_model_name_or_path
        if family.controlnet_class is None:
            raise ConfigError(
                f"method controlnet is not supported for the {family.name} family ({base!r}); difftune trains "
                f"ControlNets for: {', '.join(controlnet_families())}"
            )
        if family.is_inpainting(self.base_pipeline_class()):
            raise ConfigError(
                f"method controlnet trains on a text-to-image model, and {base!r} is an inpainting pipeline; use "
                "the text-to-image checkpoint it was made from"
            )

    def build_source(self):
        """Captioned images with their conditioning images, every one checked (missing, unreadable, of another
        size) before the models load."""
        data = self.config.data
        source = build_image_source(data, columns=[data.caption_column, data.conditioning_image_column])
        _ = source.conditioning
        return source

    def default_prompt(self) -> str:
        captions = self.all_captions()
        return captions[0] if captions else "a photo"

    # -- the ControlNet --------------------------------------------------------------------------------------------
    def configure_trainable(self) -> None:
        load, pretrained = {}, self.options.controlnet_model_name_or_path
        if pretrained:
            pretrained, subfolder = pretrained_controlnet(pretrained)
            load = {"subfolder": subfolder} if subfolder else {}
        try:
            controlnet = self.family.make_controlnet(self.denoiser, self.vae, pretrained, **load)
        except (OSError, ValueError) as err:
            raise ConfigError(f"controlnet.controlnet_model_name_or_path: cannot load {pretrained!r}: {err}") from err
        controlnet.to(self.device)
        if controlnet.dtype != torch.float32:  # trained in fp32 whatever the base model's precision
            controlnet.to(dtype=torch.float32)
        controlnet.requires_grad_(True)
        controlnet.train()
        if self.config.train.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        self.controlnet = controlnet

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"controlnet": self.controlnet}

    def compute_modules(self) -> list[torch.nn.Module]:
        """The UNet and the ControlNet: both run every step (train.channels_last, train.compile)."""
        return [self.denoiser, self.controlnet]

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        conditioning = {**self.text_conditioning(batch), **self.denoiser_inputs}
        control = batch["conditioning_pixel_values"].to(self.device)
        model_input = self.model_input(noisy, batch)
        with self.denoiser_autocast():
            return self.family.denoise_with_controlnet(
                self.denoiser, self.controlnet, model_input, timesteps, conditioning, batch, control
            )

    # -- samples ---------------------------------------------------------------------------------------------------
    def pipeline(self):
        scheduler = self.family.sampling_scheduler(self.noise_scheduler)
        return self.family.pipeline(self.parts(unwrap=True), scheduler, controlnet=self.unwrap(self.controlnet))

    def validation_control(self, index: int, size: tuple[int, int]) -> Image.Image:
        """Control image `index` of the grids (validation_images cycled, else the first training image's
        conditioning image), resized and centre-cropped to `size` (w, h)."""
        resolution = self.config.data.resolution
        bucket = None if size == (resolution, resolution) else size
        if self.options.validation_images:
            source = self.options.validation_images[index % len(self.options.validation_images)]
            source = Path(source).expanduser()
        else:
            records = self.train_dataset.source
            source = records.conditioning.sources[records.indices[0]]
        pixels, _ = image_to_tensor(open_image(source), resolution, 3, np.random.default_rng(0), bucket=bucket)
        return tensor_to_image(pixels)

    def validation_inputs(self, num_images: int, size=None, indices=None) -> dict[str, Any]:
        size = size or (self.config.data.resolution,) * 2
        indices = indices if indices is not None else list(range(num_images))
        return {
            "image": [self.validation_control(i, size) for i in indices],
            "controlnet_conditioning_scale": self.options.conditioning_scale,
        }

    @torch.no_grad()
    def sample(self, num_images: int, seed: int) -> list:
        """control | generated, one pair per image of the grid."""
        unet_dtype = next(self.denoiser.parameters()).dtype
        with residuals_in(self.unwrap(self.controlnet), unet_dtype):
            images = super().sample(num_images, seed)
        return [side_by_side(self.validation_control(i, image.size), image) for i, image in enumerate(images)]

    # -- outputs ---------------------------------------------------------------------------------------------------
    def save(self, output_dir: Path) -> None:
        self.unwrap(self.controlnet).save_pretrained(str(Path(output_dir) / "controlnet"), safe_serialization=True)

    def card(self) -> dict[str, Any]:
        base = self.config.model.pretrained_model_name_or_path
        pipeline = self.family.pipeline_class(controlnet=True).__name__
        controlnet = self.family.controlnet_class
        prompt = self.validation_prompts()[0]
        guidance = self.options.validation_guidance_scale
        return {
            **self.license_facts(),
            "base_model": base,
            "tags": ["controlnet", *self.card_tags()],
            "description": f"A ControlNet for `{base}`, trained with [difftune](https://github.com/) method "
            "`controlnet`. The sample grid shows control | generated pairs.",
            "usage": f"""
from diffusers import {controlnet}, {pipeline}
from diffusers.utils import load_image

controlnet = {controlnet}.from_pretrained("OUTPUT_DIR_OR_REPO_ID", subfolder="controlnet")
pipe = {pipeline}.from_pretrained("{base}", controlnet=controlnet)
control = load_image("control.png")  # a conditioning image like the training ones
image = pipe("{prompt}", image=control, num_inference_steps=30, guidance_scale={guidance}).images[0]
""",
        }
