"""Images in one place: which files are images, how one is opened and converted, and what kind a pipeline is.

Everything that reads an image goes through here: the training data (`finetune.data`), evaluation folders
(`finetune.evaluate`), the captioner (`captioning`), the web app and the generation command (`pipelines`).

diffusers' own helpers were weighed and not used where they would change what we do:
`diffusers.utils.load_image` always opens lazily (a truncated file fails later, far from its name), converts to RGB
unless told otherwise (transparency turns black where `to_mode` puts it on white), cannot decode a large JPEG at
reduced scale, and fetches http(s) URLs, which our commands never mean; `make_image_grid` has no gaps between cells,
needs a full rows x cols grid and always makes RGB (see `finetune.outputs.image_grid`).
"""

from __future__ import annotations

import inspect
import io
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from finetune.buckets import Bucket, cover_geometry

EXIF_ORIENTATION = 0x0112
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# PIL warns (DecompressionBombWarning) when it opens an image over ~89 MP and refuses over ~179 MP. For training data
# data.max_image_pixels replaces that check: it is made on the header, before any decoding, and the image is reduced
# or skipped and counted; PIL's warning would only repeat it, its error is caught and counted as "too large". The
# warning is silenced around Image.open only (which reads just the header), under a lock: catch_warnings is not
# thread-safe and images are checked from a thread pool.
_OPEN_LOCK = threading.Lock()


def record_path(source: Any) -> str | None:
    """The file path of an undecoded image record (a path, or a `datasets` {'path', 'bytes'} dict)."""
    if isinstance(source, dict):
        return source.get("path")
    return str(source) if isinstance(source, (str, os.PathLike)) else None


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether the name ends in one of IMAGE_EXTENSIONS (any case); the file itself is not looked at."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------------------------------
# opening
# ---------------------------------------------------------------------------------------------------------------------
class ImageTooLarge(ValueError):
    """An image over data.max_image_pixels that cannot be decoded at a reduced scale; it is skipped, never decoded."""


def open_image(source: Any, max_pixels: int | None = None, header: bool = False) -> Image.Image:
    """Open a path, bytes, a `datasets` {'path', 'bytes'} record or a PIL image, fully decoded (raises if bad);
    with `header`, only opened (its size known, nothing decoded).

    An image over `max_pixels` raises ImageTooLarge before decoding, unless it is a JPEG that decodes at 1/2, 1/4 or
    1/8 scale under the limit (`Image.draft`: the DCT does the reduction, the full image never exists).
    """
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if not isinstance(source, (bytes, bytearray, str, os.PathLike)):
        raise ValueError(f"not an image: {type(source).__name__}")
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"too large: over PIL's decompression-bomb limit ({err})") from err
    try:
        if max_pixels is not None:
            fit_pixel_limit(image, max_pixels)
        if not header:
            image.load()  # decode now: truncated files fail here rather than in the training loop
    except BaseException:
        image.close()
        raise
    return image


def check_image(source: Any, max_pixels: int | None = None) -> tuple[int, int]:
    """Check that an image decodes, decoding as little as that needs; return its (w, h) as opened. PNG:
    `Image.verify` (every chunk read and its CRC checked, up to IEND: truncated or corrupt files fail, no pixel is
    inflated). JPEG: decoded at 1/8 scale (`draft`: the whole entropy-coded stream is read, so truncation fails, but
    the DCT skips 63/64 of the work). Every other format: decoded whole. Raises as `open_image` does."""
    image = open_image(source, max_pixels, header=True)
    try:
        size = image.size
        if size[0] < 1 or size[1] < 1:
            raise ValueError("empty image")
        if image.format == "PNG":
            try:
                image.verify()
            except OSError as err:
                if "truncated" in str(err).lower():  # (worded as the full decode words it)
                    raise OSError("image file is truncated (it ends before its last PNG chunk)") from err
                raise
        else:
            if image.format == "JPEG":
                image.draft(image.mode, (math.ceil(size[0] / 8), math.ceil(size[1] / 8)))
            image.load()
        return size
    finally:
        image.close()


