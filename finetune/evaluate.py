"""Sample-quality metrics: Fréchet distance and KID of generated images against real ones, always next to a
real-vs-real baseline so that a number means something.

Two feature extractors:

* `DigitsEvaluator` — the small CNN of `finetune.digits_classifier`, trained on the digits' training split and cached.
  Besides Fréchet distance (FD) and KID on its features it reports how many samples it reads confidently and, for
  class-conditional models, how many are read as the requested class.
* `InceptionEvaluator` — Inception-v3 pool3 features (the FID network) from a weights file the user already has:
  `pt_inception-2015-12-05-6726825d.pth` (the FID weights of pytorch-fid / torch-fidelity / torchmetrics) or
  torchvision's `inception_v3_google-*.pth`, or either converted to safetensors. Nothing is downloaded.

The FD and KID maths are torchmetrics' (`FrechetInceptionDistance` / `KernelInceptionDistance` fed with features that
were computed once, in float64). The baseline compares the reference real set (the digits training split) with a
held-out real set (the digits test split): a model is as good as real data when its figures reach the baseline.

Command line::

    python -m finetune.evaluate outputs/digits-ddpm --num-samples 512 --steps 50 --json scores.json
    python -m finetune.evaluate --real-dir real_pngs/ --fake-dir samples/ --inception-weights pt_inception-....pth
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .digits import load_digits_tensors
from .digits_classifier import NUM_CLASSES, load_digits_classifier

CONFIDENCE_THRESHOLD = 0.9
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_HELP = (
    "Inception-v3 FID features need a weights file on disk; difftune never downloads one. Get either\n"
    f"  the FID weights ({FID_WEIGHTS_FILE}, used by pytorch-fid, torch-fidelity and torchmetrics):\n"
    "    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth\n"
    "  or torchvision's ImageNet Inception-v3 weights:\n"
    "    https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth\n"
    "and pass its path with --inception-weights (a .safetensors conversion of either is accepted too)."
)


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
        self._baseline: dict | None = None

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

    def baseline(self) -> dict:
        """The same metrics for held-out real images (computed once): what a perfect model would score."""
        if self._baseline is None:
            self._baseline = self.score(self._heldout, self._heldout_labels)
        return dict(self._baseline)


# --------------------------------------------------------------------------------------------------------------------
# Inception-v3 pool3 features from a local weights file
# --------------------------------------------------------------------------------------------------------------------


class _ConvBNReLU(nn.Module):
    """Inception's BasicConv2d: bias-free conv, batch norm (eps 1e-3, as in the TensorFlow original), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool3x3(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The stride-1 pooling in front of a block's pool branch; the FID network differs from torchvision's here only."""
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    # the TensorFlow graph behind the FID weights averages over the valid pixels only at the border
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=kind == "avg")


class _InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _ConvBNReLU(in_channels, 64, 1)
        self.branch5x5_1 = _ConvBNReLU(in_channels, 48, 1)
        self.branch5x5_2 = _ConvBNReLU(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBNReLU(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBNReLU(96, 96, 3, padding=1)
        self.branch_pool = _ConvBNReLU(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_pool3x3(x, self.pool)),
            ],
            dim=1,
        )


