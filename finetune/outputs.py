"""What a run leaves behind besides the model: sample grids, the loss curve, the model card, the log, the Hub upload.

Every file here is written atomically (`finetune.atomic`): under its final name it is complete or absent.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from finetune import atomic
from finetune.errors import RunError

logger = logging.getLogger(__name__)

# files a run writes as it starts; a folder holding only these belongs to a run that died before its first checkpoint
# (class_images: prior-preservation images a DreamBooth run generates before training, kept when it is restarted;
# .cache: the disk cache of latents, written before training too; buckets.json: the images per bucket of
# data.aspect_buckets, written at start)
RUN_SCAFFOLDING = {"config.yaml", "logs", "train_log.jsonl", "samples", "class_images", ".cache", "buckets.json"}
HUB_IGNORE_PATTERNS = ["checkpoint-*", ".checkpoint-*", "logs/*", "class_images/*", ".cache/*"]


def image_grid(images: list[Image.Image], columns: int | None = None, gap: int = 2) -> Image.Image:
    """Tile images row by row, `gap` pixels of mid-gray between them; images of several sizes (samples at several
    aspect ratios) each sit at the top left of a cell of the largest width and height."""
    # Not diffusers' make_image_grid: the gaps keep neighbouring samples apart (16 px digits run into each other
    # without them, and the tests and users' scripts read grids of this size), a last row may be short, and grayscale
    # grids stay 'L' where make_image_grid always makes RGB.
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = max(i.width for i in images), max(i.height for i in images)
    fill = 128 if images[0].mode == "L" else (128,) * len(images[0].getbands())
    grid = Image.new(images[0].mode, (columns * (width + gap) + gap, rows * (height + gap) + gap), fill)
    for i, image in enumerate(images):
        grid.paste(image, (gap + (i % columns) * (width + gap), gap + (i // columns) * (height + gap)))
    return grid


def enlarge(images: list[Image.Image], min_cell: int = 64) -> list[Image.Image]:
    """Tiny images (16 px digits) enlarged by a whole factor with nearest-neighbour, so they can be seen."""
    smallest = min(i.width for i in images)
    if smallest >= min_cell:
        return images
    factor = math.ceil(min_cell / smallest)
    return [i.resize((i.width * factor, i.height * factor), Image.Resampling.NEAREST) for i in images]


LABEL_HEIGHT = 18  # pixels of the caption strip under a labelled row
MAX_LABELLED_COLUMNS = 8


def labelled_grid(images: list[Image.Image], labels: list[str], gap: int = 2) -> Image.Image:
    """One row per distinct label (a prompt, a class), in the order labels first appear, the label written under its
    row; a label with more than MAX_LABELLED_COLUMNS images wraps onto several rows, captioned under the last."""
    from PIL import ImageDraw, ImageFont

    groups: dict[str, list[Image.Image]] = {}
    for image, label in zip(images, labels):
        groups.setdefault(label, []).append(image)
    columns = min(MAX_LABELLED_COLUMNS, max(len(g) for g in groups.values()))
    width, height = max(i.width for i in images), max(i.height for i in images)
    mode = images[0].mode if images[0].mode in ("L", "RGB") else "RGB"
    blocks = []  # (images of the row, caption under it or None)
    for label, group in groups.items():
        chunks = [group[i : i + columns] for i in range(0, len(group), columns)]
        blocks += [(chunk, label if k == len(chunks) - 1 else None) for k, chunk in enumerate(chunks)]
    grid_width = columns * (width + gap) + gap
    grid_height = gap + sum(height + gap + (LABEL_HEIGHT if caption is not None else 0) for _, caption in blocks)
    gray, white, black = (128, 255, 0) if mode == "L" else ((128, 128, 128), (255, 255, 255), (0, 0, 0))
    grid = Image.new(mode, (grid_width, grid_height), gray)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12)
    y = gap
    for chunk, caption in blocks:
        for k, image in enumerate(chunk):
            grid.paste(image.convert(mode), (gap + k * (width + gap), y))
        y += height + gap
        if caption is not None:
            draw.rectangle((0, y - gap, grid_width, y + LABEL_HEIGHT - 1), fill=white)
            text = caption
            while text and draw.textlength(text, font=font) > grid_width - 8:
                text = text[:-2] + "…" if len(text) > 1 else ""
            draw.text((4, y + 1), text, fill=black, font=font)
            y += LABEL_HEIGHT
    return grid


def grid_image(
    images: list[Image.Image], labels: list[str] | None = None, min_cell: int = 64, columns: int | None = None
) -> Image.Image:
    """The grid of a run or a `pipelines.generate` call: tiny images enlarged (nearest), one captioned row per label
    when the images have labels (prompts, classes), else a square-ish grid."""
    images = enlarge(images, min_cell)
    if labels and any(labels):
        return labelled_grid(images, [str(label) for label in labels])
    return image_grid(images, columns)


def save_grid(
    images: list[Image.Image],
    path: Path,
    min_cell: int = 64,
    columns: int | None = None,
    then: str = "run again",
    labels: list[str] | None = None,
) -> Path:
    """Save a grid (`grid_image`): tiny images enlarged, rows captioned with their labels when given."""
    with atomic.reporting_write_errors(path.parent, then):
        path.parent.mkdir(parents=True, exist_ok=True)
    grid = grid_image(images, labels, min_cell, columns)
    with atomic.atomic_path(path, then=then) as temporary:
        grid.save(temporary, format="PNG")
    return path


def smooth_by_steps(steps: list[int], values: list[float], span: float) -> list[float]:
    """Exponential moving average over optimizer steps (not over logged points), bias-corrected as Adam's moments
    are (Kingma & Ba 2015, sec. 3): each logged value stands for the steps since the previous record (it is their
    mean), so a record k steps after the last one weighs 1 - beta^k, beta = 1 - 1/span; dividing by the total weight
    so far makes the average start at the first value instead of climbing from it (or from zero)."""
    beta = 1.0 - 1.0 / max(span, 1.0)
    smoothed, running, weight, previous = [], 0.0, 0.0, None
    for step, value in zip(steps, values):
        gap = max(1, step - previous) if previous is not None else max(1, step)
        decay = beta**gap
        running = decay * running + (1 - decay) * value
        weight = decay * weight + (1 - decay)
        smoothed.append(running / weight)
        previous = step
    return smoothed


def write_loss_curve(log_path: Path, png_path: Path, then: str = "run again") -> Path | None:
    """Plot the logged loss (raw and smoothed) against the step."""
    steps, losses = [], []
    for record in read_log(log_path):
        if "loss" in record and "step" in record:
            steps.append(record["step"])
            losses.append(record["loss"])
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    span = max(10.0, steps[-1] / 20)  # a time constant of 5% of the run, in steps
    smoothed = smooth_by_steps(steps, losses, span)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smoothed, label=f"smoothed (EMA over {span:.0f} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic.atomic_path(png_path, then=then) as temporary:
            fig.savefig(temporary, format="png")
    finally:
        plt.close(fig)
    return png_path


def read_log(log_path: Path) -> list[dict]:
    """The records of train_log.jsonl; a line that does not parse (cut by a kill mid-append) is skipped."""
    if not log_path.is_file():
        return []
    records = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_log(log_path: Path, step: int) -> int:
    """Drop the records after `step` (written by a run that was killed after its last checkpoint, and about to be
    written again by the resumed run) and unparsable lines, so the log reads as one run. Rewrites the file atomically
    when something is dropped; returns the number of lines dropped."""
    if not log_path.is_file():
        return 0
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        atomic.atomic_write_text(log_path, "".join(line + "\n" for line in kept))
        logger.info(
            "%s: dropped %d line(s) after step %d, written before the run was interrupted", log_path, dropped, step
        )
    return dropped


def flat_hyperparameters(config_dict: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """A config as `section.key: value` with typed values (numbers stay numbers, so runs can be compared and sorted
    by them); lists become their JSON text, unset (None) values are left out."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hyperparameters(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is not None:
            flat[name] = json.dumps(value, default=str)
    return flat


