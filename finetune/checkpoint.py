"""Resumable checkpoints: `checkpoint-<step>` folders written atomically, rotated, and found again on resume.

A checkpoint holds the trained parameters only (LoRA rows, not the frozen base model) as safetensors, the EMA
weights as safetensors, accelerate's optimizer, LR-scheduler and RNG states, and `trainer_state.json` with the step
and any state of the method itself (as JSON: never a pickle). The folder is written under a temporary name and renamed
when complete, so a job killed while saving leaves the previous checkpoint intact, and the next start deletes the
temporary. A full disk or a refused write is one RunError line; the partial folder is removed.

Nothing in a checkpoint is unpickled unsafely: accelerate reads optimizer.bin, scheduler.bin and random_states_*.pkl
with torch.load(weights_only=True) (accelerate.utils.other.load); it would read registered custom objects
(custom_checkpoint_*.pkl) with weights_only=False, so difftune registers none and refuses a checkpoint holding one.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from finetune import atomic
from finetune.errors import InputError, RunError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
# accelerate loads these with torch.load(weights_only=False) (accelerate/checkpointing.py, load_custom_state)
UNSAFE_PICKLE_PATTERN = re.compile(r"^custom_checkpoint_\d+\.pkl$")
RNG_STATE_GLOB = "random_states_*.pkl"
# what torch.load says about a truncated or overwritten optimizer.bin / scheduler.bin
DAMAGED_ARCHIVE_TEXT = ("PytorchStreamReader", "zip archive", "central directory")
# folders of a run where killed writers may leave temporaries (besides the output folder itself)
RUN_SUBFOLDERS = ("samples", ".cache", "class_images")


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
            if not os.path.isfile(path):
                raise InputError(f"checkpoint {input_dir} has no {os.path.basename(path)}: resume from another one")
            state = load_file(path)
            expected = set(trainable_state_dict(module))
            if set(state) != expected:
                missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
                raise InputError(
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


def resume_hint(output_dir: Path) -> str:
    """What to do after a failed write: resume from the newest complete checkpoint, which the failure left intact."""
    checkpoints = list_checkpoints(output_dir)
    kept = f"{checkpoints[-1].name} is intact" if checkpoints else "no checkpoint was written yet"
    return f"resume with checkpoint.resume_from_checkpoint=latest ({kept})"


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    ema=None,
    total_limit: int | None = None,
    method_state: dict[str, Any] | None = None,
):
    """Write checkpoint-<step> atomically on all processes, then rotate old ones (main process). `method_state` is
    the method's own progress (JSON-able), stored in trainer_state.json."""
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.tmp"
    then = resume_hint(output_dir)
    try:
        with atomic.reporting_write_errors(staging, then):
            if accelerator.is_main_process and staging.exists():
                shutil.rmtree(staging)  # left by a job killed while saving
            accelerator.wait_for_everyone()
            accelerator.save_state(str(staging))
            accelerator.wait_for_everyone()  # every process's RNG state is in the folder before it is renamed
            if accelerator.is_main_process:
                if ema is not None:
                    save_file(
                        {f"shadow.{i}": p.detach().contiguous() for i, p in enumerate(ema.shadow_params)},
                        str(staging / EMA_FILE),
                        metadata={"optimization_step": str(ema.optimization_step)},
                    )
                state: dict[str, Any] = {"global_step": step}
                if method_state is not None:
                    state["method_state"] = method_state
                (staging / TRAINER_STATE).write_text(json.dumps(state))  # written last: it marks a complete folder
                atomic.fsync_tree(staging)
                atomic.replace_folder(staging, final)
                atomic.fsync_path(output_dir)
                logger.info("saved %s", final)
    except RunError:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # nothing partial left behind; the previous checkpoint stays
        raise
    if accelerator.is_main_process and total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("removed old checkpoint %s (checkpoints_total_limit=%d)", old.name, total_limit)
    accelerator.wait_for_everyone()
    return final


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Delete what writers killed mid-write left in a run's folder (`.checkpoint-5.tmp`, a half-written sample grid or
    cache), so that it never blocks a resume or a fresh start. Main process only."""
    if not _is_main_process():
        return []
    return atomic.remove_stale_temporaries(output_dir, *(output_dir / name for name in RUN_SUBFOLDERS))


def resolve_resume(resume_from: str | None, output_dir: Path) -> Path | None:
    """'latest' -> the newest complete checkpoint (None when there is none); a path -> that checkpoint. Temporaries
    of interrupted writes are removed first, whether or not a checkpoint exists."""
    output_dir = Path(output_dir)
    remove_stale_temporaries(output_dir)
    if resume_from is None:
        return None
    checkpoints = list_checkpoints(output_dir)
    if resume_from == "latest":
        if not checkpoints:
            if _is_main_process():
                logger.info("no checkpoint in %s: starting from step 0", output_dir)
            return None
        return checkpoints[-1]
    path = Path(resume_from).expanduser()
    if not path.exists() and not path.is_absolute() and (output_dir / path).exists():
        path = output_dir / path  # `checkpoint-10` means the one in the output folder
    if (path / TRAINER_STATE).is_file():
        return path
    if not path.exists():
        problem = "does not exist"
    elif not path.is_dir():
        problem = "is a file, not a checkpoint folder"
    else:
        problem = f"is not a complete checkpoint (it has no {TRAINER_STATE})"
    if checkpoints:
        fix = f"{output_dir} holds {', '.join(p.name for p in checkpoints)}: pass one of them, or 'latest'"
    else:
        fix = f"{output_dir} holds no checkpoint: leave it unset (or 'latest') to start from step 0"
    raise InputError(f"checkpoint.resume_from_checkpoint={resume_from!r} {problem}; {fix}")


def refuse_unsafe_files(path: Path) -> None:
    """Never unpickle code: a pickle accelerate would load with weights_only=False is refused, and RNG states that
    torch's weights-only loader rejects are an error here (accelerate would skip them silently and the resume would
    not be exact)."""
    from accelerate.utils import load as weights_only_load

    for entry in sorted(path.iterdir()):
        if UNSAFE_PICKLE_PATTERN.match(entry.name):
            raise InputError(
                f"checkpoint {path} holds {entry.name}, a pickle accelerate would load with weights_only=False (it "
                f"can run code); difftune never writes one (a method's state is in {TRAINER_STATE}) and does not load "
                "it: delete the file, or resume from another checkpoint"
            )
    for entry in sorted(path.glob(RNG_STATE_GLOB)):
        try:
            weights_only_load(entry)  # torch.load(weights_only=True) with accelerate's numpy allow-list
        except Exception as err:  # noqa: BLE001 - any failure means the file is not a plain RNG state
            raise InputError(
                f"checkpoint file {entry} is not a plain RNG state and was not loaded ({type(err).__name__}); resume "
                "from another checkpoint"
            ) from None


def load_checkpoint(accelerator: Accelerator, path: Path, ema=None) -> int:
    """Restore a checkpoint on every process; return its optimizer step."""
    from safetensors import SafetensorError

    refuse_unsafe_files(path)
    if accelerator.distributed_type.value in ("DEEPSPEED", "FSDP"):
        logger.warning(
            "%s checkpoints are read by their own loaders, which may unpickle: resume only from checkpoints you wrote",
            accelerator.distributed_type.value,
        )
    try:
        accelerator.load_state(str(path))
        if ema is not None:
            if not (path / EMA_FILE).is_file():
                raise InputError(
                    f"checkpoint {path} has no {EMA_FILE}: it was written without ema.use_ema; resume with the "
                    "options that wrote it"
                )
            state = load_file(str(path / EMA_FILE))
            for i, shadow in enumerate(ema.shadow_params):
                shadow.data.copy_(state[f"shadow.{i}"])
            from safetensors import safe_open

            with safe_open(str(path / EMA_FILE), "pt") as handle:
                ema.optimization_step = int(handle.metadata()["optimization_step"])
        return int(read_trainer_state(path)["global_step"])
    except pickle.UnpicklingError:  # torch's weights-only loader refused optimizer.bin / scheduler.bin
        raise InputError(
            f"checkpoint {path} holds a .bin file (optimizer.bin, scheduler.bin) that is not a plain tensor state; it "
            "was not loaded (it could run code): resume from another checkpoint"
        ) from None
    except (SafetensorError, EOFError, RuntimeError) as err:
        text = str(err).splitlines()[0] if str(err) else ""
        if isinstance(err, RuntimeError) and not any(s in text for s in DAMAGED_ARCHIVE_TEXT):
            raise  # a bug, not a damaged file
        raise InputError(
            f"checkpoint {path} is damaged ({type(err).__name__}: {text}); resume from another checkpoint"
        ) from None


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path / TRAINER_STATE} ({err}); resume from another checkpoint") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise InputError(f"{path / TRAINER_STATE} has no integer global_step; resume from another checkpoint")
    return state


def read_method_state(path: Path) -> dict[str, Any] | None:
    """The method's own state saved with the checkpoint, or None (a checkpoint of a method that keeps none)."""
    return read_trainer_state(path).get("method_state")
