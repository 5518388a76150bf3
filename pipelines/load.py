"""Load a diffusers pipeline folder or Hub id with trained adapters: LoRAs (each with its own scale), Textual
Inversion embeddings, a replacement UNet, a chosen scheduler.

    pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", lora=["outputs/a", "outputs/b"],
                         lora_scale=[0.8, 0.5], embeddings="outputs/cat-toy", scheduler="dpm++")

Weights load from safetensors only and no remote code ever runs: the pipeline class comes from model_index.json and
must be a diffusers class or one of difftune's own (`pipelines.class_conditional.ClassConditionalDDPMPipeline`).
A LoRA is checked against the pipeline's modules before it is loaded; one made for another base model fails with
the keys that do not fit (diffusers would skip unknown module names silently).

Stable Diffusion 3 and Flux folders load the same way, with their LoRAs; an SD3 folder saved without T5 loads
without it. Their samplers are flow-matching ones: `euler` is FlowMatchEulerDiscreteScheduler for them, and the
schedulers of the variance-preserving models (DDIM, DPM++, ...) are refused. Neither takes Textual Inversion
embeddings.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from finetune.compat import require_text_encoder_lora

logger = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}
# flow-matching pipelines (SD3, Flux): their sampler must be a FlowMatch* scheduler (Flux sets its timesteps with
# sigmas and a shift `mu`); `euler` is the one that fits
FLOW_SCHEDULERS = {"euler": "FlowMatchEulerDiscreteScheduler"}
# pixel-space pipelines (DDPMPipeline, ClassConditionalDDPMPipeline) neither scale the model input (Euler) nor skip
# the step's `generator` argument (PNDM)
PIXEL_SCHEDULERS = ("ddim", "ddpm", "dpm++")
LOCAL_PIPELINES = {"ClassConditionalDDPMPipeline": "pipelines.class_conditional"}
TRUSTED_LIBRARIES = {"diffusers", "transformers", None}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
LORA_KEY = re.compile(
    r"^(?P<component>[A-Za-z0-9_]+)\.(?P<module>.+?)\."
    r"(?P<kind>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up|lora_down|lora_up)"
    r"(?:\.[A-Za-z0-9_]+)?\.weight$"
)


# ---------------------------------------------------------------------------------------------------------------------
# pipeline class and components
# ---------------------------------------------------------------------------------------------------------------------
def read_model_index(base: str, revision: str | None = None) -> dict[str, Any]:
    """model_index.json of a local pipeline folder or a Hub repo (only that file is downloaded)."""
    local = Path(base).expanduser()
    if local.is_dir():
        path = local / "model_index.json"
        if not path.is_file():
            raise ValueError(f"{base!r} is not a diffusers pipeline folder: it has no model_index.json")
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(base, "model_index.json", revision=revision)).read_text())


def pipeline_class_for(index: dict[str, Any], base: str) -> type:
    """The pipeline class named by model_index.json: a diffusers class or one of difftune's; nothing else runs."""
    import importlib

    import diffusers

    name = index.get("_class_name")
    if name in LOCAL_PIPELINES:
        return getattr(importlib.import_module(LOCAL_PIPELINES[name]), name)
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ValueError(
            f"{base!r}: model_index.json names the pipeline class {name!r}, which is neither a diffusers pipeline "
            f"nor one of difftune's ({', '.join(LOCAL_PIPELINES)}); difftune does not run remote code"
        )
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, (list, tuple)) or len(spec) != 2:
            continue
        if spec[0] not in TRUSTED_LIBRARIES:
            raise ValueError(
                f"{base!r}: component {component!r} comes from {spec[0]!r}; only diffusers and transformers "
                "components load (no remote code)"
            )
    return cls


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def is_flow_matching(scheduler) -> bool:
    """Whether a scheduler samples a flow-matching model (SD3, Flux): FlowMatchEulerDiscreteScheduler and its kin."""
    return type(scheduler).__name__.startswith("FlowMatch")


