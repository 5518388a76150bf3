"""What each fine-tuning method teaches the miniature text-to-image models, side by side: the UNet miniature
(finetune/recipes/digits_text_to_image.yaml, DDPM, a StableDiffusionPipeline) and the flow-matching miniature
(finetune/recipes/digits_flow_text_to_image.yaml, an SD3 transformer, a StableDiffusion3Pipeline).

Neither miniature model ever saw a nine. Each method gets a handful of nines under a new token and is measured on:

- fidelity: the fraction of images for "a handwritten digit <token>" that the digits classifier reads as a nine;
- prior preservation: the fraction of images for the other digits' prompts ("a handwritten digit seven") still read
  as the digit asked for, before and after (language drift);
- training time, steps, and the size of what it saves.

A style (thick strokes) is taught with LoRA too, measured by a second small classifier (thin vs thick strokes) on
images drawn with and without the style's trigger. Every method runs on both base models with the same recipe,
except Textual Inversion, which StableDiffusion3Pipeline cannot load (no `load_textual_inversion`).

A ControlNet (finetune/recipes/digits_controlnet.yaml, the UNet miniature only) learns to draw the digit whose edge map
(Canny-like, `python -m captioning.conditioning`'s annotator) it is given, from the seen digits' train split, every
caption the generic "a handwritten digit"; measured: the fraction of images the classifier reads as the control's
digit, with and without the ControlNet, on edge maps of the held-out test split (seen digits) and of the nines the
base model never saw.

    python -m benchmarks.bench_digits_finetune            # trains the miniature models first when they are missing
    python -m benchmarks.bench_digits_finetune --models flow   # one base model only
    python -m benchmarks.bench_digits_finetune --models unet --methods ControlNet   # the ControlNet alone
    make bench-digits                                     # the same as the first

Writes <work>/results.md (the tables, one column pair per base model), <work>/results.json, and
<work>/grid_<method>.png (UNet) / <work>/grid_flow_<method>.png (rows: the new token, then digits 0-8), and
<work>/grid_controlnet.png (pairs: control | drawn; seen digits, then nines).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from finetune.digits import DIGIT_NAMES, load_digits_tensors, thicken_strokes
from finetune.methods.latent_diffusion import digit_prompt, generate_images

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "finetune" / "recipes"
HELD_OUT = 9
TRIGGER = "sks"  # LoRA and DreamBooth: a token the miniature model's captions never used
PLACEHOLDER = "<new-digit>"  # Textual Inversion: a new token with a learned embedding
STYLE_TRIGGER = "zwx"
logger = logging.getLogger("bench_digits_finetune")


@dataclass
class Teaching:
    """One fine-tuning method of the benchmark: its recipe, where its data goes, how its output loads."""

    label: str
    recipe: str
    data_key: str  # the override naming the instance folder
    loads_as: str  # "lora", "embeddings" or "pipeline"
    token: str = TRIGGER
    extra: list[str] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        return f"a handwritten digit {self.token}"


TEACHINGS = [
    Teaching("LoRA", "digits_teach_lora.yaml", "data.dataset", "lora"),
    Teaching("DreamBooth", "digits_teach_dreambooth.yaml", "dreambooth.instance_data_dir", "pipeline"),
    Teaching(
        "DreamBooth + prior preservation",
        "digits_teach_dreambooth_prior.yaml",
        "dreambooth.instance_data_dir",
        "pipeline",
    ),
    Teaching("DreamBooth-LoRA", "digits_teach_dreambooth_lora.yaml", "dreambooth.instance_data_dir", "lora"),
    Teaching("Textual Inversion", "digits_teach_textual_inversion.yaml", "data.dataset", "embeddings", PLACEHOLDER),
]
STYLE = Teaching("style LoRA (thick strokes)", "digits_style_lora.yaml", "data.dataset", "lora", STYLE_TRIGGER)
CONTROLNET = "ControlNet"  # its --methods label
CONTROLNET_RECIPE = "digits_controlnet.yaml"
CONTROL_CAPTION = "a handwritten digit"  # every image's caption: only the control tells the digit


@dataclass
class BaseModel:
    """One miniature base model of the benchmark: the recipe that trains it and what its runs add to each recipe."""

    key: str  # "unet" or "flow": the --models name, the results' "model" field
    label: str
    recipe: str
    overrides: list[str] = field(default_factory=list)  # for every fine-tuning run on it
    grid_prefix: str = ""


BASE_MODELS = {
    "unet": BaseModel("unet", "UNet (DDPM)", "digits_text_to_image.yaml"),
    # saved without T5: the fine-tuning runs leave it out too
    "flow": BaseModel(
        "flow",
        "SD3 transformer (flow matching)",
        "digits_flow_text_to_image.yaml",
        ["model.drop_text_encoders=[text_encoder_3]"],
        "flow_",
    ),
}


# --------------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------------
def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, C, H, W] in [-1, 1] -> grayscale PIL images."""
    array = ((images.mean(dim=1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return [Image.fromarray(a, mode="L") for a in array]


def write_image_folder(folder: Path, images: torch.Tensor, captions: list[str] | None = None) -> Path:
    """PNGs (and a metadata.jsonl of captions) in a new folder."""
    folder.mkdir(parents=True, exist_ok=False)
    lines = []
    for i, image in enumerate(to_pil(images)):
        name = f"{i:04d}.png"
        image.save(folder / name)
        if captions is not None:
            lines.append(json.dumps({"file_name": name, "text": captions[i]}))
    if captions is not None:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def prepare_data(work: Path, num_instance: int, resolution: int, seed: int) -> dict[str, Path]:
    """The held-out digit's instance images, and the style set (thick digits captioned with the trigger, plus as many
    plain ones with plain captions, so the style binds to the trigger rather than to every prompt)."""
    images, labels = load_digits_tensors(resolution, "test")
    rng = np.random.default_rng(seed)
    nines = images[labels == HELD_OUT]
    chosen = nines[torch.from_numpy(rng.choice(len(nines), num_instance, replace=False))]
    instance = write_image_folder(work / "instance", chosen, [f"a handwritten digit {TRIGGER}"] * num_instance)

    train_images, train_labels = load_digits_tensors(resolution, "train")
    keep = torch.from_numpy(rng.permutation(int((train_labels != HELD_OUT).sum())))
    seen_images = train_images[train_labels != HELD_OUT][keep]
    seen_labels = train_labels[train_labels != HELD_OUT][keep].tolist()
    half = min(len(keep) // 2, 90)
    style_images = torch.cat([thicken_strokes(seen_images[:half]), seen_images[half : 2 * half]])
    style_captions = [f"{digit_prompt(d)} in {STYLE_TRIGGER} style" for d in seen_labels[:half]]
    style_captions += [digit_prompt(d) for d in seen_labels[half : 2 * half]]
    style = write_image_folder(work / "style", style_images, style_captions)
    return {"instance": instance, "style": style}


def digit_edges(images: torch.Tensor) -> list[Image.Image]:
    """The ControlNet's controls: edge maps (RGB) of digits [N, C, H, W] in [-1, 1], by the dataset builder's
    annotator (Canny-like, no smoothing: the 16 px digits are soft already)."""
    from captioning.conditioning import annotate

    return [annotate(image, "canny", sigma=0.0) for image in to_pil(images)]


def prepare_controlnet_data(work: Path, resolution: int) -> Path:
    """The seen digits of the train split, captioned "a handwritten digit", with their edge maps: written the way a
    user makes a ControlNet dataset (python -m captioning.conditioning DIR --sigma 0)."""
    from captioning.conditioning import build_conditioning_dataset

    images, labels = load_digits_tensors(resolution, "train")
    seen = images[labels != HELD_OUT]
    folder = write_image_folder(work / "controlnet-data", seen, [CONTROL_CAPTION] * len(seen))
    build_conditioning_dataset(folder, "canny", sigma=0.0)
    return folder


def held_out_controls(resolution: int, per_digit: int | None) -> dict[str, tuple[list[Image.Image], torch.Tensor]]:
    """Edge maps of the test split, the seen digits and the nines apart (the first `per_digit` of each digit)."""
    images, labels = load_digits_tensors(resolution, "test")
    picked = {}
    for name, digits in (("seen", [d for d in range(10) if d != HELD_OUT]), ("unseen", [HELD_OUT])):
        index = torch.cat([torch.nonzero(labels == d).flatten()[:per_digit] for d in digits])
        picked[name] = (digit_edges(images[index]), labels[index])
    return picked


def controlled_images(pipe, controls: list[Image.Image], sampling: Sampling, batch_size: int = 64) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] for "a handwritten digit", image i from seed + i, following control i when the
    pipeline has a ControlNet (the same noise with and without it)."""
    images = []
    for start in range(0, len(controls), batch_size):
        chunk = controls[start : start + batch_size]
        generators = [torch.Generator(pipe.device).manual_seed(sampling.seed + start + i) for i in range(len(chunk))]
        control = {"image": chunk} if getattr(pipe, "controlnet", None) is not None else {}
        output = pipe(
            [CONTROL_CAPTION] * len(chunk),
            num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance_scale,
            generator=generators,
            height=sampling.resolution,
            width=sampling.resolution,
            output_type="pt",
            **control,
        ).images
        images.append(output.float().cpu() * 2 - 1)
    return torch.cat(images)


def benchmark_controlnet(
    base: Path, work: Path, sampling: Sampling, classifier, args: argparse.Namespace
) -> list[dict]:
    """Train the miniature ControlNet and measure how often the drawn digit is the control's, with and without it."""
    from finetune.outputs import save_grid
    from pipelines.load import load_pipeline

    data = prepare_controlnet_data(work, sampling.resolution)
    output = work / CONTROLNET_RECIPE.removesuffix(".yaml")
    overrides = [
        f"model.pretrained_model_name_or_path={base}",
        f"data.dataset={data}",
        f"train.output_dir={output}",
        *args.teach_overrides,
    ]
    seconds = run_recipe(RECIPES / CONTROLNET_RECIPE, overrides, args.in_process)
    controls = held_out_controls(sampling.resolution, args.controls_per_digit)
    without = load(base, None, None)
    with_controlnet = load_pipeline(base, controlnet=str(output), device="cpu", dtype="float32")
    row = {
        "model": "unet",
        "method": CONTROLNET,
        "steps": _steps_from_log(output),
        "train_s": seconds,
        "size_kb": sum(p.stat().st_size for p in (output / "controlnet").glob("*.safetensors")) / 1024,
    }
    pairs = []
    for name, (edges, labels) in controls.items():
        for pipe, key in ((with_controlnet, f"follows_{name}"), (without, f"follows_{name}_without")):
            images = controlled_images(pipe, edges, sampling)
            with torch.no_grad():
                row[key] = (classifier.predict(images) == labels).float().mean().item()
            if pipe is with_controlnet:  # the first two of each digit: control | drawn
                for digit in labels.unique().tolist():
                    for i in torch.nonzero(labels == digit).flatten()[:2].tolist():
                        pairs += [edges[i].convert("L"), to_pil(images[i : i + 1])[0]]
    save_grid(pairs, work / "grid_controlnet.png", columns=8)
    logger.info("%s", row)
    return [row]


# --------------------------------------------------------------------------------------------------------------------
# the style classifier: thin (the digits as they are) vs thick strokes
# --------------------------------------------------------------------------------------------------------------------
class StrokeStyleClassifier(torch.nn.Module):
    """A small CNN that tells thick-stroke digits from plain ones (16 px, any digit)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(16, 2),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float().mean(dim=1, keepdim=True)
        if images.shape[-1] != 16:
            images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
        return self.net(images)

    @torch.no_grad()
    def thick_fraction(self, images: torch.Tensor) -> float:
        return (self(images).argmax(dim=-1) == 1).float().mean().item()


def train_style_classifier(seed: int = 0, steps: int = 300) -> tuple[StrokeStyleClassifier, float]:
    """Trained on the digits train split (plain = 0, thick = 1), with small brightness and blur jitter so generated
    images' softness is not read as style; returns the model and its accuracy on the held-out split."""
    torch.manual_seed(seed)
    train, _ = load_digits_tensors(16, "train")
    test, _ = load_digits_tensors(16, "test")

    def both(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([images, thicken_strokes(images)])
        y = torch.cat([torch.zeros(len(images)), torch.ones(len(images))]).long()
        return x, y

    x, y = both(train)
    model = StrokeStyleClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=generator)
        batch = x[idx]
        blur = torch.rand(len(batch), 1, 1, 1, generator=generator) * 0.5
        batch = (1 - blur) * batch + blur * F.avg_pool2d(batch, 3, stride=1, padding=1, count_include_pad=False)
        batch = batch + 0.1 * torch.randn(batch.shape, generator=generator)
        loss = F.cross_entropy(model(batch), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x_test, y_test = both(test)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    return model, accuracy


# --------------------------------------------------------------------------------------------------------------------
# training and measuring
# --------------------------------------------------------------------------------------------------------------------
def run_recipe(recipe: Path, overrides: list[str], in_process: bool) -> float:
    """Train with `python -m finetune` (a fresh process, as a user runs it) or in this process; wall seconds."""
    started = time.perf_counter()
    if in_process:
        from finetune.recipe import load_config
        from finetune.train import reset_accelerate_state, train

        reset_accelerate_state()
        train(load_config(recipe, overrides))
    else:
        command = [sys.executable, "-m", "finetune", str(recipe), *overrides]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - started


def build_miniature(
    model: BaseModel, base: Path, vae: Path, overrides: list[str], in_process: bool
) -> dict[str, float]:
    """Train a miniature model into `base` (and the autoencoder into `vae` first when it is missing); seconds per
    stage."""
    times = {}
    if not (vae / "config.json").is_file():
        times["autoencoder_s"] = run_recipe(
            RECIPES / "digits_autoencoder.yaml", [f"train.output_dir={vae}"], in_process
        )
    times[f"{model.key}_s"] = run_recipe(
        RECIPES / model.recipe,
        [f"train.output_dir={base}", f"latent_diffusion.vae={vae}", *overrides],
        in_process,
    )
    return times


def load(base: Path, teaching: Teaching | None, output: Path | None):
    """The base model, or it with what a teaching run saved (a LoRA, embeddings, or a whole pipeline)."""
    from pipelines.load import load_pipeline

    if teaching is None:
        return load_pipeline(base, device="cpu", dtype="float32")
    if teaching.loads_as == "pipeline":
        return load_pipeline(output, device="cpu", dtype="float32")
    return load_pipeline(base, device="cpu", dtype="float32", **{teaching.loads_as: str(output)})


def loads_embeddings(base: Path) -> bool:
    """Whether the base model's pipeline class takes Textual Inversion embeddings (StableDiffusion3Pipeline does
    not)."""
    from pipelines.load import pipeline_class_for, read_model_index

    return hasattr(pipeline_class_for(read_model_index(str(base)), str(base)), "load_textual_inversion")


def saved_bytes(output: Path, teaching: Teaching) -> int:
    if teaching.loads_as == "pipeline":  # a full fine-tune saves a complete pipeline: count its weights
        return sum(p.stat().st_size for p in output.rglob("*.safetensors") if "checkpoint-" not in str(p))
    name = "pytorch_lora_weights.safetensors" if teaching.loads_as == "lora" else "learned_embeds.safetensors"
    return (output / name).stat().st_size


@dataclass
class Sampling:
    per_prompt: int
    steps: int
    guidance_scale: float
    resolution: int
    seed: int


def digit_scores(pipe, classifier, new_prompt: str | None, sampling: Sampling) -> tuple[dict, torch.Tensor]:
    """Fidelity of `new_prompt` (read as the held-out digit) and accuracy on the seen digits' prompts."""
    seen = [d for d in range(10) if d != HELD_OUT]
    prompts = [digit_prompt(d) for d in seen for _ in range(sampling.per_prompt)]
    labels = torch.tensor([d for d in seen for _ in range(sampling.per_prompt)])
    if new_prompt is not None:
        prompts = [new_prompt] * sampling.per_prompt + prompts
    images = generate_images(
        pipe, prompts, sampling.seed, sampling.steps, sampling.guidance_scale, sampling.resolution
    )
    with torch.no_grad():
        predictions = classifier.predict(images)
    scores = {}
    if new_prompt is not None:
        scores["fidelity"] = (predictions[: sampling.per_prompt] == HELD_OUT).float().mean().item()
        predictions = predictions[sampling.per_prompt :]
    scores["prior_accuracy"] = (predictions == labels).float().mean().item()
    return scores, images


def style_scores(pipe, style_classifier, sampling: Sampling) -> dict:
    seen = [d for d in range(10) if d != HELD_OUT]
    plain = [digit_prompt(d) for d in seen for _ in range(sampling.per_prompt)]
    styled = [f"{p} in {STYLE_TRIGGER} style" for p in plain]
    args = (sampling.seed, sampling.steps, sampling.guidance_scale, sampling.resolution)
    return {
        "thick_with_trigger": style_classifier.thick_fraction(generate_images(pipe, styled, *args)),
        "thick_without_trigger": style_classifier.thick_fraction(generate_images(pipe, plain, *args)),
    }


def grid(images: torch.Tensor, per_prompt: int, columns: int, path: Path) -> None:
    from finetune.outputs import save_grid

    columns = min(columns, per_prompt)
    cells = torch.cat([row[:columns] for row in images.split(per_prompt)])
    save_grid(to_pil(cells), path, columns=columns)  # one row per prompt


def run_benchmark(args: argparse.Namespace) -> str:
    from finetune.digits_classifier import load_digits_classifier

    work = Path(args.work)
    if args.data_only:  # the teaching recipes' folders only (their headers point here): seconds, no model
        folders = [work / "instance", work / "style"]
        if all(folder.is_dir() for folder in folders):
            return "\n".join(f"{folder.name}: {folder} (already there)" for folder in folders)
        for folder in folders:  # what a killed run left half-written
            shutil.rmtree(folder, ignore_errors=True)
        data = prepare_data(work, args.num_instance, args.resolution, args.seed)
        return "\n".join(f"{name}: {folder}" for name, folder in data.items())
    if work.exists():
        if not args.overwrite:
            raise SystemExit(f"{work} exists: pass --overwrite to replace it, or choose another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    bases = {"unet": Path(args.base), "flow": Path(args.flow_base)}
    setup_times = {}
    for key in args.models:
        if not (bases[key] / "model_index.json").is_file():
            logger.info("no %s miniature model at %s: training it", key, bases[key])
            setup_times.update(
                build_miniature(BASE_MODELS[key], bases[key], Path(args.vae), args.base_overrides, args.in_process)
            )
    teach = args.methods is None or any(m != CONTROLNET for m in args.methods)  # (--methods ControlNet: only it)
    data = prepare_data(work, args.num_instance, args.resolution, args.seed) if teach else {}
    sampling = Sampling(args.per_prompt, args.steps, args.guidance_scale, args.resolution, args.seed)
    classifier = load_digits_classifier()
    style_classifier, style_accuracy = train_style_classifier(args.seed) if teach else (None, None)
    rows = []
    for key in args.models if teach else []:
        rows += benchmark_model(BASE_MODELS[key], bases[key], work, data, sampling, classifier, style_classifier, args)
    if "unet" in args.models and (args.methods is None or CONTROLNET in args.methods):
        rows += benchmark_controlnet(bases["unet"], work, sampling, classifier, args)

    report = markdown(rows, setup_times, style_accuracy, args)
    (work / "results.md").write_text(report)
    (work / "results.json").write_text(json.dumps({"rows": rows, "setup_s": setup_times}, indent=2))
    return report


def benchmark_model(
    model: BaseModel,
    base: Path,
    work: Path,
    data: dict[str, Path],
    sampling: Sampling,
    classifier,
    style_classifier,
    args: argparse.Namespace,
) -> list[dict]:
    """The rows of one base model: the model itself, then each method's run on it (results tagged with the model's
    key)."""
    runs = work if model.key == "unet" else work / model.key
    rows = []
    pipe = load(base, None, None)
    scores, images = digit_scores(pipe, classifier, f"a handwritten digit {TRIGGER}", sampling)
    before = scores["prior_accuracy"]
    grid(images, sampling.per_prompt, args.grid_columns, work / f"grid_{model.grid_prefix}base.png")
    style = style_scores(pipe, style_classifier, sampling)
    rows.append({"model": model.key, "method": "miniature model, no fine-tuning", **scores, **style})
    del pipe

    embeddings = loads_embeddings(base)
    for teaching in [t for t in TEACHINGS if args.methods is None or t.label in args.methods] + [STYLE]:
        if teaching.loads_as == "embeddings" and not embeddings:
            logger.info("%s: the %s base model's pipeline takes no embeddings: skipped", teaching.label, model.key)
            continue
        output = runs / teaching.recipe.removesuffix(".yaml")
        folder = data["style"] if teaching is STYLE else data["instance"]
        overrides = [
            f"model.pretrained_model_name_or_path={base}",
            f"{teaching.data_key}={folder}",
            f"train.output_dir={output}",
            *model.overrides,
            *teaching.extra,
            *args.teach_overrides,
        ]
        seconds = run_recipe(RECIPES / teaching.recipe, overrides, args.in_process)
        steps = _steps_from_log(output)
        pipe = load(base, teaching, output)
        row = {
            "model": model.key,
            "method": teaching.label,
            "steps": steps,
            "train_s": seconds,
            "size_kb": saved_bytes(output, teaching) / 1024,
        }
        if teaching is STYLE:
            row.update(style_scores(pipe, style_classifier, sampling))
            row.update(digit_scores(pipe, classifier, None, sampling)[0])
        else:
            scores, images = digit_scores(pipe, classifier, teaching.prompt, sampling)
            row.update(scores)
            grid_path = work / f"grid_{model.grid_prefix}{output.name}.png"
            grid(images, sampling.per_prompt, args.grid_columns, grid_path)
        row["prior_before"] = before
        rows.append(row)
        del pipe
        logger.info("%s", row)
    return rows


def _steps_from_log(output: Path) -> int | None:
    log = output / "train_log.jsonl"
    steps = [json.loads(line).get("step") for line in log.read_text().splitlines()] if log.is_file() else []
    return max((s for s in steps if s is not None), default=None)


def markdown(rows: list[dict], setup_times: dict, style_accuracy: float, args: argparse.Namespace) -> str:
    """Two tables (teaching the nine; the style), one row per method and, in each cell, one value per base model
    ("UNet / flow"), so that the base models read side by side."""
    models = [m for m in BASE_MODELS if any(r["model"] == m for r in rows)]
    by_method: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], {})[row["model"]] = row

    def pct(value):
        return "" if value is None else f"{100 * value:.0f}%"

    def kib(value):
        return "" if value is None else f"{value:,.1f}" if value < 10 else f"{value:,.0f}"

    def seconds(value):
        return "" if value is None else f"{value:.0f}"

    def prior(row):
        before = row.get("prior_before")
        return pct(row["prior_accuracy"]) if before is None else f"{pct(before)} → {pct(row['prior_accuracy'])}"

    def cell(per_model: dict[str, dict], show) -> str:
        values = [show(per_model[m]) if m in per_model else "—" for m in models]
        if len(set(values)) == 1 and len(values) > 1 and values[0] == "":
            return ""
        return " / ".join(values)

    def steps(per_model):
        values = {per_model[m].get("steps") for m in models if m in per_model}
        return cell(per_model, lambda r: str(r.get("steps") or "")) if len(values) > 1 else str(values.pop() or "")

    names = " / ".join(BASE_MODELS[m].label for m in models)
    lines = [
        f"Teaching the miniature models the held-out digit ({DIGIT_NAMES[HELD_OUT]}) from {args.num_instance} images; "
        f"{args.per_prompt} images per prompt, {args.steps} sampling steps (DDIM for the UNet, Euler for flow "
        f"matching), guidance {args.guidance_scale}. Each cell: {names}.",
        "",
        "| method | steps | train time (s) | saved size (KiB) | fidelity: new token read as "
        f"{HELD_OUT} | other digits correct (before → after) |",
        "|---|---|---|---|---|---|",
    ]
    for method, per_model in by_method.items():
        if not any("fidelity" in r for r in per_model.values()):
            continue
        lines.append(
            f"| {method} | {steps(per_model)} | {cell(per_model, lambda r: seconds(r.get('train_s')))} | "
            f"{cell(per_model, lambda r: kib(r.get('size_kb')))} | {cell(per_model, lambda r: pct(r['fidelity']))} | "
            f"{cell(per_model, prior)} |"
        )
    lines += [
        "",
        f"Style (thick strokes, trigger '{STYLE_TRIGGER} style'); style classifier accuracy on held-out digits "
        f"{pct(style_accuracy)}. Each cell: {names}.",
        "",
        "| model | steps | train time (s) | saved size (KiB) | thick, prompt with trigger | thick, prompt without | "
        "digits correct |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, per_model in by_method.items():
        if not any("thick_with_trigger" in r for r in per_model.values()):
            continue
        lines.append(
            f"| {method} | {steps(per_model)} | {cell(per_model, lambda r: seconds(r.get('train_s')))} | "
            f"{cell(per_model, lambda r: kib(r.get('size_kb')))} | "
            f"{cell(per_model, lambda r: pct(r['thick_with_trigger']))} | "
            f"{cell(per_model, lambda r: pct(r['thick_without_trigger']))} | "
            f"{cell(per_model, lambda r: pct(r['prior_accuracy']))} |"
        )
    controlnet = [r for r in rows if r["method"] == CONTROLNET]
    if len(controlnet) == len(rows):  # the ControlNet alone: no teaching tables
        lines = []
    for row in controlnet:
        lines += [
            "",
            f"ControlNet on the UNet miniature: the control is the edge map of a held-out test-split digit, prompt "
            f'"{CONTROL_CAPTION}" for every image; the fraction the digits classifier reads as the control\'s digit '
            "(chance ~10%).",
            "",
            "| controls | with the ControlNet | without (base model, same seeds) |",
            "|---|---|---|",
            f"| seen digits (0-8) | {pct(row['follows_seen'])} | {pct(row['follows_seen_without'])} |",
            f"| unseen digit ({HELD_OUT}) | {pct(row['follows_unseen'])} | {pct(row['follows_unseen_without'])} |",
            "",
            f"{row['steps']} steps, {seconds(row['train_s'])} s of training, {kib(row['size_kb'])} KiB saved.",
        ]
    if setup_times:
        lines += ["", "Trained first (s): " + ", ".join(f"{k} {v:.0f}" for k, v in setup_times.items())]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base", default="outputs/digits-text-to-image", help="the UNet miniature model (trained if absent)"
    )
    parser.add_argument(
        "--flow-base",
        default="outputs/digits-flow-text-to-image",
        help="the flow-matching miniature model (trained if absent)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(BASE_MODELS),
        default=list(BASE_MODELS),
        help="the base models to fine-tune (default: both, side by side)",
    )
    parser.add_argument(
        "--vae", default="outputs/digits-autoencoder", help="the autoencoder a missing miniature is trained on"
    )
    parser.add_argument("--work", default="outputs/bench-digits-finetune", help="folder of runs, table and grids")
    parser.add_argument("--overwrite", action="store_true", help="replace --work if it exists")
    parser.add_argument("--num-instance", type=int, default=5, help="images of the held-out digit to teach from")
    parser.add_argument("--per-prompt", type=int, default=32, help="images generated per prompt")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (DDIM or flow-matching Euler)")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-columns", type=int, default=8)
    parser.add_argument(
        "--methods", nargs="*", default=None, help=f"a subset of the method labels (and/or {CONTROLNET})"
    )
    parser.add_argument(
        "--controls-per-digit", type=int, default=None, help="ControlNet: test-split controls per digit (default: all)"
    )
    parser.add_argument("--teach-overrides", nargs="*", default=[], help="overrides for every teaching run")
    parser.add_argument("--base-overrides", nargs="*", default=[], help="overrides when training a missing base model")
    parser.add_argument("--in-process", action="store_true", help="train in this process (tests)")
    parser.add_argument(
        "--data-only",
        action="store_true",
        help="only write the instance and style folders the digits_teach_*.yaml / digits_style_lora.yaml recipes "
        "train on (make digits-teach-data), then stop",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    started = time.perf_counter()
    args = parse_args(argv)
    report = run_benchmark(args)
    print(report)
    if args.data_only:
        return
    print(f"benchmark wall time: {time.perf_counter() - started:.0f} s; results in {args.work}/results.md")


if __name__ == "__main__":
    main()
