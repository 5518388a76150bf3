"""Aspect-ratio buckets (`data.aspect_buckets`): which bucket each image trains in, how it is cut to it, and the
batch sampler that keeps every batch inside one bucket.

The ladder of buckets has one bucket per aspect ratio between `data.bucket_min_aspect` and `data.bucket_max_aspect`
(width / height), each of about `data.resolution`^2 pixels with sides a multiple of `data.bucket_step` (by default
what the model family's latents need: 8 px for Stable Diffusion's VAE, 16 for Flux's packed latents). It is made by
diffusers' `training_utils.generate_aspect_ratio_buckets`, and an image goes to the bucket
`training_utils.find_nearest_bucket` picks for its size. The image is resized to cover its bucket and cropped (center
or random, `data.center_crop`); the crop's corner and the original size go into the example for SDXL's time ids.
With `data.bucket_no_upscale` an image smaller than its bucket gets a smaller bucket of the same shape instead (the
largest it covers), so it is never enlarged.

`BucketBatchSampler` keeps what the square path guarantees: every global batch (per-process batch x processes)
comes from one bucket and is cut into one slice per process, which accelerate's `BatchSamplerShard` deals out in
turn (so 2 processes x b equal 1 process x 2b); each example is in at most one batch per epoch; the order is drawn
from (seed, epoch) only, so a resumed run skips to exactly where it stopped; a bucket's last partial global batch is
dropped (and counted, `dropped()`).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from finetune.config import ConfigError, DataConfig

logger = logging.getLogger(__name__)

Bucket = tuple[int, int]  # (width, height) in pixels

# diffusers' ladder of common aspect ratios (width, height): `training_utils._DEFAULT_BUCKET_ASPECT_RATIOS`, the
# ladder `generate_aspect_ratio_buckets` uses without `base_resolutions`; bounds past 1:2 / 2:1 add 1:k and k:1
COMMON_RATIOS = ((1, 1), (4, 5), (5, 4), (2, 3), (3, 2), (3, 4), (4, 3), (9, 16), (16, 9), (1, 2), (2, 1))
SAMPLER_SALT = 0xB0C3E7  # keeps the sampler's draws apart from the examples' (seed, epoch, index) draws


def bucket_name(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def generate_fallback(resolution: int, divisibility: int, base_resolutions: list[tuple[float, float]]) -> list:
    """diffusers' `generate_aspect_ratio_buckets` with `base_resolutions`, for a diffusers without it (older ones): the
    (h, w) of about resolution^2 pixels at each pair's aspect ratio, sides rounded to `divisibility`, no repeats."""
    buckets = []
    for rh, rw in base_resolutions:
        h = (resolution * resolution / (rw / rh)) ** 0.5
        w = h * (rw / rh)
        h = max(divisibility, round(h / divisibility) * divisibility)
        w = max(divisibility, round(w / divisibility) * divisibility)
        if (h, w) not in buckets:
            buckets.append((h, w))
    return buckets


def nearest_fallback(h: int, w: int, bucket_options: Sequence[tuple[int, int]]) -> int:
    """diffusers' `find_nearest_bucket`, for a diffusers without it: the (h, w) option minimising
    |h * bucket_w - w * bucket_h|, the last one of equals."""
    errors = [abs(h * bw - w * bh) for bh, bw in bucket_options]
    return max(i for i, error in enumerate(errors) if error == min(errors))


def _generate(resolution: int, divisibility: int, base_resolutions: list[tuple[float, float]]) -> list:
    try:
        from diffusers.training_utils import generate_aspect_ratio_buckets
    except ImportError:
        return generate_fallback(resolution, divisibility, base_resolutions)
    return generate_aspect_ratio_buckets(resolution, divisibility=divisibility, base_resolutions=base_resolutions)


def _nearest(size: tuple[int, int], ladder: Sequence[Bucket]) -> int:
    """Index of the bucket nearest an image's (w, h) in aspect ratio, by diffusers' rule."""
    width, height = size
    options = [(bh, bw) for bw, bh in ladder]
    try:
        from diffusers.training_utils import find_nearest_bucket
    except ImportError:
        return nearest_fallback(height, width, options)
    return find_nearest_bucket(height, width, options)


def bucket_ladder(resolution: int, step: int, min_aspect: float, max_aspect: float) -> list[Bucket]:
    """The (width, height) buckets, tallest first: one per aspect ratio of COMMON_RATIOS (and 1:k, k:1 for integers
    k >= 3) between the bounds, each of about resolution^2 pixels with sides a multiple of `step`."""
    ratios = list(COMMON_RATIOS)
    ratios += [(k, 1) for k in range(3, math.floor(max_aspect) + 1)]
    ratios += [(1, k) for k in range(3, math.floor(1 / min_aspect + 1e-9) + 1)]
    kept = [(w, h) for w, h in ratios if min_aspect - 1e-9 <= w / h <= max_aspect + 1e-9]
    found = _generate(resolution, step, [(h, w) for w, h in kept])
    ladder = {(int(w), int(h)) for h, w in found}
    return sorted(ladder, key=lambda b: (b[0] / b[1], b[0]))


