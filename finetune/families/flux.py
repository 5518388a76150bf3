"""Flux.1 (Black Forest Labs 2024): a rectified-flow transformer (FluxTransformer2DModel, double- and single-stream
blocks) on 16-channel VAE latents packed into 2x2 patches with their (0, row, column) position ids, conditioned on
T5's sequence and CLIP-L's pooled embedding; guidance-distilled checkpoints (FLUX.1-dev) also take the guidance
scale as an input. Timesteps are sigmas, shifted by the image's sequence length (flow matching, Esser et al. 2024)."""

from __future__ import annotations

import functools
import re
from typing import Any

import torch

from finetune.config import ConfigError
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


@functools.lru_cache(maxsize=16)
def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """[(H/2)(W/2), 3] position ids (0, row, column) of the packed tokens (FluxPipeline._prepare_latent_image_ids).
    Built once per latent size, device and dtype: they are the same every step, and building them on the host meant
    a blocking copy to the GPU every step. Callers must not modify the tensor in place (the transformer does not)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


# diffusers FluxTransformer2DModel module -> (the original BFL module kohya's sd-scripts names it after, position in
# the fused projection, members of that projection): BFL fuses q, k, v (and a single block's MLP input) into one
# Linear. The inverse of diffusers' `_convert_kohya_flux_lora_to_diffusers`.
_FLUX_DOUBLE_BLOCK = {
    "attn.to_q": ("img_attn_qkv", 0, 3),
    "attn.to_k": ("img_attn_qkv", 1, 3),
    "attn.to_v": ("img_attn_qkv", 2, 3),
    "attn.add_q_proj": ("txt_attn_qkv", 0, 3),
    "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn_qkv", 2, 3),
    "attn.to_out.0": ("img_attn_proj", 0, 1),
    "attn.to_add_out": ("txt_attn_proj", 0, 1),
    "ff.net.0.proj": ("img_mlp_0", 0, 1),
    "ff.net.2": ("img_mlp_2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp_0", 0, 1),
    "ff_context.net.2": ("txt_mlp_2", 0, 1),
    "norm1.linear": ("img_mod_lin", 0, 1),
    "norm1_context.linear": ("txt_mod_lin", 0, 1),
}
_FLUX_SINGLE_BLOCK = {
    "attn.to_q": ("linear1", 0, 4),
    "attn.to_k": ("linear1", 1, 4),
    "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4),
    "proj_out": ("linear2", 0, 1),
    "norm.linear": ("modulation_lin", 0, 1),
}
_FLUX_TOP_LEVEL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "proj_out": "final_layer_linear",
    "norm_out.linear": "final_layer_adaLN_modulation_1",
}


def flux_kohya_name(name: str) -> tuple[str, str, list[str]] | None:
    """A diffusers Flux transformer module -> (its kohya module `lora_unet_...`, the diffusers modules fused into that
    BFL module in order, with their block's path), or None where the module has no BFL counterpart."""
    for pattern, table, bfl in (
        (r"transformer_blocks\.(\d+)\.(.+)", _FLUX_DOUBLE_BLOCK, "double_blocks"),
        (r"single_transformer_blocks\.(\d+)\.(.+)", _FLUX_SINGLE_BLOCK, "single_blocks"),
    ):
        match = re.fullmatch(pattern, name)
        if match and match.group(2) in table:
            module = table[match.group(2)][0]
            block = name[: match.start(2)]
            members = sorted((index, m) for m, (fused, index, _) in table.items() if fused == module)
            return f"lora_unet_{bfl}_{match.group(1)}_{module}", [block + m for _, m in members]
    if name in _FLUX_TOP_LEVEL:
        return f"lora_unet_{_FLUX_TOP_LEVEL[name]}", [name]
    return None


def flux_kohya_state_dict(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], out_features: dict[str, int]
) -> dict[str, torch.Tensor]:
    """A Flux transformer LoRA (module -> (down, up, scale), as `lora_layers.lora_factors`) in kohya's sd-scripts
    layout. The members of a fused BFL projection become one LoRA of rank members x r: the downs stacked, the ups on
    the block diagonal (a member without LoRA: zeros, its width from `out_features`), which is the form diffusers'
    kohya loader splits back exactly. Alphas keep the trained strength; the final layer, whose alpha that loader
    ignores, gets its scale folded into the up weights (and the adaLN's shift/scale halves in BFL's order)."""
    groups: dict[str, list[str]] = {}
    for name in factors:
        target = flux_kohya_name(name)
        if target is None:
            raise ValueError(f"{name} has no counterpart in kohya's Flux layout")
        groups[target[0]] = target[1]
    out: dict[str, torch.Tensor] = {}
    for key, members in groups.items():
        present = [factors[m] for m in members if m in factors]
        rank, in_features = present[0][0].shape
        scales = {scale for _, _, scale in present}
        # one alpha per kohya module: keep alpha / r when the members share it, else fold each scale into its up
        shared = scales.pop() if len(scales) == 1 and not key.startswith("lora_unet_final_layer") else None
        downs, ups = [], []
        for member in members:
            down, up, scale = factors.get(member) or (
                torch.zeros(rank, in_features),
                torch.zeros(out_features[member], rank),
                1.0,
            )
            if factors.get(member) and down.shape[0] != rank:
                raise ValueError(f"kohya fuses {', '.join(members)} into one LoRA: they need one rank")
            downs.append(down)
            ups.append(up if shared is not None else up * scale)
        up = torch.block_diag(*ups)
        if key.endswith("final_layer_adaLN_modulation_1"):  # diffusers' AdaLayerNormContinuous: (scale, shift)
            up = torch.cat(up.chunk(2, dim=0)[::-1], dim=0)
        out[f"{key}.lora_down.weight"] = torch.cat(downs, dim=0).contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        # kohya scales by alpha / (members x r)
        out[f"{key}.alpha"] = torch.tensor((shared if shared is not None else 1.0) * rank * len(members))
    return out


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
    # kohya's sd-scripts layout (lora_flux.py): BFL's module names, fused projections, CLIP-L as te1
    kohya_prefixes = {"transformer": "lora_unet", "text_encoder": "lora_te1"}
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

    def kohya_state_dict(self, modules: dict[str, torch.nn.Module | None]) -> dict[str, torch.Tensor]:
        """CLIP-L's LoRA under `lora_te1_` and the transformer's in BFL's fused layout (flux_kohya_state_dict)."""
        from finetune.lora_layers import kohya_state_dict, lora_factors, with_adapters

        adapted = with_adapters(modules)
        transformer = adapted.pop(self.denoiser, None)
        out = kohya_state_dict(adapted, self.kohya_prefixes)
        if transformer is not None:
            widths = {name: m.out_features for name, m in transformer.named_modules() if hasattr(m, "out_features")}
            try:
                out.update(flux_kohya_state_dict(lora_factors(transformer), widths))
            except ValueError as err:
                raise ConfigError(f"lora.export_kohya: {err}; export only modules kohya names, or remove it") from err
        return out

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
