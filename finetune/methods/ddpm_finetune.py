"""Fine-tuning a pretrained pixel-space DDPM (default google/ddpm-celebahq-256) on new images.

Trains: every UNet parameter, starting from the pretrained weights, with the pretrained noise schedule. Loss: the
diffusion objective. Saves: a `DDPMPipeline` folder like the from-scratch method.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from diffusers import DDPMPipeline, DDPMScheduler

from finetune.config import Config, ConfigError
from finetune.data import build_image_source
from finetune.methods.unconditional import UnconditionalDDPM

logger = logging.getLogger(__name__)


@dataclass
class DDPMFinetuneOptions:
    """The model comes from model.pretrained_model_name_or_path; no options of its own."""


def load_pretrained_ddpm(config: Config):
    """UNet and noise scheduler of a DDPMPipeline folder or Hub id; safetensors only unless model.allow_pickle."""
    model = config.model
    try:
        pipe = DDPMPipeline.from_pretrained(
            model.pretrained_model_name_or_path,
            revision=model.revision,
            variant=model.variant,
            use_safetensors=None if model.allow_pickle else True,
        )
    except OSError as err:
        hint = (
            "" if model.allow_pickle else " If it only has .bin weights and you trust it, set model.allow_pickle=true."
        )
        raise ConfigError(
            f"model.pretrained_model_name_or_path: cannot load a DDPMPipeline from "
            f"{model.pretrained_model_name_or_path!r}: {err}.{hint}"
        ) from err
    scheduler_config = dict(pipe.scheduler.config)
    if config.diffusion.prediction_type is not None:
        scheduler_config["prediction_type"] = config.diffusion.prediction_type
    return pipe.unet, DDPMScheduler.from_config(scheduler_config)


class DDPMFinetune(UnconditionalDDPM):
    name = "ddpm_finetune"
    summary = "fine-tune a pretrained DDPMPipeline (google/ddpm-celebahq-256 or a local folder) on new images"
    Options = DDPMFinetuneOptions

    @classmethod
    def check_config(cls, config: Config) -> None:
        if not config.model.pretrained_model_name_or_path:
            raise ConfigError(
                "model.pretrained_model_name_or_path is required for ddpm_finetune, e.g. google/ddpm-celebahq-256"
            )

    def build_source(self):
        # the pretrained UNet decides the channel count; the data is converted to it
        self._pretrained = load_pretrained_ddpm(self.config)
        unet = self._pretrained[0]
        if unet.config.sample_size != self.config.data.resolution:
            logger.warning(
                "the pretrained UNet was trained at %s px; training at data.resolution=%d",
                unet.config.sample_size,
                self.config.data.resolution,
            )
        return build_image_source(self.config.data, channels=unet.config.in_channels)

    def load_components(self, channels: int):
        unet, scheduler = self._pretrained
        if unet.config.in_channels != channels:
            raise ConfigError(
                f"the pretrained UNet takes {unet.config.in_channels} channels but data.channels={channels}"
            )
        return unet, scheduler

    def card(self) -> dict:
        return {**super().card(), "base_model": self.config.model.pretrained_model_name_or_path}
