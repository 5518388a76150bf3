"""What each fine-tuning method teaches the miniature text-to-image models, side by side: the UNet miniature
(finetune/recipes/digits_text_to_image.yaml, DDPM, a StableDiffusionPipeline) and the flow-matching miniature
(finetune/recipes/digits_flow_text_to_image.yaml, an SD3 transformer, a StableDiffusion3Pipeline).

Neither miniature model ever saw the held-out digit (the nine as the recipes ship; `--held-out-digits` picks others,
one miniature trained without each, cached under outputs/digits-miniatures and reused). Each method gets a handful of
images of that digit under a new token and is measured on:

- fidelity: the fraction of images for "a handwritten digit <token>" that the digits classifier reads as that digit;
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
    python -m benchmarks.bench_digits_finetune --models unet --held-out-digits 9 3 5 --seeds 0 1   # the average
    python -m benchmarks.bench_digits_finetune --models flow   # one base model only
    python -m benchmarks.bench_digits_finetune --models unet --methods ControlNet   # the ControlNet alone
    make bench-digits     # the average over digits 9 3 5 and seeds 0 1 (UNet): a process per digit, then --combine

One held-out digit and one seed (the default) writes <work>/results.md (the tables, one column pair per base model),
<work>/results.json, and <work>/grid_<method>.png (UNet) / <work>/grid_flow_<method>.png (rows: the new token, then
the other digits), and <work>/grid_controlnet.png (pairs: control | drawn; seen digits, then the held-out one).
Several digits or seeds write each run under <work>/holdout-<digit>-seed-<seed>/ and a results.md of each method's
mean and [min-max] over every run, then per digit; results.json has every row, and each summary's mean, std, min and
max. A seed sets the instance images chosen, every method's train.seed and the sampling noise; the ControlNet runs
there only when --methods names it (once per digit).
"""

from __future__ import annotations

import argparse
import hashlib
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
DEFAULT_HELD_OUT = 9  # the digit the shipped miniature recipes hold out (latent_diffusion.holdout_digits: [9])
TRIGGER = "sks"  # LoRA and DreamBooth: a token the miniature model's captions never used
PLACEHOLDER = "<new-digit>"  # Textual Inversion: a new token with a learned embedding
STYLE_TRIGGER = "zwx"
SAMPLING_SEED_STRIDE = 10_000  # seed s samples from noise seeds 10000 s + i: no image shared between seeds
# what `make miniature` trains (the recipes' own train.output_dir): the miniatures without the nine
SHIPPED_MINIATURES = {"unet": "outputs/digits-text-to-image", "flow": "outputs/digits-flow-text-to-image"}
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
    # prior preservation drawn from the prompts of the digits the base model knows (the held-out one left out)
    seen_class_prompts: bool = False

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
        seen_class_prompts=True,
    ),
    Teaching(
        "DreamBooth-LoRA",
        "digits_teach_dreambooth_lora.yaml",
        "dreambooth.instance_data_dir",
        "lora",
        seen_class_prompts=True,
    ),
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


def prepare_data(
    work: Path, num_instance: int, resolution: int, seed: int, held_out: int = DEFAULT_HELD_OUT
) -> dict[str, Path]:
    """The held-out digit's instance images (chosen by `seed` from the test split), and the style set (thick digits
    captioned with the trigger, plus as many plain ones with plain captions, so the style binds to the trigger rather
    than to every prompt; none of them the held-out digit, which the base model never drew)."""
    images, labels = load_digits_tensors(resolution, "test")
    rng = np.random.default_rng(seed)
    taught = images[labels == held_out]
    chosen = taught[torch.from_numpy(rng.choice(len(taught), num_instance, replace=False))]
    instance = write_image_folder(work / "instance", chosen, [f"a handwritten digit {TRIGGER}"] * num_instance)

    train_images, train_labels = load_digits_tensors(resolution, "train")
    keep = torch.from_numpy(rng.permutation(int((train_labels != held_out).sum())))
    seen_images = train_images[train_labels != held_out][keep]
    seen_labels = train_labels[train_labels != held_out][keep].tolist()
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


