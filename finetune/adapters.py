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
from finetune.lora_layers import with_adapters

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


@dataclass
class LoraOptions:
    rank: int = option(4, "LoRA rank r (Hu et al. 2021).")
    alpha: float | None = option(None, "LoRA alpha; the update is scaled by alpha / rank. None: alpha = rank.")
    dropout: float = option(0.0, "Dropout on the LoRA input.")
    target_modules: list[str] = option(
        default_factory=lambda: list(UNET_ATTENTION),
        help="Denoiser modules that get LoRA (names or name suffixes; the attention projections of the UNet or the "
        "SD3/Flux transformer by default).",
    )
    train_text_encoder: bool = option(False, "Also train a LoRA on the text encoder's attention projections.")
    text_encoder_rank: int | None = option(None, "Rank of the text-encoder LoRA. None: the same rank.")
    text_encoder_lr: float | None = option(
        None, "Learning rate of the text encoders (kohya's text_encoder_lr, often below the UNet's). None: optim.lr."
    )
    export_kohya: bool = option(
        False, f"Also write {KOHYA_FILE} (kohya / WebUI key names, alpha as trained) for A1111, ComfyUI, Forge."
    )

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.text_encoder_lr is not None and self.text_encoder_lr <= 0:
            raise ConfigError(f"text_encoder_lr must be positive or null, got {self.text_encoder_lr}")
        if not self.target_modules:
            raise ConfigError("target_modules must name at least one module, e.g. [to_q, to_k, to_v, to_out.0]")
        if self.train_text_encoder and getattr(self, "use_lora", True):  # full DreamBooth trains the encoder itself
            require_text_encoder_lora("train_text_encoder=true (a LoRA on the text encoder)")

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)


def add_lora(modules: dict[str, torch.nn.Module], options: LoraOptions, family=None) -> None:
    """Inject LoRA layers (peft) into the family's frozen denoiser (the UNet, or SD3's and Flux's transformer) and,
    with train_text_encoder, into each text encoder whose LoRA the family's pipeline loads (one CLIP for SD and Flux,
    two for SDXL and SD3); only they train. `family` None: Stable Diffusion 1.x/2.x."""
    if family is None:
        from finetune.families import get_family

        family = get_family("sd")
    denoiser_config = LoraConfig(
        r=options.rank,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.dropout,
        init_lora_weights="gaussian",
        target_modules=list(options.target_modules),
    )
    try:
        modules[family.denoiser].add_adapter(denoiser_config)
    except ValueError as err:
        raise ConfigError(
            f"target_modules {options.target_modules} do not match modules of the {family.denoiser}: {err}"
        ) from err
    if options.train_text_encoder:
        rank = options.text_encoder_rank or options.rank
        for name in family.trainable_text_encoder_names():
            modules[name].add_adapter(
                LoraConfig(
                    r=rank,
                    lora_alpha=options.lora_alpha * rank / options.rank,
                    lora_dropout=options.dropout,
                    init_lora_weights="gaussian",
                    target_modules=TEXT_ENCODER_ATTENTION,
                )
            )
    if options.export_kohya:  # a module kohya's layout has no name for fails here, not after training
        family.kohya_state_dict(modules)


def _metadata(module) -> dict | None:
    config = getattr(module, "peft_config", {}).get("default")
    if config is None:
        return None
    metadata = config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}


def save_lora(output_dir: Path, modules: dict[str, torch.nn.Module | None], family, inpainting: bool = False) -> Path:
    """pytorch_lora_weights.safetensors in the diffusers layout of the family's pipeline, with the LoRA configs
    (alpha) as metadata, so that `pipe.load_lora_weights(output_dir)` restores the trained strength."""
    from diffusers.utils import convert_state_dict_to_diffusers

    adapted = with_adapters(modules)
    # the denoiser's keys stay in peft's layout (as diffusers' SD3 and Flux scripts save them): the old diffusers
    # layout renames only to_q/to_k/to_v/to_out.0, and a file that mixes both layouts (attention plus other target
    # modules) loses one part silently on load. The text encoders' LoRA is attention only: the scripts' layout.
    layers = {
        name: get_peft_model_state_dict(m)
        if name == family.denoiser
        else convert_state_dict_to_diffusers(get_peft_model_state_dict(m))
        for name, m in adapted.items()
    }
    return family.save_lora(output_dir, layers, {name: _metadata(m) for name, m in adapted.items()}, inpainting)


def save_kohya(output_dir: Path, modules: dict[str, torch.nn.Module | None], family) -> Path:
    """The kohya / WebUI file beside the diffusers one, in the family's kohya layout."""
    path = Path(output_dir) / KOHYA_FILE
    state = family.kohya_state_dict(modules)
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})
    return path
