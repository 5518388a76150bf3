"""Fréchet distance and KID of feature sets against a fixed reference set (torchmetrics does the maths), and
`DigitsEvaluator`, which scores samples on the features of the digits classifier (`finetune.digits_classifier`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from finetune.digits import load_digits_tensors
from finetune.digits_classifier import NUM_CLASSES, load_digits_classifier

CONFIDENCE_THRESHOLD = 0.9


# --------------------------------------------------------------------------------------------------------------------
# Fréchet distance and KID against a fixed reference set (torchmetrics does the maths)
# --------------------------------------------------------------------------------------------------------------------


class _PrecomputedFeatures(nn.Module):
    """Identity "feature extractor" so torchmetrics' metric states can be fed features computed once elsewhere."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # read by FrechetInceptionDistance instead of probing a dummy image

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


class FeatureDistance:
    """Fréchet distance (Heusel et al. 2017) and KID (Bińkowski et al. 2018) of feature sets against one reference set.

    The reference statistics are accumulated once; each call only adds the new set. KID draws random subsets, so it
    runs under a fixed seed in a forked RNG: scores are reproducible and the caller's random stream is untouched.
    """

    def __init__(
        self, reference_features: torch.Tensor, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0
    ):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        if reference_features.ndim != 2 or len(reference_features) < 2:
            shape = tuple(reference_features.shape)
            raise ValueError(f"need at least 2 reference feature vectors [N, D], got {shape}")
        self.num_reference = len(reference_features)
        self.kid_subset_size = kid_subset_size
        self.seed = seed
        num_features = reference_features.shape[1]
        self._fid = FrechetInceptionDistance(feature=_PrecomputedFeatures(num_features), reset_real_features=False)
        with warnings.catch_warnings():
            # torchmetrics warns that KID keeps every feature vector; that is the point here (a few thousand vectors)
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self._kid = KernelInceptionDistance(
                feature=_PrecomputedFeatures(num_features),
                subsets=kid_subsets,
                subset_size=kid_subset_size,
                reset_real_features=False,
            )
        reference_features = reference_features.detach().cpu().double()
        self._fid.update(reference_features, real=True)
        self._kid.update(reference_features, real=True)

    def __call__(self, features: torch.Tensor) -> dict[str, float]:
        """{"fd", "kid_mean", "kid_std"} of `features` [N, D] against the reference; NaN for non-finite features."""
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"need at least 2 feature vectors [N, D] to compare, got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            return {"fd": math.nan, "kid_mean": math.nan, "kid_std": math.nan}
        features = features.detach().cpu().double()
        self._fid.reset()  # keeps the reference statistics (reset_real_features=False)
        self._fid.update(features, real=False)
        fd = self._fid.compute().item()
        self._kid.reset()
        self._kid.update(features, real=False)
        # KID is unbiased for any subset size, so the subsets shrink to what both sets can supply
        self._kid.subset_size = min(self.kid_subset_size, self.num_reference, len(features))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            kid_mean, kid_std = self._kid.compute()
        return {"fd": fd, "kid_mean": kid_mean.item(), "kid_std": kid_std.item()}


def _seeded_subset(images: torch.Tensor, count: int | None, seed: int) -> torch.Tensor:
    """`count` images drawn without replacement (all of them when count is None or too large)."""
    if count is None or count >= len(images):
        return images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:count]]


def heldout_count(available: int, wanted: int | None) -> int:
    """How many held-out images a baseline for `wanted` samples uses: as many, or all there are."""
    return available if wanted is None else max(2, min(int(wanted), available))


def held_out_draw(available: int, count: int, seed: int) -> torch.Tensor:
    """Indices of `count` of `available` held-out images (a seeded draw; all of them, in order, when count is all)."""
    if count >= available:
        return torch.arange(available)
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:count]


