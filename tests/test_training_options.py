"""Every loop option runs end to end on a tiny DDPM and trains only what it should (table-driven)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline

from tests.helpers import run_training, tiny_ddpm_recipe

OPTIONS = {
    "v_prediction": {"diffusion": {"prediction_type": "v_prediction"}},
    "sample_prediction": {"diffusion": {"prediction_type": "sample"}},
    "min_snr_and_noise_offset": {"diffusion": {"snr_gamma": 5.0, "noise_offset": 0.1}},
    "adamw8bit": {"optim": {"optimizer": "adamw8bit"}},
    "gradient_checkpointing": {"train": {"gradient_checkpointing": True}},
    "bf16": {"train": {"mixed_precision": "bf16"}},
    "accumulation_and_linear_lr": {
        "train": {"gradient_accumulation_steps": 2},
        "optim": {"lr_scheduler": "linear", "lr_warmup_steps": 1},
    },
    "ddpm_sampler_linear_betas": {"diffusion": {"sampler": "ddpm", "beta_schedule": "linear"}},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_trains_and_saves(tmp_path, name):
    sections = {"train": {"max_train_steps": 4}, **OPTIONS[name]}
    if "train" in OPTIONS[name]:
        sections["train"] = {"max_train_steps": 4, **OPTIONS[name]["train"]}
    out = run_training(tiny_ddpm_recipe(tmp_path / "run", **sections))
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(logs) == 4 and all(np.isfinite(r["loss"]) for r in logs)
    pipe = DDPMPipeline.from_pretrained(out)
    weights = [p for p in pipe.unet.parameters()]
    assert all(p.dtype == torch.float32 for p in weights), "trainable weights are saved in fp32"
    expected = OPTIONS[name].get("diffusion", {}).get("prediction_type", "epsilon")
    assert pipe.scheduler.config.prediction_type == expected
    image = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert np.isfinite(image).all()


def test_lr_schedule_counts_optimizer_steps(tmp_path):
    recipe = tiny_ddpm_recipe(
        tmp_path / "run",
        train={"max_train_steps": 6, "gradient_accumulation_steps": 2},
        optim={"lr": 1e-3, "lr_scheduler": "linear", "lr_warmup_steps": 2},
    )
    out = run_training(recipe)
    lrs = [json.loads(line)["lr"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    # one log per optimizer step (2 micro-batches each): warmup over 2 steps to 1e-3, then linear decay to 0 at step 6
    np.testing.assert_allclose(lrs, [5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0], atol=1e-12)
