"""Stable Diffusion 1.x / 2.x (Rombach et al. 2022): one CLIP text encoder whose last hidden states condition a
UNet2DConditionModel through cross-attention; DDPM noise objective (epsilon, or v for 2.x 768 px)."""

from __future__ import annotations

from typing import Any

import torch

from finetune.families.base import Family


class StableDiffusion(Family):
    name = "sd"
    summary = "Stable Diffusion 1.x / 2.x (CLIP text encoder, UNet, DDPM objective)"
    pipeline_classes = (
        "StableDiffusionPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionImg2ImgPipeline",
    )
    text_to_image_pipeline = "StableDiffusionPipeline"
    inpainting_pipeline = "StableDiffusionInpaintPipeline"
    controlnet_class = "ControlNetModel"
    controlnet_pipeline = "StableDiffusionControlNetPipeline"
    default_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    license = "creativeml-openrail-m"
    license_note = (
        "Stable Diffusion 1.x is under the CreativeML OpenRAIL-M licence, 2.x under OpenRAIL++-M: their use "
        "restrictions apply to these weights too."
    )

    def encode_prompt(self, parts: dict[str, Any], texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        ids = self.tokenize(parts["tokenizer"], texts).to(device)
        return {"prompt_embeds": parts["text_encoder"](ids)[0]}

    def denoiser_kwargs(self, model_input, conditioning, batch) -> dict:
        return {"encoder_hidden_states": conditioning["prompt_embeds"]}

    def denoise(self, unet, model_input, timesteps, conditioning, batch) -> torch.Tensor:
        return unet(model_input, timesteps, **self.denoiser_kwargs(model_input, conditioning, batch)).sample

    def pipeline(self, parts: dict[str, Any], scheduler, inpainting: bool = False, controlnet=None):
        extra = {} if controlnet is None else {"controlnet": controlnet}
        return self.pipeline_class(inpainting, controlnet is not None)(
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            tokenizer=parts["tokenizer"],
            unet=parts["unet"],
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
            **extra,
        )
