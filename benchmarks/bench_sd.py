"""Seconds per training step and peak memory of each Stable Diffusion method, with and without caching.

Tiny pipeline at 64 px (the one the tests build; same shape as the reference figures for the diffusers example
scripts in FIELD_NOTES.md), and optionally the Stable Diffusion 1.5 architecture at 512 px with random weights
(no download), meant for a GPU; at --resolution 256 it also runs on a CPU, beside the real scripts as well.

    .venv/bin/python -m benchmarks.bench_sd                 # tiny, CPU
    .venv/bin/python -m benchmarks.bench_sd --sd15 --methods lora --mixed-precision bf16   # on a GPU
    .venv/bin/python -m benchmarks.bench_sd --methods lora --set train.mixed_precision=bf16   # a lever, on a CPU

Beside the real diffusers example scripts (not part of the project; never commit them). Prepare them once, outside
the checkout, then pass their folder:

    G=<diffusers git dir>; mkdir -p /tmp/peer
    for f in text_to_image/train_text_to_image_lora.py dreambooth/train_dreambooth_lora.py \
             textual_inversion/textual_inversion.py; do
        git --git-dir=$G show HEAD:examples/$f > /tmp/peer/${f##*/}
    done
    # + a PIL stand-in package named `torchvision` in /tmp/peer/stub where the real one does not load (peer only)

    .venv/bin/python -m benchmarks.bench_sd --peer-scripts /tmp/peer --peer-stub /tmp/peer/stub \
        --methods lora dreambooth_lora textual_inversion --steps 35 --repeats 5

The script and difftune (cache=none, cache=memory) take turns, starting one later each repetition; each run prints
the 1-minute load average before it and the cores other processes kept busy during it (other_cores: figures well
above 0 are not worth keeping). The peer's steps are timed from its own tqdm bar (benchmarks/bench_sdxl.py), its
memory is the peak RSS of its process. Both sides run with --threads CPU threads. Without --peer-scripts, the
stand-in benchmarks/reference_sd_step.py is timed instead.

With --split both sides run under benchmarks/step_split.py, which times the same library calls in each (VAE encode,
text encoder forward and backward, UNet forward and backward, optimizer, clipping, data, Textual Inversion's row
restore, the rest) and prints each one's ms per step, in process CPU time (comparable under load at --threads 1)
and in wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.bench_sdxl import OtherLoad, parse_tqdm_steps
from benchmarks.common import REPO, measure_training, print_table

sys.path.insert(0, str(REPO))
from tests.tiny_models import TOKENIZER_DIR, make_test_images, make_tiny_sd_pipeline  # noqa: E402

# the diffusers example scripts on the same tiny pipeline, 64 px (FIELD_NOTES.md, measured on this machine kind on
# another day; the side-by-side figure is benchmarks/reference_sd_step.py, timed in the same run)
REFERENCE_S_PER_STEP = {"lora": 0.240, "dreambooth_lora": 0.148, "textual_inversion": 0.208}
REFERENCE_PEAK_MB = {"lora": 730}


def method_recipes(base: Path, data: Path, instance: Path, resolution: int) -> dict[str, dict]:
    common = {
        "model": {"pretrained_model_name_or_path": str(base)},
        "data": {"resolution": resolution, "random_flip": True},
        "optim": {"lr": 1e-4},
    }
    return {
        "lora": {
            **common,
            "method": "lora",
            "data": {**common["data"], "dataset": str(data)},
            "train": {"train_batch_size": 4},
            "lora": {"rank": 4},
        },
        "dreambooth_lora": {
            **common,
            "method": "dreambooth",
            "train": {"train_batch_size": 2},
            "dreambooth": {
                "use_lora": True,
                "instance_data_dir": str(instance),
                "instance_prompt": "a photo of sks toy",
            },
        },
        "dreambooth": {
            **common,
            "method": "dreambooth",
            "train": {"train_batch_size": 2},
            "dreambooth": {"instance_data_dir": str(instance), "instance_prompt": "a photo of sks toy"},
        },
        "textual_inversion": {
            **common,
            "method": "textual_inversion",
            "data": {**common["data"], "dataset": str(instance)},
            "train": {"train_batch_size": 4},
            "textual_inversion": {"placeholder_token": "<sks>", "initializer_token": "toy"},
        },
    }


def build_sd15(out_dir: Path) -> Path:
    """Stable Diffusion 1.5's architecture with random weights (the vendored tiny tokenizer stands in for CLIP's)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        latent_channels=4,
        sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(out_dir)
    return out_dir


