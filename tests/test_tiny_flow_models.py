"""The tiny SD3 and Flux builders save folders that StableDiffusion3Pipeline / FluxPipeline load and sample from, and
the transformers receive what a family must feed them in training (timestep scale, packed latents, ids, guidance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny_models import (
    T5_WORDS,
    TINY_FLOW_RESOLUTION,
    TINY_T5_HIDDEN_SIZE,
    make_tiny_flux_pipeline,
    make_tiny_sd3_pipeline,
    make_tiny_t5_tokenizer,
)

PROMPT = "a photo of sks toy"


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux"))


def load(pipeline_class, folder: Path, **components):
    pipeline = pipeline_class.from_pretrained(folder, **components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample(pipeline, seed: int = 0, **kwargs) -> np.ndarray:
    """Two steps at 32x32, as a numpy image batch."""
    kwargs = {"height": TINY_FLOW_RESOLUTION, "width": TINY_FLOW_RESOLUTION, "num_inference_steps": 2, **kwargs}
    generator = torch.Generator().manual_seed(seed)
    return pipeline(PROMPT, generator=generator, output_type="np", **kwargs).images


def assert_valid_and_deterministic(pipeline, **kwargs) -> np.ndarray:
    image = sample(pipeline, **kwargs)
    assert image.shape == (1, TINY_FLOW_RESOLUTION, TINY_FLOW_RESOLUTION, 3)
    assert np.isfinite(image).all()
    np.testing.assert_array_equal(sample(pipeline, **kwargs), image)
    assert not np.array_equal(sample(pipeline, seed=1, **kwargs), image)  # the generator does drive the sample
    return image


def transformer_calls(pipeline, **kwargs) -> list[dict]:
    """The keyword arguments of each of the pipeline's transformer calls in a 2-step sample."""
    calls = []
    handle = pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kw: calls.append(kw), with_kwargs=True
    )
    try:
        sample(pipeline, **kwargs)
    finally:
        handle.remove()
    assert len(calls) == 2
    return calls


def test_t5_tokenizer_is_t5_shaped_and_round_trips(tmp_path):
    from transformers import T5TokenizerFast

    tokenizer = make_tiny_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 512
    for word in T5_WORDS:
        assert tokenizer(word).input_ids == [tokenizer.convert_tokens_to_ids("\u2581" + word), 1], word
    ids = tokenizer("a zebra!").input_ids  # an unknown ASCII word is spelt out, without <unk>
    assert tokenizer.unk_token_id not in ids and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a zebra!"
    assert tokenizer.unk_token_id in tokenizer("a toy 🤗").input_ids
    batch = tokenizer([PROMPT], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (1, 16) and batch.input_ids[0, -1] == tokenizer.pad_token_id
    tokenizer.save_pretrained(tmp_path)
    reloaded = T5TokenizerFast.from_pretrained(tmp_path)
    assert reloaded(PROMPT).input_ids == tokenizer(PROMPT).input_ids
    assert make_tiny_t5_tokenizer()(PROMPT).input_ids == tokenizer(PROMPT).input_ids  # built the same every time


def test_tiny_sd3_loads_and_samples(tiny_sd3_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    assert not list(tiny_sd3_dir.rglob("*.bin")), "weights must be safetensors"
    pipeline = load(StableDiffusion3Pipeline, tiny_sd3_dir)
    transformer, vae = pipeline.transformer.config, pipeline.vae.config
    assert transformer.in_channels == transformer.out_channels == vae.latent_channels == 16
    assert vae.shift_factor is not None  # None crashes the pipeline's decode
    assert transformer.joint_attention_dim == pipeline.text_encoder_3.config.d_model == TINY_T5_HIDDEN_SIZE
    pooled = pipeline.text_encoder.config.projection_dim + pipeline.text_encoder_2.config.projection_dim
    assert transformer.pooled_projection_dim == pooled
    assert isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler) and pipeline.scheduler.config.shift == 3.0
    # a training script builds its noise scheduler from the same folder
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3_dir, subfolder="scheduler")
    assert noise_scheduler.config.shift == 3.0 and not noise_scheduler.config.use_dynamic_shifting
    assert_valid_and_deterministic(pipeline)


