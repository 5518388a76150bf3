"""Plug-in discovery: every module of a package that defines a subclass of a base class with a `name` of its own
contributes it. The methods (finetune/methods/) and the model families (finetune/families/) are found this way, so
adding one is adding one file; nothing else lists them."""

from __future__ import annotations

import importlib
import inspect
import pkgutil


def discover(package: str, path: list[str], base: type) -> dict[str, type]:
    """name -> class of every `base` subclass with its own `name` in the modules of `package` (at `path`), skipping
    the module `base` and private modules, sorted by name."""
    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(path):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, base) and obj.__module__ == module.__name__ and "name" in obj.__dict__:
                found[obj.name] = obj
    return dict(sorted(found.items()))
