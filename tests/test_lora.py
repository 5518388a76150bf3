"""LoRA on a tiny Stable Diffusion beyond the method contract (tests/contract.py: trains, loads, changes the output,
unloads, kohya export, resume after SIGKILL): only LoRA parameters move, the text-encoder LoRA and the version guard,
the disk cache, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from finetune.config import ConfigError
from finetune.recipe import load_config
from tests.helpers import (
    reset_accelerate,
    run_training,
    sd_image,
)
from tests.tiny_models import make_test_images


@pytest.fixture
def tiny_sd(tiny_sd_dir):
    return tiny_sd_dir


@pytest.fixture(scope="session")
def captioned_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captioned")
    paths = make_test_images(folder, 6, size=64)
    with open(folder / "metadata.jsonl", "w") as handle:
        for i, path in enumerate(paths):
            handle.write(
                json.dumps({"file_name": path.name, "text": [f"a toy picture {i}", f"a toy drawing {i}"]}) + "\n"
            )
    return folder


def lora_recipe(base, data, output_dir, **lora):
    return {
        "method": "lora",
        "model": {"pretrained_model_name_or_path": str(base)},
        "data": {"dataset": str(data), "resolution": 64, "random_flip": True},
        "optim": {"lr": 5e-3, "lr_scheduler": "constant"},
        "diffusion": {"num_inference_steps": 2},
        "train": {
            "output_dir": str(output_dir),
            "max_train_steps": 4,
            "train_batch_size": 2,
            "log_every": 1,
            "num_samples": 2,
            "report_to": "jsonl",
            "progress_bar": False,
        },
        "checkpoint": {"checkpointing_steps": 0},
        "lora": {"rank": 4, "alpha": 8.0, "validation_prompts": ["a toy picture 1"], **lora},
    }


def generate(pipe, prompt="a toy picture 1"):
    return sd_image(pipe, prompt, steps=3)


def test_only_lora_parameters_change(tiny_sd, captioned_folder, tmp_path, monkeypatch):
    from finetune.methods.lora import LoraTextToImage

    seen = {}
    original_save = LoraTextToImage.save

    def save_and_look(self, output_dir):
        seen["unet"] = {k: v.detach().clone() for k, v in self.unwrap(self.unet).state_dict().items()}
        seen["text_encoder"] = {k: v.detach().clone() for k, v in self.unwrap(self.text_encoder).state_dict().items()}
        return original_save(self, output_dir)

    monkeypatch.setattr(LoraTextToImage, "save", save_and_look)
    recipe = lora_recipe(tiny_sd, captioned_folder, tmp_path / "run")
    recipe["checkpoint"]["checkpointing_steps"] = 4
    out = run_training(recipe)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    trained = seen["unet"]
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys
    for name, value in base.unet.state_dict().items():
        key = (
            name
            if name in trained
            else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        torch.testing.assert_close(trained[key], value, rtol=0, atol=0)
    for name, value in base.text_encoder.state_dict().items():
        torch.testing.assert_close(seen["text_encoder"][name], value, rtol=0, atol=0)
    initial = {k: v for k, v in base.unet.state_dict().items()}
    assert initial  # and the LoRA layers did move away from their initialisation (B starts at zero)
    assert any(trained[k].abs().max() > 0 for k in lora_keys if "lora_B" in k)
    checkpoint_keys = load_file(str(out / "checkpoint-4" / "trainable_0.safetensors")).keys()
    assert sorted(checkpoint_keys) == sorted(lora_keys), "a checkpoint holds the adapter, not the base model"


def test_text_encoder_lora_is_saved_and_loaded(tiny_sd, captioned_folder, tmp_path, monkeypatch):
    out = run_training(lora_recipe(tiny_sd, captioned_folder, tmp_path / "run", train_text_encoder=True))
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    base = generate(pipe)
    pipe.load_lora_weights(out)
    assert np.abs(generate(pipe) - base).max() > 1e-3

    # with a transformers that needs a newer peft, load_pipeline says so before diffusers' load raises deep inside
    import transformers.integrations.peft

    from finetune.errors import InputError
    from pipelines.load import load_pipeline

    monkeypatch.setattr(transformers.integrations.peft, "MIN_PEFT_VERSION", "99.0.0")
    with pytest.raises(InputError, match=r"holds text-encoder weights: transformers .* peft >= 99.0.0"):
        load_pipeline(tiny_sd, lora=str(out))


def test_a_lora_on_attention_and_other_modules_loads_every_layer_it_trained(tiny_sd, captioned_folder, tmp_path):
    """Attention projections beside other target modules: diffusers' old key layout renames only the attention
    ones, and a file mixing both layouts loads one part silently. Every trained layer must come back exactly."""
    from peft.utils import get_peft_model_state_dict

    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in"]
    out = run_training(lora_recipe(tiny_sd, captioned_folder, tmp_path / "run", target_modules=targets))
    saved = {k.removeprefix("unet."): v for k, v in load_file(str(out / "pytorch_lora_weights.safetensors")).items()}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(out, adapter_name="trained")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="trained")
    assert {k for k in saved if ".ff.net.2." in k} and {k for k in saved if ".to_out.0." in k}
    assert sorted(loaded) == sorted(saved)
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_cached_and_uncached_training_give_the_same_loss(tiny_sd, captioned_folder, tmp_path):
    """Uncached, in memory and from the sharded disk caches (shards of 2 images: 3 files; the captions' conditioning
    in a shard of its own): the same loss."""
    from accelerate import Accelerator

    from finetune import latent_cache as lc
    from finetune.data import collate_examples
    from finetune.methods import get_method_class

    losses = {}
    for mode in ("none", "memory", "disk"):
        reset_accelerate()
        recipe = lora_recipe(tiny_sd, captioned_folder, tmp_path / mode, cache=mode, caption_dropout=0.5)
        recipe["lora"]["cache_shard_mb"] = 0.15  # 2 images (8 x 32 x 32 fp32 moments, both flips: 64 KB each)
        config = load_config(recipe)
        method = get_method_class("lora")(config, Accelerator(cpu=True))
        method.setup()
        method.before_training(None)
        if mode != "none":
            assert len(method.cache.moments) == 12 and "" in method.cache.text  # both flips, the empty prompt
        if mode == "disk":  # both caches read from their shards, lazily
            assert isinstance(method.cache.moments, lc.ShardedMoments)
            assert isinstance(method.cache.text, lc.ShardedTexts) and not method.cache.text.extra
        examples = method.train_dataset
        batch = collate_examples([examples[i] for i in range(6)])
        assert batch["flipped"].any() and not batch["flipped"].all()
        # with the latents cached, the data loader stops decoding and resizing images
        assert ("pixel_values" in batch) == (mode == "none")
        torch.manual_seed(0)
        losses[mode] = method.loss(batch)[0].item()
    assert losses["memory"] == losses["disk"]
    assert losses["disk"] == pytest.approx(losses["none"], rel=1e-5, abs=1e-6)
    assert len(list((tmp_path / "disk" / ".cache").glob("latents-*/shard-*.safetensors"))) == 3
    assert len(list((tmp_path / "disk" / ".cache").glob("text-*/shard-*.safetensors"))) == 1


def test_bad_inputs_fail_before_training(tiny_sd, captioned_folder, tmp_path):
    with pytest.raises(ConfigError, match="must be a multiple of 8"):
        load_config(lora_recipe(tiny_sd, captioned_folder, tmp_path / "a"), ["data.resolution=60"])
    with pytest.raises(ConfigError, match="column 'caption' not found .* Available columns: image, text"):
        run_training(lora_recipe(tiny_sd, captioned_folder, tmp_path / "b"), "data.caption_column=caption")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("unet", "vae", "tokenizer", "scheduler"):
        (broken / name).mkdir()
    with pytest.raises(ConfigError, match="missing text_encoder"):
        run_training(lora_recipe(broken, captioned_folder, tmp_path / "c"))
    with pytest.raises(ConfigError, match="needs data.center_crop=true"):
        load_config(lora_recipe(tiny_sd, captioned_folder, tmp_path / "d", cache="memory"), ["data.center_crop=false"])