def prepare_controlnet_data(work: Path, resolution: int, held_out: int) -> Path:
    """The seen digits of the train split, captioned "a handwritten digit", with their edge maps: written the way a
    user makes a ControlNet dataset (python -m captioning.conditioning DIR --sigma 0)."""
    from captioning.conditioning import build_conditioning_dataset

    images, labels = load_digits_tensors(resolution, "train")
    seen = images[labels != held_out]
    folder = write_image_folder(work / "controlnet-data", seen, [CONTROL_CAPTION] * len(seen))
    build_conditioning_dataset(folder, "canny", sigma=0.0)
    return folder


def held_out_controls(
    resolution: int, per_digit: int | None, held_out: int
) -> dict[str, tuple[list[Image.Image], torch.Tensor]]:
    """Edge maps of the test split, the seen digits and the held-out digit apart (the first `per_digit` of each
    digit)."""
    images, labels = load_digits_tensors(resolution, "test")
    picked = {}
    for name, digits in (("seen", [d for d in range(10) if d != held_out]), ("unseen", [held_out])):
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
    base: Path, work: Path, sampling: Sampling, classifier, args: argparse.Namespace, held_out: int
) -> list[dict]:
    """Train the miniature ControlNet and measure how often the drawn digit is the control's, with and without it."""
    from finetune.outputs import save_grid
    from pipelines.load import load_pipeline

    data = prepare_controlnet_data(work, sampling.resolution, held_out)
    output = work / CONTROLNET_RECIPE.removesuffix(".yaml")
    overrides = [
        f"model.pretrained_model_name_or_path={base}",
        f"data.dataset={data}",
        f"train.output_dir={output}",
        *args.teach_overrides,
    ]
    seconds = run_recipe(RECIPES / CONTROLNET_RECIPE, overrides, args.in_process)
    controls = held_out_controls(sampling.resolution, args.controls_per_digit, held_out)
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


def build_autoencoder(vae: Path, in_process: bool) -> dict[str, float]:
    """Train the miniatures' shared first stage (digits_autoencoder.yaml, every digit: it only compresses pixels)
    into `vae`; its seconds."""
    shutil.rmtree(vae, ignore_errors=True)  # what a killed run left half-written
    return {"autoencoder_s": run_recipe(RECIPES / "digits_autoencoder.yaml", [f"train.output_dir={vae}"], in_process)}


def build_miniature(model: BaseModel, base: Path, vae: Path, overrides: list[str], in_process: bool) -> float:
    """Train a miniature model into `base` on the autoencoder `vae`; its seconds."""
    return run_recipe(
        RECIPES / model.recipe, [f"train.output_dir={base}", f"latent_diffusion.vae={vae}", *overrides], in_process
    )


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


def digit_scores(
    pipe, classifier, new_prompt: str | None, sampling: Sampling, held_out: int
) -> tuple[dict, torch.Tensor]:
    """Fidelity of `new_prompt` (read as the held-out digit) and accuracy on the seen digits' prompts."""
    seen = [d for d in range(10) if d != held_out]
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
        scores["fidelity"] = (predictions[: sampling.per_prompt] == held_out).float().mean().item()
        predictions = predictions[sampling.per_prompt :]
    scores["prior_accuracy"] = (predictions == labels).float().mean().item()
    return scores, images


def seen_digit_prompts(held_out: int) -> list[str]:
    """The captions of the digits the miniature without `held_out` knows, in order."""
    return [digit_prompt(d) for d in range(10) if d != held_out]


