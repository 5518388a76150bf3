"""The model the web app serves (pipelines/app.py): loading a pipeline folder with its LoRAs and Textual Inversion
embeddings into a `ServedModel` (kind, defaults from the model card, scheduler choices), the `ModelHolder` one app
shares between its pages, and the scheduler / LoRA-scale settings applied before each run. No gradio here.

Any pipeline `pipelines.load.load_pipeline` loads is served the same way: Stable Diffusion 1.x/2.x and SDXL folders
(with their LoRAs, and embeddings in either layout), Stable Diffusion 3 and Flux folders (with their LoRAs),
class-conditional and unconditional DDPMs, distilled students. SD3 and Flux are offered only the flow-matching
sampler and start from their pipeline's guidance (Flux.1-dev's is an input of the model, not classifier-free); Flux
takes no negative prompt.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.generate import parse_lora  # 'PATH' or 'PATH:SCALE', as the generate command takes it
from pipelines.steps import (
    fresh_scheduler,
    guidance_is_an_input,
    load_image,
    model_image_size,
    pipeline_kind,
    uses_negative_prompt,
)

logger = logging.getLogger("pipelines.app")

DEMO_MODEL = "outputs/digits-unconditional"


def split_lines(text: str | Sequence[str] | None) -> list[str]:
    """The non-empty lines of a text box (or the items of a list), stripped."""
    if text is None:
        return []
    items = text.splitlines() if isinstance(text, str) else list(text)
    return [item.strip() for item in items if item and item.strip()]


def _card_value(folder: str, key: str) -> float | None:
    """`key=NUMBER` from the model card (README.md) difftune writes into every output folder, e.g. the step count a
    distilled student was trained for."""
    card = Path(folder).expanduser() / "README.md"
    try:
        match = re.search(rf"\b{key}\s*=\s*([0-9.]+)", card.read_text(errors="replace"))
    except OSError:
        return None
    try:
        return float(match.group(1)) if match else None
    except ValueError:
        return None


def _check_local(path: str, what: str) -> None:
    """A path that names a local place (its parent folder exists, or it starts with . / ~) must exist: a typo is
    reported as such instead of being looked up on the Hub. Anything else is left to load_pipeline as a Hub id."""
    local = Path(path).expanduser()
    if local.exists():
        return
    parent = str(local.parent) not in ("", ".") and local.parent.exists()
    demo = is_missing_demo(path)  # outputs/ of a fresh clone is not there either: never a Hub id
    if path.startswith((".", "/", "~")) or parent or demo or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(f"{what} {path!r}: no such file or folder")


def is_missing_demo(path: str | None) -> bool:
    """`path` is the demo model's folder (`make demo` makes it) and it is not there."""
    return bool(path) and Path(path).as_posix().rstrip("/").endswith(DEMO_MODEL) and not Path(path).is_dir()


def default_model() -> str:
    """The demo model (`make demo` output) under the working directory, or else under this checkout."""
    here = Path(DEMO_MODEL)
    checkout = Path(__file__).resolve().parents[1] / DEMO_MODEL
    return str(checkout) if not here.is_dir() and checkout.is_dir() else DEMO_MODEL


