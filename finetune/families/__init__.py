"""Model families: every module in this package that defines a `Family` subclass with a `name` is a family.

A family is what differs between Stable Diffusion 1.x/2.x, SDXL and the models after them: which components a
pipeline folder has and how they load, how a caption becomes conditioning, how the denoiser is called, the pipeline
class, and how LoRA weights and embeddings are laid out. Methods ask the family; they never name one. Adding a
family is adding one file here (and its recipes); nothing else lists the families.
"""

from __future__ import annotations

from functools import cache

from finetune.errors import InputError
from finetune.registry import discover


@cache
def _registry() -> dict[str, type]:
    from finetune.families.base import Family

    return discover(__name__, __path__, Family)


def family_names() -> list[str]:
    return list(_registry())


def supported() -> str:
    """'sd (StableDiffusionPipeline, ...), sdxl (...)': what an error message lists."""
    return "; ".join(f"{name} ({', '.join(cls.pipeline_classes)})" for name, cls in _registry().items())


def get_family(name: str):
    registry = _registry()
    if name not in registry:
        raise InputError(f"model.family: unknown family {name!r}. Supported: {', '.join(registry)} (or auto)")
    return registry[name]()


def family_of_pipeline(class_name: str, where: str):
    """The family whose pipelines include `class_name` (model_index.json's `_class_name`)."""
    for cls in _registry().values():
        if class_name in cls.pipeline_classes:
            return cls()
    raise InputError(
        f"{where} is a {class_name}, which difftune does not train. Supported model families: {supported()}"
    )
