"""Shared helpers for tests that run training jobs in-process or as subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; a fresh one per in-process run keeps tests independent."""
    from finetune.train import reset_accelerate_state

    reset_accelerate_state()


def run_training(recipe: dict | str | Path, *overrides: str) -> Path:
    from finetune.recipe import load_config
    from finetune.train import train

    reset_accelerate()
    return train(load_config(recipe, list(overrides)))


def tiny_ddpm_recipe(output_dir: Path, method: str = "unconditional", **sections) -> dict:
    """A digits run that takes a few seconds: tiny UNet, 8 px, batch 8, 2-step sampling."""
    recipe = {
        "method": method,
        "data": {"dataset": "digits", "resolution": 8, "max_samples": 64},
        "optim": {"lr": 1e-3, "lr_scheduler": "constant", "weight_decay": 0.0},
        "diffusion": {"num_inference_steps": 2, "beta_schedule": "squaredcos_cap_v2"},
        "train": {
            "output_dir": str(output_dir),
            "max_train_steps": 6,
            "train_batch_size": 8,
            "log_every": 1,
            "num_samples": 4,
            "report_to": "jsonl",
            "progress_bar": False,
        },
        "checkpoint": {"checkpointing_steps": 0},
    }
    if method in ("unconditional", "class_conditional"):
        recipe[method] = {"preset": "tiny"}
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    return recipe


def sd_image(pipe, prompt: str, steps: int = 2, size: int = 64):
    """One seeded image (numpy) from a text-to-image pipeline: the same call before and after a change to compare."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=3.0,
        generator=torch.manual_seed(0),
        height=size,
        width=size,
        output_type="np",
    ).images


def safetensors_in(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of all safetensors files under a folder, keyed by relative path and name."""
    tensors = {}
    for path in sorted(folder.rglob("*.safetensors")):
        if "checkpoint-" in str(path.relative_to(folder)):
            continue
        for key, value in load_file(str(path)).items():
            tensors[f"{path.relative_to(folder)}:{key}"] = value
    return tensors


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys(), f"different tensors: {sorted(set(a) ^ set(b))[:5]}"
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"largest difference {worst:.3g} > {atol}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_cpu_processes_launch(port: int | None = None) -> list[str]:
    """`accelerate launch` of two synchronised processes; with ACCELERATE_USE_CPU=1 in the environment they are two
    gloo processes on the CPU (the form FIELD_NOTES.md found to really start two)."""
    return [
        PYTHON, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port or free_port()),
    ]  # fmt: skip


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def wait_for(predicate, timeout: float, process: subprocess.Popen | None = None, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process ended (code {process.returncode}) before the condition was met")
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
