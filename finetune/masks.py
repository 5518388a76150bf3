"""Masks of the data layer: the inpainting masks every example of an inpainting model trains with.

An inpainting model (a UNet that also takes a mask and the masked image's latents, e.g.
stable-diffusion-v1-5/stable-diffusion-inpainting or an SDXL inpainting folder) trains with any text-to-image method;
each example gets a mask (white = repaint): drawn from the example's own seeded generator (random rectangles and
ellipses, `random_mask`), or read from the user's masks (`mask_data_dir`: a mask with the image's file name;
`mask_column`: a metadata column naming the mask file), resized, cropped and flipped with its image. Class images of
prior preservation always get random masks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from finetune.config import ConfigError, option
from finetune.imaging import IMAGE_EXTENSIONS, image_to_tensor, open_image, record_path

logger = logging.getLogger(__name__)

ELLIPSE_FILL = math.pi / 4  # an ellipse covers pi/4 of its bounding box


@dataclass
class InpaintingMaskOptions:
    """The masks of an inpainting model's examples (ignored by text-to-image models, refused when set for one)."""

    mask_data_dir: str | None = option(
        None,
        "Inpainting models: folder of user masks (white = repaint), one per training image with the image's file "
        "name (any image extension). None: random masks.",
    )
    mask_column: str | None = option(
        None, "Inpainting models: metadata column naming each image's mask file. None: random masks."
    )
    mask_shapes: list[Literal["rectangle", "ellipse"]] = option(
        default_factory=lambda: ["rectangle", "ellipse"], help="Inpainting models: shapes of random masks."
    )
    mask_min_area: float = option(0.1, "Inpainting models: smallest random mask, as a fraction of the image area.")
    mask_max_area: float = option(
        0.5, "Inpainting models: largest random mask, as a fraction of the image area (ellipses <= 0.75)."
    )
    full_mask_probability: float = option(
        0.1, "Inpainting models: probability of masking the whole image (it also learns to paint from scratch)."
    )
    validation_image: str | None = option(
        None, "Inpainting models: image inpainted for the sample grids. None: the first training image."
    )
    validation_mask: str | None = option(
        None,
        "Inpainting models: mask of validation_image (white = repaint). None: its user mask, or a centred square.",
    )

    def __post_init__(self):
        if not self.mask_shapes:
            raise ConfigError("mask_shapes must name at least one shape: rectangle, ellipse")
        if not 0 < self.mask_min_area <= self.mask_max_area <= 1:
            raise ConfigError(
                f"need 0 < mask_min_area <= mask_max_area <= 1, got {self.mask_min_area} and {self.mask_max_area}"
            )
        if "ellipse" in self.mask_shapes and self.mask_max_area > 0.75:
            raise ConfigError(
                f"mask_max_area={self.mask_max_area}: an ellipse inside the image covers at most pi/4 of it; use "
                "<= 0.75, or mask_shapes=[rectangle]"
            )
        if not 0 <= self.full_mask_probability <= 1:
            raise ConfigError(f"full_mask_probability must be in [0, 1], got {self.full_mask_probability}")
        if self.mask_data_dir and self.mask_column:
            raise ConfigError("set one of mask_data_dir and mask_column, not both")

    def user_masks_given(self) -> bool:
        return bool(self.mask_data_dir or self.mask_column or self.validation_mask or self.validation_image)


