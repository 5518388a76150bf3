"""Large image folders before the first step: verification time, caching images/s, time to the first step, peak RSS
and the disk cache's size, for N generated 64 px images, with a fresh disk cache and with the cache reused.

LoRA on the tiny Stable Diffusion of the tests (tests/tiny_models.py), `lora.cache=disk`, 2 training steps, one
process; each run is a fresh `python -m finetune`-equivalent process (imports included in its times).

    .venv/bin/python benchmarks/bench_data.py --images 2000 20000
    .venv/bin/python benchmarks/bench_data.py --images 2000 --repo /path/to/other/checkout   # compare a checkout
    .venv/bin/python benchmarks/bench_data.py --images 20000 --keep-cache --reuse 3   # the reused cache only

The images are generated once into --workdir and reused by later runs (100,000 take ~0.2 GB; their fp32 latents
without flips ~3.3 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import print_table  # noqa: E402

# run in the child: time the first optimizer step from the parent's launch, and the process's peak RSS
DRIVER = """
import json, os, resource, sys, time
launched = float(os.environ["BENCH_LAUNCHED"])
marks = {}
import accelerate.optimizer as accelerated
original = accelerated.AcceleratedOptimizer.step
def step(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    marks.setdefault("first_step_s", time.time() - launched)
    return result
accelerated.AcceleratedOptimizer.step = step
from finetune.__main__ import main
code = main(sys.argv[1:])
marks["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
marks["code"] = code
open(os.environ["BENCH_RESULT"], "w").write(json.dumps(marks))
sys.exit(code)
"""


def make_images(folder: Path, count: int) -> None:
    """`count` 64 px PNGs with .txt captions (kept between runs)."""
    import numpy as np
    from PIL import Image, ImageDraw

    done = folder / ".complete"
    if done.is_file() and done.read_text() == str(count):
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        colours = rng.integers(0, 256, size=(2, 3))
        image = Image.new("RGB", (64, 64), tuple(int(c) for c in colours[0]))
        x, y = (int(v) for v in rng.integers(0, 40, size=2))
        ImageDraw.Draw(image).ellipse((x, y, x + 24, y + 24), fill=tuple(int(c) for c in colours[1]))
        image.save(folder / f"image_{index:06d}.png")
        (folder / f"image_{index:06d}.txt").write_text(f"a toy picture {index % 100}")
    done.write_text(str(count))


def run(repo: Path, recipe: dict, workdir: Path) -> dict:
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result_path = workdir / "result.json"
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "BENCH_RESULT": str(result_path), "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "2"}
    env["BENCH_LAUNCHED"] = str(time.time())
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    process = subprocess.run(
        [sys.executable, "-c", DRIVER, str(path)], cwd=repo, env=env, capture_output=True, text=True
    )
    wall, load_after = time.perf_counter() - started, os.getloadavg()[0]
    if process.returncode != 0:
        raise RuntimeError(f"training failed:\n{process.stderr[-3000:]}")
    marks = json.loads(result_path.read_text())
    log = process.stderr
    verified = re.search(r"data: verified \d+ images in ([\d.]+) s", log)
    encoded = re.search(r"cache: encoded (\d+) images in ([\d.]+) s \((\d+) images/s\)", log)
    return {
        "verify_s": float(verified.group(1)) if verified else None,
        "encoded": int(encoded.group(1)) if encoded else None,
        "cache_img_per_s": int(encoded.group(3)) if encoded and int(encoded.group(1)) else None,
        "first_step_s": marks.get("first_step_s"),
        "wall_s": wall,
        "peak_rss_mb": marks["peak_rss_mb"],
        # the 1-minute load average before and after: on shared cores the times follow it
        "load": f"{load_before:.1f}-{load_after:.1f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_data")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose finetune/ runs (default: this)")
    parser.add_argument("--reuse", type=int, default=1, help="runs with the cache reused after the fresh one")
    parser.add_argument(
        "--keep-cache",
        action="store_true",
        help="keep a cache left in --workdir by an earlier run (finished shards are reused, the rest encoded): "
        "measure the reused cache again without paying for the fresh one",
    )
    args = parser.parse_args()

    from tests.tiny_models import make_tiny_sd_pipeline

    args.workdir.mkdir(parents=True, exist_ok=True)
    base = args.workdir / "tiny_sd"
    if not (base / "model_index.json").is_file():
        make_tiny_sd_pipeline(base)
    rows = []
    for count in args.images:
        images = args.workdir / f"images-{count}"
        started = time.perf_counter()
        make_images(images, count)
        print(f"{count} images ready in {time.perf_counter() - started:.0f} s", flush=True)
        cache = args.workdir / f"cache-{count}"
        kept = args.keep_cache and cache.is_dir()
        if not kept:
            shutil.rmtree(cache, ignore_errors=True)
        recipe = {
            "method": "lora",
            "model": {"pretrained_model_name_or_path": str(base)},
            "data": {"dataset": str(images), "resolution": 64},
            "optim": {"lr": 1e-3, "lr_scheduler": "constant"},
            "diffusion": {"num_inference_steps": 1},
            "train": {
                "output_dir": str(args.workdir / "run"),
                "max_train_steps": 2,
                "train_batch_size": 2,
                "num_samples": 1,
                "report_to": "jsonl",
                "progress_bar": False,
            },
            "checkpoint": {"checkpointing_steps": 0},
            "lora": {"rank": 2, "cache": "disk", "cache_dir": str(cache), "validation_prompts": []},
        }
        for attempt in range(int(kept), 1 + args.reuse):
            shutil.rmtree(args.workdir / "run", ignore_errors=True)
            result = run(args.repo, recipe, args.workdir)
            size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) if cache.exists() else 0
            label = "fresh" if attempt == 0 else "reused" if not result["encoded"] else "resumed"  # (a kept cache)
            rows.append({"images": count, "cache": label, **result, "cache_mb": size / 1e6})
            print(rows[-1], flush=True)
    print()
    columns = [
        "images",
        "cache",
        "verify_s",
        "cache_img_per_s",
        "first_step_s",
        "wall_s",
        "peak_rss_mb",
        "cache_mb",
        "load",
    ]
    print_table(rows, columns)


if __name__ == "__main__":
    main()