@dataclass(frozen=True)
class BucketPlan:
    """The buckets of a run and the rule that puts an image (its size) in one of them."""

    resolution: int
    step: int
    min_aspect: float
    max_aspect: float
    no_upscale: bool
    ladder: tuple[Bucket, ...]

    @classmethod
    def from_config(cls, data: DataConfig, multiple: int) -> BucketPlan:
        """The plan of `data`'s bucket options; `multiple`: what the family's latents need of a side (8 px for SD)."""
        step = data.bucket_step or multiple
        if step % multiple:
            raise ConfigError(
                f"data.bucket_step={data.bucket_step} must be a multiple of {multiple}, what this model family's "
                f"latents need of an image side (or null: {multiple})"
            )
        ladder = bucket_ladder(data.resolution, step, data.bucket_min_aspect, data.bucket_max_aspect)
        return cls(
            data.resolution,
            step,
            data.bucket_min_aspect,
            data.bucket_max_aspect,
            data.bucket_no_upscale,
            tuple(ladder),
        )

    def bucket_for(self, size: tuple[int, int]) -> Bucket | None:
        """The bucket of an image of `size` (w, h): the ladder's nearest in aspect ratio; with no_upscale, when the
        image cannot cover it, the largest bucket of the same shape it covers (sides rounded down to the step), or
        None when that is under one step (the image is left out)."""
        width, height = size
        bucket_w, bucket_h = self.ladder[_nearest(size, self.ladder)]
        if not self.no_upscale or (bucket_w <= width and bucket_h <= height):
            return bucket_w, bucket_h
        scale = min(Fraction(width, bucket_w), Fraction(height, bucket_h))  # exact: a side equal to the image's stays
        smaller = (
            math.floor(bucket_w * scale / self.step) * self.step,
            math.floor(bucket_h * scale / self.step) * self.step,
        )
        return smaller if min(smaller) >= self.step else None

    def key(self) -> list:
        return [self.resolution, self.step, self.min_aspect, self.max_aspect, self.no_upscale]


def cover_geometry(
    size: tuple[int, int], bucket: Bucket, rng: np.random.Generator, center_crop: bool = True
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where an image of `size` (w, h) is cut for `bucket` (w, h): the size it is resized to (the smallest that covers
    the bucket, aspect kept) and the crop's (left, top) in it. Random crops draw left, then top, from `rng` (as the
    square path's `finetune.imaging.crop_geometry` does)."""
    width, height = size
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    new_size = (max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale)))
    if center_crop:
        left, top = (new_size[0] - bucket_w) // 2, (new_size[1] - bucket_h) // 2
    else:
        left = int(rng.integers(0, new_size[0] - bucket_w + 1))
        top = int(rng.integers(0, new_size[1] - bucket_h + 1))
    return new_size, (left, top)