REFERENCE_BATCH = {"lora": 4, "dreambooth_lora": 2, "textual_inversion": 4}


def measure_reference(name: str, base: Path, data: Path, instance: Path, steps: int) -> dict:
    """The diffusers example script's per-step work (benchmarks/reference_sd_step.py) in a fresh process."""
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "reference_sd_step.py"),
        "--method",
        name,
        "--base",
        str(base),
        "--data",
        str(data if name == "lora" else instance),
        "--batch-size",
        str(REFERENCE_BATCH[name]),
        "--steps",
        str(steps),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"reference run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# the diffusers example script of each method, and its command line for the work of method_recipes
PEER_SCRIPTS = {
    "lora": "train_text_to_image_lora.py",
    "dreambooth_lora": "train_dreambooth_lora.py",
    "textual_inversion": "textual_inversion.py",
}


def peer_command(
    name: str, args, base: Path, data: Path, instance: Path, resolution: int, batch: int, out: Path
) -> list[str]:
    """The script's arguments for the same work as method_recipes[name]: same model, images, resolution, batch,
    rank 4 (alpha = rank on both sides), lr 1e-4, constant LR, no warm-up, --mixed-precision (fp32 unless given), no
    validation, no checkpoints."""
    steps = args.warmup + args.steps
    command = [args.peer_python, str(Path(args.peer_scripts) / PEER_SCRIPTS[name])]
    command += [f"--pretrained_model_name_or_path={base}", f"--output_dir={out}", f"--resolution={resolution}"]
    command += [f"--train_batch_size={batch}", f"--max_train_steps={steps}", "--learning_rate=1e-4", "--seed=0"]
    command += ["--lr_scheduler=constant", "--lr_warmup_steps=0", f"--mixed_precision={args.mixed_precision or 'no'}"]
    command += ["--checkpointing_steps=1000000", "--dataloader_num_workers=0"]
    if name == "lora":
        command += [f"--train_data_dir={data}", "--rank=4", "--random_flip"]
    elif name == "dreambooth_lora":
        command += [f"--instance_data_dir={instance}", "--instance_prompt=a photo of sks toy", "--rank=4"]
    else:
        command += [f"--train_data_dir={instance}", "--placeholder_token=<sks>", "--initializer_token=toy"]
        command += ["--learnable_property=object", "--save_steps=1000000"]
    return command