def scheduler_class_name(scheduler, name: str, what: str) -> str:
    """The diffusers class of the scheduler `name` (a key of SCHEDULERS) for a pipeline whose scheduler is `scheduler`:
    a flow-matching one for SD3 and Flux. ValueError naming `what` when `name` does not fit it."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not one of {', '.join(SCHEDULERS)}")
    if is_flow_matching(scheduler):
        if name not in FLOW_SCHEDULERS:
            raise ValueError(
                f"scheduler {name!r} does not work with {what}, a flow-matching model; use one of "
                f"{', '.join(FLOW_SCHEDULERS)} (or its own scheduler)"
            )
        return FLOW_SCHEDULERS[name]
    return SCHEDULERS[name]


def family_or_none(class_name: str):
    """The difftune family of a pipeline class, None for those outside the families (DDPM, class-conditional)."""
    from finetune.families import family_of_pipeline

    try:
        return family_of_pipeline(class_name, class_name)
    except ValueError:
        return None


def absent_text_encoders(index: dict[str, Any], base: str, cls: type) -> dict[str, None]:
    """{name: None} for the optional text encoder (SD3's T5) and its tokenizer when the folder was saved without it:
    null in model_index.json, or a local folder without its subfolder. diffusers loads such a folder only when they
    are passed as None."""
    family = family_or_none(cls.__name__)
    if family is None:
        return {}
    local = Path(base).expanduser()
    absent = {}
    for encoder in family.optional_text_encoders:
        names = (encoder, family.tokenizer_of(encoder))
        for name in names:
            spec = index.get(name)
            listed = isinstance(spec, (list, tuple)) and len(spec) == 2 and spec[0] is not None
            if not listed or (local.is_dir() and not (local / name).is_dir()):
                absent.update(dict.fromkeys(names))  # an encoder without its tokenizer is of no use, and the reverse
    if absent:
        logger.info("%s has no %s: loading it without them", base, ", ".join(absent))
    return absent


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_unet(path: str, index: dict[str, Any], base: str, dtype: torch.dtype):
    """A trained UNet: a UNet folder (config.json + weights) or a pipeline folder / repo with a unet/ subfolder."""
    import diffusers

    spec = index.get("unet")
    if not spec or spec[0] != "diffusers":
        raise ValueError(f"{base!r} has no diffusers UNet to replace (model_index.json: unet = {spec!r})")
    cls = getattr(diffusers, spec[1])
    local = Path(path).expanduser()
    if local.exists():
        subfolder = "unet" if (local / "unet" / "config.json").is_file() else None
        if subfolder is None and not (local / "config.json").is_file():
            raise ValueError(
                f"unet {path!r} is neither a UNet folder (config.json) nor a folder with a unet/ subfolder"
            )
    else:
        from huggingface_hub import file_exists

        subfolder = "unet" if file_exists(path, "unet/config.json") else None
    unet = cls.from_pretrained(path, subfolder=subfolder, use_safetensors=True, dtype=dtype)
    base_config = cls.load_config(base, subfolder="unet")
    for key in ("in_channels", "out_channels", "cross_attention_dim", "num_class_embeds"):
        if base_config.get(key) != unet.config.get(key):
            raise ValueError(
                f"unet {path!r} does not fit {base!r}: {key} is {unet.config.get(key)!r}, the base model's UNet has "
                f"{base_config.get(key)!r}"
            )
    return unet


def load_controlnet(path: str, cls: type, base: str, dtype: torch.dtype):
    """A trained ControlNet: a ControlNet folder (config.json + weights) or a difftune output / repo with a
    controlnet/ subfolder, checked against the base model's UNet; returns (controlnet, the ControlNet pipeline
    class of the base model's family)."""
    import diffusers

    family = family_or_none(cls.__name__)
    if family is None or family.controlnet_pipeline is None or family.is_inpainting(cls.__name__):
        from finetune.families import family_names, get_family

        families = [get_family(name) for name in family_names()]
        supported = [family.text_to_image_pipeline for family in families if family.controlnet_pipeline]
        raise ValueError(f"{base!r} is a {cls.__name__}: a ControlNet loads into {', '.join(supported)} folders only")
    local = Path(path).expanduser()
    if local.exists():
        subfolder = "controlnet" if (local / "controlnet" / "config.json").is_file() else None
        if subfolder is None and not (local / "config.json").is_file():
            raise ValueError(
                f"controlnet {path!r} is neither a ControlNet folder (config.json) nor a folder with a controlnet/ "
                "subfolder"
            )
    else:
        from huggingface_hub import file_exists

        subfolder = "controlnet" if file_exists(path, "controlnet/config.json") else None
    controlnet_cls = getattr(diffusers, family.controlnet_class)
    controlnet = controlnet_cls.from_pretrained(path, subfolder=subfolder, use_safetensors=True, dtype=dtype)
    base_config = diffusers.UNet2DConditionModel.load_config(base, subfolder="unet")
    for key in ("in_channels", "cross_attention_dim", "block_out_channels", "addition_embed_type"):
        if base_config.get(key) != controlnet.config.get(key) and not (
            isinstance(base_config.get(key), (list, tuple)) and list(base_config[key]) == list(controlnet.config[key])
        ):
            raise ValueError(
                f"controlnet {path!r} does not fit {base!r}: {key} is {controlnet.config.get(key)!r}, the base "
                f"model's UNet has {base_config.get(key)!r}"
            )
    return controlnet, family.pipeline_class(controlnet=True)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA compatibility
# ---------------------------------------------------------------------------------------------------------------------
def _module_at(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None) if not part.isdigit() else _child(module, part)
        if module is None:
            return None
    return getattr(module, "base_layer", module)  # a LoRA loaded earlier wraps the layer


def _child(module: torch.nn.Module, index: str) -> torch.nn.Module | None:
    try:
        return module[int(index)]
    except (TypeError, IndexError, KeyError):
        return getattr(module, index, None)


def _io_features(module: torch.nn.Module) -> tuple[int, int] | None:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def lora_mismatches(pipe, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], int]:
    """(descriptions of LoRA weights that fit no module of the pipeline, number of LoRA weights checked)."""
    problems, checked = [], 0
    for key, tensor in state_dict.items():
        match = LORA_KEY.match(key)
        if match is None:
            continue
        checked += 1
        component, path, kind = match["component"], match["module"], match["kind"]
        root = getattr(pipe, component, None)
        if not isinstance(root, torch.nn.Module):
            problems.append(f"{key}: this pipeline has no {component}")
            continue
        module = _module_at(root, path)
        if module is None and path.startswith("text_model."):  # older text-encoder key layout
            module = _module_at(root, path.removeprefix("text_model."))
        if module is None:
            problems.append(f"{key}: no module {path!r} in the {component} ({type(root).__name__})")
            continue
        features = _io_features(module)
        if features is None:
            continue
        down = kind in ("lora_A", "lora.down", "lora_linear_layer.down", "lora_down")
        expected = features[0] if down else features[1]
        actual = tensor.shape[1] if down else tensor.shape[0]
        if actual != expected:
            side = "inputs" if down else "outputs"
            problems.append(
                f"{key}: shape {list(tensor.shape)} is for {actual} {side}, {component}.{path} has {expected}"
            )
    return problems, checked