def log_hyperparameters(trackers: list, config_dict: dict) -> None:
    """The run's hyperparameters, once, as typed values: TensorBoard's in the run's own event file (accelerate's
    `store_init_configuration` would write them as a second run in a timestamped folder), other trackers through
    their own `store_init_configuration`."""
    values = flat_hyperparameters(config_dict)
    for tracker in trackers:
        if tracker.name == "tensorboard":
            from torch.utils.tensorboard.summary import hparams

            writer = tracker.writer
            for summary in hparams(values, {}):  # experiment, session start and end: the HParams dashboard's data
                writer._get_file_writer().add_summary(summary)
            writer.flush()
        else:
            tracker.store_init_configuration(values)


MODEL_PLACEHOLDER = "OUTPUT_DIR_OR_REPO_ID"  # in a method's usage snippet: replaced by the Hub id or the folder


def base_model_license(base: str | None) -> dict[str, str]:
    """The licence in the base model's own card (README.md metadata: license, license_name, license_link), read from
    its local folder or the Hub cache, never downloaded; {} when there is none to read."""
    if not base:
        return {}
    from huggingface_hub import ModelCard, try_to_load_from_cache

    readme: str | Path | None = Path(base) / "README.md"
    if not Path(base).is_dir():
        try:
            readme = try_to_load_from_cache(base, "README.md")
        except Exception:  # noqa: BLE001 - not a repo id: no card to read
            readme = None
    if not isinstance(readme, (str, Path)) or not Path(readme).is_file():
        return {}
    try:
        data = ModelCard.load(readme).data
    except Exception:  # noqa: BLE001 - a card without metadata
        return {}
    found = {key: getattr(data, key, None) for key in ("license", "license_name", "license_link")}
    found = {key: str(value) for key, value in found.items() if isinstance(value, str) and value}
    link = found.get("license_link")
    if link and "://" not in link and not Path(base).is_dir():  # relative to the base model's repository
        found["license_link"] = f"https://huggingface.co/{base}/blob/main/{link}"
    return found if "license" in found else {}


