"""SDXL DreamBooth-LoRA: seconds per step and peak memory of difftune beside diffusers' own example script
`examples/dreambooth/train_dreambooth_lora_sdxl.py`, both run for real, interleaved, on the same model, images and
recipe (rank-4 LoRA on to_q/to_k/to_v/to_out.0 with alpha = rank, AdamW lr 1e-4, weight decay 1e-4, constant LR,
gradient clipping 1.0, center crop, no flip, no prior preservation, no validation), with difftune's
`dreambooth.cache=none` and `dreambooth.cache=memory`.

Models: the tiny SDXL the tests build (64 px, ~2M parameters; CPU), or with --real the Stable Diffusion XL base 1.0
architecture (UNet 2.57B, CLIP-L + CLIP-G text encoders, VAE; 3.47B parameters, 13 GiB in fp32) with random
weights, built from its configs with no download, at 1024 px, batch 1: meant for a GPU with --mixed-precision bf16.
Building it takes ~2.5 min and 10.5 GB of RAM on 2 CPU cores (one component in memory at a time).

The peer script is not part of the project and never goes into it. Prepare it once, outside the checkout:

    git --git-dir=<diffusers git dir> show HEAD:examples/dreambooth/train_dreambooth_lora_sdxl.py \\
        > /tmp/peer/train_dreambooth_lora_sdxl.py
    # a PIL stand-in package named `torchvision` in /tmp/peer/stub (transforms, transforms.functional, import-only
    # io and transforms.v2): it goes on the peer's PYTHONPATH only; skip it where real torchvision is installed
    python3 -m venv /tmp/peer-venv && /tmp/peer-venv/bin/pip install torch==2.13.0   # the torch difftune runs on
    /tmp/peer-venv/bin/pip install -c requirements/lock.txt diffusers transformers accelerate peft datasets \\
        safetensors huggingface_hub tensorboard Jinja2            # the same locked versions on both sides

    .venv/bin/python -m benchmarks.bench_sdxl --peer-script /tmp/peer/train_dreambooth_lora_sdxl.py \\
        --peer-stub /tmp/peer/stub --peer-python /tmp/peer-venv/bin/python                  # tiny, CPU, 2 threads
    .venv/bin/python -m benchmarks.bench_sdxl --real --mixed-precision bf16 --peer-script ... --peer-python ...
    .venv/bin/python -m benchmarks.bench_sdxl --real --build-only /data/sdxl-random     # build once, then --model

Timing: difftune's steps from its own train_log.jsonl (benchmarks.common.measure_training); the peer's from its own
tqdm bar, made to print every step's instantaneous rate by tqdm's environment defaults (TQDM_MININTERVAL=0,
TQDM_MINITERS=1, TQDM_SMOOTHING=1; the script is run unmodified). Both: the median of the steps after the warm-up.
Memory on a CPU: peak RSS of each training process (ru_maxrss; the peer's, read with wait4, also covers the final
save and the pipeline it reloads after training). On a GPU: difftune's torch peak allocation from its log, and for
both the GPU memory in use sampled with nvidia-smi (peak minus the value before the run; includes the CUDA context).
Noise: a 2-thread step slows 10-50x when another job shares the CPU. Before every run the 1-minute load average is
printed (it lags: it still counts the previous run), and during it `other_cores`, the cores other processes kept
busy (the machine's busy CPU time from /proc/stat minus the run's own); figures with other_cores well above 0 are
not worth keeping.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import REPO, measure_training, print_table

sys.path.insert(0, str(REPO))
from tests.tiny_models import TOKENIZER_DIR, make_test_images, make_tiny_sdxl_pipeline  # noqa: E402

INSTANCE_PROMPT = "a photo of sks toy"
TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]  # the script's unet_target_modules
CONFIGS = ("diffusers", "difftune", "difftune_cache_memory")

# stabilityai/stable-diffusion-xl-base-1.0, as in its unet/, text_encoder/, text_encoder_2/, vae/ config.json
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    upcast_attention=False,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the 1280-d pooled CLIP-G embedding
)
SDXL_TEXT_ENCODER = dict(  # CLIP ViT-L/14's text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=768,
    hidden_act="quick_gelu",
    max_position_embeddings=77,
)
SDXL_TEXT_ENCODER_2 = dict(  # OpenCLIP ViT-bigG/14's text tower, with its projection
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
    max_position_embeddings=77,
)
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)
# parameters of the components these configs build, as published for the checkpoint (UNet 2.6B, CLIP-L 123M,
# CLIP-G with projection 695M, VAE 84M); build_sdxl warns when a config edit changes them
SDXL_PARAMETERS = {
    "unet": 2_567_463_684,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "vae": 83_653_863,
}


def build_sdxl(out_dir: Path) -> dict[str, int]:
    """Save Stable Diffusion XL base 1.0's architecture with random weights (fp32, safetensors) as a
    StableDiffusionXLPipeline folder, one component at a time so that only one is in memory (the UNet: ~10.3 GB,
    plus one 2 GB shard while it is written). The vendored tiny tokenizer stands in for CLIP's (both encoders keep
    the real 49408-token embedding tables). Returns each component's parameter count."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    counts = {}

    def save(name: str, model) -> None:
        counts[name] = sum(p.numel() for p in model.parameters())
        print(f"{name}: {counts[name] / 1e6:.1f}M parameters", flush=True)
        model.save_pretrained(out_dir / name, max_shard_size="2GB", safe_serialization=True)

    save("unet", UNet2DConditionModel(**SDXL_UNET))
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    ids["pad_token_id"] = tokenizer.pad_token_id
    save("text_encoder", CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER, **ids)))
    save("text_encoder_2", CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2, **ids)))
    save("vae", AutoencoderKL(**SDXL_VAE))
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer.save_pretrained(out_dir / name)
    EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(out_dir / "scheduler")
    # what StableDiffusionXLPipeline.save_pretrained writes, without holding every component at once
    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return _check_counts(counts)


