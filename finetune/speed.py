"""The speed levers of the loop, behind options: mixed precision the device really runs, regional torch.compile,
channels-last memory, the attention kernel, the optimizer's kernels, the data loader's workers. Each is a small
function the loop calls; none knows which method or family it runs (a method names the modules that do a step's
work, `compute_modules`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch

from finetune.config import Config, ConfigError, DataConfig, TrainConfig

logger = logging.getLogger(__name__)


def serial_tokenizers() -> None:
    """Tokenize each batch on the calling thread (TOKENIZERS_PARALLELISM=false) unless the user chose otherwise.
    The tokenizers library encodes a batch of prompts (a step's, a text-cache chunk's) on its own thread pool, one
    thread per core, whose threads spin and yield between calls: a few prompts gain nothing from them, and beside the
    step's torch threads they took CPU from the model (Textual Inversion, tokenizing every step, was 7% slower per
    step than diffusers' script, which tokenizes one prompt at a time). Also keeps DataLoader workers, forked after
    the pool started, from the library's fork warning."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_mixed_precision(mixed_precision: str, device: torch.device, config: Config) -> None:
    """fp16 autocast does not exist on a CPU (accelerate turns it off there), so frozen fp16 weights would meet fp32
    activations at the first matmul: refuse it in one line, before anything loads."""
    if mixed_precision != "fp16" or device.type != "cpu":
        return
    where = (
        "train.mixed_precision=fp16"
        if config.train.mixed_precision == "fp16"
        else "mixed precision fp16 (accelerate's --mixed_precision flag or config file)"
    )
    raise ConfigError(
        f"{where} needs a GPU: this job runs on a CPU, which has no fp16 autocast. On a CPU set "
        "train.mixed_precision=bf16 (bf16 autocast, frozen weights in bf16) or train.mixed_precision=no (fp32)"
    )


