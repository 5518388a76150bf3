"""What the digits metrics of ``finetune.evaluate`` read on known inputs, and what they cost.

* the digits classifier: training time from scratch (no cache) and held-out accuracy at 8, 16 and 32 px;
* the real-vs-real baseline (train split vs held-out test split) at 8, 16 and 32 px;
* reference points at 16 px: held-out digits with Gaussian pixel noise, blurred digits, a single class repeated
  (mode collapse), pure noise;
* the time of one ``DigitsEvaluator.score`` on 512 images and, with ``--inception``, Inception-v3 feature
  throughput at 299x299 (random weights: the speed does not depend on them).

    .venv/bin/python benchmarks/bench_eval_baseline.py              # CPU: about a minute on 2 cores
    .venv/bin/python benchmarks/bench_eval_baseline.py --inception
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import print_table  # noqa: E402 - the repository root must be importable first
from finetune import digits_classifier as dc  # noqa: E402
from finetune.digits import load_digits_tensors  # noqa: E402
from finetune.evaluate import DigitsEvaluator, InceptionV3Features  # noqa: E402


def _row(name: str, scores: dict) -> dict:
    return {
        "images": name,
        "n": scores["num_samples"],
        "fd": scores["fd"],
        "kid_x1e3": scores["kid_mean"] * 1e3,
        "kid_std_x1e3": scores["kid_std"] * 1e3,
        "confident": scores["confident_fraction"],
        "class_acc": scores.get("class_accuracy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="classifier seed")
    parser.add_argument("--inception", action="store_true", help="also time Inception-v3 features at 299 px")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)

    with tempfile.TemporaryDirectory() as cache_dir:
        started = time.perf_counter()
        classifier = dc.load_digits_classifier(cache_dir, seed=args.seed)  # empty cache: trains
        print(
            f"classifier: trained and cached in {time.perf_counter() - started:.1f} s "
            f"(training alone {classifier.training_info['train_seconds']:.1f} s wall, "
            f"{classifier.training_info['train_cpu_seconds']:.1f} s CPU on its single thread)"
        )
        for resolution in (8, 16, 32):
            accuracy = dc.classifier_accuracy(classifier, resolution, "test")
            print(f"  held-out accuracy at {resolution:2d} px: {accuracy:.4f}")

        print("\nreal-vs-real baseline: digits train split (reference) vs held-out test split")
        rows = []
        for resolution in (8, 16, 32):
            evaluator = DigitsEvaluator(resolution, cache_dir=cache_dir)
            rows.append(_row(f"held-out digits, {resolution} px", evaluator.baseline()))
        print_table(rows, list(rows[0]))

        print("\nreference points at 16 px, against the same 1437-image reference")
        started = time.perf_counter()
        evaluator = DigitsEvaluator(16, cache_dir=cache_dir)
        init_seconds = time.perf_counter() - started
        heldout, labels = load_digits_tensors(16, "test")
        rows = [_row("held-out digits (baseline)", evaluator.baseline())]
        for sigma in (0.1, 0.3, 1.0):
            noisy = (heldout + sigma * torch.randn(heldout.shape, generator=generator)).clamp(-1, 1)
            rows.append(_row(f"held-out + noise sigma {sigma}", evaluator.score(noisy, labels)))
        blurred = F.interpolate(F.interpolate(heldout, size=(6, 6), mode="area"), size=(16, 16), mode="bilinear")
        rows.append(_row("held-out blurred (16->6->16 px)", evaluator.score(blurred, labels)))
        train, train_labels = load_digits_tensors(16, "train")
        ones = train[train_labels == 1]
        collapsed = ones[torch.randint(len(ones), (512,), generator=generator)]
        rows.append(_row("one class only (real 1s)", evaluator.score(collapsed)))
        gaussian = torch.randn(512, 1, 16, 16, generator=generator).clamp(-1, 1)
        rows.append(_row("Gaussian noise N(0,1), clamped", evaluator.score(gaussian)))
        uniform = torch.rand(512, 1, 16, 16, generator=generator) * 2 - 1
        started, started_cpu = time.perf_counter(), time.process_time()
        uniform_scores = evaluator.score(uniform)
        score_seconds, score_cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
        rows.append(_row("uniform noise in [-1, 1]", uniform_scores))
        print_table(rows, list(rows[0]))
        print(
            f"\nDigitsEvaluator(16): construction {init_seconds:.2f} s with a cached classifier; "
            f"score() on 512 images {score_seconds:.2f} s ({score_cpu_seconds:.2f} CPU-s)"
        )

    if args.inception:
        network = InceptionV3Features().eval()
        images = torch.rand(16, 3, 64, 64) * 2 - 1
        with torch.no_grad():
            network(images[:2])  # warm-up
            started, started_cpu = time.perf_counter(), time.process_time()
            network(images)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
        print(
            f"Inception-v3 pool3 features at 299x299: {len(images) / seconds:.1f} images/s "
            f"({seconds / len(images):.3f} s and {cpu_seconds / len(images):.3f} CPU-s per image, "
            f"batch {len(images)}, {torch.get_num_threads()} threads)"
        )


if __name__ == "__main__":
    main()
