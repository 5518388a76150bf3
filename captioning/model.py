"""The captioning model: BLIP (``BlipForConditionalGeneration`` + ``BlipProcessor``, safetensors weights only, no
remote code), its precision, and how its text decoder generates a caption (beam search or nucleus sampling)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from captioning.errors import CaptioningError

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
DECODING_CHOICES = ("beam", "sample")


@dataclass(frozen=True)
class GenerationSettings:
    """How BLIP's text decoder produces a caption. Lengths count generated tokens only, never the prompt."""

    decoding: str = "beam"
    num_beams: int = 3
    top_p: float = 0.9
    temperature: float = 1.0
    min_new_tokens: int = 5
    max_new_tokens: int = 30

    def __post_init__(self) -> None:
        if self.decoding not in DECODING_CHOICES:
            raise CaptioningError(f"decoding must be one of {DECODING_CHOICES}, not {self.decoding!r}")
        if self.num_beams < 1:
            raise CaptioningError(f"num_beams must be at least 1, not {self.num_beams}")
        if not 0.0 < self.top_p <= 1.0:
            raise CaptioningError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.temperature <= 0.0:
            raise CaptioningError(f"temperature must be positive, not {self.temperature}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens or self.max_new_tokens < 1:
            raise CaptioningError(
                f"need 0 <= min length <= max length and max length >= 1, got {self.min_new_tokens}, "
                f"{self.max_new_tokens}"
            )

    def generate_kwargs(self) -> dict:
        lengths = {"min_new_tokens": self.min_new_tokens, "max_new_tokens": self.max_new_tokens}
        if self.decoding == "sample":
            # Nucleus sampling as in the BLIP paper: top_k=0 switches off transformers' default top-k of 50.
            sampling = {"do_sample": True, "num_beams": 1, "top_p": self.top_p, "top_k": 0}
            return {**sampling, "temperature": self.temperature, **lengths}
        return {"do_sample": False, "num_beams": self.num_beams, **lengths}


def resolve_dtype(dtype: str, device):
    import torch

    if dtype == "auto":
        # Half precision is BLIP's usual inference setting on GPUs; CPUs run float32 (float16 matmuls are slow there).
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class BlipCaptioner:
    """Batched captioning with ``BlipForConditionalGeneration`` + ``BlipProcessor``.

    With a prompt ("a photograph of") BLIP continues the prompt, and the caption starts with it, as in BLIP's
    conditional captioning.
    """

    def __init__(self, model, processor, *, generation: GenerationSettings, prompt: str | None = None):
        self.model = model.eval()
        self.processor = processor
        self.generation = generation
        self.prompt = prompt.strip() if prompt and prompt.strip() else None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        size = getattr(processor.image_processor, "size", None) or {}
        self.image_size = max(size.get("height", 0), size.get("width", 0), size.get("shortest_edge", 0)) or None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device,
        dtype: str = "auto",
        generation: GenerationSettings | None = None,
        prompt: str | None = None,
    ) -> BlipCaptioner:
        import torch
        from transformers import AutoConfig, BlipConfig, BlipForConditionalGeneration, BlipProcessor

        device = torch.device(device)
        try:
            # trust_remote_code stays off: only transformers' own BLIP code runs.
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
        except (OSError, ValueError) as error:
            raise CaptioningError(f"cannot load a model config from {name_or_path!r}: {error}") from error
        if not isinstance(config, BlipConfig):
            raise CaptioningError(
                f"{name_or_path!r} is a {type(config).__name__} ({config.model_type!r}); this tool runs BLIP "
                "captioning checkpoints (model_type 'blip'), e.g. Salesforce/blip-image-captioning-large"
            )
        try:
            # safetensors only: a pickled checkpoint from the internet can run code when it is loaded.
            model = BlipForConditionalGeneration.from_pretrained(
                name_or_path, config=config, dtype=resolve_dtype(dtype, device), use_safetensors=True
            )
            processor = BlipProcessor.from_pretrained(name_or_path)
        except OSError as error:
            raise CaptioningError(
                f"cannot load BLIP weights and processor from {name_or_path!r} (safetensors weights are required): "
                f"{error}"
            ) from error
        return cls(model.to(device), processor, generation=generation or GenerationSettings(), prompt=prompt)

    def caption(self, images: Sequence) -> list[str]:
        import torch

        if self.prompt is not None:
            # Every image gets the same prompt, so the token rows have equal length and need no padding.
            inputs = self.processor(images=list(images), text=[self.prompt] * len(images), return_tensors="pt")
        else:
            inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {name: tensor.to(self.device) for name, tensor in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            output_ids = self.model.generate(**inputs, **self.generation.generate_kwargs())
        return [caption.strip() for caption in self.processor.batch_decode(output_ids, skip_special_tokens=True)]
