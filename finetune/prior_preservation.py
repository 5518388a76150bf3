"""Prior preservation (Ruiz et al. 2022, section 3.3) as a data wrapper any text-to-image method can use: the
training set becomes a mix of the method's own examples and class images, each carrying the loss weight that makes
the expected loss diffusers' `mse(instance) + prior_loss_weight * mse(class)`; and the class images a folder lacks,
each generated from its own seed so that neither the number of processes nor an interruption changes them.

How the weights work (kohya's regularisation-image scheme, with diffusers' expectation): an epoch holds M examples of
each set (M = the larger set; the other one repeats), shuffled together; instance examples weigh INSTANCE_WEIGHT = 2,
class examples 2 x prior_loss_weight. A batch is a random mix with half of each on average, so E[mean(w * mse)] =
E[mse_instance] + prior_loss_weight * E[mse_class].
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.imaging import IMAGE_EXTENSIONS

CLASS_IMAGE_PATTERN = "class_{index}.png"
INSTANCE_WEIGHT = 2.0  # 2 and 2 x prior_loss_weight make the expected loss diffusers' (see the module docstring)


def class_image_files(folder: Path) -> list[Path]:
    """Image files directly in the class folder, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def missing_class_indices(taken_names: set[str], count: int) -> list[int]:
    """The first `count` indices i whose `class_<i>.png` is not in the folder: an interrupted generation that wrote
    some of them resumes with exactly the others."""
    indices, i = [], 0
    while len(indices) < count:
        if CLASS_IMAGE_PATTERN.format(index=i) not in taken_names:
            indices.append(i)
        i += 1
    return indices


def class_image_seed(seed: int, index: int) -> int:
    """The seed of class image `index`: the same whichever process generates it, in whatever batch."""
    return int(np.random.default_rng([seed, index, 0xC1A55]).integers(0, 2**62))


class PriorPreservationExamples(torch.utils.data.Dataset):
    """Instance and class examples, M of each per epoch (M = the larger set; the other one repeats), with the loss
    weights of the module docstring. Class rows are numbered after all instance rows, so latent-cache keys differ."""

    def __init__(self, instance: Any, classes: Any, instance_repeats: int, prior_loss_weight: float):
        # any two record sources (finetune.data: `get(index, rng)`, `len`, `decode_pixels`, `skipped`)
        self.instance, self.classes = instance, classes
        self.per_set = max(len(instance) * instance_repeats, len(classes))
        self.row_offset = len(getattr(instance, "image_sources", range(len(instance))))
        self.class_weight = INSTANCE_WEIGHT * prior_loss_weight
        self.skipped = instance.skipped

    def __len__(self) -> int:
        return 2 * self.per_set

    @property
    def decode_pixels(self) -> bool:
        return self.instance.decode_pixels

    @decode_pixels.setter
    def decode_pixels(self, value: bool) -> None:
        self.instance.decode_pixels = self.classes.decode_pixels = value

    # -- aspect-ratio buckets (finetune/buckets.py): instance and class images each in their own bucket ---------------
    def can_use_buckets(self) -> bool:
        return all(hasattr(s, "use_buckets") and s.can_use_buckets() for s in (self.instance, self.classes))

    def use_buckets(self, plan) -> None:
        self.instance.use_buckets(plan)
        self.classes.use_buckets(plan)

    def example_buckets(self) -> list:
        """The bucket of each index, in `get`'s order: M instance examples, then M class examples."""
        instance, classes = self.instance.example_buckets(), self.classes.example_buckets()
        return [instance[i % len(instance)] for i in range(self.per_set)] + [
            classes[i % len(classes)] for i in range(self.per_set)
        ]

    def bucket_images(self) -> Counter:
        return self.instance.bucket_images() + self.classes.bucket_images()

    def get(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        if index < self.per_set:
            example = self.instance.get(index % len(self.instance), rng)
            example.update(prior=False, loss_weight=INSTANCE_WEIGHT)
        else:
            example = self.classes.get((index - self.per_set) % len(self.classes), rng)
            example.update(row=example["row"] + self.row_offset, prior=True, loss_weight=self.class_weight)
        return example