def _check_counts(counts: dict[str, int]) -> dict[str, int]:
    for name, expected in SDXL_PARAMETERS.items():
        if name in counts and counts[name] != expected:
            print(f"warning: {name} has {counts[name]} parameters, the real checkpoint {expected}", flush=True)
    return counts


def recipe(args, base: Path, instance: Path, cache: str) -> dict:
    """difftune's side of the peer script's command line (see peer_command)."""
    train = {"train_batch_size": args.batch_size, "seed": 0}
    if args.mixed_precision:
        train["mixed_precision"] = args.mixed_precision
    if args.gradient_checkpointing:
        train["gradient_checkpointing"] = True
    return {
        "method": "dreambooth",
        "model": {"pretrained_model_name_or_path": str(base)},
        # center crops on both sides (dreambooth.cache needs them); the images are made at the training resolution, so
        # the script's default random crop would cut nothing either
        "data": {"resolution": args.resolution, "center_crop": True, "random_flip": False},
        "optim": {
            "lr": 1e-4,
            "lr_scheduler": "constant",
            "lr_warmup_steps": 0,
            "weight_decay": 1e-4,
            "max_grad_norm": 1.0,
        },
        "train": train,
        "dreambooth": {
            "use_lora": True,
            "rank": args.rank,
            "alpha": args.rank,
            "target_modules": TARGET_MODULES,
            "instance_data_dir": str(instance),
            "instance_prompt": INSTANCE_PROMPT,
            "with_prior_preservation": False,
            "cache": cache,
        },
    }


