"""Training speed and peak memory of the pixel-space DDPM: the digits demo recipe, and a UNet2DModel of the
google/ddpm-celebahq-256 shape (~114M parameters, random init, no download) at batch 1.

    .venv/bin/python benchmarks/bench_ddpm.py            # CPU here; on a GPU machine it uses the GPU
    .venv/bin/python benchmarks/bench_ddpm.py --skip-celebahq
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

if __package__ in (None, ""):  # run as a script: `python benchmarks/bench_ddpm.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, measure_training, print_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the digits recipe")
    parser.add_argument("--celebahq-steps", type=int, default=3, help="timed steps of the CelebA-HQ-256 shape")
    parser.add_argument("--skip-celebahq", action="store_true")
    args = parser.parse_args()

    rows = []
    digits = yaml.safe_load((REPO / "finetune" / "recipes" / "digits_unconditional.yaml").read_text())
    result = measure_training(digits, steps=args.steps, warmup_steps=3)
    batch = digits["train"]["train_batch_size"]
    rows.append(
        {
            "model": "digits recipe (16 px, UNet 'digits')",
            "batch": batch,
            **result,
            "steps_per_s": 1 / result["s_per_step"],
            "images_per_s": batch / result["s_per_step"],
        }
    )

    if not args.skip_celebahq:
        with tempfile.TemporaryDirectory() as tmp:
            rng = np.random.default_rng(0)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(Path(tmp) / f"{i}.png")
            recipe = {
                "method": "unconditional",
                "unconditional": {"preset": "ddpm-celebahq-256"},
                "data": {"dataset": tmp, "resolution": 256},
                "train": {"train_batch_size": 1},
                "optim": {"lr": 1e-5},
            }
            result = measure_training(recipe, steps=args.celebahq_steps, warmup_steps=1)
        rows.append(
            {
                "model": "ddpm-celebahq-256 shape (256 px)",
                "batch": 1,
                **result,
                "steps_per_s": 1 / result["s_per_step"],
                "images_per_s": 1 / result["s_per_step"],
            }
        )
    print_table(rows, ["model", "batch", "s_per_step", "steps_per_s", "images_per_s", "peak_memory_mb", "wall_s"])


if __name__ == "__main__":
    main()
