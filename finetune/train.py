"""The one training loop. Every method plugs into it through `finetune.methods.base.Method`; it never asks which
method it runs.

    accelerate launch -m finetune finetune/recipes/digits_unconditional.yaml train.max_train_steps=2000
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    set_seed,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from finetune import atomic, buckets, speed
from finetune import checkpoint as ckpt
from finetune.config import Config, ConfigError
from finetune.data import collate_examples
from finetune.methods import get_method_class
from finetune.outputs import (
    log_hyperparameters,
    push_failed_error,
    push_output_folder,
    save_grid,
    truncate_log,
    write_loss_curve,
    write_model_card,
)
from finetune.plan import check_output_dir
from finetune.preflight import check_training_inputs, format_duration, resolve_tracker

logger = logging.getLogger("difftune")


def build_optimizer(
    config: Config, parameters: list, lr: float, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' AdamW8bit) over `parameters`: tensors, or param groups that may set their own lr;
    torch AdamW's kernels (fused, foreach) from optim.adamw_implementation and the device."""
    optim = config.optim
    kwargs = dict(
        lr=lr, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_epsilon, weight_decay=optim.weight_decay
    )
    if optim.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, **kwargs)
    implementation = speed.adamw_options(config.optim.adamw_implementation, device or torch.device("cpu"))
    return torch.optim.AdamW(parameters, **kwargs, **implementation)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on a GPU; peak resident memory of the process on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@contextlib.contextmanager