def peer_command(args, base: Path, instance: Path, output_dir: Path) -> list[str]:
    command = [args.peer_python, args.peer_script]
    command += ["--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(instance)]
    command += ["--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(output_dir)]
    command += ["--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size)]
    command += ["--rank", str(args.rank), "--max_train_steps", str(args.warmup + args.steps)]
    command += ["--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0"]
    command += ["--checkpointing_steps", str(10**9), "--seed", "0", "--center_crop"]
    command += ["--mixed_precision", args.mixed_precision or "no"]
    if args.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    return command


def thread_env(args) -> dict[str, str]:
    """Both sides: the same CPU threads, and no Hub calls (the model is a local folder)."""
    env = {"HF_HUB_OFFLINE": "1"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return env


def peer_env(args) -> dict[str, str]:
    env = {**os.environ, **thread_env(args)}
    # tqdm >= 4.66 reads its defaults from TQDM_* variables: a line per step with that step's own rate
    env.update(TQDM_MININTERVAL="0", TQDM_MINITERS="1", TQDM_SMOOTHING="1")
    if args.peer_stub:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.peer_stub, env.get("PYTHONPATH")) if p)
    return env


STEP_RE = re.compile(r"^Steps:.*?\|\s*(\d+)/(\d+) \[[^,\]]*,\s*([0-9.]+)(s/it|it/s)")


def parse_tqdm_steps(stderr: str) -> dict[int, float]:
    """Seconds of each step from the peer's progress bar: {step: seconds}, the first line printed for each step
    (set_postfix reprints the same rate)."""
    seconds = {}
    for line in re.split(r"[\r\n]", stderr):
        match = STEP_RE.match(line.strip())
        if match and int(match.group(1)) not in seconds:
            value = float(match.group(3))
            seconds[int(match.group(1))] = value if match.group(4) == "s/it" else 1 / value
    return seconds


class GpuMemory:
    """Peak GPU memory in use during a block, sampled with nvidia-smi every 0.2 s, minus the value before it (MB).
    None where nvidia-smi is missing."""

    def __init__(self):
        self.peak_mb = None
        self._tool = shutil.which("nvidia-smi")

    def _used(self) -> float:
        query = [self._tool, "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
        return sum(float(v) for v in out.split())

    def __enter__(self):
        if self._tool:
            self._base, self._max, self._stop = self._used(), 0.0, threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self._max = max(self._max, self._used())

    def __exit__(self, *exc):
        if self._tool:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._max - self._base, 0.0)


def cpu_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat); 0 where there is no /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class OtherLoad:
    """Cores kept busy by other processes while a block runs: the machine's busy CPU time minus the CPU time of
    the child processes this block waited for, over its wall time. About 0 on a quiet machine."""

    def __enter__(self):
        self._start = (time.perf_counter(), cpu_busy_s(), children_cpu_s())
        return self

    def __exit__(self, *exc):
        wall, busy, children = (
            now - then for now, then in zip((time.perf_counter(), cpu_busy_s(), children_cpu_s()), self._start)
        )
        self.cores = max(busy - children, 0.0) / max(wall, 1e-9)


def measure_peer(args, base: Path, instance: Path, work: Path) -> dict:
    """Run the peer script for warmup + steps steps in a fresh process."""
    output_dir = work / "peer-run"
    shutil.rmtree(output_dir, ignore_errors=True)
    log = work / "peer-stderr.txt"
    started = time.perf_counter()
    with GpuMemory() as gpu, open(log, "w") as err, open(work / "peer-stdout.txt", "w") as out:
        command = peer_command(args, base, instance, output_dir)
        process = subprocess.Popen(command, cwd=work, env=peer_env(args), stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage (Popen.wait would drop it)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    stderr = log.read_text(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"peer script failed (exit {process.returncode}):\n{stderr[-3000:]}")
    seconds = parse_tqdm_steps(stderr)
    steady = [s for step, s in seconds.items() if step > args.warmup]
    if len(steady) < args.steps:
        raise RuntimeError(f"read {len(steady)} timed steps from the peer's progress bar, expected {args.steps}")
    return {
        "s_per_step": statistics.median(steady),
        "min_s_per_step": min(steady),
        "peak_memory_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "gpu_memory_mb": gpu.peak_mb,
        "wall_s": wall,
        "lora_file": (output_dir / "pytorch_lora_weights.safetensors").is_file(),
    }


def measure_ours(args, base: Path, instance: Path, cache: str) -> dict:
    with GpuMemory() as gpu:
        result = measure_training(
            recipe(args, base, instance, cache), steps=args.steps, warmup_steps=args.warmup, env=thread_env(args)
        )
    return {**result, "gpu_memory_mb": gpu.peak_mb}


def versions(python: str, env: dict | None = None) -> str:
    code = (
        "import importlib.metadata as m, torch; print(' '.join(f'{p}=={m.version(p)}' for p in ('torch', "
        "'diffusers', 'transformers', 'accelerate', 'peft')), 'cuda' if torch.cuda.is_available() else 'cpu')"
    )
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    return result.stdout.strip() or result.stderr.strip()[-300:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-script", default="/tmp/peer/train_dreambooth_lora_sdxl.py")
    parser.add_argument("--peer-stub", default=None, help="folder holding the torchvision stand-in (peer only)")
    parser.add_argument("--peer-python", default=sys.executable, help="interpreter of the peer (its own venv)")
    parser.add_argument("--steps", type=int, default=35, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed (the first is the slowest)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; medians are reported")
    parser.add_argument("--images", type=int, default=32, help="instance images")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=None, help="default 2 (tiny), 1 (--real)")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 (tiny), 1024 (--real)")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP/MKL threads of both sides; default 2 (tiny), 0 (--real): as is"
    )
    parser.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--real", action="store_true", help="SDXL base 1.0 architecture, random weights (GPU)")
    parser.add_argument("--model", type=Path, help="an existing SDXL pipeline folder instead of building one")
    parser.add_argument("--build-only", type=Path, metavar="DIR", help="build the model into DIR and stop")
    parser.add_argument("--only", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="configurations to run")
    parser.add_argument("--json", help="also write the rows and every run to this file")
    args = parser.parse_args()
    args.batch_size = args.batch_size or (1 if args.real else 2)
    args.resolution = args.resolution or (1024 if args.real else 64)
    args.threads = (0 if args.real else 2) if args.threads is None else args.threads

    if args.build_only:
        counts = build_sdxl(args.build_only) if args.real else None
        if not args.real:
            make_tiny_sdxl_pipeline(args.build_only)
        print(f"saved {args.build_only}", counts or "")
        return
    if "diffusers" in args.only and not Path(args.peer_script).is_file():
        parser.error(f"--peer-script {args.peer_script} does not exist (see the module docstring)")

    if args.real and not shutil.which("nvidia-smi"):
        print("warning: --real without a GPU: the SDXL base UNet takes minutes per step on a CPU", flush=True)
    print("ours:", versions(sys.executable))
    if "diffusers" in args.only:
        print("peer:", versions(args.peer_python, peer_env(args)))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model:
            base = args.model
        elif args.real:
            base = work / "sdxl"
            build_sdxl(base)
        else:
            base = make_tiny_sdxl_pipeline(work / "tiny-sdxl")
        instance = work / "instance"
        make_test_images(instance, args.images, size=args.resolution)
        runs: dict[str, list[dict]] = {name: [] for name in args.only}
        for repeat in range(args.repeats):
            # each side takes its turn, starting one later every repetition, so a slow minute hits all of them
            order = args.only[repeat % len(args.only) :] + args.only[: repeat % len(args.only)]
            for name in order:
                load = os.getloadavg()[0]
                try:
                    with OtherLoad() as others:
                        if name == "diffusers":
                            result = measure_peer(args, base, instance, work)
                        else:
                            cache = "memory" if name.endswith("cache_memory") else "none"
                            result = measure_ours(args, base, instance, cache)
                    result["other_cores"] = others.cores
                except RuntimeError as err:
                    result = {"error": str(err).strip().splitlines()[-1][:300]}
                result["load1"] = load
                runs[name].append(result)
                print(f"repeat {repeat + 1} {name}: load {load:.2f} ->", result, flush=True)

    reference = [r["s_per_step"] for r in runs.get("diffusers", []) if "s_per_step" in r]
    reference_s = statistics.median(reference) if reference else None
    rows = []
    for name, results in runs.items():
        ok = [r for r in results if "s_per_step" in r]
        row = {"config": name, "runs_ok": f"{len(ok)}/{len(results)}"}
        row["load1"] = statistics.median(r["load1"] for r in results)
        if ok:
            s_per_step = statistics.median(r["s_per_step"] for r in ok)
            row["s_per_step"] = s_per_step
            row["speedup_vs_diffusers"] = reference_s / s_per_step if reference_s else None
            row["peak_memory_mb"] = statistics.median(r["peak_memory_mb"] for r in ok)
            gpu = [r["gpu_memory_mb"] for r in ok if r.get("gpu_memory_mb") is not None]
            row["gpu_used_mb"] = statistics.median(gpu) if gpu else None
            row["wall_s"] = statistics.median(r["wall_s"] for r in ok)
            row["other_cores"] = statistics.median(r["other_cores"] for r in ok)
        else:
            row["error"] = results[-1].get("error") if results else None
        rows.append(row)
    print()
    print(
        f"SDXL DreamBooth-LoRA rank {args.rank}, batch {args.batch_size}, {args.resolution} px, "
        f"{'SDXL base architecture' if args.real else 'tiny SDXL'}, mixed precision {args.mixed_precision or 'no'}, "
        f"{args.threads or 'default'} threads, {args.steps} timed steps after {args.warmup}, {args.repeats} repeats"
    )
    columns = ["config", "runs_ok", "load1", "s_per_step", "speedup_vs_diffusers", "peak_memory_mb"]
    columns += ["gpu_used_mb", "wall_s", "other_cores", "error"]
    print_table(rows, [c for c in columns if any(c in row for row in rows)])
    if any(row.get("gpu_used_mb") is not None for row in rows):
        print("on a GPU, difftune's peak_memory_mb is torch's peak allocation, the peer's is RSS: see gpu_used_mb")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "runs": runs}, indent=2, default=str))


if __name__ == "__main__":
    main()
