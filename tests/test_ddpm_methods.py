"""Each pixel-space DDPM method end to end on CPU: train -> save -> from_pretrained -> sample, and it learns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from pipelines.class_conditional import ClassConditionalDDPMPipeline
from tests.helpers import REPO, run_training, tiny_ddpm_recipe
from tests.test_outputs import assert_valid_card
from tests.tiny_models import make_tiny_unet2d


def logged_losses(output_dir):
    return [
        r["loss"] for r in map(json.loads, (output_dir / "train_log.jsonl").read_text().splitlines()) if "loss" in r
    ]


def test_unconditional_trains_saves_loads_and_samples(tmp_path):
    recipe = tiny_ddpm_recipe(tmp_path / "run", train={"max_train_steps": 30, "report_to": "tensorboard"})
    out = run_training({**recipe, "ema": {"use_ema": True}})
    losses = logged_losses(out)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), f"loss did not fall: {losses[:5]} -> {losses[-5:]}"
    for expected in ("model_index.json", "README.md", "loss_curve.png", "samples/final.png", "config.yaml"):
        assert (out / expected).exists(), expected
    pipe = DDPMPipeline.from_pretrained(out)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    card = (out / "README.md").read_text()
    assert "| method | unconditional |" in card and f'DDPMPipeline.from_pretrained("{out}")' in card
    meta = assert_valid_card(out / "README.md")
    assert meta["pipeline_tag"] == "unconditional-image-generation" and "base_model" not in meta
    assert "min-SNR gamma" not in card  # unset: no row
    # TensorBoard: one run folder (the run's own), its hyperparameters logged once, numbers as numbers
    runs, hyperparameters = tensorboard_hyperparameters(out / "logs")
    assert runs == [out / "logs" / "difftune"], runs
    assert hyperparameters["optim.lr"] == ("number_value", 1e-3)
    assert hyperparameters["train.max_train_steps"] == ("number_value", 30)
    assert hyperparameters["ema.use_ema"] == ("number_value", 1.0)  # torch's hparams writes booleans as 0 / 1
    assert hyperparameters["method"] == ("string_value", "unconditional")
    assert "diffusion.snr_gamma" not in hyperparameters  # unset


def test_saved_weights_are_the_ema_weights(tmp_path):
    out = run_training(
        tiny_ddpm_recipe(
            tmp_path / "run",
            ema={"use_ema": True, "decay": 0.5, "use_ema_warmup": False},
            checkpoint={"checkpointing_steps": 6},
        )
    )
    from safetensors.torch import load_file

    saved = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(out / "checkpoint-6" / "ema.safetensors"))
    trained = load_file(str(out / "checkpoint-6" / "trainable_0.safetensors"))
    names = [name for name, _ in UNet2DModel.from_pretrained(out / "unet").named_parameters()]  # EMA's order
    assert set(names) == set(trained) == set(saved)
    for i, name in enumerate(names):
        torch.testing.assert_close(saved[name], ema[f"shadow.{i}"])
    assert any(not torch.equal(ema[f"shadow.{i}"], trained[name]) for i, name in enumerate(names)), (
        "EMA weights should differ from the raw weights"
    )


def test_ddpm_finetune_starts_from_the_pretrained_model(tmp_path):
    base = tmp_path / "base"
    unet = make_tiny_unet2d(resolution=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(base)
    recipe = tiny_ddpm_recipe(
        tmp_path / "run",
        method="ddpm_finetune",
        model={"pretrained_model_name_or_path": str(base)},
        optim={"lr": 1e-5},
        train={"max_train_steps": 3},
    )
    out = run_training(recipe)
    tuned = DDPMPipeline.from_pretrained(out).unet
    before = dict(unet.named_parameters())
    deltas = [(p - before[n]).abs().max().item() for n, p in tuned.named_parameters()]
    assert 0 < max(deltas) < 1e-3, "a few steps at lr 1e-5 move the weights a little, not from scratch"
    assert DDPMPipeline.from_pretrained(out).scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert f"**Base model:** {base}" in (out / "README.md").read_text()


def test_ddpm_finetune_refuses_pickle_weights_unless_allowed(tmp_path):
    base = tmp_path / "base"
    unet = make_tiny_unet2d(resolution=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(base, safe_serialization=False)
    recipe = tiny_ddpm_recipe(
        tmp_path / "run", method="ddpm_finetune", model={"pretrained_model_name_or_path": str(base)}
    )
    from finetune.config import ConfigError

    with pytest.raises(ConfigError, match="allow_pickle=true"):
        run_training(recipe)


def test_class_conditional_trains_and_samples_requested_classes(tmp_path):
    recipe = tiny_ddpm_recipe(
        tmp_path / "run", method="class_conditional", class_conditional={"label_dropout": 0.2, "guidance_scale": 2.0}
    )
    out = run_training(recipe)
    pipe = ClassConditionalDDPMPipeline.from_pretrained(out)
    assert pipe.config.num_classes == 10 and pipe.null_class_label == 10
    labels = [0, 3, 9]
    guided = pipe(
        class_labels=labels,
        guidance_scale=2.0,
        num_inference_steps=3,
        generator=torch.manual_seed(0),
        output_type="np",
    ).images
    plain = pipe(
        class_labels=labels,
        guidance_scale=1.0,
        num_inference_steps=3,
        generator=torch.manual_seed(0),
        output_type="np",
    ).images
    assert guided.shape == (3, 8, 8, 1) and not np.allclose(guided, plain)
    # the recipe's guidance is saved with the model and is what a call without guidance_scale uses
    assert pipe.config.guidance_scale == 2.0 and pipe.default_guidance_scale == 2.0
    default = pipe(class_labels=labels, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert np.allclose(default, guided)
    other = pipe(
        class_labels=[1, 4, 8],
        guidance_scale=1.0,
        num_inference_steps=3,
        generator=torch.manual_seed(0),
        output_type="np",
    ).images
    assert not np.allclose(other, plain), "the class label must change the output"
    with pytest.raises(ValueError, match="class_labels must be integers in"):
        pipe(class_labels=[10], num_inference_steps=1)


def test_evaluation_is_logged_during_training_with_its_baseline(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path / "cache"))
    recipe = tiny_ddpm_recipe(
        tmp_path / "run",
        method="class_conditional",
        train={"max_train_steps": 4, "eval_every": 2, "eval_num_samples": 20},
    )
    out = run_training(recipe)
    evals = [r["eval"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "eval" in r]
    assert len(evals) == 2
    for metrics in evals:
        for key in ("digits_fd", "digits_kid_mean", "digits_class_accuracy"):
            assert np.isfinite(metrics[key]) and np.isfinite(metrics[f"{key}_baseline"])
        assert metrics["digits_fd"] > metrics["digits_fd_baseline"], "4 steps of training are far from real digits"


def test_a_label_outside_num_classes_is_refused_at_start_naming_the_file(tmp_path):
    import json

    from finetune.config import ConfigError
    from tests.tiny_models import make_test_images

    folder = tmp_path / "labelled"
    paths = make_test_images(folder, 4, size=16)
    labels = [0, 1, 12, 3]
    lines = [json.dumps({"file_name": p.name, "label": label}) for p, label in zip(paths, labels)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    recipe = tiny_ddpm_recipe(tmp_path / "run", method="class_conditional", data={"dataset": str(folder)})
    with pytest.raises(ConfigError, match=rf"label 12 of .*{paths[2].name} is outside \[0, 10\)"):
        run_training(recipe)


def tensorboard_hyperparameters(logs) -> tuple[list, dict]:
    """The run folders under `logs` that hold event files, and the hyperparameters of the HParams dashboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    runs = sorted({path.parent for path in logs.rglob("events.out.tfevents.*")})
    values = {}
    for run in runs:
        events = EventAccumulator(str(run))
        events.Reload()
        for content in events.PluginTagToContent("hparams").values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                for key, value in data.session_start_info.hparams.items():
                    values[key] = value.WhichOneof("kind"), getattr(value, value.WhichOneof("kind"))
    return runs, values


