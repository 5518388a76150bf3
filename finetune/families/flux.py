"""Flux.1 (Black Forest Labs 2024): a rectified-flow transformer (FluxTransformer2DModel, double- and single-stream
blocks) on 16-channel VAE latents packed into 2x2 patches with their (0, row, column) position ids, conditioned on
T5's sequence and CLIP-L's pooled embedding; guidance-distilled checkpoints (FLUX.1-dev) also take the guidance
scale as an input. Timesteps are sigmas, shifted by the image's sequence length (flow matching, Esser et al. 2024)."""

from __future__ import annotations

from typing import Any

import torch

from finetune.families.base import Family


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: 2x2 patches as tokens, as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of pack_latents for a latent grid of height x width."""
    b, _, channels = tokens.shape
    latents = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """[(H/2)(W/2), 3] position ids (0, row, column) of the packed tokens (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class Flux(Family):
    name = "flux"
    summary = "Flux.1 (CLIP-L pooled + T5, packed-latent transformer with guidance input, flow matching)"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline")
    text_to_image_pipeline = "FluxPipeline"
    denoiser = "transformer"
    denoiser_class = "FluxTransformer2DModel"
    tokenizers = ("tokenizer", "tokenizer_2")
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder",)  # FluxPipeline loads a CLIP LoRA, not T5's
    text_classes = {
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "T5TokenizerFast",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel",
    }
    kohya_prefixes = None  # no diffusers -> kohya converter for Flux: ComfyUI and Forge read the diffusers file
    embedding_keys = None
    textual_inversion = False  # no embedding layout its pipeline loads into T5, which carries most of the prompt
    default_model = "black-forest-labs/FLUX.1-dev"
    license_name = "flux-1-dev-non-commercial-license"
    license_link = "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"
    license_note = (
        "FLUX.1 [dev] is under the FLUX.1 [dev] Non-Commercial License (FLUX.1 [schnell] under Apache 2.0); weights "
        "trained from it inherit its terms."
    )
    flow_matching = True
    training_scheduler = "FlowMatchEulerDiscreteScheduler"  # the folder's shift; no prediction_type to override
    latent_multiple = 16  # the 8x VAE, then 2x2 packing
    max_sequence_length = 512  # T5 tokens, as FluxPipeline's default

    def denoiser_input_channels(self, latent_channels: int, inpainting: bool) -> int:
        return 4 * latent_channels  # 2x2 packed patches

    def denoiser_inputs(self, config, parts: dict[str, Any]) -> dict[str, Any]:
        # guidance-distilled checkpoints (FLUX.1-dev) take the guidance scale as an input; FLUX.1-schnell does not
        if not parts[self.denoiser].config.guidance_embeds:
            return {}
        return {"guidance_scale": config.diffusion.guidance_scale}

    def encode_prompt(self, parts: dict[str, Any], texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        ids = self.tokenize(parts["tokenizer"], texts).to(device)
        pooled = parts["text_encoder"](ids, output_hidden_states=False).pooler_output
        t5_ids = parts["tokenizer_2"](
            texts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids
        sequence = parts["text_encoder_2"](t5_ids.to(device), output_hidden_states=False)[0]
        return {"prompt_embeds": sequence, "pooled_prompt_embeds": pooled}

    def denoise(self, transformer, model_input, timesteps, conditioning, batch) -> torch.Tensor:
        height, width = model_input.shape[-2:]
        prompt_embeds = conditioning["prompt_embeds"]
        dtype, device = prompt_embeds.dtype, model_input.device
        guidance = None
        if "guidance_scale" in conditioning:  # (denoiser_inputs: a guidance-distilled transformer)
            guidance = torch.full((model_input.shape[0],), conditioning["guidance_scale"], device=device)
        prediction = transformer(
            hidden_states=pack_latents(model_input),
            timestep=timesteps / 1000,  # the transformer takes sigmas; the objective's timesteps are sigma x 1000
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=latent_image_ids(height, width, device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(prediction, height, width)

    def pipeline(self, parts: dict[str, Any], scheduler, inpainting: bool = False):
        return self.pipeline_class(inpainting)(
            transformer=parts["transformer"],
            scheduler=scheduler,
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            tokenizer=parts["tokenizer"],
            text_encoder_2=parts["text_encoder_2"],
            tokenizer_2=parts["tokenizer_2"],
        )