def style_scores(pipe, style_classifier, sampling: Sampling, held_out: int) -> dict:
    plain = [prompt for prompt in seen_digit_prompts(held_out) for _ in range(sampling.per_prompt)]
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
        data = prepare_data(work, args.num_instance, args.resolution, args.seeds[0], args.held_out_digits[0])
        return "\n".join(f"{name}: {folder}" for name, folder in data.items())
    if work.exists():
        if not args.overwrite:
            raise SystemExit(f"{work} exists: pass --overwrite to replace it, or choose another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if args.combine:
        return combine_results(work, args)
    single = len(args.held_out_digits) == 1 and len(args.seeds) == 1
    teach = args.methods is None or any(m != CONTROLNET for m in args.methods)  # (--methods ControlNet: only it)
    # the ControlNet is no teaching method: it runs when named, or in the one-digit one-seed run it always was part of
    controlnet = "unet" in args.models and (CONTROLNET in args.methods if args.methods is not None else single)
    classifier = load_digits_classifier()
    # one instrument for every run: the style classifier is not retrained per seed
    style_classifier, style_accuracy = train_style_classifier(0) if teach else (None, None)
    setup_times: dict[str, float] = {}
    runs, rows = [], []
    miniatures: dict[int, dict[str, Path]] = {}
    # every digit at the first seed, then at the next: a run stopped part-way has still averaged over the digits
    for seed in args.seeds:
        for held_out in args.held_out_digits:
            if held_out not in miniatures:
                miniatures[held_out] = {key: miniature_for(key, held_out, args, setup_times) for key in args.models}
            bases = miniatures[held_out]
            started = time.perf_counter()
            run_work = work if single else work / f"holdout-{held_out}-seed-{seed}"
            run_work.mkdir(parents=True, exist_ok=True)
            data = prepare_data(run_work, args.num_instance, args.resolution, seed, held_out) if teach else {}
            # image i of a prompt uses sampling seed + i: seeds far apart draw different noise
            sampling = Sampling(
                args.per_prompt, args.steps, args.guidance_scale, args.resolution, seed * SAMPLING_SEED_STRIDE
            )
            run_rows = []
            for key in args.models if teach else []:
                run_rows += benchmark_model(
                    BASE_MODELS[key],
                    bases[key],
                    run_work,
                    data,
                    sampling,
                    classifier,
                    style_classifier,
                    args,
                    held_out,
                    seed,
                )
            if controlnet and seed == args.seeds[0]:  # one ControlNet per held-out digit, at the first seed
                run_rows += benchmark_controlnet(bases["unet"], run_work, sampling, classifier, args, held_out)
            for row in run_rows:
                row.update(held_out=held_out, seed=seed)
            rows += run_rows
            runs.append({"held_out": held_out, "seed": seed, "wall_s": time.perf_counter() - started})
            # after every run, so that a long benchmark stopped part-way still leaves the runs it finished
            report = write_results(work, rows, runs, setup_times, style_accuracy, single, args)
    return report


def combine_results(work: Path, args: argparse.Namespace) -> str:
    """One averaged report from the results.json of benchmarks run apart (e.g. one process per held-out digit, to
    use both cores): their rows, runs and setup times together, the digits and seeds in the order they appear."""
    rows, runs, setup_times, style_accuracy = [], [], {}, None
    for folder in args.combine:
        results = json.loads((Path(folder) / "results.json").read_text())
        rows += results["rows"]
        runs += results["runs"]
        setup_times.update(results["setup_s"])
        style_accuracy = results.get("style_accuracy", style_accuracy)
    args.held_out_digits = list(dict.fromkeys(run["held_out"] for run in runs))
    args.seeds = list(dict.fromkeys(run["seed"] for run in runs))
    return write_results(work, rows, runs, setup_times, style_accuracy, False, args)


def write_results(
    work: Path,
    rows: list[dict],
    runs: list[dict],
    setup_times: dict[str, float],
    style_accuracy: float | None,
    single: bool,
    args: argparse.Namespace,
) -> str:
    """results.md and results.json of the runs so far; the report."""
    summary = summarize(rows, ("model", "method"))
    per_digit = summarize(rows, ("model", "method", "held_out"))
    if single:
        report = markdown(rows, setup_times, style_accuracy, args, args.held_out_digits[0])
    else:
        report = averaged_markdown(summary, per_digit, setup_times, style_accuracy, runs, args)
    (work / "results.md").write_text(report)
    results = {
        "held_out_digits": args.held_out_digits,
        "seeds": args.seeds,
        "spread": "min-max (and population std) over every held-out digit and seed",
        "summary": summary,
        "per_digit": per_digit,
        "rows": rows,
        "runs": runs,
        "setup_s": setup_times,
        "style_accuracy": style_accuracy,
    }
    (work / "results.json").write_text(json.dumps(results, indent=2))
    return report


def miniature_folder(model: BaseModel, held_out: int, args: argparse.Namespace) -> Path:
    """Where the miniature without `held_out` is cached: keyed by the digit and everything that makes it (the
    recipe's text, the overrides, the autoencoder), so a change to any of them trains a new one."""
    vae = Path(args.vae)
    key = {
        "recipe": (RECIPES / model.recipe).read_text(),
        "held_out": held_out,
        "overrides": [*model.overrides, *args.base_overrides],
        "vae": str(vae.resolve()),
        "vae_config": (vae / "config.json").read_text() if (vae / "config.json").is_file() else None,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return Path(args.miniatures) / f"{model.key}-without-{DIGIT_NAMES[held_out]}-{digest}"


def miniature_for(key: str, held_out: int, args: argparse.Namespace, setup_times: dict[str, float]) -> Path:
    """The base model that never saw `held_out`: --base / --flow-base when given (one held-out digit), the recipe's
    own output for the digit the recipe holds out as shipped (what `make miniature` trains), otherwise a cached one;
    trained first when missing."""
    model = BASE_MODELS[key]
    explicit = args.base if key == "unet" else args.flow_base
    vae = Path(args.vae)
    if explicit is not None:
        base = Path(explicit)
    elif held_out == DEFAULT_HELD_OUT and not args.base_overrides:
        base = Path(SHIPPED_MINIATURES[key])
    else:
        if not (vae / "config.json").is_file():  # the cache key reads the autoencoder's config
            setup_times.update(build_autoencoder(vae, args.in_process))
        base = miniature_folder(model, held_out, args)
    if (base / "model_index.json").is_file():
        logger.info("%s miniature without the %s: %s (reused)", key, DIGIT_NAMES[held_out], base)
        return base
    logger.info("no %s miniature without the %s at %s: training it", key, DIGIT_NAMES[held_out], base)
    shutil.rmtree(base, ignore_errors=True)  # what a killed run left half-written
    if not (vae / "config.json").is_file():
        setup_times.update(build_autoencoder(vae, args.in_process))
    overrides = [f"latent_diffusion.holdout_digits=[{held_out}]", *args.base_overrides]
    setup_times[f"{key}_without_{held_out}_s"] = build_miniature(model, base, vae, overrides, args.in_process)
    return base


def benchmark_model(
    model: BaseModel,
    base: Path,
    work: Path,
    data: dict[str, Path],
    sampling: Sampling,
    classifier,
    style_classifier,
    args: argparse.Namespace,
    held_out: int,
    seed: int,
) -> list[dict]:
    """The rows of one base model: the model itself, then each method's run on it (results tagged with the model's
    key), every run trained with `seed`."""
    runs = work if model.key == "unet" else work / model.key
    rows = []
    pipe = load(base, None, None)
    scores, images = digit_scores(pipe, classifier, f"a handwritten digit {TRIGGER}", sampling, held_out)
    before = scores["prior_accuracy"]
    grid(images, sampling.per_prompt, args.grid_columns, work / f"grid_{model.grid_prefix}base.png")
    style = style_scores(pipe, style_classifier, sampling, held_out)
    rows.append({"model": model.key, "method": "miniature model, no fine-tuning", **scores, **style})
    del pipe

    embeddings = loads_embeddings(base)
    for teaching in [t for t in [*TEACHINGS, STYLE] if args.methods is None or t.label in args.methods]:
        if teaching.loads_as == "embeddings" and not embeddings:
            logger.info("%s: the %s base model's pipeline takes no embeddings: skipped", teaching.label, model.key)
            continue
        output = runs / teaching.recipe.removesuffix(".yaml")
        folder = data["style"] if teaching is STYLE else data["instance"]
        overrides = [
            f"model.pretrained_model_name_or_path={base}",
            f"{teaching.data_key}={folder}",
            f"train.output_dir={output}",
            f"train.seed={seed}",
            *model.overrides,
            *teaching.extra,
            *(
                [f"dreambooth.class_prompts=[{', '.join(seen_digit_prompts(held_out))}]"]
                if teaching.seen_class_prompts
                else []
            ),
            *args.teach_overrides,
        ]
        seconds = run_recipe(Path(args.recipes) / teaching.recipe, overrides, args.in_process)
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
            row.update(style_scores(pipe, style_classifier, sampling, held_out))
            row.update(digit_scores(pipe, classifier, None, sampling, held_out)[0])
        else:
            scores, images = digit_scores(pipe, classifier, teaching.prompt, sampling, held_out)
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


def markdown(
    rows: list[dict], setup_times: dict, style_accuracy: float, args: argparse.Namespace, held_out: int
) -> str:
    """One held-out digit and one seed: two tables (teaching the digit; the style), one row per method and, in each
    cell, one value per base model ("UNet / flow"), so that the base models read side by side."""
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
        f"Teaching the miniature models the held-out digit ({DIGIT_NAMES[held_out]}) from {args.num_instance} images; "
        f"{args.per_prompt} images per prompt, {args.steps} sampling steps (DDIM for the UNet, Euler for flow "
        f"matching), guidance {args.guidance_scale}. Each cell: {names}.",
        "",
        "| method | steps | train time (s) | saved size (KiB) | fidelity: new token read as "
        f"{held_out} | other digits correct (before → after) |",
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
            f"| seen digits (the other nine) | {pct(row['follows_seen'])} | {pct(row['follows_seen_without'])} |",
            f"| unseen digit ({held_out}) | {pct(row['follows_unseen'])} | {pct(row['follows_unseen_without'])} |",
            "",
            f"{row['steps']} steps, {seconds(row['train_s'])} s of training, {kib(row['size_kb'])} KiB saved.",
        ]
    if setup_times:
        lines += ["", "Trained first (s): " + ", ".join(f"{k} {v:.0f}" for k, v in setup_times.items())]
    return "\n".join(lines) + "\n"


# the measured fractions (and the seconds) that are averaged over held-out digits and seeds
METRICS = (
    "fidelity",
    "prior_accuracy",
    "prior_drop",
    "thick_with_trigger",
    "thick_without_trigger",
    "train_s",
    "follows_seen",
    "follows_seen_without",
    "follows_unseen",
    "follows_unseen_without",
)


def summarize(rows: list[dict], group_by: tuple[str, ...]) -> list[dict]:
    """Per group of rows (e.g. model and method): each metric's mean, population std, min and max over the group's
    runs (held-out digits x seeds), in the rows' order. `prior_drop` is a run's other-digit accuracy lost against the
    base model of the same digit and sampling seed (before - after)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        measured = dict(row)
        if row.get("prior_before") is not None and row.get("prior_accuracy") is not None:
            measured["prior_drop"] = row["prior_before"] - row["prior_accuracy"]
        groups.setdefault(tuple(row.get(key) for key in group_by), []).append(measured)
    summary = []
    for key, members in groups.items():
        entry: dict = dict(zip(group_by, key))
        entry["runs"] = len(members)
        entry["held_out_digits"] = sorted({m["held_out"] for m in members if m.get("held_out") is not None})
        entry["seeds"] = sorted({m["seed"] for m in members if m.get("seed") is not None})
        entry["steps"] = members[0].get("steps")
        for metric in METRICS:
            values = np.array([m[metric] for m in members if m.get(metric) is not None], dtype=float)
            if len(values):
                entry[metric] = {
                    "mean": float(values.mean()),
                    "std": float(values.std()),
                    "min": float(values.min()),
                    "max": float(values.max()),
                }
        summary.append(entry)
    return summary


def averaged_markdown(
    summary: list[dict],
    per_digit: list[dict],
    setup_times: dict,
    style_accuracy: float | None,
    runs: list[dict],
    args: argparse.Namespace,
) -> str:
    """Several held-out digits and/or seeds: one table of each method's mean [min-max] over every run, then the same
    per held-out digit (over the seeds)."""
    many_models = len({entry["model"] for entry in summary}) > 1

    def whole(number: float) -> str:
        return str(round(number))  # an int: -0.4 reads "0", where f"{-0.4:.0f}" gives "-0"

    def spread(entry: dict, metric: str, scale: float = 100, unit: str = "%") -> str:
        if metric not in entry:
            return ""
        value = entry[metric]
        if entry["runs"] == 1:
            return f"{whole(scale * value['mean'])}{unit}"
        return f"{whole(scale * value['mean'])}{unit} [{whole(scale * value['min'])}–{whole(scale * value['max'])}]"

    def name(entry: dict) -> str:
        return f"{entry['method']} ({BASE_MODELS[entry['model']].label})" if many_models else entry["method"]

    digits = ", ".join(str(d) for d in args.held_out_digits)
    seeds = ", ".join(str(s) for s in args.seeds)
    header = (
        "| method | steps | train time (s) | fidelity: new token read as the held-out digit | other digits right, "
        "after | other digits lost (points) | thick with the style trigger | thick without |"
    )
    lines = [
        f"Teaching the miniature models a digit they never saw, from {args.num_instance} images: every method on "
        f"held-out digits {digits} (one miniature without each), training seeds {seeds}; {args.per_prompt} images "
        f"per prompt, {args.steps} sampling steps, guidance {args.guidance_scale}. Each cell: the mean over the "
        f"{len(runs)} runs (digits x seeds), [min–max] the spread over them (results.json adds the std). "
        "'Other digits lost': the base model's accuracy on the other digits' prompts minus the taught model's, same "
        "digit and sampling seed.",
        "",
        header,
        "|---|---|---|---|---|---|---|---|",
    ]

    def row_cells(entry: dict) -> str:
        return (
            f"{spread(entry, 'fidelity')} | {spread(entry, 'prior_accuracy')} | "
            f"{spread(entry, 'prior_drop', unit='')} | {spread(entry, 'thick_with_trigger')} | "
            f"{spread(entry, 'thick_without_trigger')} |"
        )

    for entry in summary:
        if entry["method"] == CONTROLNET:
            continue
        lines.append(
            f"| {name(entry)} | {entry['steps'] or ''} | {spread(entry, 'train_s', 1, '')} | {row_cells(entry)}"
        )
    lines += [
        "",
        "Per held-out digit (mean [min–max] over the seeds):",
        "",
        "| method | held-out digit | fidelity | other digits right, after | other digits lost (points) | thick with "
        "the style trigger | thick without |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in sorted(per_digit, key=lambda e: (e["model"], args.held_out_digits.index(e["held_out"]))):
        if entry["method"] != CONTROLNET:
            lines.append(f"| {name(entry)} | {entry['held_out']} | {row_cells(entry)}")
    controlnet = [entry for entry in per_digit if entry["method"] == CONTROLNET]
    if controlnet:
        lines += [
            "",
            f'ControlNet on the UNet miniature (prompt "{CONTROL_CAPTION}"): the fraction of images read as the '
            "control's digit, with / without it, on the seen digits' and the held-out digit's test-split edge maps.",
            "",
            "| held-out digit | seen digits, with / without | held-out digit, with / without |",
            "|---|---|---|",
        ]
        for entry in controlnet:
            lines.append(
                f"| {entry['held_out']} | {spread(entry, 'follows_seen')} / {spread(entry, 'follows_seen_without')} "
                f"| {spread(entry, 'follows_unseen')} / {spread(entry, 'follows_unseen_without')} |"
            )
    if style_accuracy is not None:
        lines += ["", f"Style classifier accuracy on the held-out split: {100 * style_accuracy:.0f}%."]
    lines += [
        "",
        "Wall time per run (s): " + ", ".join(f"{r['held_out']}/{r['seed']} {r['wall_s']:.0f}" for r in runs),
    ]
    if setup_times:
        lines += ["Trained first (s): " + ", ".join(f"{k} {v:.0f}" for k, v in setup_times.items())]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--held-out-digits",
        type=int,
        nargs="+",
        default=[DEFAULT_HELD_OUT],
        metavar="DIGIT",
        help="the digits to teach, one miniature without each (default: the nine, as the miniature recipes ship)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        metavar="SEED",
        help="seeds of every method's training, instance images and sampling noise; each digit runs with each",
    )
    parser.add_argument(
        "--base",
        default=None,
        help=f"the UNet miniature model (one held-out digit only; trained if absent). Default: "
        f"{SHIPPED_MINIATURES['unet']} for the nine with no --base-overrides, else one cached under --miniatures",
    )
    parser.add_argument(
        "--flow-base",
        default=None,
        help=f"the flow-matching miniature model (as --base; default {SHIPPED_MINIATURES['flow']} for the nine)",
    )
    parser.add_argument(
        "--miniatures",
        default="outputs/digits-miniatures",
        help="where miniatures without other digits (or with --base-overrides) are trained once and reused, keyed "
        "by the digit and their settings",
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
    parser.add_argument("--grid-columns", type=int, default=8)
    labels = [t.label for t in [*TEACHINGS, STYLE]] + [CONTROLNET]
    parser.add_argument(
        "--methods", nargs="*", default=None, help=f"a subset of the method labels: {'; '.join(labels)}"
    )
    parser.add_argument(
        "--controls-per-digit", type=int, default=None, help="ControlNet: test-split controls per digit (default: all)"
    )
    parser.add_argument("--teach-overrides", nargs="*", default=[], help="overrides for every teaching run")
    parser.add_argument(
        "--recipes",
        default=str(RECIPES),
        help="folder of the teaching recipes (digits_teach_*.yaml, digits_style_lora.yaml): edited copies to try "
        "other settings per method (default: the shipped ones)",
    )
    parser.add_argument(
        "--base-overrides", nargs="*", default=[], help="overrides when training a missing miniature (part of its key)"
    )
    parser.add_argument("--in-process", action="store_true", help="train in this process (tests)")
    parser.add_argument(
        "--data-only",
        action="store_true",
        help="only write the instance and style folders the digits_teach_*.yaml / digits_style_lora.yaml recipes "
        "train on (make digits-teach-data), then stop",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="WORK",
        help="train nothing: write one averaged results.md/results.json in --work from these benchmarks' "
        "results.json (e.g. one process per held-out digit); the sampling settings given here are only reported",
    )
    args = parser.parse_args(argv)
    if missing := [t.recipe for t in [*TEACHINGS, STYLE] if not (Path(args.recipes) / t.recipe).is_file()]:
        parser.error(f"--recipes {args.recipes}: no {missing[0]} there; copy the shipped recipes and edit them")
    if args.methods is not None and (unknown := [m for m in args.methods if m not in labels]):
        parser.error(f"--methods: {unknown[0]!r} is not a method label; the labels: {'; '.join(labels)}")
    if args.combine and (missing := [w for w in args.combine if not (Path(w) / "results.json").is_file()]):
        parser.error(f"--combine: no results.json in {', '.join(missing)}; run the benchmark there first")
    # bad input fails here, before any model trains (argparse's error: one line, exit 2)
    if bad := [d for d in args.held_out_digits if d not in range(10)]:
        parser.error(f"--held-out-digits: {bad} are not digits 0-9")
    for option, values in (("--held-out-digits", args.held_out_digits), ("--seeds", args.seeds)):
        if len(set(values)) != len(values):
            parser.error(f"{option} {' '.join(map(str, values))}: a value is repeated; give each once")
    if len(args.held_out_digits) > 1 and (args.base is not None or args.flow_base is not None):
        parser.error(
            "--base/--flow-base name one miniature, which holds out one digit: with several --held-out-digits leave "
            "them out (each digit's miniature is trained under --miniatures)"
        )
    return args


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