def test_tiny_sd3_runs_without_t5(tiny_sd3_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    with_t5 = sample(load(StableDiffusion3Pipeline, tiny_sd3_dir))
    pipeline = load(StableDiffusion3Pipeline, tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    assert pipeline.text_encoder_3 is None
    without_t5 = assert_valid_and_deterministic(pipeline)
    assert not np.array_equal(without_t5, with_t5)  # T5's states reach the transformer; without it, zeros do
    # a folder saved without T5 (model_index.json holds [null, null] for it) still needs the Nones at load time:
    # diffusers lists text_encoder_3/tokenizer_3 as required components, not optional ones
    folder = make_tiny_sd3_pipeline(tmp_path / "no_t5", with_t5=False)
    assert not (folder / "text_encoder_3").exists()
    with pytest.raises(ValueError, match="text_encoder_3"):
        StableDiffusion3Pipeline.from_pretrained(folder)
    pipeline = load(StableDiffusion3Pipeline, folder, text_encoder_3=None, tokenizer_3=None)
    assert pipeline.text_encoder_3 is None and pipeline.tokenizer_3 is None
    np.testing.assert_array_equal(sample(pipeline), without_t5)  # same seed: the same other weights


def test_sd3_transformer_inputs(tiny_sd3_dir):
    """What SD3's family must feed: 16-channel [B, C, H, W] latents, timestep = sigma * 1000 (the scheduler's
    timesteps, FlowMatchingObjective's), CLIP states zero-padded to T5's width and followed by T5's sequence."""
    from diffusers import StableDiffusion3Pipeline

    from finetune import diffusion

    pipeline = load(StableDiffusion3Pipeline, tiny_sd3_dir)
    first, second = transformer_calls(pipeline, guidance_scale=1.0, max_sequence_length=32)
    latent = TINY_FLOW_RESOLUTION // 2
    assert first["hidden_states"].shape == (1, 16, latent, latent)
    assert first["encoder_hidden_states"].shape == (1, 77 + 32, TINY_T5_HIDDEN_SIZE)
    assert first["pooled_projections"].shape == (1, 80)
    # 2 steps: linspace(sigma_max, sigma_min) of the scheduler's shifted training sigmas, shifted by 3 again (so the
    # last step starts at shift(shift(0.001)), not at 0.001), times 1000
    torch.testing.assert_close(first["timestep"], torch.tensor([1000.0]))
    sigma_min = diffusion.shift_sigmas(torch.tensor([0.001]), 3.0)
    torch.testing.assert_close(second["timestep"], diffusion.shift_sigmas(sigma_min, 3.0) * 1000)


def test_tiny_flux_loads_and_samples(tiny_flux_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    assert not list(tiny_flux_dir.rglob("*.bin")), "weights must be safetensors"
    pipeline = load(FluxPipeline, tiny_flux_dir)
    transformer = pipeline.transformer.config
    assert transformer.guidance_embeds
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert transformer.in_channels == 4 * pipeline.vae.config.latent_channels  # 2x2 packed latents
    assert transformer.joint_attention_dim == pipeline.text_encoder_2.config.d_model
    assert transformer.pooled_projection_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.vae.config.shift_factor is not None
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux_dir, subfolder="scheduler")
    assert scheduler.config.use_dynamic_shifting
    assert (scheduler.config.base_shift, scheduler.config.max_shift) == (0.5, 1.15)
    image = assert_valid_and_deterministic(pipeline, max_sequence_length=32)
    # the guidance embedding is wired: another guidance scale gives another image
    assert not np.array_equal(sample(pipeline, guidance_scale=1.0, max_sequence_length=32), image)


def test_flux_transformer_inputs(tiny_flux_dir):
    """What Flux's family must feed: latents packed 2x2 into [B, (H/2)(W/2), 4C] (FluxPipeline._pack_latents), image
    ids of the packed grid (_prepare_latent_image_ids), zero text ids, a guidance scale per example, and timestep =
    sigma (FlowMatchingObjective's timesteps / 1000: the transformer multiplies both by 1000 inside), shifted by mu
    of the packed sequence length."""
    from diffusers import FluxPipeline

    from finetune import diffusion

    pipeline = load(FluxPipeline, tiny_flux_dir)
    first, second = transformer_calls(pipeline, guidance_scale=4.5, max_sequence_length=32)
    latent = TINY_FLOW_RESOLUTION // 2
    tokens = (latent // 2) ** 2
    assert first["hidden_states"].shape == (1, tokens, 64)
    ids = FluxPipeline._prepare_latent_image_ids(1, latent // 2, latent // 2, "cpu", torch.float32)
    torch.testing.assert_close(first["img_ids"], ids)
    assert first["txt_ids"].shape == (32, 3) and not first["txt_ids"].any()
    torch.testing.assert_close(first["guidance"], torch.tensor([4.5]))
    assert first["encoder_hidden_states"].shape == (1, 32, TINY_T5_HIDDEN_SIZE)
    assert first["pooled_projections"].shape == (1, pipeline.text_encoder.config.hidden_size)
    # FluxPipeline's 2 sigmas are 1 and 1/2, the second shifted with mu of the 64 packed tokens; the transformer gets
    # sigma itself, not sigma * 1000
    torch.testing.assert_close(first["timestep"], torch.tensor([1.0]))
    shifted = diffusion.time_shift_sigmas(torch.tensor([0.5]), diffusion.resolution_shift_mu(tokens))
    assert abs(shifted.item() - 0.5) > 0.05  # the shift is visible at this size
    torch.testing.assert_close(second["timestep"], shifted)
