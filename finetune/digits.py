"""The embedded real dataset: scikit-learn's bundled 8x8 handwritten digits, upsampled to a training resolution.

Everything that trains or evaluates on digits goes through these two functions, so every part of difftune sees the
same pixels, the same [-1, 1] range and the same train / held-out split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "test", "all")


def load_digits_tensors(resolution: int = 16, split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as float images in [-1, 1] of shape [N, 1, resolution, resolution] and int64 labels [N].

    `split` is "train" (80%), "test" (the 20% held out, stratified by class, fixed seed) or "all".
    """
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {SPLITS}, got {split!r}")
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    labels = torch.from_numpy(digits.target.astype(np.int64))
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    if split != "all":
        train_idx, test_idx = digits_split_indices(labels.numpy())
        idx = torch.from_numpy(train_idx if split == "train" else test_idx)
        images, labels = images[idx], labels[idx]
    return images.contiguous(), labels


def digits_split_indices(
    labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train / held-out index split of the digits."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.array(train)), np.sort(np.array(test))


def thicken_strokes(images: torch.Tensor, width: int = 3) -> torch.Tensor:
    """The "thick strokes" style of the fine-tuning benchmark: grey-level dilation of bright strokes on a dark
    background (a `width` x `width` max filter) of images [N, C, H, W] in [-1, 1]."""
    return F.max_pool2d(images, kernel_size=width, stride=1, padding=width // 2)
