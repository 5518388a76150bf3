"""Stable Diffusion XL (Podell et al. 2023): two CLIP text encoders (CLIP ViT-L and OpenCLIP ViT-bigG, the second
with a projection), their penultimate hidden states concatenated as the UNet's cross-attention input, and the
second one's pooled embedding joined with six "micro-conditioning" time ids (original size, crop top-left, target
size; Podell et al. 2023, section 2.2) in the UNet's added `text_time` embedding. DDPM noise objective."""

from __future__ import annotations

from typing import Any

import torch

from finetune.config import Config
from finetune.families.base import Family


def add_time_ids(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning of each example: (original h, w, crop top, left, target h, w), from the sizes the
    data layer recorded when it resized and cropped the image (Podell et al. 2023, eq. in section 2.2)."""
    sizes = [batch["original_size"], batch["crop_top_left"], batch["target_size"]]
    return torch.cat([torch.as_tensor(s).reshape(-1, 2) for s in sizes], dim=1).to(device, dtype)


class StableDiffusionXL(Family):
    name = "sdxl"
    summary = "Stable Diffusion XL (two CLIP text encoders, UNet with size/crop conditioning, DDPM objective)"
    pipeline_classes = (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLInpaintPipeline",
        "StableDiffusionXLImg2ImgPipeline",
    )
    text_to_image_pipeline = "StableDiffusionXLPipeline"
    inpainting_pipeline = "StableDiffusionXLInpaintPipeline"
    tokenizers = ("tokenizer", "tokenizer_2")
    text_encoders = ("text_encoder", "text_encoder_2")
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    embedding_keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    text_classes = {
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "CLIPTokenizer",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "CLIPTextModelWithProjection",
    }
    controlnet_class = "ControlNetModel"
    controlnet_pipeline = "StableDiffusionXLControlNetPipeline"
    default_model = "stabilityai/stable-diffusion-xl-base-1.0"
    license = "openrail++"
    license_note = (
        "SDXL 1.0 is under the CreativeML OpenRAIL++-M licence: its use restrictions apply to these weights too."
    )

    def vae_dtype(self, config: Config, weight_dtype: torch.dtype) -> torch.dtype:
        # SDXL's own VAE overflows to NaN in fp16; a VAE fixed for it (model.vae=madebyollin/sdxl-vae-fp16-fix) runs
        # in fp16, bf16 has fp32's range
        if weight_dtype == torch.float16 and not config.model.vae:
            return torch.float32
        return weight_dtype

    def freeze_unused(self, parts: dict[str, Any]) -> list[str]:
        """The first encoder conditions through its penultimate hidden states only: its last layer and final norm
        never reach the UNet (their gradients would stay None, which DDP refuses), so they never train."""
        encoder = parts["text_encoder"]
        last = encoder.config.num_hidden_layers - 1
        unused = (f"encoder.layers.{last}.", "final_layer_norm.")
        frozen = []
        for name, parameter in encoder.named_parameters():
            # (transformers names them with or without a `text_model.` prefix, by version and class)
            if parameter.requires_grad and name.removeprefix("text_model.").startswith(unused):
                parameter.requires_grad_(False)
                frozen.append(f"text_encoder.{name}")
        return frozen

    def encode_prompt(self, parts: dict[str, Any], texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer_name, encoder_name in zip(self.tokenizers, self.text_encoders):
            ids = self.tokenize(parts[tokenizer_name], texts).to(device)
            output = parts[encoder_name](ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the second encoder's projected pooled embedding, as the pipeline takes it
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def denoiser_kwargs(self, model_input, conditioning, batch) -> dict:
        pooled = conditioning["pooled_prompt_embeds"]
        added = {"text_embeds": pooled, "time_ids": add_time_ids(batch, model_input.device, pooled.dtype)}
        return {"encoder_hidden_states": conditioning["prompt_embeds"], "added_cond_kwargs": added}

    def denoise(self, unet, model_input, timesteps, conditioning, batch) -> torch.Tensor:
        return unet(model_input, timesteps, **self.denoiser_kwargs(model_input, conditioning, batch)).sample

    def pipeline(self, parts: dict[str, Any], scheduler, inpainting: bool = False, controlnet=None):
        extra = {"requires_aesthetics_score": False} if inpainting else {}
        extra.update({} if controlnet is None else {"controlnet": controlnet})
        return self.pipeline_class(inpainting, controlnet is not None)(
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            text_encoder_2=parts["text_encoder_2"],
            tokenizer=parts["tokenizer"],
            tokenizer_2=parts["tokenizer_2"],
            unet=parts["unet"],
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            **extra,
        )