# ---------------------------------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------------------------------
class BucketBatchSampler(torch.utils.data.Sampler):
    """Per-process batches of `batch_size` dataset indices, each global batch (batch_size x num_processes) from one
    bucket, yielded as num_processes consecutive slices (accelerate gives slice r to process r). `buckets[i]` is the
    bucket of dataset index i. The order of an epoch is drawn from (seed, epoch) alone."""

    drop_last = True  # what accelerate's BatchSamplerShard reads: every batch is full

    def __init__(
        self,
        buckets: Sequence[Bucket],
        batch_size: int,
        num_processes: int,
        seed: int,
        plan: BucketPlan | None = None,
    ):
        self.batch_size, self.num_processes, self.seed, self.plan = batch_size, num_processes, seed, plan
        self.global_batch = batch_size * num_processes
        self.groups: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(buckets):
            self.groups.setdefault(tuple(bucket), []).append(index)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, epoch: int) -> list[tuple[Bucket, list[int]]]:
        """The epoch's global batches in order: each bucket's examples shuffled (from seed, epoch, bucket) and cut
        into full global batches, the rest dropped; then the batches of all buckets shuffled (from seed, epoch)."""
        batches = []
        for bucket in sorted(self.groups):
            members = self.groups[bucket]
            order = np.random.default_rng([self.seed, epoch, SAMPLER_SALT, *bucket]).permutation(len(members))
            shuffled = [members[i] for i in order]
            size = self.global_batch
            batches += [(bucket, shuffled[k * size : (k + 1) * size]) for k in range(len(shuffled) // size)]
        order = np.random.default_rng([self.seed, epoch, SAMPLER_SALT]).permutation(len(batches))
        return [batches[i] for i in order]

    def __iter__(self):
        for _, batch in self.global_batches(self.epoch):
            for rank in range(self.num_processes):
                yield batch[rank * self.batch_size : (rank + 1) * self.batch_size]

    def __len__(self) -> int:
        return sum(self.batches_per_epoch().values()) * self.num_processes

    def batches_per_epoch(self) -> dict[Bucket, int]:
        return {bucket: len(members) // self.global_batch for bucket, members in self.groups.items()}

    def dropped(self) -> dict[Bucket, int]:
        """Examples of each bucket left out of every epoch: its last partial global batch."""
        return {bucket: len(members) % self.global_batch for bucket, members in self.groups.items()}


# ---------------------------------------------------------------------------------------------------------------------
# what the training loop calls
# ---------------------------------------------------------------------------------------------------------------------
def make_sampler(dataset, data: DataConfig, multiple: int, batch_size: int, num_processes: int, seed: int):
    """Put the dataset's images in their buckets and return its BucketBatchSampler; a dataset that cannot be
    bucketed (the digits) or a plan that leaves no full global batch is one ConfigError line."""
    if not hasattr(dataset, "use_buckets") or not dataset.can_use_buckets():
        raise ConfigError(
            f"data.aspect_buckets: data.dataset={data.dataset!r} has images of one size; buckets need an image folder "
            "or a Hub dataset. Set data.aspect_buckets=false"
        )
    plan = BucketPlan.from_config(data, multiple)
    dataset.use_buckets(plan)
    sampler = BucketBatchSampler(dataset.example_buckets(), batch_size, num_processes, seed, plan)
    if not len(sampler):
        counts = ", ".join(f"{bucket_name(b)}: {len(m)}" for b, m in sorted(sampler.groups.items()))
        raise ConfigError(
            f"data.aspect_buckets: no bucket holds one global batch of {sampler.global_batch} examples "
            f"(train.train_batch_size {batch_size} x {num_processes} process(es); examples per bucket: {counts}). "
            "Lower train.train_batch_size, narrow the buckets (data.bucket_min_aspect / bucket_max_aspect), or add "
            "images"
        )
    return sampler


def bucket_rows(sampler: BucketBatchSampler, images: Counter) -> list[dict]:
    """One row per bucket, tallest first: size, aspect, images, batches per epoch, examples dropped per epoch."""
    batches, dropped = sampler.batches_per_epoch(), sampler.dropped()
    rows = []
    for bucket in sorted(sampler.groups, key=lambda b: (b[0] / b[1], b[0])):
        rows.append(
            {
                "bucket": bucket_name(bucket),
                "aspect": bucket[0] / bucket[1],
                "images": images.get(bucket, 0),
                "batches": batches[bucket],
                "dropped": dropped[bucket],
            }
        )
    return rows


def format_table(rows: list[dict], sampler: BucketBatchSampler) -> list[str]:
    """The bucket table logged at start."""
    plan = sampler.plan
    header = f"{'bucket':>10}  {'aspect':>6}  {'images':>6}  {'batches/epoch':>13}  {'dropped/epoch':>13}"
    lines = [
        f"buckets: {len(rows)} of about {plan.resolution}x{plan.resolution} px, sides multiples of {plan.step} px, "
        f"aspect {plan.min_aspect:g} to {plan.max_aspect:g}{', no upscaling' if plan.no_upscale else ''}; global "
        f"batch {sampler.global_batch}",
        header,
    ]
    for row in rows:
        lines.append(
            f"{row['bucket']:>10}  {row['aspect']:>6.2f}  {row['images']:>6}  {row['batches']:>13}  "
            f"{row['dropped']:>13}"
        )
    total = sum(len(m) for m in sampler.groups.values())
    lines.append(
        f"{'total':>10}  {'':>6}  {sum(r['images'] for r in rows):>6}  {sum(r['batches'] for r in rows):>13}  "
        f"{sum(r['dropped'] for r in rows):>13}  ({total} examples per epoch)"
    )
    return lines


def log_table(dataset, sampler: BucketBatchSampler) -> list[dict]:
    """Log the bucket table, and a warning for what drop_last leaves out of every epoch. Main process, at start."""
    rows = bucket_rows(sampler, dataset.bucket_images())
    for line in format_table(rows, sampler):
        logger.info("%s", line)
    dropped = sum(r["dropped"] for r in rows)
    if dropped:
        never = [r["bucket"] for r in rows if not r["batches"]]
        logger.warning(
            "buckets: %d of %d examples are left out of each epoch (each bucket's last partial global batch of %d; "
            "which ones changes every epoch)%s",
            dropped,
            sum(len(m) for m in sampler.groups.values()),
            sampler.global_batch,
            f"; the bucket(s) {', '.join(never)} hold fewer than one global batch and never train" if never else "",
        )
    return rows


def write_json(dataset, sampler: BucketBatchSampler, output_dir: Path, then: str) -> Path:
    """`buckets.json` in the output folder: "<w>x<h>" -> images, tallest bucket first."""
    from finetune import atomic

    counts = {r["bucket"]: r["images"] for r in bucket_rows(sampler, dataset.bucket_images())}
    return atomic.atomic_write_text(output_dir / "buckets.json", json.dumps(counts, indent=1) + "\n", then=then)
