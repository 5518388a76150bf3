"""SD3 / Flux DreamBooth-LoRA: seconds per step and peak memory of difftune beside diffusers' own example scripts
`examples/dreambooth/train_dreambooth_lora_sd3.py` and `train_dreambooth_lora_flux.py`, both run for real, interleaved,
on the same model, images and recipe, with difftune's `dreambooth.cache=none` and `dreambooth.cache=memory`.

The recipe on both sides: LoRA rank 4, alpha 4, on the transformer modules `to_k,to_q,to_v,to_out.0` (the same
strings on both sides, so peft picks the same modules: the joint blocks' attn.to_*, SD3.5's attn2.to_* and Flux's
single blocks' attn.to_q/k/v; the scripts' own default also adapts add_*_proj/to_add_out, and Flux's feed-forwards),
AdamW lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 1e-4, constant LR without warm-up, gradient clipping 1.0;
logit-normal sigmas (mean 0, std 1) and the unweighted velocity loss (SD3's script gets --precondition_outputs 0: its
default regresses x0, a sigma^2-weighted velocity loss); T5 sequences of 256 tokens (SD3, as StableDiffusion3Pipeline;
the SD3 script's default is 77) and 512 (Flux); Flux-dev's guidance input 3.5; batch 1, center crop, no flip, no prior
preservation, no validation, no checkpoints.

What each configuration does per step (the scripts are run unmodified; "text" = the frozen text encoders' forward):

    config                   SD3                                          Flux
    difftune                 text and VAE encode every step               same
    diffusers                text and VAE every step (*)                  same (*)
    difftune_cache_memory    latents + text cached before training, the   same
                             text encoders freed, the VAE kept
    diffusers_cache_latents  --cache_latents: latents cached, VAE freed;   --cache_latents: latents cached, VAE freed;
                             text encoded once, encoders freed            text STILL encoded every step (**)
    diffusers_default        (--only) the README's plain call: text once  same as diffusers
                             and encoders freed, VAE every step

(*) SD3's script encodes the instance prompt once and frees the text encoders when no per-image captions are given, so
`diffusers` runs both scripts on a copy of the images with captions (metadata.jsonl, `--dataset_name DIR
--caption_column text`, every caption the instance prompt): then they encode every batch's captions under no_grad, as
difftune's cache=none does (Flux's script does that work either way, see (**)). Left unequal: the scripts decode and
resize every image once before training, difftune's cache=none every step; SD3's script runs its VAE in fp32 whatever
the mixed precision, difftune in the mixed precision. (**) train_dreambooth_lora_flux.py re-encodes the prompt every
step even with the instance prompt (the loop's `else` branch calls compute_text_embeddings), and `del text_encoder_one,
text_encoder_two` leaves them alive in the `text_encoders` list: its cached row is NOT equal work to
difftune_cache_memory (it still runs CLIP-L + T5 each step and keeps them in memory); no flag of the script avoids it.
SD3's cached row is equal work except that difftune keeps the VAE (84M parameters) loaded for samples; with
--mixed-precision bf16 or fp16 (every --real run) the SD3 script's --cache_latents fails before training: it casts the
images to the mixed precision but keeps its VAE in fp32 ("Input type (c10::BFloat16) and bias type (float) should be
the same", reproduced on the tiny model on a CPU), so that row reports the error. Sigma sampling differs (not the
work): the scripts snap sigma to the scheduler's 1000-step grid through `timesteps[(u * 1000).long()]` (which maps u to
1 - u) and Flux's script trains unshifted; difftune draws continuous sigmas, shifted as the scheduler shifts them (SD3:
shift 3; Flux: from the image's token count).

Models: the tiny SD3 / Flux pipelines the tests build (32 px, ~1M parameters; CPU, 2 threads), or with --real the
Stable Diffusion 3.5 medium architecture (MMDiT-X transformer: 24 layers, 24 heads x 64, qk rms_norm, dual
attention in layers 0-12; CLIP-L and CLIP-G with projections, T5-XXL encoder, 16-channel VAE) or FLUX.1-dev's
(transformer 11.9B: 19 double + 38 single blocks, width 3072, guidance embedding; CLIP-L, T5-XXL, VAE), with random
weights, built from their configs without any download and saved in bf16, at 512 and 1024 px, batch 1: meant for a
GPU with --mixed-precision bf16 (the default with --real). --quantize nf4 loads difftune's frozen transformer in
4 bits (model.quantize=nf4, QLoRA): a CUDA GPU only (diffusers' bitsandbytes quantizer refuses the CPU: "No GPU
found. A GPU is needed for quantization."); the scripts have no such option, their rows stay bf16.

Parameters as built: SD3.5 medium transformer 2,243,171,520 (plus its 384 x 384 x 1536 positional table, a buffer:
2.47B, the published "2.5B"), CLIP-L 123,650,304, CLIP-G 694,659,840, T5-XXL encoder 4,762,310,656, VAE 83,819,683;
FLUX.1-dev transformer 11,901,408,320, CLIP-L 123,060,480. Sizes in bf16, one component in memory at a time: SD3.5
medium 15.3 GiB on disk, peak RSS 9.7 GiB (T5-XXL), built in 4 min on 2 busy CPU cores (2026-12-01); FLUX.1-dev ~34 GB
on disk, peak RAM ~26 GB (its transformer: more than a 24 GB machine has; build it on the GPU machine). --build-only
refuses up front when free RAM or disk would not do. The tokenizers are the tests' tiny ones (the embedding tables
keep the real vocabularies).

The peer scripts are not part of the project and never go into it. Prepare them once, outside the checkout:

    for f in sd3 flux; do git --git-dir=<diffusers git dir> show \\
        HEAD:examples/dreambooth/train_dreambooth_lora_$f.py > /tmp/peer/train_dreambooth_lora_$f.py; done
    # a PIL stand-in package named `torchvision` in /tmp/peer/stub, and /tmp/peer-venv with the locked versions:
    # see benchmarks/bench_sdxl.py

    .venv/bin/python -m benchmarks.bench_flow --family sd3 --peer-script /tmp/peer/train_dreambooth_lora_sd3.py \\
        --peer-stub /tmp/peer/stub --peer-python /tmp/peer-venv/bin/python                # tiny, CPU, 2 threads
    .venv/bin/python -m benchmarks.bench_flow --family flux --peer-script /tmp/peer/train_dreambooth_lora_flux.py \\
        --peer-stub /tmp/peer/stub --peer-python /tmp/peer-venv/bin/python
    .venv/bin/python -m benchmarks.bench_flow --family flux --real --build-only /data/flux-random   # build once
    .venv/bin/python -m benchmarks.bench_flow --family flux --real --model /data/flux-random \\
        --resolution 512 1024 --peer-script ... --peer-python ...          # GPU; add --quantize nf4 for QLoRA

Timing and memory as benchmarks/bench_sdxl.py: difftune's steps from its train_log.jsonl, the script's from its own
tqdm bar (TQDM_MININTERVAL=0, TQDM_MINITERS=1, TQDM_SMOOTHING=1), medians after the warm-up; peak RSS (ru_maxrss; the
script's also covers its final save and the pipeline it reloads after training); on a GPU difftune's torch peak
allocation and, for both, the GPU memory in use sampled with nvidia-smi. Before every run the 1-minute load average is
printed and during it `other_cores`, the cores other processes kept busy: figures with other_cores well above 0 are
not worth keeping.
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

from benchmarks.bench_sdxl import (
    SDXL_PARAMETERS,
    SDXL_TEXT_ENCODER,
    SDXL_TEXT_ENCODER_2,
    GpuMemory,
    OtherLoad,
    parse_tqdm_steps,
    versions,
)
from benchmarks.common import REPO, measure_training, print_table

sys.path.insert(0, str(REPO))
from tests.tiny_models import (  # noqa: E402
    FLUX_SCHEDULER_CONFIG,
    TOKENIZER_DIR,
    make_test_images,
    make_tiny_flux_pipeline,
    make_tiny_sd3_pipeline,
    make_tiny_t5_tokenizer,
)

INSTANCE_PROMPT = "a photo of sks toy"
TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
CONFIGS = ("diffusers", "difftune", "diffusers_cache_latents", "difftune_cache_memory")
OPTIONAL = ("diffusers_default",)
MATCHED_PEER = {"difftune": "diffusers", "difftune_cache_memory": "diffusers_cache_latents"}
T5_TOKENS = {"sd3": 256, "flux": 512}  # difftune's families: StableDiffusion3Pipeline's and FluxPipeline's defaults
WORK = {
    "sd3": {
        "diffusers": "text+VAE every step (captions)",
        "diffusers_cache_latents": "text once+freed, latents cached, VAE freed",
        "diffusers_default": "text once+freed, VAE every step",
        "difftune": "text+VAE every step",
        "difftune_cache_memory": "text+latents cached, encoders freed",
    },
    "flux": {
        "diffusers": "text+VAE every step (captions)",
        "diffusers_cache_latents": "latents cached, VAE freed, TEXT EVERY STEP",
        "diffusers_default": "text+VAE every step",
        "difftune": "text+VAE every step",
        "difftune_cache_memory": "text+latents cached, encoders freed",
    },
}

# -- the real architectures, from their published configs ------------------------------------------------------------
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: dual attention in the first 13 blocks)
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)
# black-forest-labs/FLUX.1-dev transformer/config.json (FluxTransformer2DModel's defaults, with the guidance input)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# google/t5-v1_1-xxl's encoder (text_encoder_3 of SD3.x, text_encoder_2 of Flux)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",  # gelu_new, gated
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
# the 16-channel VAE of SD3.x and FLUX.1 (no quant convs); only the scaling and shift factors differ
FLOW_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
VAE_FACTORS = {
    "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609),
    "flux": dict(scaling_factor=0.3611, shift_factor=0.1159),
}
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# CLIP-L as SD3 loads it (CLIPTextModelWithProjection: the 768x768 projection on top of CLIPTextModel)
EXPECTED_PARAMETERS = {
    "sd3": {
        "text_encoder": SDXL_PARAMETERS["text_encoder"] + 768 * 768,
        "text_encoder_2": SDXL_PARAMETERS["text_encoder_2"],
    },
    "flux": {"text_encoder": SDXL_PARAMETERS["text_encoder"]},
}


def real_components(family: str) -> dict[str, tuple]:
    """Component name -> (library, class name, constructor kwargs or config kwargs) of the real pipeline."""
    clip_l = dict(SDXL_TEXT_ENCODER)
    if family == "sd3":
        return {
            "transformer": ("diffusers", "SD3Transformer2DModel", SD35_MEDIUM_TRANSFORMER),
            "text_encoder": ("transformers", "CLIPTextModelWithProjection", clip_l),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", dict(SDXL_TEXT_ENCODER_2)),
            "text_encoder_3": ("transformers", "T5EncoderModel", T5_XXL),
            "vae": ("diffusers", "AutoencoderKL", {**FLOW_VAE, **VAE_FACTORS["sd3"]}),
        }
    return {
        "transformer": ("diffusers", "FluxTransformer2DModel", FLUX_DEV_TRANSFORMER),
        "text_encoder": ("transformers", "CLIPTextModel", clip_l),
        "text_encoder_2": ("transformers", "T5EncoderModel", T5_XXL),
        "vae": ("diffusers", "AutoencoderKL", {**FLOW_VAE, **VAE_FACTORS["flux"]}),
    }


def _construct(library: str, class_name: str, kwargs: dict, clip_ids: dict):
    import diffusers
    import transformers

    if library == "diffusers":
        return getattr(diffusers, class_name)(**kwargs)
    if class_name.startswith("CLIP"):
        config = transformers.CLIPTextConfig(**kwargs, **clip_ids)
    else:
        config = transformers.T5Config(**kwargs)
    return getattr(transformers, class_name)(config)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def plan_real(family: str) -> dict[str, int]:
    """Parameter count of each component, built on the meta device (no memory)."""
    import torch

    counts = {}
    for name, (library, class_name, kwargs) in real_components(family).items():
        with torch.device("meta"):
            counts[name] = _count(_construct(library, class_name, kwargs, _clip_ids()))
    return counts


def _clip_ids() -> dict:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return {**ids, "pad_token_id": tokenizer.pad_token_id}


def _mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_real(family: str, out_dir: Path, dtype: str = "bf16") -> dict[str, int]:
    """Save the SD3.5-medium or FLUX.1-dev pipeline architecture with random weights (safetensors, `dtype`), one
    component at a time, each constructed directly in that dtype (so only one component is in memory: the largest
    is Flux's transformer, 23.8 GB in bf16). Refuses up front when the free RAM or disk would not do."""
    import diffusers
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    size = torch.finfo(torch_dtype).bits // 8
    counts = plan_real(family)
    total = sum(counts.values()) * size
    largest = max(counts.values()) * size
    for name, count in counts.items():
        print(f"{name}: {count / 1e6:.1f}M parameters, {count * size / 1e9:.1f} GB in {dtype}", flush=True)
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    free_disk = shutil.disk_usage(existing).free
    available = _mem_available_bytes()
    # a component in memory plus one shard being written; the disk keeps 8 GB for everyone else
    if available is not None and largest + 2e9 > available:
        raise SystemExit(
            f"building {family} in {dtype} needs ~{(largest + 2e9) / 1e9:.0f} GB of free RAM (its largest component), "
            f"this machine has {available / 1e9:.0f} GB available: build it where there is more (the GPU machine)"
        )
    if total + 8e9 > free_disk:
        raise SystemExit(
            f"building {family} in {dtype} writes ~{total / 1e9:.0f} GB; {out_dir} has {free_disk / 1e9:.0f} GB free "
            "(8 GB are left to others): choose another disk"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clip_ids = _clip_ids()
    built = {}
    previous = torch.get_default_dtype()
    for name, (library, class_name, kwargs) in real_components(family).items():
        started = time.perf_counter()
        torch.set_default_dtype(torch_dtype)  # allocate and initialise in the saved dtype: no fp32 copy in memory
        try:
            model = _construct(library, class_name, kwargs, clip_ids)
        finally:
            torch.set_default_dtype(previous)
        model.to(torch_dtype)  # (buffers and any parameter created in fp32 explicitly)
        built[name] = _count(model)
        model.save_pretrained(out_dir / name, max_shard_size="2GB", safe_serialization=True)
        print(f"saved {name} ({time.perf_counter() - started:.0f} s)", flush=True)
        del model
    from transformers import CLIPTokenizer

    clip_tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    t5_tokenizer = make_tiny_t5_tokenizer()
    tokenizers = {"sd3": ("tokenizer", "tokenizer_2"), "flux": ("tokenizer",)}[family]
    for name in tokenizers:
        clip_tokenizer.save_pretrained(out_dir / name)
    t5_name = "tokenizer_3" if family == "sd3" else "tokenizer_2"
    t5_tokenizer.save_pretrained(out_dir / t5_name)
    scheduler = SD3_SCHEDULER if family == "sd3" else FLUX_SCHEDULER_CONFIG
    diffusers.FlowMatchEulerDiscreteScheduler(**scheduler).save_pretrained(out_dir / "scheduler")
    # what the pipeline's save_pretrained writes (as the tiny builders' folders have it), without every component
    # in memory at once
    index = {
        "_class_name": "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        **{name: ["transformers", "CLIPTokenizer"] for name in tokenizers},
        t5_name: ["transformers", "T5Tokenizer"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for name, (library, class_name, _) in real_components(family).items():
        index[name] = [library, class_name]
    (out_dir / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    for name, expected in EXPECTED_PARAMETERS[family].items():
        if built[name] != expected:
            print(f"warning: {name} has {built[name]} parameters, the real checkpoint {expected}", flush=True)
    return built


# -- the two sides ----------------------------------------------------------------------------------------------------
def recipe(args, base: Path, instance: Path, resolution: int, cache: str) -> dict:
    """difftune's side of peer_command's command line."""
    train = {"train_batch_size": 1, "seed": 0, "mixed_precision": args.mixed_precision}
    if args.gradient_checkpointing:
        train["gradient_checkpointing"] = True
    model = {"pretrained_model_name_or_path": str(base), "family": args.family}
    if args.quantize != "none":
        model["quantize"] = args.quantize
    return {
        "method": "dreambooth",
        "model": model,
        "data": {"resolution": resolution, "center_crop": True, "random_flip": False},
        "optim": {
            "optimizer": "adamw",
            "lr": 1e-4,
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
            "adam_epsilon": 1e-8,
            "weight_decay": 1e-4,
            "max_grad_norm": 1.0,
            "lr_scheduler": "constant",
            "lr_warmup_steps": 0,
        },
        "diffusion": {
            "weighting_scheme": "logit_normal",
            "logit_mean": 0.0,
            "logit_std": 1.0,
            "flow_loss_weighting": "none",
            "guidance_scale": 3.5,
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


def peer_command(args, config: str, base: Path, data: dict[str, Path], resolution: int, work: Path) -> list[str]:
    command = [args.peer_python, args.peer_script, "--pretrained_model_name_or_path", str(base)]
    if config == "diffusers":  # per-image captions: the script encodes every batch's text (see the docstring)
        command += ["--dataset_name", str(data["captioned"]), "--caption_column", "text"]
        command += ["--cache_dir", str(work / "hf-datasets")]
    else:
        command += ["--instance_data_dir", str(data["instance"])]
    if config == "diffusers_cache_latents":
        command.append("--cache_latents")
    command += ["--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(work / "peer-run")]
    command += ["--resolution", str(resolution), "--train_batch_size", "1", "--center_crop"]
    command += ["--rank", str(args.rank), "--lora_layers", ",".join(TARGET_MODULES)]
    command += ["--max_train_steps", str(args.warmup + args.steps), "--checkpointing_steps", str(10**9)]
    command += ["--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0"]
    command += ["--adam_beta1", "0.9", "--adam_beta2", "0.999", "--adam_epsilon", "1e-8"]
    command += ["--adam_weight_decay", "1e-4", "--max_grad_norm", "1.0", "--seed", "0"]
    command += ["--weighting_scheme", "logit_normal", "--logit_mean", "0", "--logit_std", "1"]
    command += ["--max_sequence_length", str(T5_TOKENS[args.family]), "--mixed_precision", args.mixed_precision]
    if args.family == "sd3":
        command += ["--precondition_outputs", "0"]  # the velocity target, as difftune (its default regresses x0)
    else:
        command += ["--lora_alpha", str(args.rank), "--guidance_scale", "3.5"]
    if args.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    return command


def thread_env(args) -> dict[str, str]:
    """Both sides: the same CPU threads, and no Hub calls (the model is a local folder)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return env


def peer_env(args) -> dict[str, str]:
    env = {**os.environ, **thread_env(args)}
    env.update(TQDM_MININTERVAL="0", TQDM_MINITERS="1", TQDM_SMOOTHING="1")  # a line per step with its own rate
    if args.peer_stub:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.peer_stub, env.get("PYTHONPATH")) if p)
    return env


def measure_peer(args, config: str, base: Path, data: dict[str, Path], resolution: int, work: Path) -> dict:
    """Run the peer script for warmup + steps steps in a fresh process."""
    shutil.rmtree(work / "peer-run", ignore_errors=True)
    log = work / "peer-stderr.txt"
    started = time.perf_counter()
    with GpuMemory() as gpu, open(log, "w") as err, open(work / "peer-stdout.txt", "w") as out:
        command = peer_command(args, config, base, data, resolution, work)
        process = subprocess.Popen(command, cwd=work, env=peer_env(args), stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage
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
        "lora_file": (work / "peer-run" / "pytorch_lora_weights.safetensors").is_file(),
    }


def measure_ours(args, base: Path, instance: Path, resolution: int, cache: str) -> dict:
    with GpuMemory() as gpu:
        result = measure_training(
            recipe(args, base, instance, resolution, cache),
            steps=args.steps,
            warmup_steps=args.warmup,
            env=thread_env(args),
        )
    return {**result, "gpu_memory_mb": gpu.peak_mb}


def make_data(folder: Path, images: int, resolution: int) -> dict[str, Path]:
    """The instance images, and a copy with a metadata.jsonl caption per image (the instance prompt)."""
    instance, captioned = folder / "instance", folder / "captioned"
    paths = make_test_images(instance, images, size=resolution)
    captioned.mkdir(parents=True, exist_ok=True)
    lines = []
    for path in paths:
        shutil.copy(path, captioned / path.name)
        lines.append(json.dumps({"file_name": path.name, "text": INSTANCE_PROMPT}))
    (captioned / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return {"instance": instance, "captioned": captioned}


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    medians = {
        name: statistics.median(r["s_per_step"] for r in results if "s_per_step" in r)
        for name, results in runs.items()
        if any("s_per_step" in r for r in results)
    }
    rows = []
    for name, results in runs.items():
        ok = [r for r in results if "s_per_step" in r]
        row = {"config": name, "runs_ok": f"{len(ok)}/{len(results)}"}
        row["load1"] = statistics.median(r["load1"] for r in results)
        if ok:
            row["s_per_step"] = medians[name]
            peer = MATCHED_PEER.get(name)
            row["speedup_vs_peer"] = medians[peer] / medians[name] if peer in medians else None
            row["peak_memory_mb"] = statistics.median(r["peak_memory_mb"] for r in ok)
            gpu = [r["gpu_memory_mb"] for r in ok if r.get("gpu_memory_mb") is not None]
            row["gpu_used_mb"] = statistics.median(gpu) if gpu else None
            row["wall_s"] = statistics.median(r["wall_s"] for r in ok)
            row["other_cores"] = statistics.median(r["other_cores"] for r in ok)
        else:
            row["error"] = results[-1].get("error") if results else None
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["sd3", "flux"], required=True)
    parser.add_argument("--peer-script", default=None, help="default /tmp/peer/train_dreambooth_lora_<family>.py")
    parser.add_argument("--peer-stub", default=None, help="folder holding the torchvision stand-in (peer only)")
    parser.add_argument("--peer-python", default=sys.executable, help="interpreter of the peer (its own venv)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up; 35 tiny, 12 --real")
    parser.add_argument("--warmup", type=int, default=None, help="steps not timed; 5 tiny, 3 --real")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; medians are reported")
    parser.add_argument("--images", type=int, default=None, help="instance images; 32 tiny, 8 --real")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--resolution", type=int, nargs="+", default=None, help="default 32 (tiny), 512 1024 (--real)")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP/MKL threads; default 2 (tiny), 0 (--real): as is"
    )
    parser.add_argument(
        "--mixed-precision", default=None, choices=["no", "fp16", "bf16"], help="default no; bf16 with --real"
    )
    parser.add_argument(
        "--quantize", default="none", choices=["none", "nf4"], help="difftune's frozen transformer (GPU)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--real", action="store_true", help="SD3.5-medium / FLUX.1-dev architecture, random weights")
    parser.add_argument("--build-dtype", default="bf16", choices=["bf16", "fp32"], help="weights of the --real build")
    parser.add_argument("--model", type=Path, help="an existing pipeline folder of the family instead of building one")
    parser.add_argument("--build-only", type=Path, metavar="DIR", help="build the model into DIR and stop")
    parser.add_argument("--only", nargs="+", choices=CONFIGS + OPTIONAL, default=list(CONFIGS))
    parser.add_argument("--json", help="also write the rows and every run to this file")
    args = parser.parse_args()
    args.peer_script = args.peer_script or f"/tmp/peer/train_dreambooth_lora_{args.family}.py"
    args.steps = args.steps or (12 if args.real else 35)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.real else 5)
    args.images = args.images or (8 if args.real else 32)
    args.resolution = args.resolution or ([512, 1024] if args.real else [32])
    args.threads = (0 if args.real else 2) if args.threads is None else args.threads
    args.mixed_precision = args.mixed_precision or ("bf16" if args.real else "no")
    multiple = 16 if args.family == "flux" else 8
    if any(r % multiple for r in args.resolution):
        parser.error(f"--resolution: {args.family} needs multiples of {multiple} px")

    if args.build_only:
        if args.real:
            print(f"saved {args.build_only}", build_real(args.family, args.build_only, args.build_dtype))
        else:
            (make_tiny_sd3_pipeline if args.family == "sd3" else make_tiny_flux_pipeline)(args.build_only)
            print(f"saved {args.build_only}")
        return
    gpu = shutil.which("nvidia-smi") is not None
    if args.quantize == "nf4" and not gpu:
        parser.error(
            "--quantize nf4 needs a CUDA GPU: diffusers' bitsandbytes quantizer refuses the CPU ('No GPU found. A GPU "
            "is needed for quantization.')"
        )
    peer_configs = [c for c in args.only if c.startswith("diffusers")]
    if peer_configs and not Path(args.peer_script).is_file():
        parser.error(f"--peer-script {args.peer_script} does not exist (see the module docstring)")
    if args.real and not gpu:
        print("warning: --real without a GPU: a step of the real transformer takes minutes on a CPU", flush=True)
    if args.quantize == "nf4" and peer_configs:
        print("note: the diffusers scripts have no 4-bit option: their rows load the transformer in bf16", flush=True)
    print("ours:", versions(sys.executable))
    if peer_configs:
        print("peer:", versions(args.peer_python, peer_env(args)))

    results: dict[int, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model:
            base = args.model
        elif args.real:
            base = work / args.family
            build_real(args.family, base, args.build_dtype)
        else:
            builder = make_tiny_sd3_pipeline if args.family == "sd3" else make_tiny_flux_pipeline
            base = builder(work / f"tiny-{args.family}")
        for resolution in args.resolution:
            data = make_data(work / f"data-{resolution}", args.images, resolution)
            runs: dict[str, list[dict]] = {name: [] for name in args.only}
            for repeat in range(args.repeats):
                # each side takes its turn, starting one later every repetition, so a slow minute hits all of them
                order = args.only[repeat % len(args.only) :] + args.only[: repeat % len(args.only)]
                for name in order:
                    load = os.getloadavg()[0]
                    try:
                        with OtherLoad() as others:
                            if name.startswith("diffusers"):
                                result = measure_peer(args, name, base, data, resolution, work)
                            else:
                                cache = "memory" if name.endswith("cache_memory") else "none"
                                result = measure_ours(args, base, data["instance"], resolution, cache)
                        result["other_cores"] = others.cores
                    except RuntimeError as err:
                        message = str(err).strip()
                        result = {"error": message.splitlines()[-1][:300], "error_tail": message[-2000:]}
                    result["load1"] = load
                    runs[name].append(result)
                    print(f"{resolution} px, repeat {repeat + 1}, {name}: load {load:.2f} ->", result, flush=True)
            results[resolution] = runs

    model_name = {"sd3": "SD3.5-medium", "flux": "FLUX.1-dev"}[args.family] if args.real else f"tiny {args.family}"
    all_rows = {}
    for resolution, runs in results.items():
        rows = summarize(runs)
        for row in rows:
            row["work"] = WORK[args.family][row["config"]]
        all_rows[resolution] = rows
        print()
        print(
            f"{args.family} DreamBooth-LoRA rank {args.rank} on {','.join(TARGET_MODULES)}, batch 1, {resolution} px, "
            f"{model_name}{' (random weights)' if args.real else ''}, mixed precision {args.mixed_precision}"
            f"{', nf4 (difftune)' if args.quantize == 'nf4' else ''}"
            f"{', gradient checkpointing' if args.gradient_checkpointing else ''}, {args.threads or 'default'} "
            f"threads, {args.steps} timed steps after {args.warmup}, {args.repeats} repeats"
        )
        columns = ["config", "work", "runs_ok", "load1", "s_per_step", "speedup_vs_peer", "peak_memory_mb"]
        columns += ["gpu_used_mb", "wall_s", "other_cores", "error"]
        print_table(rows, [c for c in columns if any(c in row for row in rows)])
    print()
    print("speedup_vs_peer: the matched script row's s/step over this row's (difftune vs diffusers, cache_memory vs")
    print("cache_latents); Flux's cached pair is not equal work (its script still encodes the text every step).")
    if gpu:
        print("on a GPU, difftune's peak_memory_mb is torch's peak allocation, the script's is RSS: see gpu_used_mb")
    if args.json:
        payload = {"args": vars(args), "rows": all_rows, "runs": results}
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
