"""Progressive distillation on the embedded digits (CPU): the teacher sampled with 1000/100/50/16/8/4 DDIM steps and
the distilled students with 8/4/2/1 steps, in one table with Fréchet distance and KID on the digits classifier's
features (`finetune.evaluate.DigitsEvaluator`, next to its real-vs-real baseline) and sampling time per 1000 images.

    make demo                                            # the teacher: outputs/digits-unconditional
    .venv/bin/python benchmarks/bench_distillation.py    # distil 32 -> 16 -> 8 -> 4 -> 2 -> 1, then score everything
    .venv/bin/python benchmarks/bench_distillation.py --students outputs/digits-distillation   # score a finished run
    .venv/bin/python benchmarks/bench_distillation.py --teacher-steps 50,16,8,4 optim.lr=5e-4   # recipe overrides

Every row uses the same seeds and number of samples. The teacher rows are the teacher's own DDIM sampler (x0 clipped
at every step, as its scheduler config says) on the same grid as the students (t_i = (i + 1) * (T // N) - 1, the last
step to x0): what a user of the teacher gets with N steps. The first student halves the teacher's 32-step sampler with
the clipping limited to high noise (the recipe's distillation.teacher_clip_snr).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

if __package__ in (None, ""):  # run as a script: `python benchmarks/bench_distillation.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, print_table  # noqa: E402

DEFAULT_TEACHER = REPO / "outputs" / "digits-unconditional"
DEFAULT_RECIPE = REPO / "finetune" / "recipes" / "digits_distillation.yaml"


def train_students(recipe: Path, teacher: Path, output_dir: Path, overrides: list[str], env: dict) -> float:
    """Run the distillation recipe in a fresh process (the real entry point); return its wall time."""
    command = [
        sys.executable,
        "-m",
        "finetune",
        str(recipe),
        f"model.pretrained_model_name_or_path={teacher}",
        f"train.output_dir={output_dir}",
        "train.progress_bar=false",
        *overrides,
    ]
    print("training:", " ".join(command[2:]), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env)
    if result.returncode != 0:
        sys.exit(f"distillation failed (exit code {result.returncode})")
    return time.perf_counter() - started


@torch.no_grad()
def sample(pipe, num_images: int, steps: int, seed: int, batch_size: int) -> tuple[torch.Tensor, float]:
    """Images [N, C, H, W] in [-1, 1] and the seconds it took, in batches with seeds seed, seed + 1, ..."""
    pipe.set_progress_bar_config(disable=True)
    images, started = [], time.perf_counter()
    for index, start in enumerate(range(0, num_images, batch_size)):
        count = min(batch_size, num_images - start)
        generator = torch.Generator().manual_seed(seed + index)
        batch = pipe(batch_size=count, generator=generator, num_inference_steps=steps, output_type="np").images
        images.append(torch.from_numpy(batch).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(images), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER, help="the teacher's DDPMPipeline folder")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument(
        "--students", type=Path, help="score the student-<N>-steps folders of a finished run instead of training"
    )
    parser.add_argument("--output", type=Path, help="output folder of the distillation (default: the recipe's)")
    parser.add_argument("--teacher-steps", default="1000,100,50,16,8,4", help="comma-separated teacher step counts")
    parser.add_argument("--num-samples", type=int, default=1000, help="images generated per row")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads for training and sampling (1 is much faster on a CPU shared with other jobs)",
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides for the distillation, e.g. optim.lr=5e-4")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)

    if not (args.teacher / "model_index.json").is_file():
        sys.exit(f"no teacher at {args.teacher}: run `make demo` first (or pass --teacher PATH to a DDPMPipeline)")

    from diffusers import DDIMPipeline, DDPMPipeline

    from finetune.evaluate import DigitsEvaluator
    from finetune.methods.distillation import student_scheduler

    train_wall = None
    students = args.students
    if students is None:
        recipe = yaml.safe_load(args.recipe.read_text())
        students = (args.output or REPO / recipe["train"]["output_dir"]).resolve()
        if students.exists() and any(students.iterdir()):
            sys.exit(f"{students} is not empty: pass --students {students} to score it, or --output NEW_FOLDER")
        train_wall = train_students(args.recipe, args.teacher.resolve(), students, args.overrides, env)
    folders = sorted(students.glob("student-*-steps"), key=lambda p: -int(p.name.split("-")[1]))
    if not folders:
        sys.exit(f"no student-<N>-steps folders in {students}")

    teacher = DDPMPipeline.from_pretrained(args.teacher)
    teacher_config = dict(teacher.scheduler.config)
    resolution = teacher.unet.config.sample_size
    evaluator = DigitsEvaluator(resolution=resolution)
    baseline = evaluator.baseline()
    rows = [
        {
            "model": "real: held-out test split",
            "steps": "",
            "fd": baseline["fd"],
            "kid_x1e3": baseline["kid_mean"] * 1e3,
            "confident": baseline["confident_fraction"],
            "samples": baseline["num_samples"],
        }
    ]

    def score(model: str, pipe, steps: int) -> None:
        images, seconds = sample(pipe, args.num_samples, steps, args.seed, args.batch_size)
        scores = evaluator.score(images)
        row = {
            "model": model,
            "steps": steps,
            "fd": scores["fd"],
            "kid_x1e3": scores["kid_mean"] * 1e3,
            "confident": scores["confident_fraction"],
            "samples": scores["num_samples"],
            "s_per_1000_images": seconds * 1000 / args.num_samples,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    clip = teacher_config.get("clip_sample", True)
    for steps in [int(s) for s in args.teacher_steps.split(",") if s]:
        scheduler = student_scheduler(teacher_config, steps, teacher_config["prediction_type"], clip_sample=clip)
        score("teacher (DDIM)", DDIMPipeline(unet=teacher.unet, scheduler=scheduler), steps)
    for folder in folders:
        steps = int(folder.name.split("-")[1])
        score(f"student {folder.name}", DDIMPipeline.from_pretrained(folder), steps)

    print()
    if train_wall is not None:
        print(f"distillation training: {train_wall:.0f} s wall ({students})")
    print_table(rows, ["model", "steps", "fd", "kid_x1e3", "confident", "samples", "s_per_1000_images"])
    by_key = {(r["model"].split()[0], r["steps"]): r for r in rows}
    if ("teacher", 50) in by_key and ("student", 4) in by_key:
        ratio = by_key[("student", 4)]["fd"] / by_key[("teacher", 50)]["fd"]
        print(f"\n4-step student FD / 50-step teacher FD = {ratio:.2f} (aim: <= 1.25)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
