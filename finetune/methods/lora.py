"""LoRA text-to-image fine-tuning (Hu et al. 2021, through peft) of any text-to-image family (SD 1.x/2.x, SDXL).

Trains: LoRA layers on the UNet attention projections (optionally every text encoder's: one for SD, two for SDXL);
everything else is frozen in the mixed-precision dtype. Loss: the diffusion objective on VAE latents conditioned on
the captions. Saves: `pytorch_lora_weights.safetensors` in the layout of the family's pipeline
(`pipe.load_lora_weights(output_dir)`), optionally a kohya/WebUI file (`lora_te1_`/`lora_te2_` for SDXL).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.adapters import LoraOptions, add_lora, save_kohya, save_lora
from finetune.text_to_image import TextToImageMethod, TextToImageOptions


@dataclass
class LoraTrainingOptions(LoraOptions, TextToImageOptions):
    def __post_init__(self):
        LoraOptions.__post_init__(self)
        TextToImageOptions.__post_init__(self)


def lora_card(method, trigger: str | None = None) -> dict[str, Any]:
    base = method.config.model.pretrained_model_name_or_path
    prompt = method.card_prompt()
    return {
        **method.license_facts(),
        "base_model": base,
        "tags": ["lora", *method.card_tags()],
        "pipeline_tag": method.pipeline_tag(),
        "trigger": trigger,
        "prompt": prompt,
        "usage": f"""
{method.usage_loading(base)}
pipe.load_lora_weights("OUTPUT_DIR_OR_REPO_ID")  # pytorch_lora_weights.safetensors
{method.usage_call(prompt)}
""",
    }


def lora_modules(method) -> dict:
    """The denoiser and the text encoders, unwrapped: what carries the LoRA layers when saving."""
    denoiser = {method.family.denoiser: method.unwrap(method.denoiser)}
    return {**denoiser, **{name: method.unwrap(m) for name, m in method.text_encoders.items()}}


class LoraTextToImage(TextToImageMethod):
    name = "lora"
    summary = "LoRA text-to-image fine-tuning (SD 1.x/2.x, SDXL) on captioned images (folder, .txt captions, Hub)"
    Options = LoraTrainingOptions

    def configure_trainable(self) -> None:
        add_lora(self.parts(), self.options, self.family)

    def default_prompt(self) -> str:
        captions = self.all_captions()
        return captions[0] if captions else "a photo"

    def save(self, output_dir: Path) -> None:
        modules = lora_modules(self)
        save_lora(output_dir, modules, self.family, inpainting=self.inpainting)
        if self.options.export_kohya:
            save_kohya(output_dir, modules, self.family)

    def card(self) -> dict[str, Any]:
        return lora_card(self)
