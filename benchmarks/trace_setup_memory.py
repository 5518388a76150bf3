"""Where a job's memory goes before its first step: the process's resident memory after each set-up stage of the
loop, one fresh process per method, on the tiny Stable Diffusion at 64 px (the work of benchmarks/bench_sd.py), or
on SD 1.5's architecture with random weights (--sd15, bench_sd's build).

    .venv/bin/python -m benchmarks.trace_setup_memory                       # LoRA, DreamBooth-LoRA, TI
    .venv/bin/python -m benchmarks.trace_setup_memory --tracemalloc 15      # + the 15 lines that allocated most
    .venv/bin/python -m benchmarks.trace_setup_memory --sd15 --resolution 256 --mixed-precision bf16

The stages are marked by wrapping the loop's own calls (nothing in finetune/ knows about this script).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mb() -> tuple[float, float]:
    """(resident MB now, peak resident MB so far) of this process."""
    now = peak = float("nan")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            now = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return now, peak


def child(method: str, workdir: Path, trace: int, steps: int, resolution: int, precision: str, batch: int) -> None:
    """One job in this process, printing a JSON line of (stage, RSS MB) pairs."""
    import tracemalloc

    if trace:
        tracemalloc.start(1)
    stages: list[tuple[str, tuple[float, float]]] = [("python + argparse", rss_mb())]

    def mark(name: str) -> None:
        stages.append((name, rss_mb()))

    import finetune.train as loop

    mark("imports (finetune.train: torch, diffusers, accelerate)")
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_sd import method_recipes
    from finetune import speed
    from finetune.methods import get_method_class
    from finetune.recipe import load_config
    from finetune.text_to_image import TextToImageMethod

    recipe = method_recipes(workdir / "base", workdir / "captioned", workdir / "instance", resolution)[method]
    recipe["train"].update(
        mixed_precision=precision,
        train_batch_size=batch or recipe["train"]["train_batch_size"],
        output_dir=str(workdir / f"run-{method}"),
        max_train_steps=steps,
        num_samples=0,
        report_to="jsonl",
        progress_bar=False,
    )
    recipe["checkpoint"] = {"checkpointing_steps": 0}
    config = load_config(recipe)
    mark("config")

    def wrap(owner, name: str, label: str, once: bool = True):
        original = getattr(owner, name)
        done = []

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            if not (once and done):
                done.append(1)
                mark(label)
            return result

        setattr(owner, name, wrapper)

    wrap(speed, "check_mixed_precision", "Accelerator()")
    cls = get_method_class(config.method)
    wrap(TextToImageMethod, "build_source", "data source (records, captions)")
    wrap(TextToImageMethod, "load_components", "models loaded (from_pretrained)")
    wrap(cls, "setup", "method.setup (models on device, trainable marked, dataset)")
    wrap(cls, "use_prepared_modules", "accelerator.prepare + optimizer")
    wrap(cls, "before_training", "before_training (caches)")
    wrap(cls, "loss", "step 1: forward (the method's loss)")
    from accelerate import Accelerator

    wrap(Accelerator, "backward", "step 1: backward")
    wrap(cls, "after_optimizer_step", "step 1: optimizer step")
    snapshot = None
    original_step = cls.after_optimizer_step

    def first_step(self, step):
        nonlocal snapshot
        if step == 1 and trace:
            snapshot = tracemalloc.take_snapshot()
        if step > 1 and (step <= 3 or step == steps or step % 10 == 0):
            mark(f"step {step}")
        return original_step(self, step)

    cls.after_optimizer_step = first_step
    loop.train(config)
    mark("end of run")
    top = []
    if snapshot is not None:
        for stat in snapshot.statistics("lineno")[:trace]:
            frame = stat.traceback[0]
            top.append((f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}", stat.size / 2**20))
    print("STAGES " + json.dumps({"stages": stages, "tracemalloc": top}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["lora", "dreambooth_lora", "textual_inversion"])
    parser.add_argument("--tracemalloc", type=int, default=0, help="list the N lines that allocated most by step 1")
    parser.add_argument("--steps", type=int, default=2, help="steps to train (RSS after steps 1-3, every 10th, last)")
    parser.add_argument("--sd15", action="store_true", help="SD 1.5's architecture, random weights, batch 1")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--batch", type=int, default=0, help="per-process batch (default: bench_sd's; 1 with --sd15)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(
            args.child,
            Path(args.workdir),
            args.tracemalloc,
            args.steps,
            args.resolution,
            args.mixed_precision,
            args.batch,
        )
        return

    sys.path.insert(0, str(REPO))
    from tests.tiny_models import make_test_images, make_tiny_sd_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.sd15:
            from benchmarks.bench_sd import build_sd15

            build_sd15(workdir / "base")
        else:
            make_tiny_sd_pipeline(workdir / "base")
        for i, image in enumerate(make_test_images(workdir / "captioned", 32, size=args.resolution)):
            image.with_suffix(".txt").write_text(f"a toy picture {i}")
        make_test_images(workdir / "instance", 32, size=args.resolution, seed=1)
        results = {}
        for method in args.methods:
            command = [sys.executable, "-m", "benchmarks.trace_setup_memory", "--child", method, "--workdir", tmp]
            command += ["--tracemalloc", str(args.tracemalloc), "--steps", str(args.steps)]
            command += ["--resolution", str(args.resolution), "--mixed-precision", args.mixed_precision]
            command += ["--batch", str(args.batch or (1 if args.sd15 else 0))]
            run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            line = [x for x in run.stdout.splitlines() if x.startswith("STAGES ")]
            if run.returncode or not line:
                raise RuntimeError(f"{method} failed:\n{run.stderr[-3000:]}")
            results[method] = json.loads(line[0][len("STAGES ") :])
    for method, result in results.items():
        print(f"\n{method}: resident MB after each stage (change), and the peak so far")
        previous = 0.0
        for stage, (mb, peak) in result["stages"]:
            print(f"  {mb:7.0f}  {mb - previous:+6.0f}  peak {peak:5.0f}  {stage}")
            previous = mb
        for where, mb in result["tracemalloc"]:
            print(f"      tracemalloc {mb:7.1f} MB  {where}")


if __name__ == "__main__":
    main()
