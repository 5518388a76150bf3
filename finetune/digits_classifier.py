"""A small CNN that reads the embedded digits: the feature extractor and judge for samples of digits models.

Inception-v3 features of 16 px grayscale digits blown up to 299 px say little about stroke shape, its weights are a
download and it is slow on CPU. This classifier trains on the digits' own training split in seconds, so Fréchet
distance and KID on its penultimate features react to what a digits model gets wrong (blur, broken strokes, class
imbalance).

It resizes every input to 16x16 itself, so one cached model serves 8, 16 and 32 px models: 8 px digits upsampled to
16 px are exactly the 16 px rendering, and 32 px digits shrunk with antialiasing differ from it by 0.016 on average
(out of 2), which the shift / zoom augmentation covers (held-out accuracy is the same at 8, 16 and 32 px).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .digits import load_digits_tensors

logger = logging.getLogger(__name__)

CLASSIFIER_RESOLUTION = 16
NUM_CLASSES = 10
# Bump when the architecture or training code changes in a way the recipe fields do not capture.
RECIPE_VERSION = "digits-cnn-3"
CACHE_ENV_VAR = "DIFFTUNE_CACHE"


@dataclass(frozen=True)
class ClassifierRecipe:
    """Everything that determines the trained weights; its hash names the cache file."""

    seed: int = 0
    epochs: int = 16
    batch_size: int = 128
    learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    max_shift_pixels: float = 1.5  # at 16 px, i.e. 0.75 of an original 8x8 pixel
    max_scale_change: float = 0.1
    train_resolutions: tuple[int, ...] = field(default=(16,))
    feature_dim: int = 128
    version: str = RECIPE_VERSION

    def cache_key(self) -> str:
        """Short stable hash of the recipe."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class DigitsClassifier(nn.Module):
    """Three 3x3 conv layers, a `feature_dim` feature layer and a 10-way head, on 1x16x16 inputs in [-1, 1]."""

    def __init__(self, feature_dim: int = 128, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.num_features = feature_dim  # width of `features()`
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 -> 8: the digits were 8x8 originally, so little is lost
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.to_features = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)
        # Set after training so that real digits' features have a mean square of 1 per dimension. The raw scale is
        # arbitrary, and KID's polynomial kernel (x.y / D + 1)^3 is only well conditioned for features of order 1.
        self.register_buffer("feature_scale", torch.ones(()))

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """[N, 1 or 3, H, W] in [-1, 1] -> [N, 1, 16, 16] grayscale at the classifier's resolution."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape [N, 1 or 3, H, W], got {tuple(images.shape)}")
        images = images.float()
        if images.shape[1] == 3:
            images = images.mean(dim=1, keepdim=True)
        if images.shape[-2:] != (CLASSIFIER_RESOLUTION, CLASSIFIER_RESOLUTION):
            # antialias only matters when shrinking (32 -> 16); it makes the result match digits rendered at 16 px
            images = F.interpolate(
                images,
                size=(CLASSIFIER_RESOLUTION, CLASSIFIER_RESOLUTION),
                mode="bilinear",
                align_corners=False,
                antialias=images.shape[-1] > CLASSIFIER_RESOLUTION,
            )
        return images

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled penultimate-layer features [N, feature_dim] and class logits [N, 10] from one pass."""
        raw_features = self.to_features(self.conv(self.prepare(images)))
        return raw_features * self.feature_scale, self.head(raw_features)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [N, feature_dim], scaled to a mean square of about 1 on real digits."""
        return self.features_and_logits(images)[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [N, 10]."""
        return self.head(self.to_features(self.conv(self.prepare(images))))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class per image [N] (int64)."""
        return self.forward(images).argmax(dim=-1)


def random_shift_and_scale(
    images: torch.Tensor, max_shift_pixels: float, max_scale_change: float, generator: torch.Generator
) -> torch.Tensor:
    """Small random translations and zooms; the area uncovered by a shift is filled with the background (-1)."""
    n, _, height, _ = images.shape
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * max_scale_change
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * max_shift_pixels / height)  # normalised coords
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # sample (x + 1) with zero padding so that pixels from outside the image are background, then shift back
    return F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def _training_set(recipe: ClassifierRecipe, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The split rendered at every training resolution, each brought to 16 px the way `prepare` does it."""
    images, labels = [], []
    for resolution in recipe.train_resolutions:
        split_images, split_labels = load_digits_tensors(resolution, split)
        images.append(DigitsClassifier.prepare(split_images))
        labels.append(split_labels)
    return torch.cat(images), torch.cat(labels)


