"""Command line: ``python -m captioning IMAGE_DIR [options]``, or ``accelerate launch -m captioning IMAGE_DIR ...``
to split the images between several processes (one per GPU)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from captioning.caption import (
    DECODING_CHOICES,
    DEFAULT_MODEL,
    DTYPE_CHOICES,
    METADATA_FILENAME,
    STATE_DIRNAME,
    CaptioningError,
    CaptionOptions,
    GenerationSettings,
    caption_folder,
    push_captioned_dataset,
)
from finetune.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m captioning",
        description=(
            "Caption every image under IMAGE_DIR (subfolders included) with a BLIP model and write "
            f"IMAGE_DIR/{METADATA_FILENAME} in the Hugging Face datasets imagefolder layout "
            '({"file_name": ..., "text": ...} per line), ready for the text-to-image fine-tuning recipes. '
            "Images that already have a caption are skipped; an interrupted run resumes where it stopped when "
            f"started again (progress lives in IMAGE_DIR/{STATE_DIRNAME}/). Run it with `accelerate launch -m "
            "captioning ...` to split the images between processes."
        ),
    )
    parser.add_argument("image_dir", metavar="IMAGE_DIR", help="folder of images to caption (searched recursively)")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="BLIP captioning checkpoint: a Hub id or a local folder with safetensors weights "
        f"(default: {DEFAULT_MODEL}; Salesforce/blip-image-captioning-base is faster)",
    )
    model.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weights and compute precision; auto = float16 on CUDA, float32 elsewhere (default: auto)",
    )
    model.add_argument(
        "--device",
        default=None,
        help="torch device such as cuda:0 or cpu (default: the device accelerate assigns to the process)",
    )
    model.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    model.add_argument(
        "--num-workers", type=int, default=4, help="threads decoding the next batch of images (default: 4)"
    )

    generation = parser.add_argument_group("caption generation")
    generation.add_argument(
        "--decoding",
        choices=DECODING_CHOICES,
        default="beam",
        help="beam: beam search, deterministic; sample: nucleus sampling, more varied captions (default: beam)",
    )
    generation.add_argument(
        "--num-beams", type=int, default=3, help="beams for --decoding beam; 1 is greedy decoding (default: 3)"
    )
    generation.add_argument(
        "--top-p", type=float, default=0.9, help="nucleus probability mass for --decoding sample (default: 0.9)"
    )
    generation.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature for --decoding sample (default: 1.0)"
    )
    generation.add_argument(
        "--min-length", type=int, default=5, help="minimum caption length in tokens, prompt excluded (default: 5)"
    )
    generation.add_argument(
        "--max-length", type=int, default=30, help="maximum caption length in tokens, prompt excluded (default: 30)"
    )
    generation.add_argument(
        "--prompt",
        default=None,
        help='conditional captioning: text BLIP continues, e.g. "a photograph of"; the caption starts with it',
    )
    generation.add_argument("--seed", type=int, default=0, help="random seed for --decoding sample (default: 0)")

    output = parser.add_argument_group("output")
    output.add_argument(
        "--caption-prefix",
        default="",
        help='text put before every caption, e.g. trigger words "sks toy," (joined with a space)',
    )
    output.add_argument("--caption-suffix", default="", help="text put after every caption (joined with a space)")
    output.add_argument(
        "--caption-column",
        default="text",
        help=f"name of the caption field in {METADATA_FILENAME} (default: text, what the recipes read)",
    )
    output.add_argument(
        "--write-txt",
        action="store_true",
        help="also write each new caption to a .txt file next to its image (the layout kohya's scripts read)",
    )
    output.add_argument(
        "--overwrite",
        action="store_true",
        help="caption again the images that already have a caption (metadata entry or .txt file), replacing it; "
        f"captions of an interrupted run are still resumed, not redone (delete IMAGE_DIR/{STATE_DIRNAME} for that)",
    )
    output.add_argument("--no-progress", action="store_true", help="do not show the progress bar")

    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument(
        "--push-to-hub",
        metavar="REPO",
        default=None,
        help="after captioning, upload the folder as a dataset to this Hub repo (e.g. user/my-dataset)",
    )
    hub.add_argument("--private", action="store_true", help="create the Hub dataset repo as private")
    hub.add_argument(
        "--hub-token",
        default=None,
        help="Hub token for --push-to-hub (default: the token of `hf auth login` or HF_TOKEN; prefer those, a token "
        "on the command line ends up in the shell history)",
    )
    return parser


def options_from_args(args: argparse.Namespace) -> CaptionOptions:
    return CaptionOptions(
        model=args.model,
        batch_size=args.batch_size,
        generation=GenerationSettings(
            decoding=args.decoding,
            num_beams=args.num_beams,
            top_p=args.top_p,
            temperature=args.temperature,
            min_new_tokens=args.min_length,
            max_new_tokens=args.max_length,
        ),
        prompt=args.prompt,
        caption_prefix=args.caption_prefix,
        caption_suffix=args.caption_suffix,
        caption_column=args.caption_column,
        write_txt=args.write_txt,
        overwrite=args.overwrite,
        dtype=args.dtype,
        device=args.device,
        num_workers=args.num_workers,
        seed=args.seed,
        show_progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 when every image is captioned (and pushed, if asked); 2 for bad input (folder, model, options);
    1 when the push or a write fails while running (the captions written so far are kept) or for a bug (one line, or
    the traceback with --debug / DIFFTUNE_DEBUG=1); 130 when interrupted (finished batches are kept)."""
    from finetune.preflight import debug_requested, exit_code_for

    argv, debug = debug_requested(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            # Before captioning, not after hours of it.
            validate_repo_id(args.push_to_hub)
        except HFValidationError as error:
            parser.error(f"--push-to-hub: {error}")
    try:
        summary = run(args)
    except CaptioningError as error:
        print(f"difftune: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished batches are saved in {args.image_dir}/{STATE_DIRNAME}/; run the same command "
            "again to resume",
            file=sys.stderr,
        )
        return 130
    except Exception as error:  # noqa: BLE001 - InputError / RunError: their line and code; a bug: one line
        return exit_code_for(error, debug)
    if summary is None:
        return 0

    print(summary.format())
    if args.push_to_hub:
        print(f"Pushing {summary.image_dir} to the Hub dataset {args.push_to_hub} (private={args.private})...")
        try:
            push_captioned_dataset(summary.image_dir, args.push_to_hub, private=args.private, token=args.hub_token)
        except (OSError, ValueError) as error:  # Hub HTTP errors are OSErrors; a bad token or repo, ValueErrors
            print(
                f"difftune: the upload failed ({type(error).__name__}: {error}). The captions are saved in "
                f"{summary.image_dir / METADATA_FILENAME}; run the same command again to retry the upload only.",
                file=sys.stderr,
            )
            return 1
        print(f"Pushed to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0


def run(args: argparse.Namespace):
    """Check the folder (captions are written into it) and the model before any image is read, then caption.
    Returns the summary on the main process, None on the others."""
    from pathlib import Path

    from finetune.preflight import check_model_path, check_output_folder, is_main_rank

    if Path(args.image_dir).expanduser().is_dir():
        check_output_folder(args.image_dir, "IMAGE_DIR", probe=is_main_rank())
    try:
        check_model_path(args.model, "--model", "transformers", "this command loads safetensors weights only")
    except InputError as error:
        raise CaptioningError(f"{error} (cannot load a model config)") from None
    summary = caption_folder(args.image_dir, options_from_args(args))

    from accelerate import PartialState

    return summary if PartialState().is_main_process else None


if __name__ == "__main__":
    sys.exit(main())