# train.attention_backend -> torch's SDPA backend. torch's sdpa_kernel rather than diffusers' set_attention_backend:
# diffusers' registry reaches only the processors built on its dispatch_attention_fn (Flux's), while SD's and SDXL's
# UNet (AttnProcessor2_0) and SD3 (JointAttnProcessor2_0) call F.scaled_dot_product_attention directly; every one of
# them, diffusers' "native" backend included, ends in that call, which sdpa_kernel governs
SDPA_BACKENDS = {
    "math": "MATH",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """The context a training step runs in for train.attention_backend: only that SDPA kernel allowed (torch raises
    rather than fall back to another), or no constraint under 'auto'. A new context per step (sdpa_kernel is a
    generator context manager; entering it sets a few flags)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))


def attention_backend_runs(name: str, device: torch.device, mixed_precision: str) -> bool:
    """Whether the device runs this SDPA kernel forward and backward in the step's precision: a tiny attention
    (batch 1, 2 heads of 64, 8 tokens) on a linear projection's output, under the autocast the step uses, as in the
    models (the projection decides the dtype attention sees). torch itself decides (compute capability, dtype,
    build), so nothing here restates its rules."""
    import warnings

    dtype = AUTOCAST_DTYPES.get(mixed_precision)
    # constant values: the probe draws nothing from the RNG, so runs with and without it stay alike
    weight = torch.full((128, 64), 1 / 64, device=device, requires_grad=True)
    tokens = torch.ones(1, 8, 64, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    try:
        with warnings.catch_warnings(), autocast, attention_backend(name):
            warnings.simplefilter("ignore")  # torch warns once per refused kernel, with its reason
            query = torch.nn.functional.linear(tokens, weight).view(1, 8, 2, 64).transpose(1, 2)
            out = torch.nn.functional.scaled_dot_product_attention(query, query, query)
            out.float().sum().backward()
    except RuntimeError:
        return False
    return True


def check_attention_backend(name: str, device: torch.device, mixed_precision: str) -> None:
    """Refuse, in one line and before anything loads, an attention kernel the device cannot run (efficient or
    cudnn on a CPU, flash in fp32 on a GPU), naming the ones it can."""
    if name == "auto" or attention_backend_runs(name, device, mixed_precision):
        return
    usable = [
        other for other in SDPA_BACKENDS if other != name and attention_backend_runs(other, device, mixed_precision)
    ]
    precision = f"mixed precision {mixed_precision}" if mixed_precision in AUTOCAST_DTYPES else "fp32"
    raise ConfigError(
        f"train.attention_backend={name}: torch has no such attention kernel for this device ({device.type}, "
        f"{precision}). Set train.attention_backend=auto (torch picks per call)"
        + (f", or one this device runs: {', '.join(usable)}" if usable else "")
    )


def adamw_options(implementation: str, device: torch.device) -> dict[str, Any]:
    """torch AdamW's kernel choice as keyword arguments: under 'auto', fused on a CUDA GPU (one kernel for every
    parameter instead of a Python loop over them), foreach elsewhere: torch's own default on a CPU is the loop over
    parameters, and foreach computes the same weights to the bit in less time (0.62x the optimizer's time for the
    tiny UNet's 96 LoRA factors); fused is faster still on a CPU but rounds differently, so it stays an option."""
    if implementation == "fused" or (implementation == "auto" and device.type == "cuda"):
        return {"fused": True}
    if implementation in ("foreach", "auto"):
        return {"foreach": True}
    if implementation == "for_loop":
        return {"foreach": False}
    return {}


def pin_memory(data: DataConfig) -> bool:
    """data.pin_memory, resolved: page-locked batches only where there is a CUDA GPU to copy them to."""
    return (data.pin_memory if data.pin_memory is not None else True) and torch.cuda.is_available()


def dataloader_options(data: DataConfig) -> dict[str, Any]:
    """DataLoader keyword arguments of the worker options: workers, pinned memory, persistent workers, prefetch."""
    options: dict[str, Any] = {"num_workers": data.num_workers, "pin_memory": pin_memory(data)}
    if data.num_workers:
        options["persistent_workers"] = data.persistent_workers
        if data.prefetch_factor is not None:
            options["prefetch_factor"] = data.prefetch_factor
    return options


def host_to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor made on the host during a step (seeded noise, cached latents and text) on the device. On a CUDA GPU
    through page-locked memory without waiting: a plain copy from pageable memory first waits for every kernel
    queued on the stream, so the host could not queue the step ahead of the GPU. Elsewhere a plain `.to`."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, dtype, non_blocking=True)
    return tensor.to(device, dtype)


def batch_to_device(batch: dict[str, Any], device: torch.device, non_blocking: bool) -> dict[str, Any]:
    """The batch's tensors on the device, except the per-example bookkeeping that is read on the host (cache keys,
    RNG seeds: finetune.data.HOST_KEYS): reading those back from a GPU every step waited for the whole queue."""
    from accelerate.utils import send_to_device

    from finetune.data import HOST_KEYS

    return send_to_device(batch, device, non_blocking=non_blocking, skip_keys=list(HOST_KEYS))


def regional_compile(module: torch.nn.Module, backend: str, mode: str | None) -> str:
    """torch.compile each repeated block of `module` in place (diffusers' compile_repeated_blocks: a block class is
    compiled once and its graph reused by every instance), or the whole module where it declares no repeated blocks.
    Returns what was compiled, for the log."""
    kwargs = {"backend": backend, **({"mode": mode} if mode else {})}
    blocks = getattr(module, "_repeated_blocks", None)
    if blocks and hasattr(module, "compile_repeated_blocks"):
        names = set(blocks)
        count = sum(type(m).__name__ in names for m in module.modules())
        if count:
            module.compile_repeated_blocks(**kwargs)
            return f"{type(module).__name__}: {count} repeated blocks ({', '.join(sorted(names))})"
    module.compile(**kwargs)
    return f"{type(module).__name__}: whole"


def apply_levers(train: TrainConfig, modules: list[torch.nn.Module]) -> None:
    """train.channels_last and train.compile on the modules that do a step's work (before accelerator.prepare)."""
    for module in modules:
        if train.channels_last:
            module.to(memory_format=torch.channels_last)
        if train.compile:
            what = regional_compile(module, train.compile_backend, train.compile_mode)
            logger.info("train.compile: %s, backend %s", what, train.compile_backend)