@dataclass
class ServedModel:
    pipe: Any
    path: str
    kind: str  # 'text', 'class' or 'unconditional'
    model_id: int
    loras: list[tuple[str, float]] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)  # the Textual Inversion tokens to use in prompts
    default_steps: int = 50
    default_guidance: float | None = None
    num_classes: int = 0
    guided: bool = False  # whether guidance applies (text, or class with a "no class" label)
    guidance_input: bool = False  # guidance is an input of the model (Flux.1-dev), not classifier-free guidance
    negative_prompt: bool = False  # whether a negative prompt is used (text; not by Flux)
    base_scheduler: Any = None
    scheduler_choices: list[str] = field(default_factory=list)
    controlnet: str | None = None  # a trained ControlNet, and the control image every generation follows
    control_image: Any = None

    @property
    def pixel_size(self) -> tuple[int, int, int]:
        return model_image_size(self.pipe)

    def describe(self) -> str:
        height, width, channels = self.pixel_size
        what = {"text": "text-to-image", "class": "class-conditional", "unconditional": "unconditional"}[self.kind]
        space = "latent" if self.kind == "text" else "pixel"
        parts = [
            f"**{self.path}**: {type(self.pipe).__name__} ({what}, {space} space, {width}x{height}, "
            f"{channels} channel{'s' if channels > 1 else ''}), scheduler {type(self.base_scheduler).__name__}, "
            f"{self.default_steps} steps by default"
        ]
        if self.kind == "class":
            guidance = "" if self.guided else ", no guidance (no null class)"
            parts.append(f"classes 0-{self.num_classes - 1}{guidance}")
        if self.kind == "text" and self.guidance_input:
            parts.append("guidance is an input of the model (guidance-distilled), not classifier-free")
        elif self.kind == "text" and not self.guided:
            parts.append("no guidance (this model does not take it)")
        if self.kind == "text" and not self.negative_prompt:
            parts.append(f"no negative prompt ({type(self.pipe).__name__} uses one only with true CFG)")
        if self.loras:
            parts.append("LoRA " + ", ".join(f"`{path}` x{scale:g}" for path, scale in self.loras))
        if self.tokens:
            parts.append("embedding tokens " + ", ".join(f"`{token}`" for token in self.tokens))
        if self.controlnet:
            parts.append(
                f"ControlNet `{self.controlnet}` following a {self.control_image.width}x"
                f"{self.control_image.height} control image"
            )
        return "; ".join(parts)


def _check_paths(model: str, lora: Sequence[str], embeddings: Sequence[str]) -> list[tuple[str, float]]:
    """The LoRAs as (path, scale), once the model is a folder and every local path names something that exists:
    clear messages before anything loads."""
    if not model:
        raise ValueError("no model given: type a pipeline folder")
    _check_local(model, "model")
    if Path(model).expanduser().is_file():
        raise ValueError(f"{model!r} is a file; give the pipeline's folder (the one with model_index.json)")
    loras = [parse_lora(spec) for spec in lora]
    for path, _ in loras:
        _check_local(path, "LoRA")
    for path in embeddings:
        _check_local(path, "embeddings")
    return loras


def embedding_tokens(pipe) -> list[str]:
    """The Textual Inversion tokens added to the pipeline's (first) tokenizer, to use in prompts: one per embedding,
    without the `token_1`, `token_2` ... of multi-vector embeddings. SDXL adds the same token to both tokenizers."""
    if not hasattr(pipe, "tokenizer"):
        return []
    special = set(getattr(pipe.tokenizer, "all_special_tokens", []))
    return [t for t in pipe.tokenizer.get_added_vocab() if t not in special and not re.search(r"_\d+$", t)]


def _pipeline_guidance(pipe) -> float | None:
    """The guidance_scale the pipeline uses when none is given (SD3: 7.0, Flux: 3.5)."""
    import inspect

    parameter = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    default = None if parameter is None else parameter.default
    return float(default) if isinstance(default, (int, float)) else None


def _set_defaults(served: ServedModel) -> None:
    """Steps and guidance from the model card when it names them, else the kind's usual ones; scheduler choices,
    classes and whether guidance applies, from the kind. Flow-matching models (SD3, Flux) start from their pipeline's
    own guidance and are offered only the samplers that fit them; Flux.1-schnell (no guidance input) none."""
    from pipelines.load import FLOW_SCHEDULERS, PIXEL_SCHEDULERS, SCHEDULERS, is_flow_matching

    kind, pipe = served.kind, served.pipe
    card_steps = _card_value(served.path, "num_inference_steps")
    served.default_steps = int(card_steps) if card_steps else (30 if kind == "text" else 50)
    card_guidance = _card_value(served.path, "guidance_scale")
    if kind == "text" and is_flow_matching(pipe.scheduler):
        served.guidance_input = guidance_is_an_input(pipe)
        served.negative_prompt = uses_negative_prompt(pipe)
        # guidance is classifier-free (SD3, with the negative prompt), an input of the model (FLUX.1-dev) or neither
        # (FLUX.1-schnell: Flux's classifier-free guidance is "true CFG", which difftune does not run)
        served.guided = served.guidance_input or served.negative_prompt
        served.default_guidance = (card_guidance or _pipeline_guidance(pipe) or 7.0) if served.guided else None
        served.scheduler_choices = ["default", *FLOW_SCHEDULERS]
    elif kind == "text":
        served.guided = True
        served.negative_prompt = uses_negative_prompt(pipe)
        served.default_guidance = card_guidance or 7.5
        served.scheduler_choices = ["default", *SCHEDULERS]
    else:
        served.scheduler_choices = ["default", *PIXEL_SCHEDULERS]
    if kind == "class":
        served.num_classes = int(pipe.config.num_classes or pipe.unet.config.num_class_embeds)
        served.guided = pipe.null_class_label is not None
        saved = getattr(pipe.config, "guidance_scale", None)  # saved with the model by training
        served.default_guidance = (saved or card_guidance or 1.0) if served.guided else None


