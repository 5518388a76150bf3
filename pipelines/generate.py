"""Generate images from a pipeline with trained adapters; numbered PNGs and a grid, never overwriting a file.

    python -m pipelines.generate stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a <cat-toy> on a bench" \\
        --embeddings outputs/sd-textual-inversion-cat-toy --lora outputs/sd-lora-naruto:0.7 --scheduler dpm++ \\
        --steps 30 --num-images 4 --seed 0 --out samples/
    python -m pipelines.generate outputs/sd3-base --lora outputs/sd3-lora:0.8 --prompt "a toy" --guidance 5 --out o/
    python -m pipelines.generate black-forest-labs/FLUX.1-dev --lora outputs/flux-lora --prompt "a toy" --out o/
    python -m pipelines.generate INPAINTING_MODEL --prompt "a red door" --image house.png --mask door-mask.png --out o/
    python -m pipelines.generate stable-diffusion-v1-5/stable-diffusion-v1-5 --controlnet outputs/sd-controlnet \
        --control-image circle.png --controlnet-scale 1.0 --prompt "red circle with blue background" --out o/
    python -m pipelines.generate outputs/digits-class-conditional --class-labels 3 7 --num-images 8 --out digits/
    python -m pipelines.generate outputs/digits-unconditional --num-images 16 --out digits/
    python -m pipelines.generate outputs/digits-text-to-image --prompt "a handwritten digit three" \
        --image sketch.png --strength 0.6 --out o/             # image-to-image (SDEdit), pixel models too

Without --seed a random seed is drawn and printed; image i of a run uses seed + i, so any single image can be made
again. Each PNG carries its settings, its seed included, as a `parameters` text chunk (JSON). Stable Diffusion 3
and Flux take LoRAs (no embeddings) and `--scheduler euler` (their flow-matching sampler) only;
`--guidance` is classifier-free for SD3 and an input of the model for FLUX.1-dev, which takes no negative prompt.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from finetune.imaging import load_image, pipeline_kind
from pipelines.load import SCHEDULERS, load_pipeline
from pipelines.steps import uses_negative_prompt

NUMBERED_PNG = re.compile(r"^(\d+)\.png$")


def parse_lora(spec: str) -> tuple[str, float]:
    """'PATH' -> (PATH, 1.0); 'PATH:0.7' -> (PATH, 0.7). A colon not followed by a number belongs to the path."""
    path, sep, scale = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def plan_jobs(kind: str, prompts: list[str], class_labels: list[int], num_images: int, seed: int) -> list[dict]:
    """One dict per image: its prompt or label, and its seed."""
    if kind in ("text", "inpaint"):
        if not prompts:
            raise ValueError("--prompt is required for a text-to-image or inpainting pipeline")
        if class_labels:
            raise ValueError("--class-labels needs a class-conditional pipeline")
        items = [{"prompt": p} for p in prompts for _ in range(num_images)]
    elif kind == "class":
        if not class_labels:
            raise ValueError("--class-labels is required for a class-conditional pipeline, e.g. --class-labels 0 3 7")
        if prompts:
            raise ValueError("--prompt does not apply to a class-conditional pipeline; use --class-labels")
        items = [{"class_label": label} for label in class_labels for _ in range(num_images)]
    else:
        if prompts or class_labels:
            raise ValueError("an unconditional pipeline takes neither --prompt nor --class-labels")
        items = [{} for _ in range(num_images)]
    for i, item in enumerate(items):
        item["seed"] = seed + i
    return items


def generate(
    pipe,
    *,
    prompts: Sequence[str] = (),
    negative_prompt: str | None = None,
    class_labels: Sequence[int] = (),
    num_images: int = 1,
    steps: int = 50,
    guidance: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    image: str | Path | Image.Image | None = None,
    mask: str | Path | Image.Image | None = None,
    strength: float | None = None,
    batch_size: int = 4,
    control_image: str | Path | Image.Image | None = None,
    controlnet_scale: float = 1.0,
) -> list[tuple[Image.Image, dict[str, Any]]]:
    """(image, its settings) for every image asked for. With `image` and no `mask`: image-to-image (SDEdit, Meng et
    al. 2022), the image noised to `strength` (default 0.8) and denoised: through the family's image-to-image
    pipeline for a text-to-image model (diffusers' AutoPipelineForImage2Image.from_pipe, the same modules), through
    the scheduler loop of `pipelines.steps.reconstruct` for a pixel model. A pipeline with a
    ControlNet (load_pipeline(..., controlnet=...)) draws text-to-image following `control_image` at
    `controlnet_scale`."""
    if num_images < 1 or batch_size < 1 or steps < 1:
        raise ValueError("--num-images, --batch-size and --steps must be >= 1")
    controlled = getattr(pipe, "controlnet", None) is not None
    kind = "text" if controlled else pipeline_kind(pipe)
    if controlled:
        if control_image is None:
            raise ValueError(f"{type(pipe).__name__} runs a ControlNet: give --control-image")
        control_image = control_image if isinstance(control_image, Image.Image) else load_image(control_image, "RGB")
        width = width or control_image.width // 8 * 8
        height = height or control_image.height // 8 * 8
        if image is not None or mask is not None:
            raise ValueError("--image/--mask do not combine with a ControlNet here; its input is --control-image")
    elif control_image is not None:
        raise ValueError("--control-image needs a ControlNet (--controlnet DIR)")
    if kind == "image-to-image":
        raise ValueError(f"{type(pipe).__name__} is an image-to-image pipeline, which this command does not run")
    jobs = plan_jobs(kind, list(prompts), list(class_labels), num_images, seed)
    runner, image_to_image = pipe, False
    if kind == "inpaint":
        if image is None or mask is None:
            raise ValueError(f"{type(pipe).__name__} is an inpainting pipeline: give --image and --mask")
        image = image if isinstance(image, Image.Image) else load_image(image, "RGB")
        mask = mask if isinstance(mask, Image.Image) else load_image(mask, "L")
        width, height = width or image.width // 8 * 8, height or image.height // 8 * 8
        strength = 1.0 if strength is None else strength
    elif mask is not None:
        raise ValueError(f"--mask needs an inpainting pipeline; {type(pipe).__name__} is not one")
    elif image is not None:
        from pipelines.steps import fit_image, img2img_for, model_image_size

        image_to_image, strength = True, 0.8 if strength is None else strength
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"--strength must be in (0, 1], got {strength}")
        model_height, model_width, channels = model_image_size(pipe)
        picture = image if isinstance(image, Image.Image) else load_image(image, "RGB")
        height, width = height or model_height, width or model_width
        image = fit_image(picture, height, width, channels)
        if kind == "text":
            runner = img2img_for(pipe)
            runner.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    elif strength is not None:
        raise ValueError("--strength needs --image (image-to-image) or an inpainting pipeline")
    if negative_prompt and kind not in ("text", "inpaint"):
        raise ValueError("--negative-prompt needs a text-conditioned pipeline")
    if negative_prompt and not uses_negative_prompt(pipe):
        raise ValueError(
            f"{type(pipe).__name__} does not use a negative prompt (only with true CFG, which this command does not "
            "run): leave out --negative-prompt"
        )
    if guidance is not None and kind == "unconditional":
        raise ValueError(f"{type(pipe).__name__} has no guidance; leave out --guidance")

    results = []
    if image_to_image and kind != "text":  # a pixel model: SDEdit through its scheduler loop, one image at a time
        from pipelines.steps import reconstruct

        for job in jobs:
            made = reconstruct(
                pipe,
                image,
                strength=strength,
                steps=steps,
                seed=job["seed"],
                class_label=job.get("class_label", 0),
                guidance=guidance,
            )
            settings = {**job, "steps": steps, "guidance": guidance, "scheduler": type(pipe.scheduler).__name__}
            results.append((made.reconstruction, {**settings, "strength": strength, "image_to_image": True}))
        return results
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        kwargs: dict[str, Any] = {
            "num_inference_steps": steps,
            "generator": [torch.Generator("cpu").manual_seed(job["seed"]) for job in batch],
        }
        if guidance is not None:
            kwargs["guidance_scale"] = guidance
        if kind in ("text", "inpaint"):
            kwargs["prompt"] = [job["prompt"] for job in batch]
            if negative_prompt:
                kwargs["negative_prompt"] = [negative_prompt] * len(batch)
            if (height or width) and "height" in inspect.signature(runner.__call__).parameters:
                kwargs.update(height=height, width=width)
            if kind == "inpaint":
                kwargs.update(image=image, mask_image=mask, strength=strength)
            elif image_to_image:
                kwargs.update(image=image, strength=strength)
            if controlled:
                kwargs.update(image=control_image, controlnet_conditioning_scale=controlnet_scale)
        elif kind == "class":
            kwargs["class_labels"] = [job["class_label"] for job in batch]
        else:
            kwargs["batch_size"] = len(batch)
        images = runner(**kwargs).images
        for picture, job in zip(images, batch):
            settings = {**job, "steps": steps, "guidance": guidance, "scheduler": type(runner.scheduler).__name__}
            if negative_prompt:
                settings["negative_prompt"] = negative_prompt
            if kind == "inpaint" or image_to_image:
                settings["strength"] = strength
            if image_to_image:
                settings["image_to_image"] = True
            if controlled:
                settings["controlnet_scale"] = controlnet_scale
            results.append((picture, settings))
    return results


def _write_new(path_for, image: Image.Image, start: int, info: PngInfo | None = None) -> Path:
    """Save to the first path_for(n), n >= start, that does not exist yet: written under a temporary name and linked
    to its own only when complete and only if that name is still free (never overwrites, never half an image)."""
    from finetune.atomic import atomic_path

    n = start
    while True:
        path = path_for(n)
        if not path.exists():
            try:
                with atomic_path(path, overwrite=False) as temporary:
                    image.save(temporary, format="PNG", pnginfo=info)
                return path
            except FileExistsError:
                pass  # another process took the name meanwhile
        n += 1


def grid_label(settings: dict[str, Any]) -> str:
    """What the grid writes under an image's row: its prompt or its class ('' for an unconditional model)."""
    if settings.get("prompt") is not None:
        return str(settings["prompt"])
    if settings.get("class_label") is not None:
        return f"class {settings['class_label']}"
    return ""


def save_images(results: list[tuple[Image.Image, dict[str, Any]]], out_dir: str | Path, extra: dict | None = None):
    """Numbered PNGs after the highest number already in `out_dir`, and a grid (grid.png, grid-2.png, ...): small
    images enlarged (nearest), each prompt's or class's images in a row with it written underneath."""
    from finetune.atomic import reporting_write_errors
    from finetune.outputs import grid_image

    out_dir = Path(out_dir)
    with reporting_write_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in out_dir.iterdir() if (m := NUMBERED_PNG.match(p.name))]
    next_number = max(numbers, default=0) + 1
    paths = []
    for picture, settings in results:
        info = PngInfo()
        info.add_text("parameters", json.dumps({**settings, **(extra or {})}))
        path = _write_new(lambda n: out_dir / f"{n:04d}.png", picture, next_number, info)
        next_number = int(path.stem) + 1
        paths.append(path)
    grid = grid_image([picture for picture, _ in results], labels=[grid_label(settings) for _, settings in results])
    info = PngInfo()  # the grid's settings: the first image's, and every image's seed
    info.add_text(
        "parameters", json.dumps({**results[0][1], "seeds": [s["seed"] for _, s in results], **(extra or {})})
    )
    grid_path = _write_new(lambda n: out_dir / ("grid.png" if n == 1 else f"grid-{n}.png"), grid, 1, info)
    return paths, grid_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.generate",
        description="Generate images with a diffusers pipeline (Stable Diffusion 1.x/2.x, SDXL, SD3, Flux, "
        "inpainting, DDPM, class-conditional) plus LoRAs, Textual Inversion embeddings or a trained UNet. Writes "
        "numbered PNGs and a grid to --out, never overwriting existing files.",
    )
    parser.add_argument("base", help="pipeline folder or Hub id (model_index.json decides the pipeline type)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    parser.add_argument("--class-labels", type=int, nargs="+", default=[], help="class labels (class-conditional)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt / label (default: 1)")
    parser.add_argument("--steps", type=int, default=50, help="inference steps (default: 50)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the first image; image i uses seed + i (default: a random seed, printed and written into each "
        "PNG's metadata)",
    )
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=None,
        help="default: the pipeline's own (SD3 and Flux: euler, their flow-matching sampler, only)",
    )
    parser.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA folder, file or Hub id (repeat)"
    )
    parser.add_argument("--embeddings", action="append", default=[], help="Textual Inversion folder or file (repeat)")
    parser.add_argument("--unet", default=None, help="a trained UNet folder (or a pipeline folder with unet/)")
    parser.add_argument(
        "--controlnet", default=None, help="a trained ControlNet folder (or an output with controlnet/)"
    )
    parser.add_argument(
        "--control-image", default=None, help="the ControlNet's conditioning image (with --controlnet)"
    )
    parser.add_argument(
        "--controlnet-scale", type=float, default=1.0, help="strength of the ControlNet's residuals (default: 1.0)"
    )
    parser.add_argument(
        "--image",
        default=None,
        help="an input image: image-to-image (SDEdit) for text-to-image and pixel models, the image to inpaint for "
        "inpainting pipelines (with --mask)",
    )
    parser.add_argument("--mask", default=None, help="inpainting mask: white is repainted, black is kept")
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help="how much of --image is noised away, in (0, 1]: 1 keeps nothing of it (default: 0.8 for image-to-image, "
        "1.0 for inpainting)",
    )
    parser.add_argument("--height", type=int, default=None, help="image height (text-to-image, inpainting)")
    parser.add_argument("--width", type=int, default=None, help="image width (text-to-image, inpainting)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: 4)")
    parser.add_argument("--device", default=None, help="cuda, cpu, mps (default: the best available)")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA), float32, float16, bfloat16")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 when every image is written; 2 for bad input (a path, an option, a model that does not fit);
    1 when writing fails or for a bug (one line, or the traceback with --debug / DIFFTUNE_DEBUG=1)."""
    from finetune.preflight import debug_requested, exit_code_for

    argv, debug = debug_requested(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BaseException as err:  # noqa: BLE001 - every way out gets its exit code and one line
        if isinstance(err, SystemExit):
            raise
        return exit_code_for(err, debug)


def check_inputs(args: argparse.Namespace) -> None:
    """Everything that can be checked before a model loads: the output folder, then every model and file path."""
    from finetune.errors import InputError
    from finetune.preflight import check_model_path, check_output_folder, looks_local

    check_output_folder(args.out, "--out")
    safetensors_only = "this command loads safetensors weights only"
    check_model_path(args.base, "base model", "pipeline", safetensors_only)
    check_model_path(args.unet, "--unet", "any", safetensors_only)
    if (
        args.controlnet is not None
        and not Path(args.controlnet).expanduser().exists()
        and looks_local(args.controlnet)
    ):
        raise InputError(f"--controlnet: {args.controlnet!r} does not exist; give a ControlNet folder or a Hub id")
    if args.controlnet is not None and args.control_image is None:
        raise InputError("--controlnet needs --control-image, the conditioning image the ControlNet follows")
    if args.control_image is not None and args.controlnet is None:
        raise InputError("--control-image needs --controlnet DIR (a trained ControlNet)")
    for option, values in (("--lora", [parse_lora(spec)[0] for spec in args.lora]), ("--embeddings", args.embeddings)):
        for value in values:
            if not Path(value).expanduser().exists() and looks_local(value):
                raise InputError(f"{option}: {value!r} does not exist; give an existing file or folder, or a Hub id")
    for option, value in (("--image", args.image), ("--mask", args.mask), ("--control-image", args.control_image)):
        if value is not None and not Path(value).expanduser().is_file():
            raise InputError(f"{option}: the file {value!r} does not exist")


def run(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError

    from finetune.errors import InputError, RunError
    from finetune.preflight import describe_load_error, one_line

    check_inputs(args)
    loras = [parse_lora(spec) for spec in args.lora]
    try:
        pipe = load_pipeline(
            args.base,
            lora=[path for path, _ in loras] or None,
            lora_scale=[scale for _, scale in loras] or 1.0,
            embeddings=args.embeddings or None,
            unet=args.unet,
            controlnet=args.controlnet,
            scheduler=args.scheduler,
            device=args.device,
            dtype=args.dtype,
        )
    except ValueError as err:  # our own checks: a LoRA for another model, a scheduler that does not fit, ...
        raise InputError(one_line(err)) from err
    except (OSError, SafetensorError) as err:
        raise InputError(describe_load_error(err, args.base, "base model", "pipeline")) from err
    pipe.set_progress_bar_config(disable=args.quiet)  # (load_pipeline turns it off: library users choose)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    if args.seed is None:
        print(f"seed: {seed} (image i uses {seed} + i; --seed {seed} makes these images again)", file=sys.stderr)
    try:
        results = generate(
            pipe,
            prompts=args.prompt,
            negative_prompt=args.negative_prompt,
            class_labels=args.class_labels,
            num_images=args.num_images,
            steps=args.steps,
            guidance=args.guidance,
            seed=seed,
            height=args.height,
            width=args.width,
            image=args.image,
            mask=args.mask,
            strength=args.strength,
            batch_size=args.batch_size,
            control_image=args.control_image,
            controlnet_scale=args.controlnet_scale,
        )
    except (ValueError, OSError) as err:  # options that do not fit this pipeline, an unreadable --image
        raise InputError(one_line(err)) from err
    extra = {"base": args.base, "lora": [f"{p}:{s}" for p, s in loras], "embeddings": args.embeddings}
    if args.unet:
        extra["unet"] = args.unet
    if args.controlnet:
        extra.update(controlnet=args.controlnet, control_image=args.control_image)
    try:
        paths, grid = save_images(results, args.out, extra)
    except OSError as err:
        raise RunError(f"cannot write the images in {args.out!r}: {err.strerror or err}") from err
    for path in paths:
        print(path)
    print(f"grid: {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
