"""Images to score, as float [N, C, H, W] in [-1, 1]: sampled from a pipeline, or read from a folder."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from finetune.digits_classifier import NUM_CLASSES
from finetune.imaging import IMAGE_EXTENSIONS, is_image_file, open_image, to_mode

# --------------------------------------------------------------------------------------------------------------------
# Sampling pipelines and reading image folders
# --------------------------------------------------------------------------------------------------------------------


def pipeline_accepts_class_labels(pipeline) -> bool:
    """Whether the pipeline's `__call__` takes `class_labels` (the class-conditional pipelines in `pipelines/`)."""
    return "class_labels" in inspect.signature(pipeline.__call__).parameters


def _images_to_tensor(images) -> torch.Tensor:
    """A pipeline's output images (torch NCHW or numpy NHWC in [0, 1], or PIL images) -> float NCHW in [-1, 1]."""
    if isinstance(images, list) and images and not isinstance(images[0], (np.ndarray, torch.Tensor)):
        images = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
        if images.ndim == 3:
            images = images[..., None]
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return images.float().cpu() * 2 - 1


def sample_pipeline_images(
    pipeline,
    num_samples: int,
    steps: int = 50,
    batch_size: int = 128,
    seed: int = 0,
    class_labels: torch.Tensor | Sequence[int] | None = None,
    pipeline_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`num_samples` images in [-1, 1] [N, C, H, W] and the class labels asked for (None if unconditional).

    A class-conditional pipeline without `class_labels` gets the classes in turn (0, 1, ..., 9, 0, ...).
    `pipeline_kwargs` go to every pipeline call (e.g. guidance_scale). Sampling uses its own CPU generator, so the
    caller's (e.g. a training loop's) random stream is not consumed.
    """
    conditional = pipeline_accepts_class_labels(pipeline)
    if class_labels is not None and not conditional:
        raise ValueError(f"{type(pipeline).__name__} takes no class_labels but class labels were given")
    if conditional:
        if class_labels is None:
            class_labels = torch.arange(num_samples) % NUM_CLASSES
        class_labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if len(class_labels) != num_samples:
            raise ValueError(f"got {len(class_labels)} class labels for {num_samples} samples")
    # class-conditional pipelines make one image per label and take no batch_size
    takes_batch_size = "batch_size" in inspect.signature(pipeline.__call__).parameters
    generator = torch.Generator().manual_seed(seed)
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        # "np" rather than "pt": every diffusers image pipeline supports it, and it comes back as NHWC in [0, 1]
        kwargs = {"generator": generator, "num_inference_steps": steps, "output_type": "np", **(pipeline_kwargs or {})}
        if takes_batch_size:
            kwargs["batch_size"] = count
        if conditional:
            kwargs["class_labels"] = class_labels[start : start + count].tolist()
        output = pipeline(**kwargs)
        images.append(_images_to_tensor(output.images if hasattr(output, "images") else output[0]))
    return torch.cat(images), class_labels


def load_image_folder(
    folder: str | Path, size: int | tuple[int, int] | None = None, max_size: int | None = None
) -> torch.Tensor:
    """Every image in `folder` as float [N, C, H, W] in [-1, 1]; grayscale files give C=1, any colour file C=3.

    Images are resized (antialiased bilinear) to `size` (an int means square), else to the first image's size; a size
    above `max_size` becomes `max_size` x `max_size` (the feature extractors resize to a square anyway).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(path for path in folder.iterdir() if is_image_file(path))
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    pil_images = [open_image(path) for path in paths]
    grayscale = all(image.mode in ("L", "1", "I", "I;16", "F") for image in pil_images)
    if size is None:
        target = (pil_images[0].height, pil_images[0].width)
    else:
        target = (size, size) if isinstance(size, int) else tuple(size)
    if max_size is not None and max(target) > max_size:
        target = (max_size, max_size)
    tensors = []
    for image in pil_images:
        # upright, 16-bit scaled rather than clipped, transparency on white: as the training data is read
        array = np.asarray(to_mode(image, 1 if grayscale else 3), dtype=np.float32) / 127.5 - 1
        image.close()
        tensor = torch.from_numpy(array).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)[None]
        if tuple(tensor.shape[-2:]) != target:
            tensor = F.interpolate(tensor, size=target, mode="bilinear", align_corners=False, antialias=True)
        tensors.append(tensor)
    return torch.cat(tensors)
