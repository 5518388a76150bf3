"""Sample-quality metrics: Fréchet distance and KID of generated images against real ones, always next to a
real-vs-real baseline so that a number means something.

Two feature extractors:

* `DigitsEvaluator` — the small CNN of `finetune.digits_classifier`, trained on the digits' training split and cached.
  Besides Fréchet distance (FD) and KID on its features it reports how many samples it reads confidently and, for
  class-conditional models, how many are read as the requested class.
* `InceptionEvaluator` — Inception-v3 pool3 features (the FID network) from a weights file the user already has:
  `pt_inception-2015-12-05-6726825d.pth` (the FID weights of pytorch-fid / torch-fidelity / torchmetrics) or
  torchvision's `inception_v3_google-*.pth`, or either converted to safetensors. Nothing is downloaded.

The FD and KID maths are torchmetrics' (`FrechetInceptionDistance` / `KernelInceptionDistance` fed with features that
were computed once, in float64). The baseline compares the reference real set (the digits training split) with a
held-out real set (the digits test split): a model is as good as real data when its figures reach the baseline.

Command line::

    python -m finetune.evaluate outputs/digits-ddpm --num-samples 512 --steps 50 --json scores.json
    python -m finetune.evaluate --real-dir real_pngs/ --fake-dir samples/ --inception-weights pt_inception-....pth
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

# the parts live in finetune/evaluation/; every name other code imports from finetune.evaluate stays importable here
from finetune.evaluation.inception import (
    FID_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_HELP,
    InceptionEvaluator,
    InceptionV3Features,
    load_inception_features,
)
from finetune.evaluation.metrics import (
    CONFIDENCE_THRESHOLD,
    DigitsEvaluator,
    FeatureDistance,
    split_reference_and_heldout,
)
from finetune.evaluation.report import format_report, metrics_for_logging
from finetune.evaluation.sampling import (
    IMAGE_EXTENSIONS,
    load_image_folder,
    pipeline_accepts_class_labels,
    sample_pipeline_images,
)
from finetune.evaluation.scores import compare_image_folders, evaluate_pipeline, evaluate_pipeline_folder

__all__ = [
    "CONFIDENCE_THRESHOLD",
    "FID_WEIGHTS_FILE",
    "IMAGE_EXTENSIONS",
    "INCEPTION_WEIGHTS_HELP",
    "DigitsEvaluator",
    "FeatureDistance",
    "InceptionEvaluator",
    "InceptionV3Features",
    "compare_image_folders",
    "evaluate_pipeline",
    "evaluate_pipeline_folder",
    "format_report",
    "load_image_folder",
    "load_inception_features",
    "main",
    "metrics_for_logging",
    "pipeline_accepts_class_labels",
    "sample_pipeline_images",
    "split_reference_and_heldout",
]


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


# below this many samples, FD on the digits classifier's 128 features moves with the count more than with the model
MIN_FD_SAMPLES = 500


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from pipelines.load import PIXEL_SCHEDULERS

    parser = argparse.ArgumentParser(
        prog="python -m finetune.evaluate",
        description="Fréchet distance and KID of a diffusers pipeline's samples (or a folder of images) against real "
        "images, each next to the real-vs-real baseline computed on as many held-out real images as there are "
        "samples. 1-channel models are scored on the digits classifier's features; give --inception-weights for "
        "Inception-v3 (FID) features.",
    )
    parser.add_argument(
        "pipeline_folder",
        nargs="?",
        help="a saved pipeline folder (DDPM / DDIM / class-conditional); or give --real-dir and --fake-dir",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=512,
        help=f"images to generate (default: 512); FD is biased upward below about {MIN_FD_SAMPLES} (a warning "
        "says so)",
    )
    parser.add_argument("--steps", type=int, default=50, help="denoising steps per sample (default: 50)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per pipeline call (default: 128)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the samples and of the real-image draws (default: 0)"
    )
    parser.add_argument(
        "--scheduler", choices=PIXEL_SCHEDULERS, help="replace the folder's scheduler for sampling (default: keep it)"
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        help="classifier-free guidance of a class-conditional pipeline trained with label dropout (default: the "
        "pipeline's)",
    )
    parser.add_argument(
        "--inception-weights",
        help=f"local Inception-v3 weights, e.g. {FID_WEIGHTS_FILE} (default: none, digits features only)",
    )
    parser.add_argument("--real-dir", help="folder of real images (default: the embedded digits)")
    parser.add_argument(
        "--num-real", type=int, help="cap the real reference set (default: all; Inception on CPU is slow)"
    )
    parser.add_argument(
        "--fake-dir", help="folder of generated images to compare with --real-dir (instead of a pipeline folder)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps (default: cpu)")
    parser.add_argument("--json", dest="json_path", help="also write the results to this JSON file (default: none)")
    args = parser.parse_args(argv)
    if args.fake_dir is not None:
        if args.pipeline_folder is not None:
            parser.error("give either PIPELINE_FOLDER or --fake-dir, not both")
        if args.real_dir is None:
            parser.error("--fake-dir needs --real-dir")
    elif args.pipeline_folder is None:
        parser.error("give a PIPELINE_FOLDER, or --real-dir and --fake-dir")
    for option, value in (
        ("PIPELINE_FOLDER", args.pipeline_folder),
        ("--real-dir", args.real_dir),
        ("--fake-dir", args.fake_dir),
    ):
        if value is not None and not Path(value).expanduser().is_dir():
            parser.error(f"{option}: folder not found: {value}")
    if args.inception_weights is not None and not Path(args.inception_weights).expanduser().is_file():
        parser.error(f"--inception-weights: file not found: {args.inception_weights}\n{INCEPTION_WEIGHTS_HELP}")
    if args.num_samples < 2:
        parser.error("--num-samples must be at least 2")
    if args.fake_dir is None and args.num_samples < MIN_FD_SAMPLES:
        print(
            f"difftune: warning: --num-samples {args.num_samples}: FD on fewer than about {MIN_FD_SAMPLES} images is "
            "biased upward and noisy; compare it only with the baseline beside it (computed on as many real images), "
            "not with figures at other counts",
            file=sys.stderr,
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 when the scores are computed (and written, with --json); 2 for bad input (a folder, a file, an
    option); 1 when writing fails or for a bug (one line, or the traceback with --debug / DIFFTUNE_DEBUG=1)."""
    from finetune.errors import InputError, RunError
    from finetune.preflight import check_model_path, debug_requested, exit_code_for

    argv, debug = debug_requested(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    try:
        if args.json_path:
            parent = Path(args.json_path).expanduser().parent
            if not parent.is_dir():
                raise InputError(
                    f"--json: the folder {str(parent)!r} does not exist; create it or choose another file"
                )
        if args.fake_dir is not None:
            result = compare_image_folders(
                args.real_dir,
                args.fake_dir,
                inception_weights=args.inception_weights,
                device=args.device,
                seed=args.seed,
            )
        else:
            check_model_path(
                args.pipeline_folder, "PIPELINE_FOLDER", "pipeline", "this command loads safetensors only"
            )
            result = evaluate_pipeline_folder(
                args.pipeline_folder,
                args.num_samples,
                args.steps,
                args.batch_size,
                args.seed,
                inception_weights=args.inception_weights,
                real_dir=args.real_dir,
                num_real=args.num_real,
                scheduler=args.scheduler,
                device=args.device,
                pipeline_kwargs=None if args.guidance_scale is None else {"guidance_scale": args.guidance_scale},
            )
        if args.json_path:
            try:
                Path(args.json_path).expanduser().write_text(json.dumps(result, indent=2) + "\n")
            except OSError as error:
                raise RunError(f"--json: cannot write {args.json_path!r}: {error.strerror or error}") from error
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, InputError):
            return exit_code_for(error, debug)
        print(f"difftune: {error}", file=sys.stderr)
        return 2
    except BaseException as error:  # noqa: BLE001 - every way out gets its exit code and one line
        if isinstance(error, SystemExit):
            raise
        return exit_code_for(error, debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
