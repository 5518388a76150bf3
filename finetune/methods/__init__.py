"""Method registry: every module in this package that defines a `Method` subclass with a `name` is a method.

Adding a method is adding one file here (and a recipe); nothing else lists the methods.
"""

from __future__ import annotations

from functools import cache

from finetune.config import ConfigError
from finetune.registry import discover


@cache
def _registry() -> dict[str, type]:
    from finetune.methods.base import Method

    return discover(__name__, __path__, Method)


def method_names() -> list[str]:
    return list(_registry())


# methods that became something else, and what to write instead
RENAMED = {
    "inpainting": "inpainting models train with any text-to-image method: use method 'dreambooth' (or 'lora', "
    "'textual_inversion') with an inpainting checkpoint; the mask options (mask_data_dir, mask_column, mask_shapes "
    "...) move to that method's section",
}


def get_method_class(name: str) -> type:
    registry = _registry()
    if name in RENAMED and name not in registry:
        raise ConfigError(f"method {name!r} is gone: {RENAMED[name]}")
    if name not in registry:
        raise ConfigError(f"unknown method {name!r}. Valid methods: {', '.join(registry)}")
    return registry[name]
