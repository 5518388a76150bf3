"""Data: image folders, Hub datasets and the embedded digits through `datasets`, with PIL/numpy transforms.

Every random choice made for an example (crop, flip, caption choice, caption dropout, and the diffusion noise
later) is drawn from a generator seeded by (seed, epoch, example index). Augmentation then does not depend on which
process loads the example, how batches are split, or whether the run was resumed: exact resume and multi-process
equivalence follow from it.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from finetune.config import ConfigError, DataConfig

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# ---------------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------------
def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL image (16-bit, palette, alpha, CMYK, ...) to 8-bit 'L' or 'RGB'; transparency becomes white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: PIL's convert('L') clips instead of scaling, so scale by the data's own range
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("L" if channels == 1 else "RGB")


def image_to_tensor(
    image: Image.Image,
    resolution: int,
    channels: int,
    rng: np.random.Generator,
    center_crop: bool = True,
    random_flip: bool = False,
) -> tuple[torch.Tensor, bool]:
    """Resize the short side to `resolution`, crop a square, maybe flip; return ([C, R, R] in [-1, 1], flipped)."""
    image = to_mode(image, channels)
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    width, height = image.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left = int(rng.integers(0, width - resolution + 1))
        top = int(rng.integers(0, height - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    flipped = bool(random_flip and rng.random() < 0.5)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array).unsqueeze(0) if channels == 1 else torch.from_numpy(array).permute(2, 0, 1)
    if flipped:
        tensor = tensor.flip(-1)
    return tensor.contiguous(), flipped


def open_image(source: Any) -> Image.Image:
    """Open a path, bytes, a `datasets` {'path', 'bytes'} record or a PIL image, fully decoded (raises if bad)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        image = Image.open(io.BytesIO(source))
    elif isinstance(source, (str, os.PathLike)):
        image = Image.open(source)
    else:
        raise ValueError(f"not an image: {type(source).__name__}")
    image.load()  # decode now: truncated files fail here rather than in the training loop
    return image


def _describe(source: Any, index: int) -> str:
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"example {index}"


def find_unreadable_images(sources: Sequence[Any], num_threads: int = 8) -> list[tuple[int, str, str]]:
    """Try to decode every image; return (index, name, reason) for the ones that cannot be read."""

    def check(item: tuple[int, Any]):
        index, source = item
        try:
            image = open_image(source)
            if image.width < 1 or image.height < 1:
                raise ValueError("empty image")
            return None
        except Exception as err:  # noqa: BLE001 - any decoding failure means: skip this file
            return index, _describe(source, index), f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        return [bad for bad in pool.map(check, enumerate(sources)) if bad is not None]


# ---------------------------------------------------------------------------------------------------------------------
# records: a `datasets.Dataset` whose image column is left undecoded (paths or bytes)
# ---------------------------------------------------------------------------------------------------------------------
def _has_metadata(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("metadata.jsonl", "metadata.csv", "metadata.parquet"))


def load_records(config: DataConfig, dataset: str | None = None):
    """Load an image folder or Hub dataset as a `datasets.Dataset` with the image column undecoded.

    A local folder with metadata.jsonl/csv is an `imagefolder` (its other columns come along); a folder whose images
    have `.txt` sidecar captions (kohya's format) gets a caption column from them; otherwise only images.
    """
    import datasets

    name = dataset or config.dataset
    folder = Path(name).expanduser()
    if folder.is_dir():
        image_files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if _has_metadata(folder):
            records = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
        elif image_files and any(p.with_suffix(".txt").is_file() for p in image_files):
            captions = [
                p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else None
                for p in image_files
            ]
            records = datasets.Dataset.from_dict(
                {config.image_column: [str(p) for p in image_files], config.caption_column: captions}
            )
            return records  # image column holds paths already
        else:
            if not image_files:
                raise ConfigError(
                    f"data.dataset: the folder {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            records = datasets.Dataset.from_dict({config.image_column: [str(p) for p in image_files]})
            return records
    elif name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name):
        raise ConfigError(f"data.dataset: the folder {name!r} does not exist")
    else:
        records = datasets.load_dataset(name, config.dataset_config_name, split=config.split)
    if config.image_column in records.column_names and isinstance(
        records.features.get(config.image_column), datasets.Image
    ):
        records = records.cast_column(config.image_column, datasets.Image(decode=False))
    return records


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def require_columns(records, columns: dict[str, str], source: str) -> None:
    """Fail with the list of available columns when a configured column is missing."""
    for column, option_name in columns.items():
        if column not in records.column_names:
            raise ConfigError(
                f"{option_name}: column {column!r} not found in {source!r}. Available columns: "
                f"{', '.join(records.column_names)}. Set {option_name}=<one of them>."
            )