class _InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = _ConvBNReLU(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBNReLU(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBNReLU(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class _InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int, pool: str):
        super().__init__()
        c7 = channels_7x7
        self.pool = pool
        self.branch1x1 = _ConvBNReLU(in_channels, 192, 1)
        self.branch7x7_1 = _ConvBNReLU(in_channels, c7, 1)
        self.branch7x7_2 = _ConvBNReLU(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBNReLU(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBNReLU(in_channels, c7, 1)
        self.branch7x7dbl_2 = _ConvBNReLU(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBNReLU(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBNReLU(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBNReLU(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBNReLU(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            double = layer(double)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                self.branch7x7dbl_5(double),
                self.branch_pool(_pool3x3(x, self.pool)),
            ],
            dim=1,
        )


class _InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = _ConvBNReLU(in_channels, 192, 1)
        self.branch3x3_2 = _ConvBNReLU(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBNReLU(in_channels, 192, 1)
        self.branch7x7x3_2 = _ConvBNReLU(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBNReLU(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBNReLU(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3_2(self.branch3x3_1(x)),
                self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class _InceptionE(nn.Module):
    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _ConvBNReLU(in_channels, 320, 1)
        self.branch3x3_1 = _ConvBNReLU(in_channels, 384, 1)
        self.branch3x3_2a = _ConvBNReLU(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBNReLU(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBNReLU(in_channels, 448, 1)
        self.branch3x3dbl_2 = _ConvBNReLU(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBNReLU(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBNReLU(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBNReLU(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(single),
                self.branch3x3_2b(single),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(_pool3x3(x, self.pool)),
            ],
            dim=1,
        )


class InceptionV3Features(nn.Module):
    """Inception-v3 (Szegedy et al. 2016) up to the 2048-d pool3 features that FID uses, in plain torch.

    Parameter names match the FID weights and torchvision's, so either state dict loads. `fid_variant` selects the
    FID network's pooling (border-exclusive averages, a max pool in the last block) over torchvision's. Input: images
    in [-1, 1], any size, 1 or 3 channels; they are quantised to 8 bits like a saved PNG, resized to 299x299 with
    antialiased bilinear interpolation (torchmetrics' default) and scaled as (pixel - 128) / 128 (FID graph) or
    (pixel - 127.5) / 127.5 (what torchvision's `transform_input` makes of ImageNet-normalised input).
    """

    INPUT_SIZE = 299
    num_features = 2048

    def __init__(self, fid_variant: bool = True):
        super().__init__()
        self.fid_variant = fid_variant
        average = "avg_valid" if fid_variant else "avg"
        self.Conv2d_1a_3x3 = _ConvBNReLU(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBNReLU(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBNReLU(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBNReLU(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBNReLU(80, 192, 3)
        self.Mixed_5b = _InceptionA(192, 32, average)
        self.Mixed_5c = _InceptionA(256, 64, average)
        self.Mixed_5d = _InceptionA(288, 64, average)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, 128, average)
        self.Mixed_6c = _InceptionC(768, 160, average)
        self.Mixed_6d = _InceptionC(768, 160, average)
        self.Mixed_6e = _InceptionC(768, 192, average)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, average)
        self.Mixed_7c = _InceptionE(2048, "max" if fid_variant else "avg")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 1|3, H, W] in [-1, 1] -> [N, 3, 299, 299] as the network expects it."""
        pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        pixels = F.interpolate(
            pixels, size=(self.INPUT_SIZE, self.INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True
        )
        center = 128.0 if self.fid_variant else 127.5
        return (pixels - center) / center

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed [N, 3, 299, 299] -> pool3 features [N, 2048]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.preprocess(images))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or from a torch pickle without executing anything (weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for code-carrying pickles, RuntimeError for other files
        raise ValueError(
            f"cannot read {path} as a plain state dict with torch.load(weights_only=True): {error}\n"
            "Files that need arbitrary unpickling are refused; convert them to safetensors in a trusted environment."
        ) from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    return state


def load_inception_features(weights_path: str | Path) -> InceptionV3Features:
    """The Inception-v3 feature network with weights from a local file; a clear error (with URLs) when it is absent."""
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: {path}\n{INCEPTION_WEIGHTS_HELP}")
    state = _read_state_dict(path)
    # the FID weights end in a 1008-way classifier, torchvision's in a 1000-way one
    fc_weight = state.get("fc.weight")
    fid_variant = fc_weight is None or fc_weight.shape[0] == 1008
    network = InceptionV3Features(fid_variant=fid_variant)
    # the classifier and torchvision's auxiliary head are not needed for pool3 features
    state = {key: value for key, value in state.items() if not key.startswith(("fc.", "AuxLogits."))}
    result = network.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} is not an Inception-v3 state dict: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})\n{INCEPTION_WEIGHTS_HELP}"
        )
    return network.eval().requires_grad_(False)


class InceptionEvaluator:
    """FID / KID on Inception-v3 pool3 features from a local weights file, with a real-vs-real baseline.

    The real set defaults to the digits (train split as reference, test split held out) at `resolution`; pass
    `real_images` to use another set, which is split in halves into reference and held-out. CPU cost, measured on
    one core: ~0.25 s per image at 299x299, and ~7 s per score for FD (torchmetrics' 2048x2048 eigenvalues) and
    100 KID subsets, so `num_real` caps the reference and held-out sets.
    """

    def __init__(
        self,
        weights_path: str | Path,
        real_images: torch.Tensor | None = None,
        *,
        resolution: int = 16,
        num_real: int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        seed: int = 0,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
    ):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.network = load_inception_features(weights_path).to(self.device)
        if real_images is None:
            reference, _ = load_digits_tensors(resolution, "train")
            self._heldout, _ = load_digits_tensors(resolution, "test")
            self.reference_description = f"digits train split vs held-out test split at {resolution} px"
        else:
            _check_image_batch(real_images, "real images")
            reference, self._heldout = split_reference_and_heldout(real_images, seed)
            self.reference_description = "half vs half of the real images"
        reference = _seeded_subset(reference, num_real, seed)
        self._heldout = _seeded_subset(self._heldout, num_real, seed)
        self.num_reference = len(reference)
        self.reference_images = reference
        self._distance = FeatureDistance(self.features(reference), kid_subsets, kid_subset_size, seed)
        self._baseline: dict | None = None

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pool3 features [N, 2048] of images in [-1, 1]."""
        return torch.cat([self.network(batch.to(self.device)).cpu() for batch in images.split(self.batch_size)])

    def score(self, fake_images: torch.Tensor) -> dict:
        """{"fd", "kid_mean", "kid_std", "num_samples"} of `fake_images` [N, C, H, W] in [-1, 1]."""
        _check_image_batch(fake_images, "fake images")
        scores = self._distance(self.features(fake_images))
        scores["num_samples"] = len(fake_images)
        return scores

    def baseline(self) -> dict:
        """The same metrics for the held-out real images (computed once)."""
        if self._baseline is None:
            self._baseline = self.score(self._heldout)
        return dict(self._baseline)


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
    from PIL import Image

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    pil_images = []
    for path in paths:
        with Image.open(path) as image:
            pil_images.append(image.copy())
    grayscale = all(image.mode in ("L", "1", "I", "I;16", "F") for image in pil_images)
    if size is None:
        target = (pil_images[0].height, pil_images[0].width)
    else:
        target = (size, size) if isinstance(size, int) else tuple(size)
    if max_size is not None and max(target) > max_size:
        target = (max_size, max_size)
    tensors = []
    for image in pil_images:
        array = np.asarray(image.convert("L" if grayscale else "RGB"), dtype=np.float32) / 127.5 - 1
        tensor = torch.from_numpy(array).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)[None]
        if tuple(tensor.shape[-2:]) != target:
            tensor = F.interpolate(tensor, size=target, mode="bilinear", align_corners=False, antialias=True)
        tensors.append(tensor)
    return torch.cat(tensors)


# --------------------------------------------------------------------------------------------------------------------
# Putting it together: evaluate a pipeline or two folders and report next to the baseline
# --------------------------------------------------------------------------------------------------------------------


def _scores_with_baseline(evaluator, images: torch.Tensor, class_labels=None) -> dict:
    if isinstance(evaluator, DigitsEvaluator):
        samples = evaluator.score(images, class_labels)
    else:
        samples = evaluator.score(images)
    return {"samples": samples, "baseline": evaluator.baseline(), "baseline_is": evaluator.reference_description}


def evaluate_pipeline(
    pipeline,
    num_samples: int = 512,
    steps: int = 50,
    batch_size: int = 128,
    seed: int = 0,
    class_labels: torch.Tensor | Sequence[int] | None = None,
    digits_evaluator: DigitsEvaluator | None = None,
    inception_evaluator: InceptionEvaluator | None = None,
    pipeline_kwargs: dict | None = None,
) -> dict:
    """Sample an in-memory pipeline and score it with the given evaluators (a training loop reuses its evaluators).

    Returns {"settings": ..., "digits": {"samples", "baseline", "baseline_is"}, "inception": {...}} with the entries
    of the evaluators that were given.
    """
    if digits_evaluator is None and inception_evaluator is None:
        raise ValueError("evaluate_pipeline needs a DigitsEvaluator and/or an InceptionEvaluator")
    start = time.perf_counter()
    images, labels = sample_pipeline_images(
        pipeline, num_samples, steps, batch_size, seed, class_labels, pipeline_kwargs
    )
    result: dict = {
        "settings": {
            "num_samples": num_samples,
            "steps": steps,
            "batch_size": batch_size,
            "seed": seed,
            "image_shape": list(images.shape[1:]),
            "class_conditional": labels is not None,
            **(pipeline_kwargs or {}),
            "sampling_seconds": round(time.perf_counter() - start, 2),
        }
    }
    if digits_evaluator is not None:
        result["digits"] = _scores_with_baseline(digits_evaluator, images, labels)
    if inception_evaluator is not None:
        result["inception"] = _scores_with_baseline(inception_evaluator, images)
    return result


def _load_pipeline(folder: Path, pipeline_class=None, scheduler: str | None = None, device: str = "cpu"):
    """Through `pipelines.load` (safetensors only, diffusers or difftune pipeline classes only), in float32."""
    from pipelines.load import SCHEDULERS, load_pipeline

    if not folder.is_dir():
        raise FileNotFoundError(f"pipeline folder not found: {folder}")
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"not a diffusers pipeline folder (no model_index.json): {folder}")
    if pipeline_class is None:
        return load_pipeline(folder, scheduler=scheduler, device=device, dtype="float32")
    pipeline = pipeline_class.from_pretrained(str(folder), use_safetensors=True)
    if scheduler is not None:
        import diffusers

        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        pipeline.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipeline.scheduler.config)
    return pipeline.to(device)


def evaluate_pipeline_folder(
    folder: str | Path,
    num_samples: int = 512,
    steps: int = 50,
    batch_size: int = 128,
    seed: int = 0,
    class_labels: torch.Tensor | Sequence[int] | None = None,
    *,
    inception_weights: str | Path | None = None,
    real_dir: str | Path | None = None,
    num_real: int | None = None,
    pipeline_class=None,
    scheduler: str | None = None,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    pipeline_kwargs: dict | None = None,
    print_report: bool = True,
) -> dict:
    """Load a saved DDPMPipeline / DDIMPipeline folder, sample it and score the samples.

    The class named in model_index.json is loaded (difftune's class-conditional pipeline included) unless
    `pipeline_class` is given; `scheduler` ("ddim", "ddpm", "dpm++") replaces the saved scheduler. Single-channel
    models are scored with the digits classifier; Inception scores are added when `inception_weights` is given
    (required for colour models). The real set is the digits at the model's resolution unless `real_dir` names a
    folder of real images; `num_real` caps the reference (and, for Inception, the held-out) set, which matters for
    Inception on CPU. `pipeline_kwargs` go to every pipeline call (e.g. guidance_scale). Prints a table with the
    real-vs-real baseline next to each figure.
    """
    folder = Path(folder).expanduser()
    if inception_weights is not None:
        # fail on a missing weights file before the slow part
        weights = Path(inception_weights).expanduser()
        if not weights.is_file():
            raise FileNotFoundError(f"Inception weights file not found: {weights}\n{INCEPTION_WEIGHTS_HELP}")
    pipeline = _load_pipeline(folder, pipeline_class, scheduler, device)
    sample_size = pipeline.unet.config.sample_size
    resolution = sample_size if isinstance(sample_size, int) else max(sample_size)
    channels = pipeline.unet.config.in_channels
    real_images = load_image_folder(real_dir, size=resolution) if real_dir is not None else None
    digits_evaluator = None
    if channels == 1:
        digits_evaluator = DigitsEvaluator(
            resolution, num_real, device, real_images=real_images, cache_dir=cache_dir, seed=seed
        )
    elif inception_weights is None:
        raise ValueError(
            f"{folder} holds a {channels}-channel model: the digits classifier only scores 1-channel models, so pass "
            f"--inception-weights.\n{INCEPTION_WEIGHTS_HELP}"
        )
    inception_evaluator = None
    if inception_weights is not None:
        inception_evaluator = InceptionEvaluator(
            inception_weights, real_images, resolution=resolution, num_real=num_real, device=device, seed=seed
        )
    result = evaluate_pipeline(
        pipeline,
        num_samples,
        steps,
        batch_size,
        seed,
        class_labels,
        digits_evaluator,
        inception_evaluator,
        pipeline_kwargs,
    )
    result["settings"]["pipeline"] = str(folder)
    result["settings"]["pipeline_class"] = type(pipeline).__name__
    result["settings"]["scheduler"] = type(pipeline.scheduler).__name__
    if print_report:
        print(format_report(result))
    return result


def compare_image_folders(
    real_dir: str | Path,
    fake_dir: str | Path,
    *,
    inception_weights: str | Path | None = None,
    device: str = "cpu",
    seed: int = 0,
    cache_dir: str | Path | None = None,
    print_report: bool = True,
) -> dict:
    """Score a folder of generated images against a folder of real ones (baseline: real half vs real half).

    Grayscale folders are scored with the digits classifier; Inception scores are added when `inception_weights` is
    given (required for colour images).
    """
    # nothing above Inception's 299 px input is ever looked at, and full-size photos would not fit in memory
    real_images = load_image_folder(real_dir, max_size=InceptionV3Features.INPUT_SIZE)
    fake_images = load_image_folder(fake_dir, size=tuple(real_images.shape[-2:]))
    if fake_images.shape[1] != real_images.shape[1]:
        # mixed grayscale / colour folders: compare both as colour
        real_images, fake_images = real_images.expand(-1, 3, -1, -1), fake_images.expand(-1, 3, -1, -1)
    result: dict = {
        "settings": {
            "real_dir": str(real_dir),
            "fake_dir": str(fake_dir),
            "num_real": len(real_images),
            "num_samples": len(fake_images),
            "image_shape": list(fake_images.shape[1:]),
        }
    }
    if real_images.shape[1] == 1:
        evaluator = DigitsEvaluator(
            real_images.shape[-1], device=device, real_images=real_images, seed=seed, cache_dir=cache_dir
        )
        result["digits"] = _scores_with_baseline(evaluator, fake_images)
    elif inception_weights is None:
        raise ValueError(f"{real_dir} holds colour images: pass --inception-weights.\n{INCEPTION_WEIGHTS_HELP}")
    if inception_weights is not None:
        evaluator = InceptionEvaluator(inception_weights, real_images, device=device, seed=seed)
        result["inception"] = _scores_with_baseline(evaluator, fake_images)
    if print_report:
        print(format_report(result))
    return result


def metrics_for_logging(result: dict, prefix: str = "eval/") -> dict[str, float]:
    """Flatten an evaluation result into scalar logs, each figure with its baseline: {"eval/digits_fd": ..., ...}."""
    logs = {}
    for name in ("digits", "inception"):
        if name not in result:
            continue
        for key, value in result[name]["samples"].items():
            if isinstance(value, (int, float)) and key != "num_samples":
                logs[f"{prefix}{name}_{key}"] = float(value)
                if key in result[name]["baseline"]:
                    logs[f"{prefix}{name}_{key}_baseline"] = float(result[name]["baseline"][key])
    return logs


_ROWS = (
    ("fd", "Fréchet distance", "{:.4g}"),
    ("kid", "KID x 1e3", None),
    ("confident_fraction", "confident (p > 0.9)", "{:.3f}"),
    ("class_accuracy", "read as requested class", "{:.3f}"),
    ("predicted_class_histogram", "predicted class counts", "{}"),
    ("num_samples", "images", "{}"),
)


def _format_cell(scores: dict, key: str, template: str | None) -> str:
    if key == "kid":
        return f"{scores['kid_mean'] * 1e3:.3f} ± {scores['kid_std'] * 1e3:.3f}"
    if key not in scores:
        return "-"
    return template.format(scores[key])


def format_report(result: dict) -> str:
    """A text table: each figure for the samples next to the real-vs-real baseline."""
    settings = result.get("settings", {})
    source = settings.get("pipeline") or settings.get("fake_dir", "samples")
    lines = [f"evaluation of {source}: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "pipeline")]
    for name, title in (("digits", "digits classifier features"), ("inception", "Inception-v3 pool3 features")):
        if name not in result:
            continue
        samples, baseline = result[name]["samples"], result[name]["baseline"]
        lines.append("")
        lines.append(f"{title}  (baseline: {result[name]['baseline_is']})")
        lines.append(f"  {'':26}{'samples':>34}    {'real-vs-real baseline':>34}")
        for key, label, template in _ROWS:
            if key != "kid" and key not in samples and key not in baseline:
                continue
            sample_cell, baseline_cell = _format_cell(samples, key, template), _format_cell(baseline, key, template)
            lines.append(f"  {label:26}{sample_cell:>34}    {baseline_cell:>34}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from pipelines.load import PIXEL_SCHEDULERS

    parser = argparse.ArgumentParser(
        prog="python -m finetune.evaluate",
        description="Fréchet distance and KID of a diffusers pipeline's samples (or a folder of images) against real "
        "images, each next to the real-vs-real baseline.",
    )
    parser.add_argument("pipeline_folder", nargs="?", help="a saved DDPMPipeline / DDIMPipeline folder")
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50, help="denoising steps per sample")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scheduler", choices=PIXEL_SCHEDULERS, help="replace the folder's scheduler for sampling (default: keep it)"
    )
    parser.add_argument("--guidance-scale", type=float, help="for class-conditional pipelines trained with dropout")
    parser.add_argument("--inception-weights", help=f"local Inception-v3 weights, e.g. {FID_WEIGHTS_FILE}")
    parser.add_argument("--real-dir", help="folder of real images (default: the embedded digits)")
    parser.add_argument("--num-real", type=int, help="cap the real reference set (Inception on CPU is slow)")
    parser.add_argument("--fake-dir", help="folder of generated images to compare with --real-dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.fake_dir is not None:
        if args.pipeline_folder is not None:
            parser.error("give either PIPELINE_FOLDER or --fake-dir, not both")
        if args.real_dir is None:
            parser.error("--fake-dir needs --real-dir")
    elif args.pipeline_folder is None:
        parser.error("give a PIPELINE_FOLDER, or --real-dir and --fake-dir")
    for option, value in (
        ("PIPELINE_FOLDER", args.pipeline_folder),
        ("--real-dir", args.real_dir),
        ("--fake-dir", args.fake_dir),
    ):
        if value is not None and not Path(value).expanduser().is_dir():
            parser.error(f"{option}: folder not found: {value}")
    if args.inception_weights is not None and not Path(args.inception_weights).expanduser().is_file():
        parser.error(f"--inception-weights: file not found: {args.inception_weights}\n{INCEPTION_WEIGHTS_HELP}")
    if args.num_samples < 2:
        parser.error("--num-samples must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 when the scores are computed (and written, with --json); 2 for bad input (a folder, a file, an
    option); 1 when writing fails or for a bug (one line, or the traceback with --debug / DIFFTUNE_DEBUG=1)."""
    from finetune.errors import InputError, RunError
    from finetune.preflight import check_model_path, debug_requested, exit_code_for

    argv, debug = debug_requested(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    try:
        if args.json_path:
            parent = Path(args.json_path).expanduser().parent
            if not parent.is_dir():
                raise InputError(
                    f"--json: the folder {str(parent)!r} does not exist; create it or choose another file"
                )
        if args.fake_dir is not None:
            result = compare_image_folders(
                args.real_dir,
                args.fake_dir,
                inception_weights=args.inception_weights,
                device=args.device,
                seed=args.seed,
            )
        else:
            check_model_path(
                args.pipeline_folder, "PIPELINE_FOLDER", "pipeline", "this command loads safetensors only"
            )
            result = evaluate_pipeline_folder(
                args.pipeline_folder,
                args.num_samples,
                args.steps,
                args.batch_size,
                args.seed,
                inception_weights=args.inception_weights,
                real_dir=args.real_dir,
                num_real=args.num_real,
                scheduler=args.scheduler,
                device=args.device,
                pipeline_kwargs=None if args.guidance_scale is None else {"guidance_scale": args.guidance_scale},
            )
        if args.json_path:
            try:
                Path(args.json_path).expanduser().write_text(json.dumps(result, indent=2) + "\n")
            except OSError as error:
                raise RunError(f"--json: cannot write {args.json_path!r}: {error.strerror or error}") from error
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, InputError):
            return exit_code_for(error, debug)
        print(f"difftune: {error}", file=sys.stderr)
        return 2
    except BaseException as error:  # noqa: BLE001 - every way out gets its exit code and one line
        if isinstance(error, SystemExit):
            raise
        return exit_code_for(error, debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