def hub_path(base: str | None) -> bool:
    """A Hub id (namespace/name), not a local folder."""
    return bool(base) and "/" in str(base) and not Path(str(base)).exists() and not str(base).startswith((".", "/"))


def write_model_card(
    output_dir: Path, config, facts: dict[str, Any], method_options: dict, steps: int, then: str = "run again"
) -> Path:
    """README.md with Hub metadata (base model and its licence, pipeline_tag, tags, the prompt the run trained with,
    a sample widget): base model, method, data, hyperparameters, a usage snippet that loads this model (its Hub id
    when one is set, else its folder), sample grid. Written last by a run: a folder with it holds a finished model."""
    from huggingface_hub import ModelCard, ModelCardData

    base_model = facts.get("base_model") or config.model.pretrained_model_name_or_path
    dataset = facts.get("dataset") or config.data.dataset  # a method may train on data named elsewhere
    licence = base_model_license(base_model) or {
        key: facts[key] for key in ("license", "license_name", "license_link") if facts.get(key)
    }
    grids = sorted((output_dir / "samples").glob("*.png")) if (output_dir / "samples").is_dir() else []
    final = [g for g in grids if g.name == "final.png"] or grids[-1:]
    prompt = facts.get("prompt")
    # the final grid's prompts (its rows): the run's validation prompts, else the method's default, this prompt
    shown = (method_options or {}).get("validation_prompts") or ([prompt] if prompt else [])
    data = ModelCardData(
        base_model=base_model if hub_path(base_model) else None,
        library_name="diffusers",
        license=licence.get("license", "apache-2.0"),
        license_name=licence.get("license_name"),
        license_link=licence.get("license_link"),
        pipeline_tag=facts.get("pipeline_tag"),
        tags=["difftune", "diffusers", f"difftune-{config.method}", *facts.get("tags", [])],
        datasets=[dataset] if hub_path(dataset) else None,
        instance_prompt=prompt,  # the Hub shows it as the trigger words of a LoRA
        widget=[{"text": " | ".join(shown), "output": {"url": final[0].relative_to(output_dir).as_posix()}}]
        if final and shown
        else None,
    )
    where = config.hub.hub_model_id or str(output_dir)
    hyper = {
        "method": config.method,
        "steps": steps,
        "batch per process": config.train.train_batch_size,
        "gradient accumulation": config.train.gradient_accumulation_steps,
        "learning rate": config.optim.lr,
        "lr schedule": config.optim.lr_scheduler,
        "optimizer": config.optim.optimizer,
        "mixed precision": config.train.mixed_precision or "accelerate default",
        "resolution": config.data.resolution,
        "EMA": config.ema.use_ema,
        "min-SNR gamma": config.diffusion.snr_gamma,
        "noise offset": config.diffusion.noise_offset,
    }
    lines = [
        f"# {facts.get('title', output_dir.name)}",
        "",
        facts.get("description", f"Trained with difftune, method `{config.method}`."),
        "",
        f"- **Base model:** {base_model or 'trained from scratch'}",
        f"- **Dataset:** {dataset}",
    ]
    if facts.get("trigger"):
        lines.append(f"- **Trigger words:** `{facts['trigger']}`")
    if prompt:
        lines.append(f"- **Prompt it was trained with:** `{prompt}`")
    if facts.get("license_note"):
        lines.append(f"- **Licence:** {facts['license_note']}")
    usage = facts.get("usage", "").strip().replace(MODEL_PLACEHOLDER, where)
    lines += ["", "## Usage", "", "```python", usage, "```", ""]
    lines += ["## Training hyperparameters", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in hyper.items() if v is not None]
    method_options = {key: value for key, value in (method_options or {}).items() if value is not None}
    if method_options:
        lines += [
            "",
            f"Method options (`{config.method}`, unset ones left out):",
            "",
            "```yaml",
            yaml.safe_dump(method_options).strip(),
            "```",
        ]
    for grid in final:
        lines += ["", "## Samples", "", f"![samples]({grid.relative_to(output_dir).as_posix()})"]
    for image in facts.get("validation_images", []):
        lines += ["", f"![validation]({image})"]
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n")
    path = output_dir / "README.md"
    with atomic.atomic_path(path, then=then) as temporary:
        card.save(temporary)
    return path


