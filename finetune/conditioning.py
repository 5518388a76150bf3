"""Conditioning images of the data layer: the control image each training image of a ControlNet comes with.

A conditioning image is named by `data.conditioning_image_column` (a path relative to an image folder in its
metadata, or an image column of a Hub dataset such as fusing/fill50k). It must be readable and of its image's size
(checked for every row before any model loads); it is cut exactly as its image: the same resize, crop (the draws
replayed from a copy of the example's generator), aspect-ratio bucket and flip. It stays in pixel space, in [0, 1]
as diffusers' ControlNet pipelines feed it (their control image processor does not normalise), never through the VAE.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.config import ConfigError
from finetune.imaging import image_to_tensor, open_image, record_path

logger = logging.getLogger(__name__)


def conditioning_source(value: Any, folder: Path | None) -> Any:
    """Where a row's conditioning image is: a path (relative ones resolved in the image folder), or a `datasets`
    record / bytes as they are; None when the row names none."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        path = Path(value)
        return path if path.is_absolute() or folder is None else folder / path
    return value


def listed_conditioning_files(values: list[Any]) -> set[str]:
    """The relative paths a folder's metadata names as conditioning images (never training images themselves)."""
    return {v.strip() for v in values if isinstance(v, str) and v.strip()}


class ConditioningImages:
    """Each training row's conditioning image, found and checked once, cut with its image on demand."""

    def __init__(self, records, config, sources: dict[int, Any]):
        self.records, self.config, self.sources = records, config, sources

    @classmethod
    def find(cls, records, config) -> ConditioningImages:
        """Every row's conditioning image, checked before training: a row without one, a file that does not exist
        or cannot be read, or one whose size is not its image's, is one line naming the files and the fix."""
        column = config.conditioning_image_column
        folder = Path(records.source_name).expanduser()
        folder = folder if folder.is_dir() else None
        values = records.column_values[column]
        sources, missing, unreadable, wrong = {}, [], [], []
        for row in records.indices:
            name = Path(record_path(records.image_sources[row]) or f"row {row}").name
            source = conditioning_source(values[row], folder)
            if source is None:
                missing.append(name)
                continue
            where = Path(record_path(source) or "").name or f"row {row}"
            if isinstance(source, Path) and not source.is_file():
                unreadable.append(f"{name}: {str(source)!r} does not exist")
                continue
            try:
                with open_image(source, header=True) as image:
                    size = image.size
                with open_image(records.image_sources[row], header=True) as image:
                    image_size = image.size
            except Exception as err:  # noqa: BLE001 - every bad file is reported at once
                unreadable.append(f"{where}: unreadable ({type(err).__name__})")
                continue
            if size != image_size:
                wrong.append(f"{where} is {size[0]}x{size[1]}, its image {name} {image_size[0]}x{image_size[1]}")
            sources[row] = source
        option, source_name = "data.conditioning_image_column", records.source_name
        if missing:
            raise ConfigError(
                f"{option}: {len(missing)} training image(s) of {source_name!r} have no conditioning image in column "
                f"{column!r} ({', '.join(missing[:5])}); give every image one, or leave those images out"
            )
        if unreadable:
            raise ConfigError(
                f"{option}: conditioning images of {source_name!r} cannot be read: {'; '.join(unreadable[:5])}"
                f"{f' (+{len(unreadable) - 5} more)' if len(unreadable) > 5 else ''}; fix the paths (relative to the "
                "dataset folder)"
            )
        if wrong:
            raise ConfigError(
                f"{option}: a conditioning image must have its image's size (it is resized and cropped with it): "
                f"{'; '.join(wrong[:5])}{f' (+{len(wrong) - 5} more)' if len(wrong) > 5 else ''}"
            )
        logger.info("conditioning images: %d from column %r of %s", len(sources), column, source_name)
        return cls(records, config, sources)

    def cut(self, row: int, rng: np.random.Generator, bucket=None) -> torch.Tensor:
        """[3, H, W] in [0, 1], cut exactly as the row's image (`rng`: a copy of the generator before its cut)."""
        config = self.config
        image = open_image(self.sources[row], config.max_image_pixels)
        resolution, crop, flip = config.resolution, config.center_crop, config.random_flip
        pixels, _ = image_to_tensor(image, resolution, 3, rng, crop, flip, None, bucket)
        return ((pixels + 1) / 2).clamp(0, 1)
