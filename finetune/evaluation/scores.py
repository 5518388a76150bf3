"""Putting it together: sample a pipeline (in memory or a saved folder), or read two image folders, and score the
images with the digits and/or Inception evaluators, each next to its real-vs-real baseline."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from finetune.evaluation.inception import INCEPTION_WEIGHTS_HELP, InceptionEvaluator, InceptionV3Features
from finetune.evaluation.metrics import DigitsEvaluator
from finetune.evaluation.report import format_report
from finetune.evaluation.sampling import load_image_folder, sample_pipeline_images

# --------------------------------------------------------------------------------------------------------------------
# Putting it together: evaluate a pipeline or two folders and report next to the baseline
# --------------------------------------------------------------------------------------------------------------------


def _scores_with_baseline(evaluator, images: torch.Tensor, class_labels=None) -> dict:
    if isinstance(evaluator, DigitsEvaluator):
        samples = evaluator.score(images, class_labels)
    else:
        samples = evaluator.score(images)
    # the baseline on as many held-out images as there are samples: FD is biased upward at small counts, on both sides
    baseline = evaluator.baseline(len(images))
    return {"samples": samples, "baseline": baseline, "baseline_is": evaluator.reference_description}


def evaluate_pipeline(
    pipeline,
    num_samples: int = 512,
    steps: int = 50,
    batch_size: int = 128,
    seed: int = 0,
    class_labels: torch.Tensor | Sequence[int] | None = None,
    digits_evaluator: DigitsEvaluator | None = None,
    inception_evaluator: InceptionEvaluator | None = None,
    pipeline_kwargs: dict | None = None,
) -> dict:
    """Sample an in-memory pipeline and score it with the given evaluators (a training loop reuses its evaluators).

    Returns {"settings": ..., "digits": {"samples", "baseline", "baseline_is"}, "inception": {...}} with the entries
    of the evaluators that were given.
    """
    if digits_evaluator is None and inception_evaluator is None:
        raise ValueError("evaluate_pipeline needs a DigitsEvaluator and/or an InceptionEvaluator")
    start = time.perf_counter()
    images, labels = sample_pipeline_images(
        pipeline, num_samples, steps, batch_size, seed, class_labels, pipeline_kwargs
    )
    result: dict = {
        "settings": {
            "num_samples": num_samples,
            "steps": steps,
            "batch_size": batch_size,
            "seed": seed,
            "image_shape": list(images.shape[1:]),
            "class_conditional": labels is not None,
            **(pipeline_kwargs or {}),
            "sampling_seconds": round(time.perf_counter() - start, 2),
        }
    }
    if digits_evaluator is not None:
        result["digits"] = _scores_with_baseline(digits_evaluator, images, labels)
    if inception_evaluator is not None:
        result["inception"] = _scores_with_baseline(inception_evaluator, images)
    return result


def _load_pipeline(folder: Path, pipeline_class=None, scheduler: str | None = None, device: str = "cpu"):
    """Through `pipelines.load` (safetensors only, diffusers or difftune pipeline classes only), in float32."""
    from pipelines.load import load_pipeline

    if not folder.is_dir():
        raise FileNotFoundError(f"pipeline folder not found: {folder}")
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"not a diffusers pipeline folder (no model_index.json): {folder}")
    if pipeline_class is None:
        return load_pipeline(folder, scheduler=scheduler, device=device, dtype="float32")
    pipeline = pipeline_class.from_pretrained(str(folder), use_safetensors=True)
    if scheduler is not None:
        import diffusers

        from pipelines.load import scheduler_class_name

        # (refuses a sampler that does not fit the pipeline, e.g. DDIM on a flow-matching one)
        name = scheduler_class_name(pipeline.scheduler, scheduler, type(pipeline).__name__)
        pipeline.scheduler = getattr(diffusers, name).from_config(pipeline.scheduler.config)
    return pipeline.to(device)


def evaluate_pipeline_folder(
    folder: str | Path,
    num_samples: int = 512,
    steps: int = 50,
    batch_size: int = 128,
    seed: int = 0,
    class_labels: torch.Tensor | Sequence[int] | None = None,
    *,
    inception_weights: str | Path | None = None,
    real_dir: str | Path | None = None,
    num_real: int | None = None,
    pipeline_class=None,
    scheduler: str | None = None,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    pipeline_kwargs: dict | None = None,
    print_report: bool = True,
) -> dict:
    """Load a saved DDPMPipeline / DDIMPipeline folder, sample it and score the samples.

    The class named in model_index.json is loaded (difftune's class-conditional pipeline included) unless
    `pipeline_class` is given; `scheduler` ("ddim", "ddpm", "dpm++") replaces the saved scheduler. Single-channel
    models are scored with the digits classifier; Inception scores are added when `inception_weights` is given
    (required for colour models). The real set is the digits at the model's resolution unless `real_dir` names a
    folder of real images; `num_real` caps the reference (and, for Inception, the held-out) set, which matters for
    Inception on CPU. `pipeline_kwargs` go to every pipeline call (e.g. guidance_scale). Prints a table with the
    real-vs-real baseline next to each figure.
    """
    folder = Path(folder).expanduser()
    if inception_weights is not None:
        # fail on a missing weights file before the slow part
        weights = Path(inception_weights).expanduser()
        if not weights.is_file():
            raise FileNotFoundError(f"Inception weights file not found: {weights}\n{INCEPTION_WEIGHTS_HELP}")
    pipeline = _load_pipeline(folder, pipeline_class, scheduler, device)
    sample_size = pipeline.unet.config.sample_size
    resolution = sample_size if isinstance(sample_size, int) else max(sample_size)
    channels = pipeline.unet.config.in_channels
    real_images = load_image_folder(real_dir, size=resolution) if real_dir is not None else None
    digits_evaluator = None
    if channels == 1:
        digits_evaluator = DigitsEvaluator(
            resolution, num_real, device, real_images=real_images, cache_dir=cache_dir, seed=seed
        )
    elif inception_weights is None:
        raise ValueError(
            f"{folder} holds a {channels}-channel model: the digits classifier only scores 1-channel models, so pass "
            f"--inception-weights.\n{INCEPTION_WEIGHTS_HELP}"
        )
    inception_evaluator = None
    if inception_weights is not None:
        inception_evaluator = InceptionEvaluator(
            inception_weights, real_images, resolution=resolution, num_real=num_real, device=device, seed=seed
        )
    result = evaluate_pipeline(
        pipeline,
        num_samples,
        steps,
        batch_size,
        seed,
        class_labels,
        digits_evaluator,
        inception_evaluator,
        pipeline_kwargs,
    )
    result["settings"]["pipeline"] = str(folder)
    result["settings"]["pipeline_class"] = type(pipeline).__name__
    result["settings"]["scheduler"] = type(pipeline.scheduler).__name__
    if print_report:
        print(format_report(result))
    return result


def compare_image_folders(
    real_dir: str | Path,
    fake_dir: str | Path,
    *,
    inception_weights: str | Path | None = None,
    device: str = "cpu",
    seed: int = 0,
    cache_dir: str | Path | None = None,
    print_report: bool = True,
) -> dict:
    """Score a folder of generated images against a folder of real ones (baseline: real half vs real half).

    Grayscale folders are scored with the digits classifier; Inception scores are added when `inception_weights` is
    given (required for colour images).
    """
    # nothing above Inception's 299 px input is ever looked at, and full-size photos would not fit in memory
    real_images = load_image_folder(real_dir, max_size=InceptionV3Features.INPUT_SIZE)
    fake_images = load_image_folder(fake_dir, size=tuple(real_images.shape[-2:]))
    if fake_images.shape[1] != real_images.shape[1]:
        # mixed grayscale / colour folders: compare both as colour
        real_images, fake_images = real_images.expand(-1, 3, -1, -1), fake_images.expand(-1, 3, -1, -1)
    result: dict = {
        "settings": {
            "real_dir": str(real_dir),
            "fake_dir": str(fake_dir),
            "num_real": len(real_images),
            "num_samples": len(fake_images),
            "image_shape": list(fake_images.shape[1:]),
        }
    }
    if real_images.shape[1] == 1:
        evaluator = DigitsEvaluator(
            real_images.shape[-1], device=device, real_images=real_images, seed=seed, cache_dir=cache_dir
        )
        result["digits"] = _scores_with_baseline(evaluator, fake_images)
    elif inception_weights is None:
        raise ValueError(f"{real_dir} holds colour images: pass --inception-weights.\n{INCEPTION_WEIGHTS_HELP}")
    if inception_weights is not None:
        evaluator = InceptionEvaluator(inception_weights, real_images, device=device, seed=seed)
        result["inception"] = _scores_with_baseline(evaluator, fake_images)
    if print_report:
        print(format_report(result))
    return result
