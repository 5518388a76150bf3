"""A DDPM/DDIM pipeline for class-conditional UNet2DModels, with classifier-free guidance (Ho & Salimans 2022).

pipe = ClassConditionalDDPMPipeline.from_pretrained("outputs/digits-class-conditional")
images = pipe(class_labels=[3, 7], num_inference_steps=50).images  # the guidance scale saved with the model
images = pipe(class_labels=[3, 7], guidance_scale=2.0).images  # or another one
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalDDPMPipeline(DiffusionPipeline):
    """unet: a UNet2DModel with `num_class_embeds`; `num_classes`: the real classes. When the model was trained with
    label dropout, `num_class_embeds == num_classes + 1` and the last embedding is the "no class" label.
    `guidance_scale`: the default of `__call__`, saved in model_index.json (training saves its recipe's value), so a
    user who loads the folder samples with the tuned guidance without knowing it; None means 1 (no guidance)."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, num_classes: int | None = None, guidance_scale: float | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(num_classes=num_classes, guidance_scale=guidance_scale)

    @property
    def default_guidance_scale(self) -> float:
        """The guidance scale used when a call gives none: the saved one, else 1 (plain conditional sampling)."""
        saved = getattr(self.config, "guidance_scale", None)
        if saved is None or self.null_class_label is None:
            return 1.0
        return float(saved)

    @property
    def null_class_label(self) -> int | None:
        num_classes = self.config.num_classes
        if num_classes is not None and self.unet.config.num_class_embeds == num_classes + 1:
            return num_classes
        return None

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        guidance_scale: float | None = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
    ):
        """Sample one image per label. guidance_scale > 1 mixes conditional and unconditional predictions
        (Ho & Salimans 2022, eq. 6); it needs a model trained with label dropout. None: `default_guidance_scale`."""
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        labels = torch.as_tensor(class_labels, device=self._execution_device).long().flatten()
        embeds = self.unet.config.num_class_embeds
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= (self.null_class_label or embeds):
            raise ValueError(f"class_labels must be integers in [0, {self.null_class_label or embeds})")
        guided = guidance_scale != 1.0
        if guided and self.null_class_label is None:
            raise ValueError("guidance_scale != 1 needs a model trained with label dropout (no null class here)")
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (len(labels), self.unet.config.in_channels, *size)
        image = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        step_kwargs = {}
        step_parameters = inspect.signature(self.scheduler.step).parameters
        if "eta" in step_parameters:
            step_kwargs["eta"] = eta
        if "generator" in step_parameters:
            step_kwargs["generator"] = generator
        null = torch.full_like(labels, self.null_class_label) if guided else None
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if guided:
                both = self.unet(torch.cat([image, image]), t, class_labels=torch.cat([labels, null])).sample
                conditional, unconditional = both.chunk(2)
                model_output = unconditional + guidance_scale * (conditional - unconditional)
            else:
                model_output = self.unet(image, t, class_labels=labels).sample
            image = self.scheduler.step(model_output, t, image, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": image})
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
