"""Method registry: every module in this package that defines a `Method` subclass with a `name` is a method.

Adding a method is adding one file here (and a recipe); nothing else lists the methods.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from functools import cache

from finetune.config import ConfigError


@cache
def _registry() -> dict[str, type]:
    from finetune.methods.base import Method

    methods: dict[str, type] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Method) and obj.__module__ == module.__name__ and "name" in obj.__dict__:
                methods[obj.name] = obj
    return dict(sorted(methods.items()))


def method_names() -> list[str]:
    return list(_registry())


def get_method_class(name: str) -> type:
    registry = _registry()
    if name not in registry:
        raise ConfigError(f"unknown method {name!r}. Valid methods: {', '.join(registry)}")
    return registry[name]
