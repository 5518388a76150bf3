"""Stable Diffusion 3 / 3.5 (Esser et al. 2024): an MMDiT (SD3Transformer2DModel) on 16-channel VAE latents,
conditioned on two CLIP encoders (penultimate hidden states concatenated, zero-padded to T5's width) joined with T5's
sequence, and the two CLIP pooled embeddings; rectified-flow objective with logit-normal timesteps. T5 may be left
out (`model.drop_text_encoders=[text_encoder_3]`), as diffusers allows: its sequence is then zeros."""

from __future__ import annotations

from typing import Any

import torch

from finetune.families.base import Family


class StableDiffusion3(Family):
    name = "sd3"
    summary = "Stable Diffusion 3.x (CLIP-L + CLIP-G + optional T5, MMDiT transformer, flow matching)"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    text_to_image_pipeline = "StableDiffusion3Pipeline"
    denoiser = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    optional_text_encoders = ("text_encoder_3",)
    trainable_text_encoders = ("text_encoder", "text_encoder_2")  # pipelines load CLIP LoRAs, not T5's
    text_classes = {
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "CLIPTokenizer",
        "tokenizer_3": "T5TokenizerFast",
        "text_encoder": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "text_encoder_3": "T5EncoderModel",
    }
    kohya_prefixes = None  # no standard kohya layout for SD3 LoRAs: ComfyUI reads the diffusers file
    embedding_keys = None
    textual_inversion = False  # no embedding layout its pipeline loads into T5, which carries most of the prompt
    default_model = "stabilityai/stable-diffusion-3.5-medium"
    license_name = "stabilityai-ai-community"
    license_link = "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/LICENSE.md"
    license_note = (
        "Stable Diffusion 3.x weights are under the Stability AI Community License (SD 3.0 medium: the Stability "
        "Non-Commercial Research Community License); weights trained from them inherit its terms."
    )
    flow_matching = True
    training_scheduler = "FlowMatchEulerDiscreteScheduler"  # the folder's shift; no prediction_type to override
    max_sequence_length = 256  # T5 tokens, as StableDiffusion3Pipeline's default

    def encode_prompt(self, parts: dict[str, Any], texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        clip_hidden, pooled = [], []
        for tokenizer_name, encoder_name in zip(self.tokenizers[:2], self.text_encoders[:2]):
            ids = self.tokenize(parts[tokenizer_name], texts).to(device)
            output = parts[encoder_name](ids, output_hidden_states=True)
            clip_hidden.append(output.hidden_states[-2])
            pooled.append(output[0])  # text_embeds: the projected pooled embedding
        clip = torch.cat(clip_hidden, dim=-1)
        t5 = self.t5_sequence(parts, texts, device, clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def t5_sequence(self, parts: dict[str, Any], texts: list[str], device, dtype) -> torch.Tensor:
        """T5's last hidden states; zeros of the transformer's joint-attention width when T5 is left out."""
        encoder = parts.get("text_encoder_3")
        if encoder is None:
            transformer = parts[self.denoiser]
            width = getattr(transformer, "module", transformer).config.joint_attention_dim  # (DDP wraps it)
            return torch.zeros(len(texts), self.max_sequence_length, width, device=device, dtype=dtype)
        tokenizer = parts["tokenizer_3"]
        ids = tokenizer(
            texts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids
        return encoder(ids.to(device))[0]

    def denoise(self, transformer, model_input, timesteps, conditioning, batch) -> torch.Tensor:
        return transformer(
            hidden_states=model_input,
            timestep=timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            pooled_projections=conditioning["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    def pipeline(self, parts: dict[str, Any], scheduler, inpainting: bool = False):
        return self.pipeline_class(inpainting)(
            transformer=parts["transformer"],
            scheduler=scheduler,
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            tokenizer=parts["tokenizer"],
            text_encoder_2=parts["text_encoder_2"],
            tokenizer_2=parts["tokenizer_2"],
            text_encoder_3=parts.get("text_encoder_3"),
            tokenizer_3=parts.get("tokenizer_3"),
        )
