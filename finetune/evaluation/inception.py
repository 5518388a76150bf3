"""Inception-v3 pool3 features (the FID network) in plain torch, its weights from a file the user already has, and
`InceptionEvaluator`: FID / KID on those features next to a real-vs-real baseline. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from finetune.digits import load_digits_tensors
from finetune.evaluation.metrics import (
    FeatureDistance,
    _check_image_batch,
    _seeded_subset,
    held_out_draw,
    heldout_count,
    split_reference_and_heldout,
)

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
        self.seed = seed
        self._baselines: dict[int, dict] = {}

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

    def baseline(self, num_samples: int | None = None) -> dict:
        """The same metrics for the held-out real images; with `num_samples`, for that many of them (as many as the
        samples, so that both carry the same small-sample bias). Computed once per count."""
        count = heldout_count(len(self._heldout), num_samples)
        if count not in self._baselines:
            self._baselines[count] = self.score(self._heldout[held_out_draw(len(self._heldout), count, self.seed)])
        return dict(self._baselines[count])