def random_mask(
    height: int,
    width: int,
    rng: np.random.Generator,
    shapes: tuple[str, ...] | list[str] = ("rectangle", "ellipse"),
    min_area: float = 0.1,
    max_area: float = 0.5,
    full_probability: float = 0.0,
) -> np.ndarray:
    """A [height, width] float32 mask in {0, 1} (1 = repaint): the whole image with `full_probability`, else one
    rectangle or ellipse covering a uniform fraction in [min_area, max_area] of the image (up to pixel rounding), with
    a log-uniform aspect ratio in [1/2, 2] (squeezed where the image is too narrow) and a uniform position inside
    the image. Every draw comes from `rng`."""
    if full_probability and rng.random() < full_probability:
        return np.ones((height, width), np.float32)
    shape = shapes[int(rng.integers(len(shapes)))]
    area = rng.uniform(min_area, max_area) * height * width
    box_area = area / ELLIPSE_FILL if shape == "ellipse" else area
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # width / height
    box_w = min(math.sqrt(box_area * aspect), width)
    box_h = min(box_area / box_w, height)
    box_w = min(box_area / box_h, width)
    box_w, box_h = max(1, min(width, round(box_w))), max(1, min(height, round(box_h)))
    left = int(rng.integers(0, width - box_w + 1))
    top = int(rng.integers(0, height - box_h + 1))
    mask = np.zeros((height, width), np.float32)
    if shape == "rectangle":
        mask[top : top + box_h, left : left + box_w] = 1.0
    else:
        ys = (np.arange(height, dtype=np.float64) + 0.5 - top - box_h / 2) / (box_h / 2)
        xs = (np.arange(width, dtype=np.float64) + 0.5 - left - box_w / 2) / (box_w / 2)
        mask[(ys[:, None] ** 2 + xs[None, :] ** 2) <= 1.0] = 1.0
    return mask


