"""Model families: every module in this package that defines a `Family` subclass with a `name` is a family.

A family is what differs between Stable Diffusion 1.x/2.x, SDXL and the models after them: which components a
pipeline folder has and how they load, how a caption becomes conditioning, how the denoiser is called, the pipeline
class, and how LoRA weights and embeddings are laid out. Methods ask the family; they never name one. Adding a
family is adding one file here (and its recipes); nothing else lists the families.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from finetune.config import Config, ConfigError
from finetune.errors import InputError
from finetune.families.base import MODEL_KEY, Family
from finetune.registry import discover


@cache
def _registry() -> dict[str, type]:
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


def pipeline_class_name(path: str, revision: str | None = None) -> str | None:
    """model_index.json's `_class_name` of a local folder or a Hub id (from the Hub cache when offline); None when
    the file cannot be read, which the component loaders then report with their own clear message."""
    local = Path(path).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            return None
        try:
            return json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "model_index.json", revision=revision)).read_text()).get(
            "_class_name"
        )
    except Exception:  # noqa: BLE001 - offline, no such repo: the loaders say which, with the fix
        return None


def resolve_family(config: Config) -> Family:
    """The family of the base model: read from its model_index.json, checked against `model.family` when a recipe
    names one (an SD 1.5 folder given to an SDXL recipe, or the other way round, is one clear line)."""
    model = config.model
    found = pipeline_class_name(str(model.pretrained_model_name_or_path), model.revision)
    where = f"{MODEL_KEY} {str(model.pretrained_model_name_or_path)!r}"
    detected = family_of_pipeline(found, where) if found else None
    if model.family == "auto":
        if detected is None:  # model_index.json unreadable here: the loaders say why; SD 1.x has the fewest parts
            return get_family("sd")
        return detected
    declared = get_family(model.family)
    if detected is not None and detected.name != declared.name:
        raise ConfigError(
            f"{where} is a {found} (family {detected.name!r}), but model.family is {declared.name!r}: use a "
            f"{detected.name} recipe (finetune/recipes/{detected.name}_*.yaml) or set model.family={detected.name} "
            f"(supported families: {supported()})"
        )
    return declared


def local_family(config: Config) -> Family:
    """The family as far as it is known without a download: a local folder's model_index.json, else the one the
    recipe names, else SD 1.x (what preflight needs to list the subfolders a folder must have)."""
    model = config.model
    local = Path(str(model.pretrained_model_name_or_path or "")).expanduser()
    found = pipeline_class_name(str(local)) if local.is_dir() else None
    if found:
        try:
            return family_of_pipeline(found, MODEL_KEY)
        except ConfigError:
            pass  # resolve_family says so, with the supported families
    return get_family("sd" if model.family == "auto" else model.family)