def split_reference_and_heldout(images: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded half / half split of one real set into a reference set and a held-out set for the baseline."""
    if len(images) < 4:
        raise ValueError(f"need at least 4 real images to split into reference and held-out halves, got {len(images)}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    half = len(images) // 2
    return images[order[:half]], images[order[half:]]


def _check_image_batch(images: torch.Tensor, what: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a tensor [N, 1 or 3, H, W] in [-1, 1], got {shape}")
    if len(images) and images.min() >= 0 and images.max() <= 1 and images.max() > 0:
        warnings.warn(f"{what} have no negative values: expected [-1, 1], got what looks like [0, 1]", stacklevel=3)


# --------------------------------------------------------------------------------------------------------------------
# Digits: classifier features
# --------------------------------------------------------------------------------------------------------------------


class DigitsEvaluator:
    """FD / KID on the digits classifier's features, plus what the classifier reads in the samples.

    The reference real set is the digits training split at `resolution` (optionally `num_real` of them); the baseline
    scores the held-out test split against it. `real_images` replaces the digits with another real set, which is
    then split in halves into reference and held-out (no class figures in its baseline).

    The held-out split is stratified (exactly balanced classes), which the unbiased KID estimator does not assume: its
    baseline KID comes out near -0.012 (8 stratified draws: -0.012 +- 0.004) where random held-out sets give
    +0.004 +- 0.008. Class-conditional samples asked for the classes in turn share that offset; unconditional ones
    do not.

    KID uses 20 subsets rather than torchmetrics' 100: with a few hundred samples every subset holds nearly the same
    images, and each float64 subset of 1000 costs ~0.1 s on a 2-core CPU, which a training loop pays at every eval.
    """

    def __init__(
        self,
        resolution: int = 16,
        num_real: int | None = None,
        device: str | torch.device = "cpu",
        *,
        real_images: torch.Tensor | None = None,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        kid_subsets: int = 20,
        kid_subset_size: int = 1000,
        batch_size: int = 512,
    ):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.classifier = load_digits_classifier(cache_dir, device=self.device)
        if real_images is None:
            reference, _ = load_digits_tensors(resolution, "train")
            self._heldout, self._heldout_labels = load_digits_tensors(resolution, "test")
            self.reference_description = f"digits train split vs held-out test split at {resolution} px"
        else:
            _check_image_batch(real_images, "real images")
            reference, self._heldout = split_reference_and_heldout(real_images, seed)
            self._heldout_labels = None
            self.reference_description = "half vs half of the real images"
        reference = _seeded_subset(reference, num_real, seed)
        reference_features, _ = self._features_and_logits(reference)
        self.num_reference = len(reference)
        self.reference_images = reference
        self._distance = FeatureDistance(reference_features, kid_subsets, kid_subset_size, seed)
        self.seed = seed
        self._baselines: dict[int, dict] = {}

    @torch.no_grad()
    def _features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = [], []
        for batch in images.split(self.batch_size):
            batch_features, batch_logits = self.classifier.features_and_logits(batch.to(self.device))
            features.append(batch_features.cpu())
            logits.append(batch_logits.cpu())
        return torch.cat(features), torch.cat(logits)

    def score(self, fake_images: torch.Tensor, class_labels: torch.Tensor | Sequence[int] | None = None) -> dict:
        """Metrics of `fake_images` [N, C, H, W] in [-1, 1]; `class_labels` [N] are the classes that were asked for.

        Returns fd, kid_mean, kid_std, confident_fraction (max probability > 0.9), predicted_class_histogram (counts
        per class), num_samples and, when labels are given, class_accuracy (fraction read as the requested class).
        """
        _check_image_batch(fake_images, "fake images")
        features, logits = self._features_and_logits(fake_images)
        scores = self._distance(features)
        probabilities = logits.double().softmax(dim=-1)
        predictions = probabilities.argmax(dim=-1)
        scores["confident_fraction"] = (probabilities.max(dim=-1).values > CONFIDENCE_THRESHOLD).double().mean().item()
        scores["predicted_class_histogram"] = torch.bincount(predictions, minlength=NUM_CLASSES).tolist()
        scores["num_samples"] = len(fake_images)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels).reshape(-1).cpu()
            if len(class_labels) != len(fake_images):
                raise ValueError(f"got {len(class_labels)} class labels for {len(fake_images)} images")
            scores["class_accuracy"] = (predictions == class_labels).double().mean().item()
        return scores

    def baseline(self, num_samples: int | None = None) -> dict:
        """The same metrics for held-out real images: what a perfect model would score. With `num_samples`, on that
        many held-out images (a seeded draw; all of them when there are fewer), so that the baseline carries the same
        small-sample bias of FD as the samples it stands beside. Computed once per count."""
        count = heldout_count(len(self._heldout), num_samples)
        if count not in self._baselines:
            order = held_out_draw(len(self._heldout), count, self.seed)
            labels = None if self._heldout_labels is None else self._heldout_labels[order]
            self._baselines[count] = self.score(self._heldout[order], labels)
        return dict(self._baselines[count])
