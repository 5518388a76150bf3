"""Class-conditional pixel-space DDPM: a UNet2DModel with class embeddings, trained on a label column.

Trains: every UNet parameter. Conditioning: `class_labels`; with `label_dropout` > 0 a label is replaced by an extra
"no class" label, so sampling can use classifier-free guidance (Ho & Salimans 2022). Saves: a
`pipelines.ClassConditionalDDPMPipeline` folder (`ClassConditionalDDPMPipeline.from_pretrained(output_dir)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune.config import Config, ConfigError, option
from finetune.data import build_image_source
from finetune.methods.unconditional import UnconditionalDDPM, UnconditionalOptions
from pipelines.class_conditional import ClassConditionalDDPMPipeline


@dataclass
class ClassConditionalOptions(UnconditionalOptions):
    num_classes: int = option(10, "Number of classes; labels must be integers in [0, num_classes).")
    label_dropout: float = option(0.1, "Probability of training with the 'no class' label (enables guidance).")
    guidance_scale: float = option(1.0, "Classifier-free guidance scale for sample grids and evaluation.")

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {self.num_classes}")
        if not 0 <= self.label_dropout < 1:
            raise ConfigError(f"label_dropout must be in [0, 1), got {self.label_dropout}")


class ClassConditionalDDPM(UnconditionalDDPM):
    name = "class_conditional"
    summary = "pixel-space DDPM with class labels (and classifier-free guidance by label dropout)"
    Options = ClassConditionalOptions

    @classmethod
    def check_config(cls, config: Config) -> None:
        super().check_config(config)
        if config.method_options.guidance_scale != 1.0 and config.method_options.label_dropout == 0:
            raise ConfigError(
                "class_conditional.guidance_scale != 1 needs class_conditional.label_dropout > 0 (the model must "
                "learn the 'no class' label to be guided)"
            )

    @property
    def null_label(self) -> int | None:
        return self.options.num_classes if self.options.label_dropout > 0 else None

    def build_source(self):
        if self.config.data.dataset == "digits":
            return build_image_source(self.config.data)
        column = self.config.data.label_column
        source = build_image_source(self.config.data, columns=[column])
        # every label in range, checked now rather than when the example is first drawn hours into training
        for row in getattr(source, "indices", []):
            label = source.column_values[column][row]
            if not 0 <= int(label) < self.options.num_classes:
                name = source.image_sources[row]
                name = name.get("path") if isinstance(name, dict) else name
                raise ConfigError(
                    f"data.label_column: label {label} of {name or f'row {row}'} is outside [0, "
                    f"{self.options.num_classes}); set class_conditional.num_classes or fix the label"
                )
        return source

    def make_example(self, example: dict, rng) -> dict:
        label = int(example.pop(self.config.data.label_column, example.get("label")))
        if not 0 <= label < self.options.num_classes:
            raise ValueError(
                f"label {label} of row {example['row']} is outside [0, {self.options.num_classes}): set "
                f"class_conditional.num_classes or fix data.label_column"
            )
        if self.null_label is not None and rng.random() < self.options.label_dropout:
            label = self.null_label  # classifier-free guidance: learn the unconditional model too
        example["label"] = label
        return example

    def unet_kwargs(self, channels: int) -> dict[str, Any]:
        embeds = self.options.num_classes + (1 if self.null_label is not None else 0)
        return {**super().unet_kwargs(channels), "num_class_embeds": embeds}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return self.unet(noisy, timesteps, class_labels=batch["label"]).sample

    def pipeline(self):
        return ClassConditionalDDPMPipeline(
            unet=self.unwrap(self.unet), scheduler=self.sampling_scheduler(), num_classes=self.options.num_classes
        )

    def validation_inputs(self, num_images: int) -> dict[str, Any]:
        return {"class_labels": torch.arange(num_images) % self.options.num_classes}

    def sample_labels(self, num_images: int) -> list[str]:
        return [f"class {i % self.options.num_classes}" for i in range(num_images)]

    def guidance_inputs(self) -> dict[str, Any]:
        return {"guidance_scale": self.options.guidance_scale}

    def card(self) -> dict[str, Any]:
        return {
            "tags": ["class-conditional-image-generation"],
            "usage": f"""
from pipelines.class_conditional import ClassConditionalDDPMPipeline  # pip install difftune

pipe = ClassConditionalDDPMPipeline.from_pretrained("OUTPUT_DIR_OR_REPO_ID")
images = pipe(class_labels=list(range({self.options.num_classes})), guidance_scale={self.options.guidance_scale},
              num_inference_steps={self.config.diffusion.num_inference_steps}).images
""",
        }
