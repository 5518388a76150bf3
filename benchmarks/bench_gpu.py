"""LoRA training speed on one GPU: Stable Diffusion 1.5, SDXL and Flux architectures with random weights (built from
their configs, no download), at 512 and 1024 px, batch 1 and 4, with and without each speed lever; optionally the
diffusers example script on the same work, side by side.

    make bench-gpu                                           # the default plan, figures to outputs/bench-gpu.json
    make bench-gpu BENCH_GPU_ARGS="--diffusers ~/src/diffusers --families sd15 sdxl"
    .venv/bin/python -m benchmarks.bench_gpu --dry-run       # what it would run; builds nothing large (CPU is fine)
    .venv/bin/python -m benchmarks.bench_gpu --cpu --families sd15 --sizes 64 --batches 1 --levers baseline \
        --warmup 1 --steps 2                                 # the whole path on a CPU, small: a check, not a figure

Each run is a fresh process (`python -m finetune` on a recipe, or the example script), wrapped so that the same
clock times both: an optimizer-step hook synchronises the GPU and records the time of every step, and
`torch.cuda.max_memory_allocated` is read at exit. Printed per run: s/step (median after the warm-up steps),
images/s, peak GPU memory, and model FLOPs utilisation (MFU): the denoiser's forward and backward FLOPs at the run's
shape (torch's FlopCounterMode on a meta-device copy: what a LoRA step computes, the input gradients through every
frozen layer, without the frozen weights' gradients), divided by s/step and the GPU's dense bf16 peak.

Flux is built at full width with fewer blocks by default (`--flux-blocks 4 8` of FLUX.1's 19 double and 38 single;
`--flux-blocks 19 38` for all 12B parameters, which takes most of the 10 minutes to build, save and load), and T5
with 2 of its 24 layers: the text encoders only encode the captions once (cache=memory) and are then freed, so their
depth changes nothing in a step. MFU is per FLOP, so it is comparable across depths.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# dense bf16 tensor-core peaks (TFLOP/s) by device name fragment; --peak-tflops overrides
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0}

ARCHITECTURES = {
    "sd15": {"family": "sd", "latent_factor": 8, "script": "examples/text_to_image/train_text_to_image_lora.py"},
    "sdxl": {
        "family": "sdxl",
        "latent_factor": 8,
        "script": "examples/text_to_image/train_text_to_image_lora_sdxl.py",
    },
    "flux": {"family": "flux", "latent_factor": 8, "script": "examples/dreambooth/train_dreambooth_lora_flux.py"},
}
# the default plan: every architecture at 512 and 1024 px, batch 1 and 4, with the default options; each lever alone
# on one shape per architecture (the largest batch, at the architecture's native size when it is among --sizes, else
# the largest of them)
NATIVE_SIZE = {"sd15": 512, "sdxl": 1024, "flux": 1024}
LEVERS = {
    "baseline": {},  # bf16, latents and captions cached in memory, fused AdamW (the default on CUDA)
    "compile": {"train": {"compile": True}},
    "channels_last": {"train": {"channels_last": True}},
    "gradient_checkpointing": {"train": {"gradient_checkpointing": True}},
    "no_cache": {"lora": {"cache": "none"}, "data": {"num_workers": 4}},
    "adamw_for_loop": {"optim": {"adamw_implementation": "for_loop"}},
    "fp32_frozen": {"train": {"mixed_precision": "no"}},
    # the SDPA kernel of the step (the baseline's 'auto' lets torch pick, FlashAttention-2 for these shapes in bf16)
    "attention_cudnn": {"train": {"attention_backend": "cudnn"}},
    "attention_efficient": {"train": {"attention_backend": "efficient"}},
    "attention_math": {"train": {"attention_backend": "math"}},
}

# the default plan's levers: 3 architectures x (4 baselines + 5 levers) = 27 runs, sized for ~10 minutes on one H100
DEFAULT_LEVERS = ["baseline", "compile", "channels_last", "no_cache", "adamw_for_loop", "attention_cudnn"]


@dataclass
class Run:
    arch: str
    resolution: int
    batch: int
    lever: str
    runner: str = "difftune"  # or "diffusers" (the example script)
    figures: dict = field(default_factory=dict)


def plan(families: list[str], sizes: list[int], batches: list[int], levers: list[str], diffusers: str | None):
    runs = []
    for arch in families:
        for resolution in sizes:
            for batch in batches:
                runs.append(Run(arch, resolution, batch, "baseline"))
                if diffusers:
                    runs.append(Run(arch, resolution, batch, "baseline", runner="diffusers"))
        lever_size = NATIVE_SIZE[arch] if NATIVE_SIZE[arch] in sizes else max(sizes)
        for lever in levers:
            if lever != "baseline":
                runs.append(Run(arch, lever_size, max(batches), lever))
    return runs


# -- architectures with random weights --------------------------------------------------------------------------------
def clip_config(tokenizer, hidden: int, layers: int, heads: int, intermediate: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def denoiser_config(arch: str, flux_blocks: tuple[int, int] = (4, 8)) -> tuple[str, dict]:
    """(diffusers class name, config) of the architecture's denoiser: SD 1.5's and SDXL's UNets, FLUX.1's
    transformer (with `flux_blocks` double and single blocks)."""
    if arch == "sd15":
        return "UNet2DConditionModel", dict(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)
        )
    if arch == "sdxl":
        return "UNet2DConditionModel", dict(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    from benchmarks.bench_flow import FLUX_DEV_TRANSFORMER  # FLUX.1-dev's config, with fewer blocks if asked

    return "FluxTransformer2DModel", {
        **FLUX_DEV_TRANSFORMER,
        "num_layers": flux_blocks[0],
        "num_single_layers": flux_blocks[1],
    }


def denoiser_inputs(arch: str, batch: int, resolution: int, device):
    """Inputs of one training forward of the denoiser at this shape (77 CLIP tokens; Flux: 512 T5 tokens)."""
    import torch

    side = resolution // 8
    if arch == "flux":
        tokens = (side // 2) ** 2
        return dict(
            hidden_states=torch.randn(batch, tokens, 64, device=device, requires_grad=True),
            timestep=torch.ones(batch, device=device),
            guidance=torch.ones(batch, device=device),
            pooled_projections=torch.randn(batch, 768, device=device),
            encoder_hidden_states=torch.randn(batch, 512, 4096, device=device),
            txt_ids=torch.zeros(512, 3, device=device),
            img_ids=torch.zeros(tokens, 3, device=device),
        )
    inputs = dict(
        sample=torch.randn(batch, 4, side, side, device=device, requires_grad=True),
        timestep=torch.ones(batch, device=device),
        encoder_hidden_states=torch.randn(batch, 77, 768 if arch == "sd15" else 2048, device=device),
    )
    if arch == "sdxl":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, device=device),
            "time_ids": torch.randn(batch, 6, device=device),
        }
    return inputs


def step_flops(arch: str, batch: int, resolution: int, flux_blocks: tuple[int, int]) -> tuple[float, float]:
    """(FLOPs of one LoRA training step's denoiser forward + backward, denoiser parameters), counted by torch's
    FlopCounterMode on a meta-device model: no memory, no GPU."""
    import diffusers
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    class_name, config = denoiser_config(arch, flux_blocks)
    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**config)
    model.requires_grad_(False)
    inputs = denoiser_inputs(arch, batch, resolution, "meta")
    with FlopCounterMode(display=False) as counter:
        output = model(**inputs).sample
        output.sum().backward()
    return float(counter.get_total_flops()), float(sum(p.numel() for p in model.parameters()))


def encoding_flops(arch: str, resolution: int) -> tuple[float, float]:
    """(FLOPs of the VAE's encode of one image, of its caption's text encoders: CLIP's 77 tokens, T5-XXL's 512 with
    all 24 layers) on meta-device models: the work per image a latent and caption cache removes from a step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    pipeline = make_pipeline(arch, (1, 1), 24, "meta")
    image = torch.randn(1, 3, resolution, resolution, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as vae_counter:
        pipeline.vae.encode(image)
    with torch.no_grad(), FlopCounterMode(display=False) as text_counter:
        pipeline.text_encoder(torch.zeros(1, 77, dtype=torch.long, device="meta"))
        if arch != "sd15":
            tokens = 512 if arch == "flux" else 77
            pipeline.text_encoder_2(torch.zeros(1, tokens, dtype=torch.long, device="meta"))
    return float(vae_counter.get_total_flops()), float(text_counter.get_total_flops())


def build_pipeline(arch: str, out_dir: Path, flux_blocks: tuple[int, int], t5_layers: int = 2) -> Path:
    """Save the architecture as a diffusers pipeline folder with random bf16 weights, built on the GPU (fast)."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = make_pipeline(arch, flux_blocks, t5_layers, device)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # random weights: no module of them needs keeping in float32
    try:
        pipeline.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    del pipeline
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out_dir


def make_pipeline(arch: str, flux_blocks: tuple[int, int], t5_layers: int, device: str):
    """The architecture's diffusers pipeline with random weights on `device` ('meta' in a dry run: nothing built)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from tests.tiny_models import FLUX_SCHEDULER_CONFIG, load_tiny_clip_tokenizer, make_tiny_t5_tokenizer

    tokenizer = load_tiny_clip_tokenizer()
    clip_l = clip_config(tokenizer, 768, 12, 12, 3072)
    vae_config = dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
    )
    class_name, config = denoiser_config(arch, flux_blocks)
    torch.manual_seed(0)
    with torch.device(device):
        denoiser = getattr(diffusers, class_name)(**config)
        if arch == "flux":
            vae = AutoencoderKL(
                latent_channels=16,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
                **vae_config,
            )
            t5_tokenizer = make_tiny_t5_tokenizer()
            t5 = T5EncoderModel(
                T5Config(
                    vocab_size=len(t5_tokenizer),
                    d_model=4096,
                    d_kv=64,
                    d_ff=10240,
                    num_layers=t5_layers,
                    num_heads=64,
                    feed_forward_proj="gated-gelu",
                )
            )
            parts = dict(
                transformer=denoiser,
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
                vae=vae,
                text_encoder=CLIPTextModel(clip_l),
                tokenizer=tokenizer,
                text_encoder_2=t5,
                tokenizer_2=t5_tokenizer,
            )
            pipeline = diffusers.FluxPipeline(**parts)
        else:
            vae = AutoencoderKL(latent_channels=4, **vae_config)
            scheduler = diffusers.DDPMScheduler(  # SD 1.5's and SDXL's training schedule, as published
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False
            )
            if arch == "sd15":
                pipeline = diffusers.StableDiffusionPipeline(
                    vae=vae,
                    text_encoder=CLIPTextModel(clip_l),
                    tokenizer=tokenizer,
                    unet=denoiser,
                    scheduler=scheduler,
                    safety_checker=None,
                    feature_extractor=None,
                    requires_safety_checker=False,
                )
            else:
                clip_g = clip_config(tokenizer, 1280, 32, 20, 5120, projection=1280)
                pipeline = diffusers.StableDiffusionXLPipeline(
                    vae=vae,
                    text_encoder=CLIPTextModel(clip_l),
                    text_encoder_2=CLIPTextModelWithProjection(clip_g),
                    tokenizer=tokenizer,
                    tokenizer_2=load_tiny_clip_tokenizer(),
                    unet=denoiser,
                    scheduler=scheduler,
                )
    return pipeline


def make_images(folder: Path, resolution: int, count: int = 16) -> Path:
    """`count` captioned images (metadata.jsonl, the `datasets` imagefolder layout both sides read), and the same
    images alone in `<folder>-plain` (the DreamBooth scripts open every file of their folder as an image)."""
    from tests.tiny_models import make_test_images

    paths = make_test_images(folder, count, size=resolution)
    plain = plain_folder(folder)
    plain.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as handle:
        for i, path in enumerate(paths):
            handle.write(json.dumps({"file_name": path.name, "text": f"a toy picture {i}"}) + "\n")
            (plain / path.name).symlink_to(path)
    return folder


def plain_folder(folder: Path) -> Path:
    return folder.with_name(folder.name + "-plain")


# -- one run ----------------------------------------------------------------------------------------------------------
WRAPPER = r"""
import atexit, json, os, runpy, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
times = []
def _step(optimizer, args, kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times.append(time.perf_counter())
register_optimizer_step_post_hook(_step)
def _report():
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    with open(os.environ["BENCH_GPU_OUT"], "w") as handle:
        json.dump({"step_times": times, "peak_bytes": peak}, handle)
atexit.register(_report)
target, sys.argv = sys.argv[1], sys.argv[1:]
if target == "-m":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
"""


def difftune_recipe(run: Run, base: Path, data: Path, output_dir: Path, steps: int) -> dict:
    recipe = {
        "method": "lora",
        "model": {"pretrained_model_name_or_path": str(base)},
        "data": {"dataset": str(data), "resolution": run.resolution},
        "optim": {"lr": 1e-4, "lr_scheduler": "constant"},
        "train": {
            "output_dir": str(output_dir),
            "max_train_steps": steps,
            "train_batch_size": run.batch,
            "mixed_precision": "bf16",
            "num_samples": 0,
            "log_every": steps,
            "report_to": "jsonl",
            "progress_bar": False,
        },
        "checkpoint": {"checkpointing_steps": 0},
        "lora": {"rank": 16, "cache": "memory"},
    }
    for section, values in LEVERS[run.lever].items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def diffusers_command(run: Run, checkout: Path, base: Path, data: Path, output_dir: Path, steps: int) -> list[str]:
    """The example script's command line for the same work (bf16, rank 16, constant lr, no validation)."""
    script = checkout / ARCHITECTURES[run.arch]["script"]
    common = [
        f"--pretrained_model_name_or_path={base}",
        f"--output_dir={output_dir}",
        f"--resolution={run.resolution}",
        f"--train_batch_size={run.batch}",
        f"--max_train_steps={steps}",
        "--mixed_precision=bf16",
        "--rank=16",
        "--learning_rate=1e-4",
        "--lr_scheduler=constant",
        "--checkpointing_steps=1000000",
        "--seed=0",
        "--dataloader_num_workers=4",
    ]
    if run.arch == "flux":
        return [str(script), f"--instance_data_dir={plain_folder(data)}", "--instance_prompt=a toy picture", *common]
    return [str(script), f"--train_data_dir={data}", "--caption_column=text", *common]


def execute(command: list[str], warmup: int, env: dict) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command],
        cwd=REPO,
        env={**os.environ, **env, "BENCH_GPU_OUT": out},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        return {"error": result.stderr[-2000:], "wall_s": wall}
    measured = json.loads(Path(out).read_text())
    times = measured["step_times"]
    deltas = [b - a for a, b in zip(times[warmup:], times[warmup + 1 :])]
    return {
        "s_per_step": statistics.median(deltas) if deltas else None,
        "peak_memory_gb": measured["peak_bytes"] / 2**30,
        "wall_s": wall,
        "steps": len(times),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument(
        "--levers",
        nargs="+",
        default=DEFAULT_LEVERS,
        choices=list(LEVERS),
        help=f"levers to measure alone (default {' '.join(DEFAULT_LEVERS)}; all: {' '.join(LEVERS)})",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--flux-blocks", nargs=2, type=int, default=[4, 8], metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--diffusers", help="a diffusers repository checkout: run its example scripts too")
    parser.add_argument(
        "--peer-stub",
        help="a folder put first on the example scripts' PYTHONPATH only (e.g. a torchvision stand-in where "
        "torchvision is not installed)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    parser.add_argument("--json", default="outputs/bench-gpu.json", help="where to write the figures")
    parser.add_argument("--workdir", help="where to build the models (default: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and each run's FLOPs; build nothing")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="where there is no GPU, run the plan on the CPU anyway: slow (give small --sizes), a check that every "
        "stage works (build, save, train, time, the script beside it), not a figure to compare",
    )
    args = parser.parse_args(argv)
    flux_blocks = tuple(args.flux_blocks)
    checkout = Path(args.diffusers).expanduser() if args.diffusers else None
    if checkout is not None:
        missing = [a for a in args.families if not (checkout / ARCHITECTURES[a]["script"]).is_file()]
        if missing:
            print(f"--diffusers {checkout}: no example script for {missing} (is it a diffusers checkout?)")
            return 2
    runs = plan(args.families, args.sizes, args.batches, args.levers, args.diffusers)

    import torch

    from finetune.recipe import load_config

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)
    if gpu is None and not (args.dry_run or args.cpu):
        print("no CUDA GPU here: --dry-run prints the plan, --cpu runs it on the CPU (slowly: give small --sizes)")
        return 2
    device = gpu or ("none (dry run)" if args.dry_run else "CPU (a check of the path, not a figure)")
    flops_cache: dict[tuple, tuple[float, float]] = {}
    ceilings: dict[tuple, tuple[float, float, float]] = {}  # (latent-cache speed-up bound, VAE, text TFLOP)
    print(f"device: {device}; bf16 peak {peak or '?'} TFLOP/s; {len(runs)} runs")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        bases: dict[str, Path] = {}
        datas: dict[int, Path] = {}
        for number, run in enumerate(runs, 1):
            key = (run.arch, run.resolution)
            if key not in flops_cache:  # counted at batch 1: every FLOP of these models is per image
                flops_cache[key] = step_flops(run.arch, 1, run.resolution, flux_blocks)
                vae, text = encoding_flops(run.arch, run.resolution)
                ceilings[key] = ((vae + flops_cache[key][0]) / flops_cache[key][0], vae / 1e12, text / 1e12)
                print(
                    f"{run.arch} {run.resolution}px, per image: denoiser forward + backward "
                    f"{flops_cache[key][0] / 1e12:.2f} TFLOP, VAE encode {vae / 1e12:.2f}, text encoders "
                    f"{text / 1e12:.3f}: a latent cache can make a step at most {ceilings[key][0]:.2f}x faster, "
                    f"{(vae + text + flops_cache[key][0]) / flops_cache[key][0]:.2f}x with the captions' encoding "
                    "(where the script encodes them every step)"
                )
            flops, parameters = flops_cache[key][0] * run.batch, flops_cache[key][1]
            run.figures.update(step_tflop=flops / 1e12, denoiser_params_b=parameters / 1e9)
            run.figures.update(latent_cache_ceiling=ceilings[key][0], vae_encode_tflop=ceilings[key][1] * run.batch)
            run.figures.update(text_encode_tflop=ceilings[key][2] * run.batch)
            base, data, out = tmp / run.arch, tmp / f"data-{run.resolution}", tmp / f"run-{number}"
            if run.runner == "diffusers":
                command = diffusers_command(run, checkout, base, data, out, args.warmup + args.steps)
            else:
                recipe = difftune_recipe(run, base, data, out, args.warmup + args.steps)
                load_config(recipe)  # every key checked now, also in a dry run
                recipe_path = tmp / f"recipe-{number}.yaml"  # (JSON is YAML)
                command = ["-m", "finetune", str(recipe_path)]
            label = f"[{number}/{len(runs)}] {run.runner:9s} {run.arch:5s} {run.resolution:4d}px batch {run.batch} "
            label += f"{run.lever:22s} {flops / 1e12:8.2f} TFLOP/step"
            if args.dry_run:
                if run.arch not in bases:  # the pipeline's constructor with every part on the meta device
                    bases[run.arch] = make_pipeline(run.arch, flux_blocks, 2, "meta") and base
                print(f"{label}  would run: {' '.join(command)}")
                continue
            if run.arch not in bases:
                bases[run.arch] = build_pipeline(run.arch, base, flux_blocks)
            if run.resolution not in datas:
                datas[run.resolution] = make_images(data, run.resolution)
            if run.runner == "difftune":
                recipe_path.write_text(json.dumps(recipe))
            env = {}
            if run.runner == "diffusers" and args.peer_stub:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.peer_stub, os.environ.get("PYTHONPATH")]))
            figures = execute(command, args.warmup, env)
            if figures.get("s_per_step"):
                figures["images_per_s"] = run.batch / figures["s_per_step"]
                figures["mfu"] = flops / figures["s_per_step"] / (peak * 1e12) if peak else None
            run.figures.update(figures)
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items() if k != "error"}
            print(
                f"{label}  {shown}{'  FAILED: ' + figures['error'][-300:] if 'error' in figures else ''}", flush=True
            )
    ratios = []
    for run in runs:
        if run.runner == "diffusers" and run.figures.get("s_per_step"):
            # the script against difftune's baseline (latents cached) and, where measured, without the cache
            for ours in runs:
                shape = (ours.arch, ours.resolution, ours.batch)
                if ours.runner != "difftune" or shape != (run.arch, run.resolution, run.batch):
                    continue
                if ours.lever in ("baseline", "no_cache") and ours.figures.get("s_per_step"):
                    ratio = run.figures["s_per_step"] / ours.figures["s_per_step"]
                    ratios.append(dict(zip(("arch", "resolution", "batch"), shape), lever=ours.lever, speedup=ratio))
                    print(
                        f"{run.arch} {run.resolution}px batch {run.batch} {ours.lever}: "
                        f"diffusers s/step / difftune's = {ratio:.2f}x"
                    )
    report = {
        "device": gpu or ("cpu" if args.cpu and not args.dry_run else None),
        "peak_tflops": peak,
        "dry_run": args.dry_run,
        "flux_blocks": flux_blocks,
        "runs": [asdict(r) for r in runs],
        "speedups": ratios,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