def _without_token(text: str) -> str:
    """An error message with any Hub token in it masked, so that a log never holds one."""
    import re

    from huggingface_hub import get_token

    token = get_token()
    if token:
        text = text.replace(token, "***")
    return re.sub(r"\bhf_[A-Za-z0-9]{8,}", "hf_***", text)


def push_output_folder(output_dir: Path, repo_id: str | None, private: bool) -> str | None:
    """Upload the output folder without checkpoints; a failed push is logged, never touches local files, and returns
    None (the caller decides that the job failed: see `push_failed_error`)."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = repo_id or output_dir.name
    try:
        repo = create_repo(repo_id, private=private, exist_ok=True)  # token: HF_TOKEN or the saved login
        upload_folder(
            repo_id=repo.repo_id,
            folder_path=str(output_dir),
            ignore_patterns=list(HUB_IGNORE_PATTERNS),  # a copy: upload_folder appends its defaults in place
            commit_message="Upload with difftune",
        )
    except Exception as err:  # noqa: BLE001 - the local output is the result; the push is a copy
        logger.error(
            "push to the Hub (%s) failed: %s. The output stays in %s; push it later with `%s`.",
            repo_id,
            _without_token(f"{type(err).__name__}: {err}"),
            output_dir,
            push_command(output_dir, repo_id),
        )
        return None
    logger.info("pushed %s to https://huggingface.co/%s", output_dir, repo.repo_id)
    return repo.repo_id


def push_failed_error(output_dir: Path, repo_id: str | None) -> RunError:
    """The error a job ends with when everything local is saved but the push did not go through (never the token)."""
    repo_id = repo_id or output_dir.name
    return RunError(
        f"the model is saved in {output_dir}, but the push to the Hub ({repo_id}) failed (see the log above); push it "
        f"later with `{push_command(output_dir, repo_id)}`"
    )


def push_command(output_dir: Path, repo_id: str) -> str:
    """The `hf upload` command that uploads what push_output_folder would (checkpoints, logs and caches left out)."""
    import shlex

    excludes = " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in HUB_IGNORE_PATTERNS)
    return f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(output_dir))} . {excludes}"
