"""Resumable checkpoints: `checkpoint-<step>` folders written atomically, rotated, and found again on resume.

A checkpoint holds the trained parameters only (LoRA rows, not the frozen base model) as safetensors, the EMA
weights as safetensors, and accelerate's optimizer, LR-scheduler and RNG states, plus `trainer_state.json` with the
step. The folder is written under a temporary name and renamed when complete, so a job killed while saving leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
EMA_FILE = "ema.safetensors"


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters that train: a LoRA checkpoint holds the adapter, not the base model."""
    return {name: p.detach().contiguous() for name, p in module.named_parameters() if p.requires_grad}


def register_trainable_only_hooks(accelerator: Accelerator) -> None:
    """Make accelerator.save_state/load_state write and read only the trainable parameters of each prepared model."""

    def save_hook(models, weights, output_dir):
        if not weights:  # FSDP / DeepSpeed save their own sharded states
            return
        for index, model in enumerate(models):
            state = trainable_state_dict(accelerator.unwrap_model(model))
            save_file(state, os.path.join(output_dir, f"trainable_{index}.safetensors"))
        weights.clear()  # nothing left for accelerate to save as full models

    def load_hook(models, input_dir):
        if accelerator.distributed_type.value in ("DEEPSPEED", "FSDP"):
            return
        for index, model in enumerate(models):
            path = os.path.join(input_dir, f"trainable_{index}.safetensors")
            module = accelerator.unwrap_model(model)
            state = load_file(path)
            expected = set(trainable_state_dict(module))
            if set(state) != expected:
                missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
                raise ValueError(
                    f"checkpoint {path} does not match the model being trained (missing {missing[:3]}, unexpected "
                    f"{unexpected[:3]}): resume with the same method and options that wrote it"
                )
            module.load_state_dict(state, strict=False)
        models.clear()  # loaded here; accelerate must not try to load full models

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))
    ]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE).is_file()]


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, ema=None, total_limit: int | None = None):
    """Write checkpoint-<step> atomically on all processes, then rotate old ones (main process)."""
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)  # left by a job killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        if ema is not None:
            save_file(
                {f"shadow.{i}": p.detach().contiguous() for i, p in enumerate(ema.shadow_params)},
                str(staging / EMA_FILE),
                metadata={"optimization_step": str(ema.optimization_step)},
            )
        (staging / TRAINER_STATE).write_text(json.dumps({"global_step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
                logger.info("removed old checkpoint %s (checkpoints_total_limit=%d)", old.name, total_limit)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume_from: str | None, output_dir: Path) -> Path | None:
    """'latest' -> the newest complete checkpoint (None when there is none); a path -> that checkpoint."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"checkpoint.resume_from_checkpoint: {resume_from!r} is not a complete checkpoint folder (no "
            f"{TRAINER_STATE}); use 'latest' or one of {[p.name for p in list_checkpoints(output_dir)]}"
        )
    return path


def load_checkpoint(accelerator: Accelerator, path: Path, ema=None) -> int:
    """Restore a checkpoint on every process; return its optimizer step."""
    accelerator.load_state(str(path))
    if ema is not None:
        if not (path / EMA_FILE).is_file():
            raise FileNotFoundError(f"{path} has no {EMA_FILE}: it was written without ema.use_ema")
        state = load_file(str(path / EMA_FILE))
        for i, shadow in enumerate(ema.shadow_params):
            shadow.data.copy_(state[f"shadow.{i}"])
        from safetensors import safe_open

        with safe_open(str(path / EMA_FILE), "pt") as handle:
            ema.optimization_step = int(handle.metadata()["optimization_step"])
    return int(json.loads((path / TRAINER_STATE).read_text())["global_step"])