def train_digits_classifier(seed: int = 0, recipe: ClassifierRecipe | None = None) -> DigitsClassifier:
    """Train on the digits "train" split (seconds on CPU), deterministically, leaving the global RNG alone.

    The returned model is in eval mode with gradients off; `model.training_info` holds the recipe, the held-out test
    accuracy and the training time.
    """
    recipe = recipe if recipe is not None else ClassifierRecipe(seed=seed)
    threads = torch.get_num_threads()
    # One thread: these convolutions are too small to gain from more, a second thread spinning against other busy
    # processes made training several times slower, and the weights no longer depend on the machine's core count.
    torch.set_num_threads(1)
    try:
        return _train(recipe)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: ClassifierRecipe) -> DigitsClassifier:
    start, start_cpu = time.perf_counter(), time.process_time()
    generator = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = DigitsClassifier(recipe.feature_dim)
    images, labels = _training_set(recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(images) / recipe.batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.learning_rate, total_steps=total_steps)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(images), generator=generator)
        for batch_indices in order.split(recipe.batch_size):
            batch = random_shift_and_scale(
                images[batch_indices], recipe.max_shift_pixels, recipe.max_scale_change, generator
            )
            loss = F.cross_entropy(model(batch), labels[batch_indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        model.feature_scale.fill_(model.features(images).square().mean().rsqrt().item())
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    model.training_info = {
        "recipe": asdict(recipe),
        "test_accuracy": classifier_accuracy(model, resolution=CLASSIFIER_RESOLUTION, split="test"),
        "train_seconds": round(train_seconds, 3),
        # single-threaded, so CPU time is what the wall time would be on an idle machine
        "train_cpu_seconds": round(train_cpu_seconds, 3),
    }
    return model


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, resolution: int = 16, split: str = "test") -> float:
    """Fraction of a digits split, rendered at `resolution`, that the classifier labels correctly."""
    images, labels = load_digits_tensors(resolution, split)
    device = next(model.parameters()).device
    return (model.predict(images.to(device)).cpu() == labels).float().mean().item()


def default_cache_dir() -> Path:
    """`$DIFFTUNE_CACHE`, else `$XDG_CACHE_HOME/difftune`, else `~/.cache/difftune`."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "difftune"


def classifier_cache_path(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Where the classifier for this recipe is (or will be) cached."""
    recipe = ClassifierRecipe(seed=seed)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return directory / f"digits_classifier_{recipe.cache_key()}.safetensors"


def _write_atomically(path: Path, write) -> None:
    """Write through `write(temp_path)` then rename, so concurrent readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp_name)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def save_digits_classifier(model: DigitsClassifier, path: str | os.PathLike) -> None:
    """Safetensors weights with the training info in their metadata, plus a readable JSON sidecar."""
    from safetensors.torch import save_file

    path = Path(path)
    info_json = json.dumps(model.training_info, sort_keys=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    _write_atomically(path, lambda temp: save_file(state, temp, metadata={"training_info": info_json}))
    _write_atomically(path.with_suffix(".json"), lambda temp: Path(temp).write_text(info_json + "\n"))


def _load_cached(path: Path, recipe: ClassifierRecipe) -> DigitsClassifier | None:
    """The cached model if the file exists and was trained with exactly `recipe`, else None."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            info = json.loads((handle.metadata() or {})["training_info"])
        if info["recipe"] != json.loads(json.dumps(asdict(recipe))):
            return None
        model = DigitsClassifier(recipe.feature_dim)
        model.load_state_dict(load_file(str(path)))
    except Exception as error:  # a corrupt or foreign file is rebuilt, not fatal
        warnings.warn(f"ignoring unreadable digits classifier cache {path}: {error}", stacklevel=3)
        return None
    model.training_info = info
    return model.eval().requires_grad_(False)


def load_digits_classifier(
    cache_dir: str | os.PathLike | None = None, seed: int = 0, device: str | torch.device = "cpu"
) -> DigitsClassifier:
    """The cached classifier, trained and cached on first use (a few seconds); see `default_cache_dir`."""
    recipe = ClassifierRecipe(seed=seed)
    path = classifier_cache_path(cache_dir, seed)
    model = _load_cached(path, recipe)
    if model is None:
        logger.info("training the digits classifier (seed %d), caching it at %s", seed, path)
        model = train_digits_classifier(recipe=recipe)
        save_digits_classifier(model, path)
    return model.to(device)
