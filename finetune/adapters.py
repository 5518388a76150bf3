"""LoRA through peft: add adapters to the UNet and text encoder, save them for diffusers, export kohya format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from finetune.compat import require_text_encoder_lora
from finetune.config import ConfigError, option

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


@dataclass
class LoraOptions:
    rank: int = option(4, "LoRA rank r (Hu et al. 2021).")
    alpha: float | None = option(None, "LoRA alpha; the update is scaled by alpha / rank. None: alpha = rank.")
    dropout: float = option(0.0, "Dropout on the LoRA input.")
    target_modules: list[str] = option(
        default_factory=lambda: list(UNET_ATTENTION), help="UNet modules that get LoRA (names or name suffixes)."
    )
    train_text_encoder: bool = option(False, "Also train a LoRA on the text encoder's attention projections.")
    text_encoder_rank: int | None = option(None, "Rank of the text-encoder LoRA. None: the same rank.")
    export_kohya: bool = option(
        False, f"Also write {KOHYA_FILE} (kohya / WebUI key names, alpha as trained) for A1111, ComfyUI, Forge."
    )

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("target_modules must name at least one module, e.g. [to_q, to_k, to_v, to_out.0]")
        if self.train_text_encoder and getattr(self, "use_lora", True):  # full DreamBooth trains the encoder itself
            require_text_encoder_lora("train_text_encoder=true (a LoRA on the text encoder)")

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)


def add_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module, options: LoraOptions) -> None:
    """Inject LoRA layers (peft) into the frozen UNet and, optionally, the text encoder; only they train."""
    unet_config = LoraConfig(
        r=options.rank,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.dropout,
        init_lora_weights="gaussian",
        target_modules=list(options.target_modules),
    )
    try:
        unet.add_adapter(unet_config)
    except ValueError as err:
        raise ConfigError(f"target_modules {options.target_modules} do not match UNet modules: {err}") from err
    if options.train_text_encoder:
        rank = options.text_encoder_rank or options.rank
        text_encoder.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=options.lora_alpha * rank / options.rank,
                lora_dropout=options.dropout,
                init_lora_weights="gaussian",
                target_modules=TEXT_ENCODER_ATTENTION,
            )
        )


def lora_state_dicts(unet, text_encoder) -> dict[str, dict[str, torch.Tensor]]:
    """peft state dicts of the adapters present: {'unet': ..., 'text_encoder': ...}."""
    out = {"unet": get_peft_model_state_dict(unet)}
    if getattr(text_encoder, "peft_config", None):
        out["text_encoder"] = get_peft_model_state_dict(text_encoder)
    return out


def _metadata(module) -> dict | None:
    config = getattr(module, "peft_config", {}).get("default")
    if config is None:
        return None
    metadata = config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}


def save_lora(output_dir: Path, unet, text_encoder, pipeline_class=None) -> Path:
    """pytorch_lora_weights.safetensors in the diffusers layout, with the LoRA configs (alpha) as metadata, so that
    `pipe.load_lora_weights(output_dir)` restores the trained strength."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    pipeline_class = pipeline_class or StableDiffusionPipeline
    states = lora_state_dicts(unet, text_encoder)
    pipeline_class.save_lora_weights(
        save_directory=str(output_dir),
        unet_lora_layers=convert_state_dict_to_diffusers(states["unet"]),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(states["text_encoder"])
        if "text_encoder" in states
        else None,
        unet_lora_adapter_metadata=_metadata(unet),
        text_encoder_lora_adapter_metadata=_metadata(text_encoder) if "text_encoder" in states else None,
        safe_serialization=True,
    )
    return Path(output_dir) / "pytorch_lora_weights.safetensors"


def kohya_state_dict(unet, text_encoder) -> dict[str, torch.Tensor]:
    """kohya / WebUI keys (`lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`), with each module's
    alpha as trained. diffusers' own converter writes alpha = rank, which changes the strength when alpha != rank."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in (("lora_unet", unet), ("lora_te", text_encoder)):
        config = getattr(module, "peft_config", {}).get("default")
        if config is None:
            continue
        for name, layer in module.named_modules():
            if not hasattr(layer, "lora_A") or "default" not in layer.lora_A:
                continue
            key = f"{prefix}_{name.replace('.', '_')}"
            out[f"{key}.lora_down.weight"] = layer.lora_A["default"].weight.detach().float().cpu().contiguous()
            out[f"{key}.lora_up.weight"] = layer.lora_B["default"].weight.detach().float().cpu().contiguous()
            # peft scales by lora_alpha / r; kohya by alpha / rank of the stored matrices
            out[f"{key}.alpha"] = torch.tensor(float(layer.scaling["default"] * layer.r["default"]))
    return out


def save_kohya(output_dir: Path, unet, text_encoder) -> Path:
    path = Path(output_dir) / KOHYA_FILE
    save_file(kohya_state_dict(unet, text_encoder), str(path), metadata={"ss_network_module": "networks.lora"})
    return path
