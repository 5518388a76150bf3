"""Flux LoRAs in kohya's sd-scripts layout (BFL module names, fused projections, CLIP-L as `lora_te1_`): read back by
diffusers' own kohya loader to the same weights, at FLUX.1's real widths, and to the same image on the tiny Flux."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finetune.families.flux import flux_kohya_state_dict

# FLUX.1's widths, which diffusers' kohya loader hard-codes for a single block's fused linear1 (q, k, v, MLP in)
INNER, MLP = 3072, 12288
RANK, IN = 2, 6  # a narrow input keeps the real-width matrices small


def lora(out_features: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, IN, generator=generator), torch.randn(out_features, RANK, generator=generator), scale


def test_a_flux_lora_survives_the_round_trip_through_diffusers_kohya_loader_at_flux1_widths():
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    factors = {
        # a double block: image and text q/k/v fused in two qkv projections, the other projections one to one
        **{f"transformer_blocks.0.attn.{m}": lora(INNER, 2.0, i) for i, m in enumerate(("to_q", "to_k", "to_v"))},
        **{f"transformer_blocks.0.attn.add_{m}_proj": lora(INNER, 2.0, 10 + i) for i, m in enumerate("qkv")},
        "transformer_blocks.0.attn.to_out.0": lora(INNER, 2.0, 20),
        "transformer_blocks.0.attn.to_add_out": lora(INNER, 2.0, 21),
        "transformer_blocks.0.ff.net.2": lora(INNER, 2.0, 22),
        "transformer_blocks.0.norm1.linear": lora(6 * INNER, 2.0, 23),
        # a single block: q/k/v trained but not the MLP input they are fused with (kohya gets zeros for it)
        **{f"single_transformer_blocks.1.attn.{m}": lora(INNER, 0.5, 30 + i) for i, m in enumerate(("to_q", "to_k"))},
        "single_transformer_blocks.1.attn.to_v": lora(INNER, 0.5, 32),
        "single_transformer_blocks.1.proj_out": lora(INNER, 0.5, 33),
        # the final layer, whose alpha the loader ignores, and its adaLN in BFL's (shift, scale) order
        "proj_out": lora(64, 3.0, 40),
        "norm_out.linear": lora(2 * INNER, 3.0, 41),
    }
    kohya = flux_kohya_state_dict(factors, {"single_transformer_blocks.1.proj_mlp": MLP})
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (3 * RANK, IN)
    assert kohya["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (3 * INNER + MLP, 4 * RANK)
    assert kohya["lora_unet_double_blocks_0_img_attn_proj.alpha"].item() == 2.0 * RANK  # the trained alpha
    diffusers = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    # diffusers loads these factors with alpha = rank: the weight update is up @ down
    for name, (down, up, scale) in factors.items():
        prefix = name if name in ("proj_out", "norm_out.linear") else f"transformer.{name}"
        got = diffusers[f"{prefix}.lora_B.weight"] @ diffusers[f"{prefix}.lora_A.weight"]
        expected = scale * up @ down
        if name == "norm_out.linear":  # the loader swaps BFL's halves back into diffusers' order
            assert torch.allclose(got, expected, atol=1e-4)
            continue
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    mlp = "transformer.single_transformer_blocks.1.proj_mlp"
    assert torch.count_nonzero(diffusers[f"{mlp}.lora_B.weight"] @ diffusers[f"{mlp}.lora_A.weight"]) == 0
    assert diffusers[f"{mlp}.lora_B.weight"].shape == (MLP, RANK)


def test_a_module_kohya_has_no_name_for_is_refused_before_training():
    with pytest.raises(ValueError, match="no counterpart in kohya's Flux layout"):
        flux_kohya_state_dict({"pos_embed.proj": lora(8, 1.0, 0)}, {})


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from tests.tiny_models import make_test_images, make_tiny_flux_pipeline

    root = tmp_path_factory.mktemp("kohya-flux")
    base = make_tiny_flux_pipeline(root / "base")
    images = make_test_images(root / "data", 4, size=32)
    lines = [json.dumps({"file_name": p.name, "text": f"a toy number {i}"}) for i, p in enumerate(images)]
    (root / "data" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root, base


def train_tiny_flux_lora(root, base, name: str, target_modules: list[str]):
    from tests.helpers import run_training

    return run_training(
        {
            "method": "lora",
            "model": {"pretrained_model_name_or_path": str(base)},
            "data": {"dataset": str(root / "data"), "resolution": 32},
            "optim": {"lr": 5e-2},
            "diffusion": {"num_inference_steps": 2},
            "train": {"output_dir": str(root / name), "max_train_steps": 2, "num_samples": 1, "progress_bar": False},
            "checkpoint": {"checkpointing_steps": 0},
            # alpha 8 != rank 4: the file must carry the trained strength
            "lora": {
                "rank": 4,
                "alpha": 8,
                "train_text_encoder": True,
                "export_kohya": True,
                "target_modules": target_modules,
            },
        }
    )


def test_the_tiny_flux_lora_in_kohya_layout_draws_what_the_diffusers_file_draws(tiny_flux):
    """Through FluxPipeline.load_lora_weights on both files. The tiny model's single blocks are narrower than the
    FLUX.1 widths diffusers' loader assumes for their fused linear1, so this LoRA stays in the double block (the
    single blocks' round trip is the test above)."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from tests.helpers import sd_image

    root, base = tiny_flux
    double_block = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_out.0", "ff.net.2", "norm1.linear"]
    out = train_tiny_flux_lora(root, base, "double", double_block)
    kohya = load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
    assert {key.split("_", 2)[1] for key in kohya} == {"unet", "te1"}
    assert "lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight" in kohya
    pipe = FluxPipeline.from_pretrained(base)
    before = sd_image(pipe, "a toy number 1", size=32)
    pipe.load_lora_weights(out)
    after = sd_image(pipe, "a toy number 1", size=32)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights_kohya.safetensors")
    np.testing.assert_allclose(sd_image(pipe, "a toy number 1", size=32), after, atol=2e-3)
    assert np.abs(after - before).max() > 1e-3, "the LoRA must change the image"


def test_the_default_flux_targets_export_and_every_linear_of_the_transformer_has_a_kohya_name(tiny_flux):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from finetune.families.flux import flux_kohya_name

    root, base = tiny_flux
    out = train_tiny_flux_lora(root, base, "default", ["to_q", "to_k", "to_v", "to_out.0"])
    kohya = load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
    # the single blocks' q/k/v in linear1 beside zeros for the MLP input they are fused with
    up = kohya["lora_unet_single_blocks_1_linear1.lora_up.weight"]
    assert up.shape[1] == 4 * 4 and torch.count_nonzero(up[:, 12:]) == 0
    transformer = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer")
    linears = [name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears and [name for name in linears if flux_kohya_name(name) is None] == []
