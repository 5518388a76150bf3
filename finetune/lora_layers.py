"""What a peft-injected module holds, read for saving: the components that carry a LoRA adapter, each LoRA layer's
factors, and kohya's key layout of them. Imports nothing of ours, so families and methods can both use it."""

from __future__ import annotations

import torch


def with_adapters(modules: dict[str, torch.nn.Module | None]) -> dict[str, torch.nn.Module]:
    """The modules that carry a LoRA adapter, by component name."""
    return {name: m for name, m in modules.items() if m is not None and getattr(m, "peft_config", None)}


def lora_factors(module: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Each LoRA'd layer of a peft-injected module: its name -> (down A [r, in], up B [out, r], scale alpha / r), so
    that the layer adds scale * B @ A to its weight."""
    factors = {}
    for name, layer in module.named_modules():
        if not hasattr(layer, "lora_A") or "default" not in layer.lora_A:
            continue
        down = layer.lora_A["default"].weight.detach().float().cpu().contiguous()
        up = layer.lora_B["default"].weight.detach().float().cpu().contiguous()
        factors[name] = (down, up, float(layer.scaling["default"]))
    return factors


def kohya_state_dict(modules: dict[str, torch.nn.Module | None], prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """kohya / WebUI keys (`lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`; text encoders
    `lora_te_` for SD, `lora_te1_`/`lora_te2_` for SDXL), with each module's alpha as trained. diffusers' own
    converter writes alpha = rank, which changes the strength when alpha != rank."""
    out: dict[str, torch.Tensor] = {}
    for component, module in with_adapters(modules).items():
        prefix = prefixes[component]
        for name, (down, up, scale) in lora_factors(module).items():
            key = f"{prefix}_{name.replace('.', '_')}"
            out[f"{key}.lora_down.weight"] = down
            out[f"{key}.lora_up.weight"] = up
            # peft scales by lora_alpha / r; kohya by alpha / rank of the stored matrices
            out[f"{key}.alpha"] = torch.tensor(scale * down.shape[0])
    return out