def thread_env(threads: int) -> dict[str, str]:
    """Both sides: the same CPU threads, and no Hub calls (every model is a local folder)."""
    env = {"HF_HUB_OFFLINE": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def split_launcher(python: str, out: Path) -> list[str]:
    """The interpreter running a side under benchmarks.step_split, which writes the step's split to `out`."""
    return [python, "-m", "benchmarks.step_split", str(out)]


def read_split(out: Path) -> dict:
    """step_split's means (ms per step, wall and CPU) of a finished run."""
    means = json.loads(out.read_text()).get("mean_s", {})
    return {clock: {part: 1e3 * seconds for part, seconds in parts.items()} for clock, parts in means.items()}


def measure_peer(name: str, args, base: Path, data: Path, instance: Path, resolution: int, batch: int) -> dict:
    """Run the diffusers example script in a fresh process: median seconds per step after the warm-up, from its own
    tqdm bar (a line per step: tqdm's TQDM_* environment defaults; the script runs unmodified), and its peak RSS.
    With --split, under benchmarks.step_split (the repository on its PYTHONPATH for that module alone)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        env = {**os.environ, **thread_env(args.threads)}
        env.update(TQDM_MININTERVAL="0", TQDM_MINITERS="1", TQDM_SMOOTHING="1")
        paths = [args.peer_stub, str(REPO) if args.split else None, env.get("PYTHONPATH")]
        if any(paths[:2]):
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        command = peer_command(name, args, base, data, instance, resolution, batch, out)
        if args.split:
            env["STEP_SPLIT_WARMUP"] = str(args.warmup)
            command = split_launcher(command[0], Path(tmp) / "split.json") + command[1:]
        started = time.perf_counter()
        with open(Path(tmp) / "stderr.txt", "w") as err:
            process = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage (Popen.wait would drop it)
        wall = time.perf_counter() - started
        stderr = (Path(tmp) / "stderr.txt").read_text(errors="replace")
        done = os.waitstatus_to_exitcode(status) == 0
        split = read_split(Path(tmp) / "split.json") if args.split and done else None
    if not done:
        raise RuntimeError(f"{PEER_SCRIPTS[name]} failed:\n{stderr[-3000:]}")
    seconds = parse_tqdm_steps(stderr)
    steady = [s for step, s in seconds.items() if step > args.warmup]
    if len(steady) < args.steps:
        raise RuntimeError(f"read {len(steady)} timed steps from {PEER_SCRIPTS[name]}'s bar, expected {args.steps}")
    result = {
        "s_per_step": statistics.median(steady),
        "peak_memory_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "wall_s": wall,
    }
    return {**result, "split": split} if split else result


def peer_data(data: Path, folder: Path) -> Path:
    """The captioned images as a `datasets` image folder (metadata.jsonl), what train_text_to_image_lora.py reads;
    difftune reads the .txt captions beside the images of `data`."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for image in sorted(data.glob("*.png")):
        shutil.copy(image, folder / image.name)
        lines.append(json.dumps({"file_name": image.name, "text": image.with_suffix(".txt").read_text()}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def difftune_recipe(recipe: dict, cache: str, batch: int, args) -> dict:
    """method_recipes' recipe with this run's cache mode, batch, precision and --set overrides."""
    recipe = json.loads(json.dumps(recipe))
    recipe.setdefault(recipe["method"], {})["cache"] = cache
    recipe["train"]["train_batch_size"] = batch
    if args.mixed_precision:
        recipe["train"]["mixed_precision"] = args.mixed_precision
    for override in args.set:
        dotted, _, value = override.partition("=")
        section, _, key = dotted.partition(".")
        recipe.setdefault(section, {})[key] = yaml.safe_load(value)
    return recipe


def measure_split_training(recipe: dict, args, env: dict, tmp: Path) -> dict:
    """difftune's run (benchmarks.common.measure_training), under benchmarks.step_split with --split."""
    if not args.split:
        return measure_training(recipe, steps=args.steps, warmup_steps=args.warmup, env=env)
    out = tmp / "split.json"
    launcher = split_launcher(sys.executable, out)
    env = {**env, "STEP_SPLIT_WARMUP": str(args.warmup)}
    result = measure_training(recipe, steps=args.steps, warmup_steps=args.warmup, launcher=launcher, env=env)
    return {**result, "split": read_split(out)}


def print_split(name: str, samples: dict[str, list[dict]]) -> None:
    """Each side's median ms per step of every component over the runs, wall and CPU, and its share of the step."""
    from benchmarks.step_split import COMPONENTS

    for clock in ("cpu", "wall"):
        print(f"\n{name}: ms per step by component ({clock} time, median over runs; share of the step)")
        rows = []
        for config, runs in samples.items():
            splits = [r["split"][clock] for r in runs if r.get("split")]
            if not splits:
                continue
            medians = {part: statistics.median(s.get(part, 0.0) for s in splits) for part in ("step", *COMPONENTS)}
            row = {"side": "diffusers script" if config == "script" else f"difftune cache={config}"}
            row["step"] = f"{medians['step']:.1f}"
            share = {part: 100 * medians[part] / medians["step"] for part in COMPONENTS}
            row.update({part: f"{medians[part]:.1f} ({share[part]:.1f}%)" for part in COMPONENTS})
            rows.append(row)
        if rows:
            print_table(rows, ["side", "step", *COMPONENTS])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["lora", "dreambooth_lora", "textual_inversion", "dreambooth"])
    parser.add_argument("--steps", type=int, default=15, help="timed steps after the warm-up steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first is the slowest)")
    parser.add_argument(
        "--peer-scripts", help="folder holding the diffusers example scripts (see above): time them, not the stand-in"
    )
    parser.add_argument("--peer-stub", help="folder holding a torchvision stand-in (on the peer's PYTHONPATH only)")
    parser.add_argument("--peer-python", default=sys.executable, help="interpreter of the peer scripts")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP/MKL threads of both sides (default: 2 with --peer-scripts)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; the median is reported")
    parser.add_argument("--images", type=int, default=16, help="captioned images (LoRA)")
    parser.add_argument("--instance-images", type=int, default=5, help="instance images (DreamBooth, TI)")
    parser.add_argument(
        "--sd15", action="store_true", help="SD 1.5 architecture, batch 1 (512 px unless --resolution)"
    )
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: 512 with --sd15, else 64)")
    parser.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--split",
        action="store_true",
        help="run both sides under benchmarks.step_split and print each component's ms per step (wall and CPU)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="recipe overrides for every difftune run, e.g. train.channels_last=true optim.adamw_implementation=fused "
        "data.num_workers=2 train.compile=true (YAML values)",
    )
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 2 if args.peer_scripts else 0
    if args.peer_scripts:
        missing = [
            f for n, f in PEER_SCRIPTS.items() if n in args.methods and not (Path(args.peer_scripts) / f).is_file()
        ]
        if missing:
            parser.error(f"--peer-scripts {args.peer_scripts} lacks {', '.join(missing)} (see the module docstring)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        resolution = args.resolution or (512 if args.sd15 else 64)
        base = build_sd15(tmp / "sd15") if args.sd15 else make_tiny_sd_pipeline(tmp / "tiny")
        data = tmp / "captioned"
        for i, image in enumerate(make_test_images(data, args.images, size=resolution)):
            image.with_suffix(".txt").write_text(f"a toy picture {i}")
        instance = tmp / "instance"
        make_test_images(instance, args.instance_images, size=resolution, seed=1)
        recipes = method_recipes(base, data, instance, resolution)
        peer_images = peer_data(data, tmp / "captioned-imagefolder") if args.peer_scripts else None
        env = thread_env(args.threads)
        rows = []
        for name in args.methods:
            batch = 1 if args.sd15 else recipes[name]["train"]["train_batch_size"]
            # the script (or its stand-in) and both cache modes take turns, starting one later every repetition, so a
            # slow minute of the machine hits all of them
            # (the stand-in reference_sd_step.py knows the tiny pipeline's batches only; the real scripts run anything)
            with_script = name in PEER_SCRIPTS if args.peer_scripts else not args.sd15 and name in REFERENCE_BATCH
            configs = (["script"] if with_script else []) + ["none", "memory"]
            samples: dict[str, list[dict]] = {config: [] for config in configs}
            for repeat in range(args.repeats):
                for config in configs[repeat % len(configs) :] + configs[: repeat % len(configs)]:
                    load = os.getloadavg()[0]
                    with OtherLoad() as others:
                        if config == "script" and args.peer_scripts:
                            result = measure_peer(name, args, base, peer_images, instance, resolution, batch)
                        elif config == "script":
                            result = measure_reference(name, base, data, instance, args.steps)
                        else:
                            recipe = difftune_recipe(recipes[name], config, batch, args)
                            result = measure_split_training(recipe, args, env, tmp)
                    result.update(load1=load, other_cores=others.cores)
                    samples[config].append(result)
                    shown = {key: value for key, value in result.items() if key != "split"}  # (tables below)
                    print(f"repeat {repeat + 1} {name} {config}: load {load:.2f} ->", shown, flush=True)
            if args.split:
                print_split(name, samples)
            script = samples.get("script")
            reference = statistics.median(r["s_per_step"] for r in script) if script else None
            reference_memory = statistics.median(r["peak_memory_mb"] for r in script) if script else None
            for cache in ("none", "memory"):
                s_per_step = statistics.median(r["s_per_step"] for r in samples[cache])
                rows.append(
                    {
                        "method": name,
                        "batch": batch,
                        "cache": cache,
                        "s_per_step": s_per_step,
                        "peak_memory_mb": statistics.median(r["peak_memory_mb"] for r in samples[cache]),
                        "script_s_per_step": reference,
                        "speedup_vs_script": reference / s_per_step if reference else None,
                        "script_peak_mb": reference_memory,
                        "load1": statistics.median(r["load1"] for runs in samples.values() for r in runs),
                        "other_cores": statistics.median(r["other_cores"] for runs in samples.values() for r in runs),
                        "field_notes_s_per_step": None if args.sd15 else REFERENCE_S_PER_STEP.get(name),
                    }
                )
    print(
        f"\n{'the diffusers example scripts' if args.peer_scripts else 'the stand-in reference_sd_step.py'} beside "
        f"difftune, {args.threads or 'default'} thread(s), {args.steps} timed steps after {args.warmup}, medians of "
        f"{args.repeats} interleaved runs"
    )
    print_table(
        rows,
        [
            "method",
            "batch",
            "cache",
            "s_per_step",
            "script_s_per_step",
            "speedup_vs_script",
            "peak_memory_mb",
            "script_peak_mb",
            "load1",
            "other_cores",
            "field_notes_s_per_step",
        ],
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
