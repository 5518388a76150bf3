"""Where one cached LoRA step's time goes: bench_sd's LoRA work (tiny Stable Diffusion, 64 px, batch 4, rank 4,
latents and captions cached in memory) under torch.profiler, in this process.

    .venv/bin/python -m benchmarks.profile_step                    # 3 profiled steps after 4 unprofiled ones
    .venv/bin/python -m benchmarks.profile_step --steps 5 --threads 2 --set train.attention_backend=math
    .venv/bin/python -m benchmarks.profile_step --arch sd15 --resolution 256 --warmup 2 --steps 2 \
        --set train.mixed_precision=bf16          # SD 1.5's full architecture (random weights, bench_gpu's build)

Prints the top ops by self CPU time, and the share of the steps' wall time in the UNet's forward, in the backward
(the UNet's, and the loss's few ops), in the optimizer and in everything else (data, the loss's host work: cache
lookup, seeded noise and timesteps, text conditioning; LR schedule, logging). Writes a chrome trace (open it in
chrome://tracing or https://ui.perfetto.dev) to outputs/profile_step/. On a CUDA GPU it also counts the host syncs
of the profiled steps (torch.cuda.set_sync_debug_mode) and where they happen: one is expected, the last step's log.

The phases are marked by wrapping the loop's own calls (nothing in finetune/ knows about this script). Figures on a
shared machine move with its load: the 1-minute load average is printed beside them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import yaml

from benchmarks.common import REPO

sys.path.insert(0, str(REPO))
from tests.tiny_models import make_test_images, make_tiny_sd_pipeline  # noqa: E402

# the phases this script labels (record_function ranges), and torch's own labels of the others
UNET_FORWARD = "profile_step: UNet forward"
BACKWARD = "profile_step: backward"
LOSS = "profile_step: method.loss"
OPTIMIZER_PREFIXES = ("Optimizer.step#", "Optimizer.zero_grad#")
DATA_PREFIX = "enumerate(DataLoader)#"
STEP_PREFIX = "ProfilerStep#"


def label(function, name: str):
    """`function` run inside a profiler range named `name`."""
    from torch.profiler import record_function

    def labelled(*args, **kwargs):
        with record_function(name):
            return function(*args, **kwargs)

    return labelled


def phase_split(trace: Path) -> dict[str, float]:
    """Seconds of each phase over the profiled steps, from the ranges in the chrome trace (the profiler's step
    ranges are in the trace, not in its event list)."""
    data = json.loads(trace.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    totals = {"steps": 0.0, "unet_forward": 0.0, "backward": 0.0, "loss": 0.0, "optimizer": 0.0, "data": 0.0}
    for event in events:
        name, seconds = event.get("name", ""), event.get("dur", 0) / 1e6  # microseconds
        if event.get("ph") != "X":
            continue
        if name.startswith(STEP_PREFIX):
            totals["steps"] += seconds
        elif name == UNET_FORWARD:
            totals["unet_forward"] += seconds
        elif name == BACKWARD:
            totals["backward"] += seconds
        elif name == LOSS:
            totals["loss"] += seconds
        elif name.startswith(OPTIMIZER_PREFIXES):
            totals["optimizer"] += seconds
        elif name.startswith(DATA_PREFIX):
            totals["data"] += seconds
    return totals


def recipe(work: Path, steps: int, overrides: list[str], resolution: int = 64) -> dict:
    from benchmarks.bench_sd import method_recipes

    recipes = method_recipes(work / "model", work / "captioned", work / "instance", resolution)
    result = json.loads(json.dumps(recipes["lora"]))
    result["lora"]["cache"] = "memory"
    result["train"].update(
        output_dir=str(work / "run"),
        max_train_steps=steps,
        log_every=steps,  # a run's usual logging: not every step (each log reads the loss back from the device)
        report_to="jsonl",
        progress_bar=False,
        num_samples=0,
    )
    result.setdefault("checkpoint", {})["checkpointing_steps"] = 0
    for override in overrides:
        key, _, value = override.partition("=")
        section, _, name = key.partition(".")
        result.setdefault(section, {})[name] = yaml.safe_load(value)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=4, help="steps before the profiler records (the first is slow)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (bench_sd's peers run with 2)")
    parser.add_argument("--top", type=int, default=20, help="rows of the op table")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "profile_step", help="where the trace goes")
    parser.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE", help="recipe overrides")
    parser.add_argument(
        "--arch",
        choices=["tiny", "sd15"],
        default="tiny",
        help="the tests' tiny SD, or SD 1.5's full architecture with random bf16 weights (bench_gpu's build: ~2 GB "
        "in a temporary folder, about a minute to build on a CPU)",
    )
    parser.add_argument("--resolution", type=int, default=64, help="image size in pixels")
    args = parser.parse_args(argv)

    import torch
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    from torch.profiler import ProfilerActivity, profile, schedule

    from finetune import train as loop
    from finetune.methods.lora import LoraTextToImage
    from finetune.recipe import load_config

    torch.set_num_threads(args.threads)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(
        activities=activities,
        schedule=schedule(wait=args.warmup - 1, warmup=1, active=args.steps, repeat=1),
        record_shapes=True,
    )
    # the phases: the UNet's forward, the backward, the method's loss (which holds the UNet's forward); a profiler
    # step ends after each optimizer step (the method's on_step_end)
    UNet2DConditionModel.forward = label(UNet2DConditionModel.forward, UNET_FORWARD)
    Accelerator.backward = label(Accelerator.backward, BACKWARD)
    LoraTextToImage.loss = label(LoraTextToImage.loss, LOSS)
    on_step_end = LoraTextToImage.on_step_end

    def step_end(self, step, *a, **k):
        on_step_end(self, step, *a, **k)
        profiler.step()
        if torch.cuda.is_available() and step == args.warmup:  # the profiled steps: report every host sync
            torch.cuda.set_sync_debug_mode("warn")

    LoraTextToImage.on_step_end = step_end

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.arch == "sd15":
            from benchmarks.bench_gpu import build_pipeline

            build_pipeline("sd15", work / "model", (4, 8))
        else:
            make_tiny_sd_pipeline(work / "model")
        for i, image in enumerate(make_test_images(work / "captioned", 16, size=args.resolution)):
            image.with_suffix(".txt").write_text(f"a toy picture {i}")
        config = load_config(recipe(work, args.warmup + args.steps, args.set, args.resolution))
        load = os.getloadavg()[0]
        started = time.perf_counter()
        with profiler, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop.train(config)
        wall = time.perf_counter() - started
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")

    args.out.mkdir(parents=True, exist_ok=True)
    trace = args.out / "trace.json"
    profiler.export_chrome_trace(str(trace))
    totals = phase_split(trace)
    print()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    steps = totals["steps"]
    print(f"chrome trace: {trace}")
    if torch.cuda.is_available():
        # the last step logs (train.log_every = the run's length), which reads the loss back: one sync expected there
        syncs = collections.Counter(
            f"{w.filename}:{w.lineno}" for w in caught if "synchronizing CUDA operation" in str(w.message)
        )
        print(f"host syncs in the profiled steps and after them: {sum(syncs.values())}", dict(syncs.most_common(8)))
    if not steps:
        print("no profiled step: raise the run's length (--warmup, --steps)")
        return 1
    other = steps - totals["unet_forward"] - totals["backward"] - totals["optimizer"]
    loss_host = totals["loss"] - totals["unet_forward"]
    print(
        f"{args.steps} profiled steps after {args.warmup}, {args.threads} thread(s), load {load:.2f} at the start "
        f"(run {wall:.1f} s in all): {steps / args.steps * 1e3:.1f} ms per step"
    )
    rows = [
        ("UNet forward", totals["unet_forward"]),
        ("backward (UNet + loss)", totals["backward"]),
        ("optimizer (step + zero_grad)", totals["optimizer"]),
        ("everything else", other),
        ("  of it: method.loss around the UNet", loss_host),
        ("  of it: data loader", totals["data"]),
        ("  of it: the rest (schedule, accumulate, logs)", other - loss_host - totals["data"]),
    ]
    for name, seconds in rows:
        print(f"{name:48s} {seconds / args.steps * 1e3:8.2f} ms  {100 * seconds / steps:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
