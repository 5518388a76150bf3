"""Known-bad combinations of installed packages, found at start instead of deep inside a load.

The requirement is read from the package that enforces it (transformers' own MIN_PEFT_VERSION), not from a table of
ours, so a future transformers that raises its floor again is caught the same way.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.version import Version

from finetune.errors import InputError

LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"


def locked_version(package: str) -> str | None:
    """The version requirements/lock.txt pins for `package`, in a source checkout; None elsewhere."""
    if not LOCK_FILE.is_file():
        return None
    match = re.search(rf"^{re.escape(package)}==(\S+)", LOCK_FILE.read_text(), re.M | re.I)
    return match.group(1) if match else None


def text_encoder_lora_problem() -> str | None:
    """Why a LoRA cannot be put on (or loaded into) a transformers text encoder here, or None when it can.

    transformers routes text-encoder adapters through its peft integration, which refuses a peft older than its
    MIN_PEFT_VERSION (transformers 5.24.0 asks for peft >= 0.22.0, unreleased on 2026-12-01)."""
    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:  # an older transformers without the constant: nothing to compare
        return None
    try:
        peft_version = metadata.version("peft")
    except metadata.PackageNotFoundError:
        return "peft is not installed; install it with `make install` (or `pip install peft`)"
    if Version(peft_version) >= Version(MIN_PEFT_VERSION):
        return None
    transformers_version = metadata.version("transformers")
    fixes = []
    locked = {name: locked_version(name) for name in ("transformers", "peft")}
    if all(locked.values()):
        pinned = f"transformers {locked['transformers']}, peft {locked['peft']}"
        fixes.append(f"reinstall the tested set with `make install` (requirements/lock.txt: {pinned})")
    fixes += [f"`pip install 'transformers<{transformers_version}'`", f"`pip install 'peft>={MIN_PEFT_VERSION}'`"]
    return (
        f"transformers {transformers_version} works with text-encoder LoRA only with peft >= {MIN_PEFT_VERSION}, and "
        f"peft {peft_version} is installed. Fix: {' or '.join(fixes)}"
    )


def require_text_encoder_lora(what: str) -> None:
    """Stop with one line naming the packages, their versions and the fix when `what` cannot work here."""
    problem = text_encoder_lora_problem()
    if problem:
        raise InputError(f"{what}: {problem}")


def require_bitsandbytes_4bit(quantize: str = "nf4") -> None:
    """model.quantize=nf4 needs bitsandbytes (installed by `make install`) and a CUDA GPU: diffusers' bitsandbytes
    quantizer refuses anything else ("No GPU found. A GPU is needed for quantization.", measured with diffusers 0.42.1
    and bitsandbytes 0.50.2, whose own 4-bit layers do run on CPU). One line before anything loads."""
    try:
        metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError as err:
        raise InputError(
            f"model.quantize={quantize} needs bitsandbytes: `make install`, or `pip install bitsandbytes`"
        ) from err
    import torch

    if not torch.cuda.is_available():
        raise InputError(
            f"model.quantize={quantize}: diffusers quantizes with bitsandbytes on a CUDA GPU only, and this machine "
            "has none. Train on a GPU, or set model.quantize=none."
        )