def lora_source(path: str) -> tuple[str, dict[str, Any]]:
    """A LoRA given as a file is loaded from its folder with weight_name (diffusers' convention)."""
    local = Path(path).expanduser()
    if local.is_file():
        return str(local.parent), {"weight_name": local.name}
    return path, {}


EMBEDDINGS_FILE = "learned_embeds.safetensors"


def embeddings_file(path: str) -> Path | None:
    """The local safetensors file of a Textual Inversion given as a file or an output folder; None for a Hub id."""
    local = Path(path).expanduser()
    if local.is_file():
        return local
    if (local / EMBEDDINGS_FILE).is_file():
        return local / EMBEDDINGS_FILE
    return None


def load_embeddings(pipe, path: str) -> list[str]:
    """Load a Textual Inversion into a pipeline. A file with one tensor per text encoder (SDXL's `clip_l` / `clip_g`,
    as difftune and the community write them) goes into each encoder with its tokenizer, the token from the file's
    metadata; a one-encoder file (`{token: tensor}`, diffusers' layout) through `load_textual_inversion` as is."""
    from safetensors import safe_open

    from finetune.families import family_of_pipeline

    file = embeddings_file(path)
    if file is None:  # a Hub repo: diffusers downloads learned_embeds.safetensors itself
        pipe.load_textual_inversion(path, use_safetensors=True)
        return []
    with safe_open(str(file), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in keys}
    family = family_of_pipeline(type(pipe).__name__, repr(path))
    layout = family.embedding_keys
    if layout and keys == set(layout.values()):
        token = metadata.get("token")
        if not token:
            raise ValueError(f"{str(file)!r} holds {sorted(keys)} but no 'token' in its metadata: pass the token")
        for encoder, key in layout.items():
            tokenizer = encoder.replace("text_encoder", "tokenizer")
            pipe.load_textual_inversion(
                tensors[key], token=token, text_encoder=getattr(pipe, encoder), tokenizer=getattr(pipe, tokenizer)
            )
        return [token]
    if layout:
        raise ValueError(
            f"{str(file)!r} holds {sorted(keys)}; a {type(pipe).__name__} needs one embedding per text encoder "
            f"({', '.join(layout.values())})"
        )
    pipe.load_textual_inversion(str(file.parent), weight_name=file.name, use_safetensors=True)
    return sorted(keys)


