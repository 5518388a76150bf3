"""LoRA text-to-image fine-tuning of Stable Diffusion (Hu et al. 2021, through peft).

Trains: LoRA layers on the UNet attention projections (optionally the text encoder's); everything else is frozen in
the mixed-precision dtype. Loss: the diffusion objective on VAE latents conditioned on the captions. Saves:
`pytorch_lora_weights.safetensors` (`pipe.load_lora_weights(output_dir)`), optionally a kohya/WebUI file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.adapters import LoraOptions, add_lora, save_kohya, save_lora
from finetune.families import get_family
from finetune.stable_diffusion import TextToImageMethod, TextToImageOptions


@dataclass
class LoraTrainingOptions(LoraOptions, TextToImageOptions):
    def __post_init__(self):
        LoraOptions.__post_init__(self)
        TextToImageOptions.__post_init__(self)


def lora_card(method, trigger: str | None = None) -> dict[str, Any]:
    base = method.config.model.pretrained_model_name_or_path
    prompt = trigger or method.validation_prompts()[0]
    return {
        "base_model": base,
        "tags": ["lora", "text-to-image", "stable-diffusion"],
        "trigger": trigger,
        "usage": f"""
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("OUTPUT_DIR_OR_REPO_ID")  # pytorch_lora_weights.safetensors
image = pipe("{prompt}", num_inference_steps=30).images[0]
""",
    }


class LoraTextToImage(TextToImageMethod):
    name = "lora"
    summary = "LoRA text-to-image fine-tuning of Stable Diffusion on captioned images (folder, .txt captions, Hub)"
    Options = LoraTrainingOptions

    def configure_trainable(self) -> None:
        add_lora({"unet": self.unet, "text_encoder": self.text_encoder}, self.options, ("text_encoder",))

    def default_prompt(self) -> str:
        captions = self.all_captions()
        return captions[0] if captions else "a photo"

    def save(self, output_dir: Path) -> None:
        unet, text_encoder = self.unwrap(self.unet), self.unwrap(self.text_encoder)
        save_lora(output_dir, {"unet": unet, "text_encoder": text_encoder}, get_family("sd"))
        if self.options.export_kohya:
            save_kohya(output_dir, {"unet": unet, "text_encoder": text_encoder}, get_family("sd"))

    def card(self) -> dict[str, Any]:
        return lora_card(self)
