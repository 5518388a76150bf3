"""Checkpoints: exact resume after SIGKILL, rotation, a kill during a checkpoint write, no overwritten outputs."""

from __future__ import annotations

import signal
import subprocess

import pytest
import yaml

from finetune import checkpoint as ckpt
from finetune.config import ConfigError
from finetune.errors import InputError
from tests.helpers import (
    PYTHON,
    REPO,
    assert_same_tensors,
    run_training,
    safetensors_in,
    subprocess_env,
    tiny_ddpm_recipe,
    wait_for,
)

STEPS = 40


def resumable_recipe(output_dir):
    # 40 examples / batch 8 = 5 batches per epoch, so the run crosses epoch boundaries; cosine LR and EMA make
    # every piece of state matter for the final weights
    return tiny_ddpm_recipe(
        output_dir,
        data={"max_samples": 40, "random_flip": True},
        optim={"lr_scheduler": "cosine", "lr_warmup_steps": 3},
        ema={"use_ema": True, "decay": 0.9},
        diffusion={"snr_gamma": 5.0, "noise_offset": 0.05},
        train={"max_train_steps": STEPS, "log_every": 5},
        checkpoint={"checkpointing_steps": 5},
    )


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    reference = run_training(resumable_recipe(tmp_path / "reference"))

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(resumable_recipe(tmp_path / "killed")))
    process = subprocess.Popen(
        [PYTHON, "-m", "finetune", str(recipe_path)],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: (tmp_path / "killed" / "checkpoint-10").is_dir(), timeout=120, process=process, interval=0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model_index.json").exists(), "the run must have been killed before its end"
    done = [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(tmp_path / "killed")]
    assert done and max(done) < STEPS

    resumed = run_training(recipe_path, "checkpoint.resume_from_checkpoint=latest")
    assert_same_tensors(safetensors_in(resumed), safetensors_in(reference), atol=1e-6)


def test_checkpoint_rotation_keeps_the_newest(tmp_path):
    out = run_training(
        tiny_ddpm_recipe(tmp_path / "run", checkpoint={"checkpointing_steps": 2, "checkpoints_total_limit": 2})
    )
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    from accelerate import Accelerator

    recipe = tiny_ddpm_recipe(tmp_path / "run", checkpoint={"checkpointing_steps": 3})
    reference = run_training(tiny_ddpm_recipe(tmp_path / "reference", checkpoint={"checkpointing_steps": 3}))
    original_save_state = Accelerator.save_state

    class Killed(BaseException):
        """Stands for the process dying: nothing after it runs."""

    def dies_while_saving(self, output_dir=None, **kwargs):
        if output_dir.endswith(".checkpoint-6.tmp"):
            original_save_state(self, output_dir, **kwargs)
            (tmp_path / "run" / ".checkpoint-6.tmp" / "trainable_0.safetensors").write_bytes(b"half a file")
            raise Killed
        return original_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", dies_while_saving)
    with pytest.raises(Killed):
        run_training(recipe)
    monkeypatch.setattr(Accelerator, "save_state", original_save_state)

    assert (tmp_path / "run" / ".checkpoint-6.tmp").is_dir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["checkpoint-3"]
    resumed = run_training(recipe, "checkpoint.resume_from_checkpoint=latest")
    assert not (tmp_path / "run" / ".checkpoint-6.tmp").exists(), "the half-written checkpoint is cleaned up"
    assert_same_tensors(safetensors_in(resumed), safetensors_in(reference), atol=1e-6)


def test_a_finished_output_folder_is_never_overwritten(tmp_path):
    recipe = tiny_ddpm_recipe(tmp_path / "run", train={"max_train_steps": 2})
    out = run_training(recipe)
    weights = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds"):
        run_training(recipe)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights


def test_resume_from_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist; .* holds no checkpoint"):
        run_training(tiny_ddpm_recipe(tmp_path / "run"), f"checkpoint.resume_from_checkpoint={tmp_path / 'nope'}")