def fit_pixel_limit(image: Image.Image, max_pixels: int) -> None:
    """Make a lazily opened image decode within `max_pixels` (JPEG draft mode), or raise ImageTooLarge."""
    width, height = image.size
    if width * height <= max_pixels:
        return
    if image.format == "JPEG":
        for scale in (2, 4, 8):
            if math.ceil(width / scale) * math.ceil(height / scale) <= max_pixels:
                image.draft(None, (width // scale, height // scale))
                if image.size[0] * image.size[1] <= max_pixels:
                    return
                break
    raise ImageTooLarge(
        f"too large: {width}x{height} = {width * height / 1e6:.1f} MP, over data.max_image_pixels = "
        f"{max_pixels / 1e6:.1f} MP (skipped, not decoded)"
    )


def load_image(
    path: str | os.PathLike, mode: str | None = None, *, draft_size: int | None = None, verify: bool = False
) -> Image.Image:
    """A file as a decoded PIL image, upright as its EXIF orientation says, in `mode` when one is given (else its
    own mode, transparency kept). PIL's errors pass through unchanged (callers word them for their users).

    `draft_size`: a JPEG may decode at 1/2, 1/4 or 1/8 scale as long as both sides stay >= draft_size (much faster
    for photos far larger than a model's input). `verify`: check the whole file first, which catches truncated and
    corrupt files that decoding alone accepts.
    """
    path = Path(path).expanduser()
    if verify:
        with Image.open(path) as probe:
            probe.verify()
    with Image.open(path) as image:
        if draft_size:
            image.draft(mode or "RGB", (draft_size, draft_size))
        image.load()
        upright = ImageOps.exif_transpose(image)  # a new image either way: safe to use once the file is closed
        return upright.convert(mode) if mode else upright


# ---------------------------------------------------------------------------------------------------------------------
# converting
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


# ---------------------------------------------------------------------------------------------------------------------
# what a pipeline makes
# ---------------------------------------------------------------------------------------------------------------------
PIPELINE_KINDS = ("text", "inpaint", "image-to-image", "class", "unconditional")


def pipeline_kind(pipe) -> str:
    """Which inputs a diffusers pipeline's `__call__` takes: 'inpaint' (a mask), 'image-to-image' (an image and a
    prompt), 'text' (a prompt: Stable Diffusion, SDXL), 'class' (class labels) or 'unconditional' (a batch size:
    DDPM/DDIM, distilled students); ValueError for anything else."""
    parameters = inspect.signature(pipe.__call__).parameters
    if "mask_image" in parameters:
        return "inpaint"
    if "prompt" in parameters:
        return "image-to-image" if "image" in parameters else "text"
    if "class_labels" in parameters:
        return "class"
    if "batch_size" in parameters:
        return "unconditional"
    raise ValueError(
        f"{type(pipe).__name__} is not a pipeline difftune can run (text-to-image, inpainting, image-to-image, "
        "class-conditional or DDPM/DDIM)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# an image as a training tensor: cut (square or bucket), flipped, with SDXL's size conditioning
# ---------------------------------------------------------------------------------------------------------------------
def crop_geometry(
    size: tuple[int, int], resolution: int, rng: np.random.Generator, center_crop: bool = True
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where an image of `size` (w, h) is cut: the size it is resized to (short side = resolution) and the crop's
    (left, top) in it. Random crops draw from `rng` exactly as they always have (left, then top)."""
    width, height = size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if center_crop:
        left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    else:
        left = int(rng.integers(0, new_size[0] - resolution + 1))
        top = int(rng.integers(0, new_size[1] - resolution + 1))
    return new_size, (left, top)


def size_conditioning(
    size: tuple[int, int],
    new_size: tuple[int, int],
    corner: tuple[int, int],
    resolution: int | Bucket,
    flipped: bool,
) -> dict[str, torch.Tensor]:
    """What SDXL's micro-conditioning needs of an example (Podell et al. 2023, section 2.2): the original (h, w), the
    crop's (top, left) in the resized image (mirrored when the crop is flipped, as the diffusers SDXL script does),
    and the target (h, w): a `resolution` square, or a bucket's (w, h)."""
    target_w, target_h = (resolution, resolution) if isinstance(resolution, int) else resolution
    left, top = corner
    if flipped:
        left = new_size[0] - left - target_w
    return {
        "original_size": torch.tensor([size[1], size[0]]),
        "crop_top_left": torch.tensor([top, left]),
        "target_size": torch.tensor([target_h, target_w]),
    }


def image_to_tensor(
    image: Image.Image,
    resolution: int,
    channels: int,
    rng: np.random.Generator,
    center_crop: bool = True,
    random_flip: bool = False,
    sizes: dict | None = None,
    bucket: Bucket | None = None,
) -> tuple[torch.Tensor, bool]:
    """Resize the short side to `resolution`, crop a square, maybe flip; return ([C, R, R] in [-1, 1], flipped).
    With a bucket (w, h), resize to cover it and crop it instead ([C, h, w]; `finetune.buckets.cover_geometry`).
    With a dict as `sizes`, it receives the example's size conditioning (`size_conditioning`)."""
    image = to_mode(image, channels)
    original = image.size
    if bucket is None:
        new_size, (left, top) = crop_geometry(original, resolution, rng, center_crop)
        target = (resolution, resolution)
    else:
        new_size, (left, top) = cover_geometry(original, bucket, rng, center_crop)
        target = bucket
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    image = image.crop((left, top, left + target[0], top + target[1]))
    flipped = bool(random_flip and rng.random() < 0.5)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array).unsqueeze(0) if channels == 1 else torch.from_numpy(array).permute(2, 0, 1)
    if flipped:
        tensor = tensor.flip(-1)
    if sizes is not None:
        sizes.update(size_conditioning(original, new_size, (left, top), bucket or resolution, flipped))
    return tensor.contiguous(), flipped