def load_mask(
    source: Any, resolution: int, flipped: bool = False, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """A user mask as [1, R, R] in {0, 1}, resized and centre-cropped like its image (white = 1 = repaint); with
    `size` (w, h), an aspect-ratio bucket's, resized to cover it and centre-cropped to it ([1, h, w])."""
    bucket = None if size is None or size == (resolution, resolution) else tuple(size)
    rng = np.random.default_rng(0)  # unused: user masks need centre crops, which draw nothing
    pixels, _ = image_to_tensor(open_image(source), resolution, 1, rng, center_crop=True, bucket=bucket)
    mask = (pixels > 0).float()  # [-1, 1]: brighter than mid-grey is white
    return mask.flip(-1) if flipped else mask


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """[C, H, W] in [-1, 1] (C = 3) or {0, 1} masks (C = 1) -> PIL."""
    if tensor.shape[0] == 1:
        return Image.fromarray((tensor[0].numpy() * 255).round().astype(np.uint8), mode="L")
    array = ((tensor.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def find_user_masks(records, folder: Path | None, options: InpaintingMaskOptions, section: str) -> dict[int, Any]:
    """Row of `records` (ImageRecords) -> mask source, checked before training: every image has a readable mask of
    its own size. `folder` resolves relative paths of `mask_column`."""
    if not (options.mask_data_dir or options.mask_column):
        return {}
    masks, missing, wrong = {}, [], []
    if options.mask_data_dir:
        mask_folder = Path(options.mask_data_dir).expanduser()
        if not mask_folder.is_dir():
            raise ConfigError(f"{section}.mask_data_dir: the folder {str(mask_folder)!r} does not exist")
        by_stem = {p.stem: p for p in sorted(mask_folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS}
    for row in records.indices:
        name = record_path(records.image_sources[row]) or f"row {row}"
        if options.mask_data_dir:
            source = by_stem.get(Path(name).stem)
        else:
            source = records.column_values[options.mask_column][row]
            if isinstance(source, str) and not Path(source).is_absolute() and folder is not None:
                source = folder / source
        if source is None:
            missing.append(Path(name).name)
            continue
        try:
            mask_size = open_image(source).size
        except Exception as err:  # noqa: BLE001 - report every bad mask at once
            wrong.append(f"{Path(name).name}: unreadable mask ({type(err).__name__})")
            continue
        image_size = open_image(records.image_sources[row]).size
        if mask_size != image_size:
            wrong.append(
                f"{Path(name).name}: mask {mask_size[0]}x{mask_size[1]}, image {image_size[0]}x{image_size[1]}"
            )
        masks[row] = source
    where = f"{section}.mask_data_dir" if options.mask_data_dir else f"column {options.mask_column!r}"
    if missing:
        raise ConfigError(
            f"{section}: {len(missing)} training image(s) have no mask in {where} ({', '.join(missing[:5])}); every "
            "image needs one (same file name in mask_data_dir), or use random masks"
        )
    if wrong:
        raise ConfigError(f"{section}: bad masks in {where}: {'; '.join(wrong[:5])}")
    logger.info("user masks for %d training images from %s", len(masks), where)
    return masks


class InpaintingMasks:
    """Each example's inpainting mask: its user mask (resized, cropped and flipped with the image), else a random
    one drawn from the example's own generator (so a resumed run and N processes draw the same masks)."""

    def __init__(self, options: InpaintingMaskOptions, resolution: int, user_masks: dict[int, Any]):
        self.options, self.resolution, self.user_masks = options, resolution, user_masks

    def mask_for(
        self, row: int, flipped: bool, is_class: bool, rng: np.random.Generator, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """[1, h, w] in {0, 1} (1 = repaint), of the example's size (w, h): its aspect-ratio bucket, or the
        data.resolution square when `size` is None."""
        width, height = size or (self.resolution, self.resolution)
        user_mask = None if is_class else self.user_masks.get(row)
        if user_mask is not None:
            return load_mask(user_mask, self.resolution, flipped=flipped, size=(width, height))
        options = self.options
        mask = random_mask(
            height,
            width,
            rng,
            options.mask_shapes,
            options.mask_min_area,
            options.mask_max_area,
            options.full_mask_probability,
        )
        return torch.from_numpy(mask)[None]

    def validation_pair(self, records, size: tuple[int, int] | None = None) -> tuple[Image.Image, Image.Image]:
        """The image and mask of the sample grids, cut to `size` (w, h; default the data.resolution square):
        validation_image/mask, or the first training image with its own mask or a centred rectangle."""
        resolution, options = self.resolution, self.options
        width, height = size or (resolution, resolution)
        bucket = None if (width, height) == (resolution, resolution) else (width, height)
        row = records.indices[0]
        image_source = options.validation_image or records.image_sources[row]
        image, _ = image_to_tensor(open_image(image_source), resolution, 3, np.random.default_rng(0), bucket=bucket)
        if options.validation_mask:
            mask = load_mask(options.validation_mask, resolution, size=(width, height))
        elif not options.validation_image and row in self.user_masks:
            mask = load_mask(self.user_masks[row], resolution, size=(width, height))
        else:
            mask = torch.zeros(1, height, width)
            mask[:, height // 4 : height * 3 // 4, width // 4 : width * 3 // 4] = 1.0
        return tensor_to_image(image), tensor_to_image(mask)

    @staticmethod
    def class_generation_inputs(num_images: int, resolution: int) -> dict[str, Any]:
        """Inpainting pipeline arguments that paint a whole image from noise (class images of prior preservation)."""
        size = (resolution, resolution)
        return {
            "image": [Image.new("RGB", size, (127, 127, 127))] * num_images,
            "mask_image": [Image.new("L", size, 255)] * num_images,  # everything repainted
            "strength": 1.0,
        }


# ---------------------------------------------------------------------------------------------------------------------
# loss masks (data.masked_loss): where the loss counts
# ---------------------------------------------------------------------------------------------------------------------
LOSS_MASK_SUFFIX = ".mask"  # <name>.mask.png beside <name>.jpg


def is_loss_mask_file(name: str) -> bool:
    """`photo.mask.png`: a loss mask beside `photo.<ext>`, never a training image of its own."""
    path = Path(name)
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.stem.lower().endswith(LOSS_MASK_SUFFIX)


ALPHA = "alpha"  # the mask is the image's own alpha channel


class LossMasks:
    """Each training image's loss mask (white = counts): a file named in the metadata column, a `<name>.mask.png`
    beside the image, or the image's alpha channel; none: the whole image counts. Cut with the image: the same
    resize, crop (its draws replayed from a copy of the example's generator), bucket and flip."""

    def __init__(self, records, config, sources: dict[int, Any]):
        self.records, self.config, self.sources = records, config, sources

    @classmethod
    def find(cls, records, config) -> LossMasks:
        """Every row's mask, checked before training: a listed or sidecar mask must be readable and of its image's
        size (one line naming the files otherwise); the counts go to the log."""
        folder = Path(records.source_name).expanduser()
        column = config.loss_mask_column
        listed = records.column_values.get(column)
        sources, wrong, counts = {}, [], {"file": 0, "alpha": 0, "none": 0}
        for row in records.indices:
            image_source = records.image_sources[row]
            name = record_path(image_source)
            source = None
            value = listed[row] if listed is not None else None
            if isinstance(value, str) and value:
                source = Path(value) if Path(value).is_absolute() else folder / value
            elif name:
                beside = sorted(Path(name).parent.glob(f"{Path(name).stem}{LOSS_MASK_SUFFIX}.*"))
                source = next((p for p in beside if p.suffix.lower() in IMAGE_EXTENSIONS), None)
            if source is not None:
                try:
                    mask_size = open_image(source).size
                    image_size = open_image(image_source).size
                except Exception as err:  # noqa: BLE001 - every bad mask is reported at once
                    wrong.append(f"{Path(str(source)).name}: unreadable ({type(err).__name__})")
                    continue
                if mask_size != image_size:
                    wrong.append(f"{Path(str(source)).name}: {mask_size[0]}x{mask_size[1]}, its image {image_size}")
                sources[row] = source
                counts["file"] += 1
            elif _has_alpha(image_source):
                sources[row] = ALPHA
                counts["alpha"] += 1
            else:
                counts["none"] += 1
        if wrong:
            raise ConfigError(f"data.masked_loss: bad loss masks in {records.source_name!r}: {'; '.join(wrong[:5])}")
        logger.info(
            "masked loss: %d mask file(s), %d alpha channel(s), %d image(s) without a mask (trained everywhere) in %s",
            counts["file"],
            counts["alpha"],
            counts["none"],
            records.source_name,
        )
        return cls(records, config, sources)

    def cut(self, row: int, rng: np.random.Generator, bucket=None) -> torch.Tensor:
        """[1, H, W] in [0, 1], cut exactly as the row's image (`rng`: a copy of the generator before its cut)."""
        config = self.config
        source = self.sources.get(row)
        if source is None:
            width, height = bucket or (config.resolution, config.resolution)
            return torch.ones(1, height, width)
        if source == ALPHA:
            image = ImageOps.exif_transpose(open_image(self.records.image_sources[row]))
            mask = image.convert("RGBA").getchannel("A")
        else:
            mask = ImageOps.exif_transpose(open_image(source)).convert("L")
        resolution, crop, flip = config.resolution, config.center_crop, config.random_flip
        pixels, _ = image_to_tensor(mask, resolution, 1, rng, crop, flip, None, bucket)
        return ((pixels + 1) / 2).clamp(0, 1)


def _has_alpha(source: Any) -> bool:
    try:
        image = open_image(source)
    except Exception:  # noqa: BLE001 - unreadable images are the data layer's to count
        return False
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def pixel_loss_weights(loss_mask: torch.Tensor, size: tuple[int, int], unmasked_weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights from image-space masks [B, 1, H, W]: the mask averaged over each latent pixel's
    area, the outside weighted `unmasked_weight` (kohya's masked loss, with a floor)."""
    mask = torch.nn.functional.interpolate(loss_mask.float(), size=size, mode="area")
    return unmasked_weight + (1.0 - unmasked_weight) * mask