def test_shifted_cosine_schedule_matches_cosine_at_shift_one_and_keeps_more_signal_when_shifted():
    from finetune.diffusion import shifted_cosine_betas, shifted_cosine_log_snr

    cosine = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    unshifted = torch.cumprod(1 - shifted_cosine_betas(1000, 1.0), 0)
    # diffusers' cosine adds a 0.008 offset (Nichol & Dhariwal 2021); without it the curves agree to about 1%
    torch.testing.assert_close(unshifted[10:990], cosine[10:990], atol=0.012, rtol=0)
    shifted = torch.cumprod(1 - shifted_cosine_betas(1000, 4.0), 0)
    assert (shifted[1:-1] > unshifted[1:-1]).all()  # more signal at every interior timestep
    assert shifted[-1] < 1e-6  # ...and still (almost) pure noise at the end
    t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    torch.testing.assert_close(
        shifted_cosine_log_snr(t, 4.0) - shifted_cosine_log_snr(t, 1.0), torch.full_like(t, 2 * np.log(4.0))
    )


def test_a_shifted_schedule_is_saved_with_the_pipeline_and_sampled_with(tmp_path):
    out = run_training(tiny_ddpm_recipe(tmp_path / "run", diffusion={"schedule_shift": 2.0}))
    from finetune.diffusion import shifted_cosine_betas

    pipe = DDPMPipeline.from_pretrained(out)
    torch.testing.assert_close(pipe.scheduler.betas.double(), shifted_cosine_betas(1000, 2.0), atol=1e-7, rtol=1e-5)


def test_a_schedule_shift_on_another_schedule_is_refused_in_one_line(tmp_path):
    from finetune.config import ConfigError

    with pytest.raises(ConfigError, match="diffusion.schedule_shift=2.0 shifts the cosine schedule only"):
        run_training(tiny_ddpm_recipe(tmp_path / "run", diffusion={"schedule_shift": 2.0, "beta_schedule": "linear"}))


def test_trailing_timestep_spacing_is_saved_and_starts_sampling_at_pure_noise(tmp_path):
    out = run_training(tiny_ddpm_recipe(tmp_path / "run", diffusion={"timestep_spacing": "trailing"}))
    pipe = DDPMPipeline.from_pretrained(out)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    pipe.scheduler.set_timesteps(50)
    assert pipe.scheduler.timesteps[0] == 999  # 'leading' would start at 980, short of the last training step
    default = DDPMPipeline.from_pretrained(run_training(tiny_ddpm_recipe(tmp_path / "default")))
    assert default.scheduler.config.timestep_spacing == "leading"


def test_timestep_spacing_on_a_method_it_does_not_apply_to_is_refused_in_one_line():
    from finetune.config import ConfigError
    from finetune.recipe import load_config

    with pytest.raises(ConfigError, match="diffusion.timestep_spacing applies to the pixel-space DDPM methods"):
        load_config(REPO / "finetune/recipes/digits_teach_lora.yaml", ["diffusion.timestep_spacing=trailing"])