def load_served_model(
    model: str,
    lora: Sequence[str] = (),
    embeddings: Sequence[str] = (),
    *,
    device: str | None = None,
    dtype: str = "auto",
    model_id: int = 0,
    controlnet: str | None = None,
    control_image: str | None = None,
) -> ServedModel:
    """Load a pipeline folder (or Hub id) with LoRAs ('PATH' or 'PATH:SCALE') and embeddings via
    `pipelines.load.load_pipeline`, optionally with a ControlNet and the control image it follows; ValueError /
    OSError with a message for the page when it cannot be served."""
    from pipelines.load import load_pipeline

    model = str(model).strip()
    loras = _check_paths(model, lora, embeddings)
    control = None
    if bool(controlnet) != bool(control_image):
        raise ValueError("a ControlNet needs a control image, and a control image a ControlNet: give both")
    if controlnet:
        _check_local(controlnet, "ControlNet")
        control = load_image(control_image).convert("RGB")
    pipe = load_pipeline(
        model,
        lora=[path for path, _ in loras] or None,
        lora_scale=[scale for _, scale in loras] or 1.0,
        embeddings=list(embeddings) or None,
        controlnet=controlnet or None,
        device=device,
        dtype=dtype,
    )
    served = ServedModel(
        pipe=pipe,
        path=model,
        kind=pipeline_kind(pipe),
        model_id=model_id,
        loras=loras,
        embeddings=list(embeddings),
        tokens=embedding_tokens(pipe) if embeddings else [],
        base_scheduler=pipe.scheduler,
        controlnet=controlnet or None,
        control_image=control,
    )
    _set_defaults(served)
    return served


class ModelHolder:
    """The model the app serves (one per app, shared by its pages) and the error of the last load, if it failed."""

    def __init__(self):
        self.model: ServedModel | None = None
        self.error: str | None = None
        self.requested: str | None = None  # the folder or id of the last load, served or not
        self.lock = threading.RLock()  # one generation or load at a time
        self._ids = 0

    def load(self, model: str, lora: Sequence[str] = (), embeddings: Sequence[str] = (), **kwargs) -> bool:
        with self.lock:
            self._ids += 1
            self.requested = model
            try:
                served = load_served_model(model, lora, embeddings, model_id=self._ids, **kwargs)
            except Exception as err:  # noqa: BLE001 - every failure goes to the page, not a traceback
                self.error = f"Could not load {model!r}: {error_message(err)}"
                logger.error("%s", self.error.splitlines()[0])
                logger.debug("load failed", exc_info=True)
                return False
            self.model, self.error = served, None
            logger.info("serving %s (%s)", served.path, type(served.pipe).__name__)
            return True


def error_message(err: BaseException) -> str:
    """An exception as the page shows it: its text, with its type unless it is a ValueError / OSError."""
    text = str(err).strip() or type(err).__name__
    if not isinstance(err, (ValueError, OSError)):
        text = f"{type(err).__name__}: {text}"
    return text


def apply_settings(served: ServedModel, scheduler: str | None, lora_scale: float | None) -> None:
    """The chosen scheduler (a fresh one every run) and LoRA scale (x each LoRA's own weight) on the pipeline."""
    served.pipe.scheduler = fresh_scheduler(served.base_scheduler, scheduler)
    if served.loras:
        names = [f"lora_{i}" for i in range(len(served.loras))]  # the adapter names pipelines.load gives
        scale = 1.0 if lora_scale is None else float(lora_scale)
        served.pipe.set_adapters(names, adapter_weights=[weight * scale for _, weight in served.loras])