def averaged_weights(ema: EMAModel | None, parameters: list[torch.nn.Parameter]):
    """Swap the EMA weights in for sampling and saving, and the trained weights back afterwards."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons, so that `train` can run again in the same process (tests,
    benchmarks running several jobs in one interpreter)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    GradientState._reset_state()


# loggers whose INFO lines are not the user's business: accelerate's four lines per checkpoint naming the staging
# folder (difftune logs one line per checkpoint instead), matplotlib's font cache
QUIET_LOGGERS = ("accelerate.accelerator", "accelerate.checkpointing", "matplotlib")


def load_hint(usage: str, output_dir: Path) -> str:
    """The loading lines of a model card's usage snippet (the pipeline's from_pretrained, then the line naming this
    run's output), on one line, with the placeholder made this run's folder; empty when the snippet has none."""
    lines, found = [], False
    for line in usage.strip().splitlines():
        code = line.split("  #")[0].strip()
        if "OUTPUT_DIR_OR_REPO_ID" in code or str(output_dir) in code:
            lines.append(code.replace("OUTPUT_DIR_OR_REPO_ID", str(output_dir)))
            found = True
            break
        if "from_pretrained(" in code:
            lines.append(code)
    return "; ".join(lines) if found else ""


def finished_line(output_dir: Path, usage: str, seconds: float, steps: int) -> str:
    """The last line of a run: where the model is, how to load it, and the wall time."""
    hint = load_hint(usage, output_dir)
    load = f"; load it with: {hint}" if hint else ""
    return f"difftune: done: {steps} steps in {format_duration(seconds)}. The model is in {output_dir}{load}"


_first_run = True


def train(config: Config) -> Path:
    global _first_run
    import finetune

    # the wall time counts from the start of the process (imports included) for its first run
    started = finetune.STARTED if _first_run else time.monotonic()
    _first_run = False
    output_dir = Path(config.train.output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for name in QUIET_LOGGERS:
        if logging.getLogger(name).level < logging.WARNING:
            logging.getLogger(name).setLevel(logging.WARNING)
    # cheap checks before accelerate starts and anything loads: the output folder (writable, with room), then every
    # model path; the data comes next, in method.setup()
    check_training_inputs(config)
    speed.serial_tokenizers()  # before the first tokenizer call: no tokenizer thread pool beside the step's threads
    accumulation = config.train.gradient_accumulation_steps

    # accelerator: devices, mixed precision, process group, data sharding with a seeded sampler (resumable order)
    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulation, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=config.train.seed, non_blocking=speed.pin_memory(config.data)
        ),
        log_with=resolve_tracker(config.train.report_to),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.train.process_group_timeout_s))],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise ConfigError(
            f"the launcher started {launched} processes but they did not join one process group: each would train "
            "alone and write the same files. On CPUs set ACCELERATE_USE_CPU=1 (see accelerate_configs/cpu_2proc.yaml)."
        )
    # before anything loads: the precision and the attention kernel the device really runs
    speed.check_mixed_precision(accelerator.mixed_precision, accelerator.device, config)
    speed.check_attention_backend(config.train.attention_backend, accelerator.device, accelerator.mixed_precision)
    resume_path = ckpt.resolve_resume(config.checkpoint.resume_from_checkpoint, output_dir)
    if accelerator.is_main_process:
        check_output_dir(output_dir, resuming=resume_path is not None)
    accelerator.wait_for_everyone()
    set_seed(config.train.seed)  # model initialisation is identical on every process
    if torch.cuda.is_available() and config.train.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    # method: check inputs, load models, build the dataset
    method = get_method_class(config.method)(config, accelerator)
    method.setup()
    speed.apply_levers(config.train, method.compute_modules())  # train.channels_last, train.compile
    dataset = method.train_dataset
    global_batch = config.train.train_batch_size * accelerator.num_processes * accumulation
    if len(dataset) < config.train.train_batch_size * accelerator.num_processes:
        raise ConfigError(
            f"the dataset has {len(dataset)} examples, fewer than one batch on every process "
            f"({config.train.train_batch_size} x {accelerator.num_processes}); lower train.train_batch_size"
        )
    distinct = len(getattr(dataset, "source", dataset))
    if distinct < config.train.train_batch_size * accelerator.num_processes and accelerator.is_main_process:
        # TrainingExamples repeats a dataset smaller than one batch (drop_last would leave no batch at all), so the
        # same images fill every batch: say so rather than train on copies silently
        logger.warning(
            "data: %d example(s) for a batch of %d (train.train_batch_size %d x %d process(es)): examples repeat "
            "within every batch (%d copies of each per epoch). Add images, or set train.train_batch_size=%d",
            distinct,
            config.train.train_batch_size * accelerator.num_processes,
            config.train.train_batch_size,
            accelerator.num_processes,
            getattr(dataset, "repeats", 1),
            max(1, distinct // accelerator.num_processes),
        )
    bucket_sampler = None
    loader_options = speed.dataloader_options(config.data)  # workers, pinned memory
    if config.data.aspect_buckets:
        # every global batch from one bucket, cut into one slice per process; the order from (seed, epoch)
        bucket_sampler = buckets.make_sampler(
            dataset,
            config.data,
            method.bucket_multiple(),
            config.train.train_batch_size,
            accelerator.num_processes,
            config.train.seed,
        )
        dataloader = torch.utils.data.DataLoader(
            dataset, batch_sampler=bucket_sampler, collate_fn=collate_examples, **loader_options
        )
        if accelerator.is_main_process:
            buckets.log_table(dataset, bucket_sampler)
    else:
        dataloader = torch.utils.data.DataLoader(
            dataset,
            batch_size=config.train.train_batch_size,
            shuffle=True,
            drop_last=True,  # equal batches on every process and every step
            collate_fn=collate_examples,
            **loader_options,
        )

    # the length of the run: train.max_train_steps, or train.num_train_epochs passes over the data (each process's
    # share of the batches, accumulation micro-batches per optimizer step)
    max_steps = config.train.max_train_steps
    if config.train.num_train_epochs is not None:
        per_process = len(dataloader) // accelerator.num_processes
        max_steps = max(1, config.train.num_train_epochs * per_process // accumulation)
        if accelerator.is_main_process:
            logger.info(
                "train.num_train_epochs=%d: %d optimizer steps (%d batches per epoch per process, %d accumulation)",
                config.train.num_train_epochs,
                max_steps,
                per_process,
                accumulation,
            )

    # optimizer and LR schedule over the trainable parameters only
    modules = method.trainable_modules()
    parameters = method.trainable_parameters()
    lr_scale = global_batch if config.optim.scale_lr else 1
    optimizer = build_optimizer(
        config, method.parameter_groups(lr_scale), config.optim.lr * lr_scale, accelerator.device
    )
    # a prepared scheduler steps once per process on every optimizer step, hence the factor
    lr_scheduler = get_scheduler(
        config.optim.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.optim.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
        num_cycles=config.optim.lr_num_cycles,
        power=config.optim.lr_power,
    )
    # the loop moves each batch itself (speed.batch_to_device), leaving the bookkeeping read on the host where it is
    placement = [None] * len(modules) + [None, False, None]
    prepared = accelerator.prepare(*modules.values(), optimizer, dataloader, lr_scheduler, device_placement=placement)
    method.use_prepared_modules(dict(zip(modules, prepared[: len(modules)])))
    optimizer, dataloader, lr_scheduler = prepared[len(modules) :]
    ema = None
    if config.ema.use_ema:
        ema = EMAModel(
            parameters,
            decay=config.ema.decay,
            use_ema_warmup=config.ema.use_ema_warmup,
            inv_gamma=config.ema.inv_gamma,
            power=config.ema.power,
            update_after_step=config.ema.update_after_step,
        )
        ema.to(accelerator.device)
    ckpt.register_trainable_only_hooks(accelerator)
    method.before_training(ema)

    # resume: weights, optimizer, scheduler, RNG and EMA from the checkpoint; the data position from the step
    global_step = 0
    if resume_path is not None:
        global_step = ckpt.load_checkpoint(accelerator, resume_path, ema)
        # the method's own progress, JSON in trainer_state.json (never a pickle)
        method.load_checkpoint_state(ckpt.read_method_state(resume_path), global_step)
        logger.info("resumed from %s at step %d", resume_path, global_step)
    batches_per_epoch = len(dataloader)
    micro_step = global_step * accumulation
    epoch, skip_batches = divmod(micro_step, batches_per_epoch)

    log_path = output_dir / "train_log.jsonl"
    if accelerator.is_main_process:
        with atomic.reporting_write_errors(output_dir):
            output_dir.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(output_dir / "config.yaml") as temporary:
            config.save(temporary)
        truncate_log(log_path, global_step)  # lines of an interrupted run after its checkpoint: the log is one run
        if bucket_sampler is not None:  # images per bucket
            buckets.write_json(dataset, bucket_sampler, output_dir, then=ckpt.resume_hint(output_dir))
        accelerator.init_trackers(
            config.train.tracker_project_name,
            init_kwargs={"wandb": {"name": config.train.run_name or output_dir.resolve().name}},
        )
        log_hyperparameters(accelerator.trackers, config.to_dict())  # once, typed, in the run's own folder
        logger.info(
            "method %s | %d examples | %d trainable parameters | global batch %d = %d per process x %d processes x "
            "%d accumulation | %d steps",
            config.method,
            len(dataset),
            sum(p.numel() for p in parameters),
            global_batch,
            config.train.train_batch_size,
            accelerator.num_processes,
            accumulation,
            max_steps,
        )
    progress = tqdm(
        total=max_steps,
        initial=global_step,
        desc="steps",
        disable=not (accelerator.is_main_process and config.train.progress_bar),
    )
    trained_modules = list(method.trainable_modules().values())
    recent_losses: list[torch.Tensor] = []
    step_started, steps_since_log = time.perf_counter(), 0

    def append_log(record: dict) -> None:
        if accelerator.is_main_process:
            with atomic.reporting_write_errors(log_path, ckpt.resume_hint(output_dir)), open(log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")  # a kill mid-line leaves a line that readers skip

    def write_samples(tag: str) -> None:
        if not config.train.samples_on:  # train.num_samples=0 / sample_every=-1: no grids at all
            return
        if accelerator.is_main_process:
            with averaged_weights(ema, parameters):
                images = method.sample(config.train.num_samples, seed=config.train.seed)
            labels = method.sample_labels(len(images))  # prompts or classes, under their rows
            save_grid(images, output_dir / "samples" / f"{tag}.png", then=ckpt.resume_hint(output_dir), labels=labels)
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    import numpy as np

                    tracker.writer.add_images(
                        "samples",
                        np.stack([np.asarray(i.convert("RGB")) for i in images]),
                        global_step,
                        dataformats="NHWC",
                    )
        accelerator.wait_for_everyone()

    while global_step < max_steps:
        dataloader.set_epoch(epoch)
        dataset.set_epoch(epoch)
        if bucket_sampler is not None:  # (accelerate's shard of a batch sampler does not pass the epoch on)
            bucket_sampler.set_epoch(epoch)
        batches = accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader
        skip_batches = 0
        for batch in batches:
            batch = speed.batch_to_device(batch, accelerator.device, non_blocking=speed.pin_memory(config.data))
            # train.attention_backend: the SDPA kernel of the forward (the backward follows the forward's choice)
            with accelerator.accumulate(*trained_modules), speed.attention_backend(config.train.attention_backend):
                # forward: the method's loss on this micro-batch (denoising, distillation, reconstruction, ...)
                loss, extra_logs = method.loss(batch)
                # backward, clip, step: gradients are averaged over processes and accumulated micro-batches
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.optim.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(parameters, config.optim.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            recent_losses.append(loss.detach().float())
            if not accelerator.sync_gradients:
                continue

            # after each optimizer step: method fix-ups, EMA, the method's step end, logs, samples, checkpoints
            global_step += 1
            method.after_optimizer_step(global_step)
            if ema is not None:
                ema.step(parameters)
            method.on_step_end(global_step, ema)
            steps_since_log += 1
            progress.update(1)
            if global_step % config.train.log_every == 0 or global_step == max_steps:
                mean_loss = accelerator.reduce(torch.stack(recent_losses).mean(), reduction="mean").item()
                recent_losses.clear()
                elapsed = time.perf_counter() - step_started
                logs = {
                    "step": global_step,
                    "loss": mean_loss,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "steps_per_s": steps_since_log / max(elapsed, 1e-9),
                    "peak_memory_mb": peak_memory_mb(accelerator.device),
                    **extra_logs,
                }
                step_started, steps_since_log = time.perf_counter(), 0
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}")
                accelerator.log(logs, step=global_step)
                append_log(logs)
            if config.train.sample_every > 0 and global_step % config.train.sample_every == 0:
                write_samples(f"step-{global_step:06d}")
            if config.train.eval_every and global_step % config.train.eval_every == 0:
                with averaged_weights(ema, parameters):
                    metrics = method.evaluate(config.train.eval_num_samples, seed=config.train.seed)
                if metrics:
                    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=global_step)
                    if accelerator.is_main_process:
                        logger.info("step %d evaluation: %s", global_step, metrics)
                    append_log({"step": global_step, "eval": metrics})
            checkpoint_due = config.checkpoint.checkpointing_steps and (
                global_step % config.checkpoint.checkpointing_steps == 0
            )
            if checkpoint_due:
                ckpt.save_checkpoint(
                    accelerator,
                    output_dir,
                    global_step,
                    ema,
                    config.checkpoint.checkpoints_total_limit,
                    method_state=method.checkpoint_state(),
                )
            if global_step >= max_steps:
                break
        epoch += 1
    progress.close()

    # final outputs: the model (EMA weights when EMA is on), sample grid, loss curve, model card; once, on main
    accelerator.wait_for_everyone()
    write_samples("final")
    pushed = True
    if accelerator.is_main_process:
        then = ckpt.resume_hint(output_dir)
        # the model is written into a staging folder and its files moved into place: none is ever half-written
        # under its final name, and the model card, written last, marks a finished folder
        with atomic.staged_contents(output_dir, "final-model", then) as staging, averaged_weights(ema, parameters):
            method.save(staging)
        write_loss_curve(log_path, output_dir / "loss_curve.png", then=then)
        card = method.card()
        write_model_card(output_dir, config, card, method.options_dict(), global_step, then=then)
        if config.hub.push_to_hub:
            pushed = push_output_folder(output_dir, config.hub.hub_model_id, config.hub.private) is not None
    accelerator.end_training()
    if accelerator.is_main_process:
        print(finished_line(output_dir, card.get("usage", ""), time.monotonic() - started, global_step))
    if not pushed:  # everything local is saved; a script must still see that the push did not happen
        raise push_failed_error(output_dir, config.hub.hub_model_id)
    return output_dir
