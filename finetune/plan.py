"""`difftune train RECIPE --dry-run`: every check a run makes before it trains (the recipe, the tracker, the output
folder and its free space, every model path, the data), then the plan: steps, global batch, examples, buckets and
the size of a latent cache. Nothing is loaded but the data's file headers and small JSON files, nothing is written.
"""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

from finetune.config import Config, ConfigError


def check_output_dir(output_dir: Path, resuming: bool) -> None:
    """Never overwrite a finished model or someone's files: a fresh run needs an empty (or absent) folder."""
    from finetune.outputs import RUN_SCAFFOLDING

    if resuming or not output_dir.exists():
        return
    foreign = sorted(p.name for p in output_dir.iterdir() if p.name not in RUN_SCAFFOLDING)
    if foreign:
        raise ConfigError(
            f"train.output_dir {str(output_dir)!r} already holds {', '.join(foreign[:5])}. Choose a new output_dir, "
            "or resume with checkpoint.resume_from_checkpoint=latest if it holds checkpoints of this run."
        )


def resume_point(config: Config) -> Path | None:
    """The checkpoint a run would resume from, found without touching the folder (no clean-up of temporaries)."""
    from finetune.checkpoint import TRAINER_STATE, list_checkpoints

    wanted = config.checkpoint.resume_from_checkpoint
    output_dir = Path(config.train.output_dir)
    if wanted is None:
        return None
    if wanted == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(wanted).expanduser()
    if not path.exists() and not path.is_absolute():
        path = output_dir / path
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(
            f"checkpoint.resume_from_checkpoint: {wanted!r} is not a complete checkpoint folder; use 'latest' or a "
            f"checkpoint-<step> folder of {str(output_dir)!r}"
        )
    return path


def check_before_launch(config: Config) -> Path | None:
    """The checks of a run that need no model and no data: the tracker, the output folder (writable, room, not
    someone else's files), every model path. Returns the checkpoint the run will resume from, if any."""
    from finetune.preflight import check_training_inputs

    output_dir = check_training_inputs(config)
    resume = resume_point(config)
    check_output_dir(output_dir, resuming=resume is not None)
    return resume


def _stand_in_accelerator(config: Config, num_processes: int):
    """What a method's constructor reads of an accelerator, without starting one (no device, no process group)."""
    import torch

    return types.SimpleNamespace(
        device=torch.device("cpu"),
        mixed_precision=config.train.mixed_precision or "no",
        num_processes=num_processes,
        process_index=0,
        is_main_process=True,
    )


def _latent_shape(config: Config) -> tuple[int, int] | None:
    """(latent channels, downscale factor) from a local base model's vae/config.json; None when not readable."""
    path = config.model.vae or config.model.pretrained_model_name_or_path
    if not path:
        return None
    root = Path(path).expanduser()
    for candidate in (root / "vae" / "config.json", root / "config.json"):
        if candidate.is_file():
            try:
                vae = json.loads(candidate.read_text())
                return int(vae["latent_channels"]), 2 ** (len(vae["block_out_channels"]) - 1)
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None


def cache_line(config: Config, sizes: list[tuple[int, int]]) -> str | None:
    """How much a latent cache (`<method>.cache=memory|disk`) holds: the VAE's mean and std per image (and per
    flip), in float32; text conditioning comes on top. None when the method has no cache or it is off."""
    cache = getattr(config.method_options, "cache", None)
    if cache in (None, "none"):
        return None
    shape = _latent_shape(config)
    if shape is None:
        return f"latent cache: {cache} (size unknown: the base model's VAE config is not in a local folder)"
    channels, factor = shape
    flips = 2 if config.data.random_flip else 1
    per_pixel = 2 * channels * 4 * flips  # mean and std, float32
    total = sum(per_pixel * math.ceil(h / factor) * math.ceil(w / factor) for w, h in sizes)
    from finetune.preflight import format_bytes

    where = "in memory" if cache == "memory" else f"on disk in {config.train.output_dir}/.cache"
    return (
        f"latent cache: about {format_bytes(total)} {where} ({len(sizes)} image(s), {channels} latent channels at "
        f"1/{factor} of the image side, mean and std in float32{', flipped and not' if flips == 2 else ''}; the "
        "text conditioning comes on top)"
    )