def check_lora_fits(pipe, path: str, base: str) -> None:
    source, kwargs = lora_source(path)
    loaded = type(pipe).lora_state_dict(source, use_safetensors=True, **kwargs)
    state_dict = loaded[0] if isinstance(loaded, tuple) else loaded  # (state_dict, alphas) for SD pipelines
    if any(key.startswith("text_encoder") for key in state_dict):
        require_text_encoder_lora(f"LoRA {path!r} holds text-encoder weights")
    problems, checked = lora_mismatches(pipe, state_dict)
    if problems:
        # one line per module (its down and up weights usually fail together)
        by_module = list({LORA_KEY.match(p.split(":")[0])["module"]: p for p in reversed(problems)}.values())[::-1]
        shown = "\n  ".join(by_module[:5])
        more = f"\n  ... and {len(by_module) - 5} more modules" if len(by_module) > 5 else ""
        raise ValueError(
            f"LoRA {path!r} does not fit the base model {base!r}: {len(problems)} of {checked} LoRA weights do not "
            f"fit the pipeline's modules (was it trained on another base model?):\n  {shown}{more}"
        )


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


# ---------------------------------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------------------------------
def load_pipeline(
    base: str | Path,
    *,
    lora: str | list[str] | None = None,
    lora_scale: float | list[float] = 1.0,
    embeddings: str | list[str] | None = None,
    unet: str | None = None,
    controlnet: str | None = None,
    scheduler: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    revision: str | None = None,
):
    """A ready pipeline: `base` (folder or Hub id) with `unet` replaced, LoRAs applied at `lora_scale` (one scale for
    all, or one per LoRA), Textual Inversion `embeddings` added, and the `scheduler` chosen by name. With a trained
    `controlnet` (its folder, or an output folder with controlnet/), the family's ControlNet pipeline (called with a
    control `image`)."""
    base = str(base)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    loras = [str(p) for p in _as_list(lora)]
    scales = [float(s) for s in _as_list(lora_scale)]
    if len(scales) == 1 and len(loras) > 1:
        scales = scales * len(loras)
    if loras and len(scales) != len(loras):
        raise ValueError(f"{len(loras)} LoRAs but {len(scales)} scales: give one scale, or one per LoRA")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r} is not one of {', '.join(SCHEDULERS)}")

    index = read_model_index(base, revision)
    cls = pipeline_class_for(index, base)
    components = {}
    if unet is not None:
        components["unet"] = load_unet(str(unet), index, base, torch_dtype)
    components.update(absent_text_encoders(index, base, cls))
    pipe = cls.from_pretrained(base, revision=revision, use_safetensors=True, dtype=torch_dtype, **components)
    if controlnet is not None:
        model, controlnet_pipeline = load_controlnet(str(controlnet), cls, base, torch_dtype)
        pipe = controlnet_pipeline.from_pipe(pipe, controlnet=model)
        cls = type(pipe)

    if scheduler is not None:
        text_free = not hasattr(pipe, "tokenizer")
        if text_free and scheduler not in PIXEL_SCHEDULERS:
            raise ValueError(
                f"scheduler {scheduler!r} does not work with {cls.__name__}; use one of {', '.join(PIXEL_SCHEDULERS)}"
            )
        import diffusers

        name = scheduler_class_name(pipe.scheduler, scheduler, cls.__name__)
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)

    if loras:
        if not hasattr(pipe, "load_lora_weights"):
            raise ValueError(f"{cls.__name__} ({base!r}) does not take LoRA weights")
        names = []
        for i, path in enumerate(loras):
            check_lora_fits(pipe, path, base)
            source, kwargs = lora_source(path)
            name = f"lora_{i}"
            pipe.load_lora_weights(source, adapter_name=name, use_safetensors=True, **kwargs)
            names.append(name)
        pipe.set_adapters(names, adapter_weights=scales)
        logger.info("LoRAs %s at scales %s", loras, scales)

    if embeddings:
        family = family_or_none(cls.__name__)
        if not hasattr(pipe, "load_textual_inversion") or (family is not None and not family.textual_inversion):
            # (FluxPipeline has the loader, for its CLIP encoder only; T5 carries most of the prompt)
            raise ValueError(f"{cls.__name__} ({base!r}) does not take Textual Inversion embeddings")
    for path in _as_list(embeddings):
        load_embeddings(pipe, str(path))

    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