class ImageRecords(torch.utils.data.Dataset):
    """Images (and chosen columns) from a `datasets.Dataset`, with unreadable images dropped and counted."""

    def __init__(self, records, config: DataConfig, channels: int, columns: Sequence[str] = (), source: str = ""):
        require_columns(records, {config.image_column: "data.image_column"}, source or config.dataset)
        if config.max_samples is not None:
            records = records.select(range(min(config.max_samples, len(records))))
        self.config = config
        self.channels = channels
        self.columns = list(columns)
        self.image_sources = records[config.image_column]
        self.column_values = {c: records[c] for c in self.columns}
        self.indices = list(range(len(records)))
        self.skipped: list[tuple[int, str, str]] = []
        self.decode_pixels = True  # False once a latent cache holds every image: get() then returns no pixels
        if config.verify_images:
            self.skipped = find_unreadable_images(self.image_sources)
            bad = {index for index, _, _ in self.skipped}
            self.indices = [i for i in self.indices if i not in bad]
            if self.skipped:
                names = ", ".join(name for _, name, _ in self.skipped[:5])
                logger.warning(
                    "skipped %d unreadable image(s) of %d: %s%s",
                    len(self.skipped),
                    len(records),
                    names,
                    " ..." if len(self.skipped) > 5 else "",
                )
        if not self.indices:
            raise ConfigError(f"data.dataset: {source or config.dataset!r} has no readable images")

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        row = self.indices[index]
        if self.decode_pixels:
            pixels, flipped = image_to_tensor(
                open_image(self.image_sources[row]),
                self.config.resolution,
                self.channels,
                rng,
                self.config.center_crop,
                self.config.random_flip,
            )
            example = {"pixel_values": pixels, "flipped": flipped, "row": row}
        else:  # cached latents (center crops only): the same draws as image_to_tensor, no image work
            example = {"flipped": bool(self.config.random_flip and rng.random() < 0.5), "row": row}
        example.update({c: self.column_values[c][row] for c in self.columns})
        return example


class DigitsRecords(torch.utils.data.Dataset):
    """The embedded digits as ready tensors (no decoding), with an integer 'label' and a caption-ready digit name."""

    def __init__(self, config: DataConfig, split: str = "all", exclude_labels: Sequence[int] = ()):
        from finetune.digits import load_digits_tensors

        images, labels = load_digits_tensors(config.resolution, split)
        if config.channels == 3:  # gray replicated: what RGB models (a Stable Diffusion VAE) take
            images = images.expand(-1, 3, -1, -1).contiguous()
        if exclude_labels:
            keep = ~torch.isin(labels, torch.tensor(list(exclude_labels)))
            images, labels = images[keep], labels[keep]
        if config.max_samples is not None:
            images, labels = images[: config.max_samples], labels[: config.max_samples]
        self.config, self.images, self.labels = config, images, labels
        self.channels = images.shape[1]
        self.skipped: list = []

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        pixels = self.images[index]
        flipped = bool(self.config.random_flip and rng.random() < 0.5)
        if flipped:
            pixels = pixels.flip(-1)
        return {"pixel_values": pixels, "flipped": flipped, "row": index, "label": int(self.labels[index])}


class TrainingExamples(torch.utils.data.Dataset):
    """Wraps a records source with repeats, per-example seeded randomness and an optional per-example transform.

    Each example gets `seed`: an integer drawn from (seed, epoch, index), from which the training step draws the
    example's noise and timestep.
    """

    def __init__(
        self,
        source,
        seed: int,
        repeats: int = 1,
        transform: Callable[[dict, np.random.Generator], dict] | None = None,
        min_length: int = 1,
    ):
        self.source, self.seed, self.transform = source, seed, transform
        # a dataset smaller than one global batch would give an empty epoch with drop_last: repeat it enough
        self.repeats = max(repeats, -(-min_length // max(len(source), 1)))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        example = self.source.get(index % len(self.source), rng)
        if self.transform is not None:
            example = self.transform(example, rng)
        example["seed"] = int(rng.integers(0, 2**62))
        return example


def collate_examples(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, turn numbers into tensors, keep strings and other values as lists."""
    batch: dict[str, Any] = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        elif isinstance(values[0], float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch


def build_image_source(
    config: DataConfig, columns: Sequence[str] = (), channels: int | None = None, exclude_labels: Sequence[int] = ()
):
    """The training images named by `data.dataset`: the digits (without the classes in `exclude_labels`) or an image
    folder / Hub dataset."""
    if config.dataset == "digits":
        return DigitsRecords(config, exclude_labels=exclude_labels)
    channels = channels or config.channels or 3
    records = load_records(config)
    required = {column: f"data.{_column_option(config, column)}" for column in columns}
    require_columns(records, required, config.dataset)
    return ImageRecords(records, config, channels, columns, source=config.dataset)


def _column_option(config: DataConfig, column: str) -> str:
    for option_name in ("caption_column", "label_column", "image_column"):
        if getattr(config, option_name) == column:
            return option_name
    return "columns"