def dry_run(config: Config, num_processes: int = 1) -> list[str]:
    """Run every check a training run makes before it trains and return the plan, one line each. Raises the first
    InputError found, as a run would."""
    from finetune import buckets
    from finetune.data import TrainingExamples
    from finetune.methods import get_method_class

    resume = check_before_launch(config)
    train = config.train
    accumulation = train.gradient_accumulation_steps
    method = get_method_class(config.method)(config, _stand_in_accelerator(config, num_processes))
    source = method.data_source()
    per_step = train.train_batch_size * num_processes
    dataset = TrainingExamples(source, train.seed, config.data.repeats, min_length=per_step)
    distinct = len(source)
    global_batch = per_step * accumulation
    lines = [
        f"recipe: method {config.method}; output folder {config.train.output_dir}"
        + (f" (resuming from {resume.name})" if resume else ""),
        f"data: {distinct} example(s) in {getattr(method, 'instance_folder', None) or config.data.dataset}, "
        f"{len(dataset)} per epoch" + (f" ({config.data.repeats} repeats)" if config.data.repeats > 1 else ""),
    ]
    lines += method.plan_lines()
    if distinct < per_step:
        lines.append(f"data: fewer examples than one batch of {per_step}: examples repeat within every batch")
    if config.data.aspect_buckets:
        sampler = buckets.make_sampler(
            dataset, config.data, method.bucket_multiple(), train.train_batch_size, num_processes, train.seed
        )
        rows = buckets.bucket_rows(sampler, dataset.bucket_images())
        lines += buckets.format_table(rows, sampler)
        batches_per_epoch = len(sampler) // num_processes
        sizes = [tuple(int(x) for x in row["bucket"].split("x")) for row in rows for _ in range(row["images"])]
    else:
        batches_per_epoch = len(dataset) // train.train_batch_size // num_processes
        side = config.data.resolution
        sizes = [(side, side)] * distinct
    steps_per_epoch = max(1, batches_per_epoch // accumulation)
    if train.num_train_epochs is not None:
        steps = max(1, train.num_train_epochs * batches_per_epoch // accumulation)
        length = f"{steps} optimizer steps (train.num_train_epochs={train.num_train_epochs})"
    else:
        steps = train.max_train_steps
        length = f"{steps} optimizer steps (train.max_train_steps; {steps / steps_per_epoch:.1f} epochs)"
    lines += [
        f"steps: {length}, {steps_per_epoch} per epoch",
        f"global batch: {global_batch} = {train.train_batch_size} per process x {num_processes} process(es) x "
        f"{accumulation} accumulation; {steps * global_batch} examples seen in all",
    ]
    every, limit = config.checkpoint.checkpointing_steps, config.checkpoint.checkpoints_total_limit
    if every:
        kept = f", the newest {limit} kept" if limit else ""
        lines.append(f"checkpoints: {steps // every} (every {every} steps{kept})")
    else:
        lines.append("checkpoints: none (checkpoint.checkpointing_steps=0)")
    cache = cache_line(config, sizes)
    if cache:
        lines.append(cache)
    from finetune.preflight import estimate_output_bytes, format_bytes, resolve_tracker

    needed, why = estimate_output_bytes(config)
    if needed:
        lines.append(f"disk: at least {format_bytes(needed)} ({why})")
    tracker = resolve_tracker(train.report_to)
    lines.append(f"tracker: {tracker or 'none'} (train_log.jsonl always)")
    lines.append("dry run: every check passed; nothing was trained or written")
    return lines
