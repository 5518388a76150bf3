"""Where a Stable Diffusion training step's time goes, measured the same way in difftune and in a diffusers example
script: run either under this module and it times each component of every step, by wrapping the same library calls
on both sides (nothing in finetune/ or in the script knows about it).

    python -m benchmarks.step_split OUT.json -m finetune recipe.yaml                # difftune
    PYTHONPATH=<repo> python -m benchmarks.step_split OUT.json textual_inversion.py --pretrained_model_name_or_path=...

Components (exclusive: a wrapped call inside another is subtracted from the outer one), in wall seconds and in
process CPU seconds (the CPU figures hold under a shared machine's load at 1 thread; the wall ones do not):
vae_encode (AutoencoderKL.encode), text_fwd (CLIPTextModel.forward), unet_fwd (UNet2DConditionModel.forward),
unet_bwd / text_bwd (torch.autograd.backward, split when the text encoder output's gradient is complete), optimizer
(AdamW.step), zero_grad, clip (Accelerator.clip_grad_norm_), data (a DataLoader batch), restore (Textual Inversion's
after_optimizer_step), other (the rest of the step: noise and timesteps, the loss, LR schedule, logs). A step runs
from one AdamW.step's end to the next. OUT.json gets the per-step records and their means after `--warmup` steps
(environment STEP_SPLIT_WARMUP, default 5). bench_sd --split runs both sides this way.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import statistics
import sys
import time

COMPONENTS = (
    "data",
    "vae_encode",
    "text_fwd",
    "unet_fwd",
    "unet_bwd",
    "text_bwd",
    "clip",
    "optimizer",
    "zero_grad",
    "restore",
    "other",
)


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class StepSplit:
    """The wrappers' shared state: a stack of open calls, the current step's totals, the finished steps."""

    def __init__(self):
        self.stack: list[list] = []  # [component, (wall, cpu) at entry, (wall, cpu) spent in wrapped calls inside]
        self.current: dict[str, list[float]] = {}
        self.steps: list[dict[str, list[float]]] = []
        self.step_start: tuple[float, float] | None = None
        self.text_grad_ready: tuple[float, float] | None = None

    def add(self, component: str, spent: tuple[float, float]) -> None:
        total = self.current.setdefault(component, [0.0, 0.0])
        total[0] += spent[0]
        total[1] += spent[1]

    def wrap(self, component: str, function):
        def timed(*args, **kwargs):
            self.stack.append([component, clocks(), [0.0, 0.0]])
            try:
                return function(*args, **kwargs)
            finally:
                self.close(*self.stack.pop())

        timed.__wrapped__ = function
        return timed

    def close(self, component: str, start: tuple[float, float], inner: list[float]) -> None:
        now = clocks()
        total = (now[0] - start[0], now[1] - start[1])
        own = (total[0] - inner[0], total[1] - inner[1])
        if component == "backward":
            ready, self.text_grad_ready = self.text_grad_ready, None
            unet = own if ready is None else (ready[0] - start[0], ready[1] - start[1])
            self.add("unet_bwd", unet)
            self.add("text_bwd", (own[0] - unet[0], own[1] - unet[1]))
        else:
            self.add(component, own)
        if self.stack:
            self.stack[-1][2][0] += total[0]
            self.stack[-1][2][1] += total[1]
        if component == "optimizer":  # the step's end
            if self.step_start is not None:
                record = dict(self.current)
                record["step"] = [now[0] - self.step_start[0], now[1] - self.step_start[1]]
                self.steps.append(record)
            self.current = {}
            self.step_start = now

    def summary(self, warmup: int) -> dict:
        kept = self.steps[warmup:]
        if not kept:
            return {"steps": 0}
        means = {}
        for index, clock in enumerate(("wall", "cpu")):
            step = statistics.mean(s["step"][index] for s in kept)
            parts = {c: statistics.mean(s.get(c, [0.0, 0.0])[index] for s in kept) for c in COMPONENTS if c != "other"}
            parts["other"] = step - sum(parts.values())
            means[clock] = {"step": step, **parts}
        return {"steps": len(kept), "mean_s": means}


def install(out: str, warmup: int) -> StepSplit:
    """Wrap the library calls of both sides; write OUT at exit."""
    import accelerate
    import torch
    import torch.utils.data.dataloader as dataloader
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    split = StepSplit()
    dataloader._BaseDataLoaderIter.__next__ = split.wrap("data", dataloader._BaseDataLoaderIter.__next__)
    torch.autograd.backward = split.wrap("backward", torch.autograd.backward)
    torch.optim.Optimizer.zero_grad = split.wrap("zero_grad", torch.optim.Optimizer.zero_grad)
    torch.optim.AdamW.step = split.wrap("optimizer", torch.optim.AdamW.step)
    AutoencoderKL.encode = split.wrap("vae_encode", AutoencoderKL.encode)
    UNet2DConditionModel.forward = split.wrap("unet_fwd", UNet2DConditionModel.forward)
    accelerate.Accelerator.clip_grad_norm_ = split.wrap("clip", accelerate.Accelerator.clip_grad_norm_)
    text_forward = CLIPTextModel.forward

    def text_forward_marked(self, *args, **kwargs):
        output = text_forward(self, *args, **kwargs)
        if output[0].requires_grad:  # its gradient is complete once the UNet's backward is done

            def mark(grad):
                split.text_grad_ready = clocks()

            output[0].register_hook(mark)
        return output

    CLIPTextModel.forward = split.wrap("text_fwd", text_forward_marked)
    try:
        from finetune.methods.textual_inversion import TextualInversion
    except ImportError:  # the peer's interpreter: no difftune
        pass
    else:
        TextualInversion.after_optimizer_step = split.wrap("restore", TextualInversion.after_optimizer_step)

    def write():
        with open(out, "w") as handle:
            json.dump({**split.summary(warmup), "per_step": split.steps}, handle)

    atexit.register(write)
    return split


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m benchmarks.step_split OUT.json (-m MODULE | SCRIPT) [ARGS ...]")
    out, rest = argv[0], argv[1:]
    install(out, int(os.environ.get("STEP_SPLIT_WARMUP", "5")))
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        sys.path.insert(0, os.path.dirname(os.path.abspath(rest[0])))
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
