"""A local web app for any model difftune trains: text-to-image Stable Diffusion (with LoRAs and Textual Inversion
embeddings), class-conditional and unconditional DDPMs, distilled students. Generate with prompt / class, steps,
guidance, seed, scheduler and LoRA scale; scrub through the denoising steps of a generation; noise an uploaded image
and let the model reconstruct it (SDEdit).

    python -m pipelines.app                                      # the demo model (`make demo`)
    python -m pipelines.app --model outputs/digits-class-conditional
    python -m pipelines.app --model stable-diffusion-v1-5/stable-diffusion-v1-5 --lora outputs/sd-lora:0.8 \\
        --embeddings outputs/sd-textual-inversion-cat-toy --port 7860

It serves on 127.0.0.1 only, never makes a share link and sends no analytics. Errors (a folder that is not a
pipeline, a LoRA for another base model, an upload that is not an image) show in the page; another model can be
loaded from the page.

In-process (tests): `app = build_app("outputs/digits-unconditional"); launch(app, port, block=False)`, then
`app.close()`. Needs the `app` extra: `pip install -e ".[app]"`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from pipelines.generate import parse_lora  # 'PATH' or 'PATH:SCALE', as the generate command takes it
from pipelines.steps import (
    StepRecord,
    fit_image,
    fresh_scheduler,
    generate_with_steps,
    load_image,
    model_image_size,
    pipeline_kind,
    reconstruct,
)

if TYPE_CHECKING:
    import gradio as gr

logger = logging.getLogger("pipelines.app")


def import_gradio():
    """gradio, imported with its analytics off (no version check, no telemetry): set before the import and passed to
    every Blocks as well."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import gradio

    return gradio


DEMO_MODEL = "outputs/digits-unconditional"
HOST = "127.0.0.1"
DISPLAY_SIZE = 256  # small model outputs (16 px digits) are enlarged (nearest neighbour) to about this for display
GALLERY_LIMIT = 48  # images kept in the gallery, newest first
MAX_STEPS = 1000
MAX_IMAGES = 8
VIEW_CHOICES = [("noisy sample x_t", "sample"), ("predicted clean image x0", "x0")]


# ---------------------------------------------------------------------------------------------------------------------
# the served model
# ---------------------------------------------------------------------------------------------------------------------
def _lines(text: str | Sequence[str] | None) -> list[str]:
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
    if path.startswith((".", "/", "~")) or parent or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(f"{what} {path!r}: no such file or folder")


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
    base_scheduler: Any = None
    scheduler_choices: list[str] = field(default_factory=list)

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
        if self.loras:
            parts.append("LoRA " + ", ".join(f"`{path}` x{scale:g}" for path, scale in self.loras))
        if self.tokens:
            parts.append("embedding tokens " + ", ".join(f"`{token}`" for token in self.tokens))
        return "; ".join(parts)


def load_served_model(
    model: str,
    lora: Sequence[str] = (),
    embeddings: Sequence[str] = (),
    *,
    device: str | None = None,
    dtype: str = "auto",
    model_id: int = 0,
) -> ServedModel:
    """Load a pipeline folder (or Hub id) with LoRAs ('PATH' or 'PATH:SCALE') and embeddings via
    `pipelines.load.load_pipeline`; ValueError / OSError with a message for the page when it cannot be served."""
    from pipelines.load import PIXEL_SCHEDULERS, SCHEDULERS, load_pipeline

    model = str(model).strip()
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
    pipe = load_pipeline(
        model,
        lora=[path for path, _ in loras] or None,
        lora_scale=[scale for _, scale in loras] or 1.0,
        embeddings=list(embeddings) or None,
        device=device,
        dtype=dtype,
    )
    kind = pipeline_kind(pipe)
    tokens: list[str] = []
    if embeddings and hasattr(pipe, "tokenizer"):
        special = set(getattr(pipe.tokenizer, "all_special_tokens", []))
        tokens = [t for t in pipe.tokenizer.get_added_vocab() if t not in special and not re.search(r"_\d+$", t)]
    served = ServedModel(
        pipe=pipe,
        path=model,
        kind=kind,
        model_id=model_id,
        loras=loras,
        embeddings=list(embeddings),
        tokens=tokens,
        base_scheduler=pipe.scheduler,
    )
    card_steps = _card_value(model, "num_inference_steps")
    served.default_steps = int(card_steps) if card_steps else (30 if kind == "text" else 50)
    card_guidance = _card_value(model, "guidance_scale")
    if kind == "text":
        served.guided = True
        served.default_guidance = card_guidance or 7.5
        served.scheduler_choices = ["default", *SCHEDULERS]
    else:
        served.scheduler_choices = ["default", *PIXEL_SCHEDULERS]
    if kind == "class":
        served.num_classes = int(pipe.config.num_classes or pipe.unet.config.num_class_embeds)
        served.guided = pipe.null_class_label is not None
        served.default_guidance = (card_guidance or 1.0) if served.guided else None
    return served


class ModelHolder:
    """The model the app serves (one per app, shared by its pages) and the error of the last load, if it failed."""

    def __init__(self):
        self.model: ServedModel | None = None
        self.error: str | None = None
        self.lock = threading.RLock()  # one generation or load at a time
        self._ids = 0

    def load(self, model: str, lora: Sequence[str] = (), embeddings: Sequence[str] = (), **kwargs) -> bool:
        with self.lock:
            self._ids += 1
            try:
                served = load_served_model(model, lora, embeddings, model_id=self._ids, **kwargs)
            except Exception as err:  # noqa: BLE001 - every failure goes to the page, not a traceback
                self.error = f"Could not load {model!r}: {_message(err)}"
                logger.error("%s", self.error.splitlines()[0])
                logger.debug("load failed", exc_info=True)
                return False
            self.model, self.error = served, None
            logger.info("serving %s (%s)", served.path, type(served.pipe).__name__)
            return True


def _message(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if not isinstance(err, (ValueError, OSError)):
        text = f"{type(err).__name__}: {text}"
    return text


# ---------------------------------------------------------------------------------------------------------------------
# page helpers
# ---------------------------------------------------------------------------------------------------------------------
def error_markdown(message: str) -> str:
    first, _, rest = message.partition("\n")
    text = f"**Error:** {first}"
    if rest.strip():
        text += "\n\n```text\n" + rest.strip("\n") + "\n```"
    return text


def for_display(image: Image.Image | None, size: int = DISPLAY_SIZE) -> Image.Image | None:
    """Small images enlarged by a whole factor (nearest neighbour), so a 16 px digit is visible and stays sharp."""
    if image is None:
        return None
    factor = max(1, size // max(image.size))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _apply_settings(served: ServedModel, scheduler: str | None, lora_scale: float | None) -> None:
    """The chosen scheduler (a fresh one every run) and LoRA scale (x each LoRA's own weight) on the pipeline."""
    served.pipe.scheduler = fresh_scheduler(served.base_scheduler, scheduler)
    if served.loras:
        names = [f"lora_{i}" for i in range(len(served.loras))]  # the adapter names pipelines.load gives
        scale = 1.0 if lora_scale is None else float(lora_scale)
        served.pipe.set_adapters(names, adapter_weights=[weight * scale for _, weight in served.loras])


def _int(value, name: str, low: int, high: int) -> int:
    try:
        number = int(round(float(value)))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number") from None
    if not low <= number <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {number}")
    return number


def _seed(value) -> int:
    return _int(0 if value in (None, "") else value, "seed", 0, 2**63 - 1)


# ---------------------------------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------------------------------
def build_app(
    model: str | None = None,
    lora: Sequence[str] = (),
    embeddings: Sequence[str] = (),
    *,
    device: str | None = None,
    dtype: str = "auto",
    holder: ModelHolder | None = None,
) -> gr.Blocks:
    """The app as a gr.Blocks (not launched). The model is loaded now; if that fails the page shows why and lets the
    user load another."""
    gr = import_gradio()
    holder = holder or ModelHolder()
    load_kwargs = {"device": device, "dtype": dtype}
    if model and holder.model is None and holder.error is None:
        holder.load(model, list(lora), list(embeddings), **load_kwargs)
    served = holder.model

    def model_markdown() -> str:
        if holder.error:
            still = f"\n\nStill serving {holder.model.describe()}" if holder.model else ""
            return error_markdown(holder.error) + still
        if holder.model is None:
            return "No model loaded: type a pipeline folder under **Model** and press **Load**."
        return holder.model.describe()

    def control_updates() -> list:
        """Visibility and defaults of the controls for the model now served, in the order of `controls`."""
        m = holder.model
        kind = m.kind if m else None
        classes = [(str(i), i) for i in range(m.num_classes)] if m and kind == "class" else []
        return [
            gr.update(visible=kind == "text"),  # prompt
            gr.update(visible=kind == "text"),  # negative prompt
            gr.update(visible=kind == "class", choices=classes, value=classes[0][1] if classes else None),
            gr.update(value=m.default_steps if m else 50),
            gr.update(visible=bool(m and m.guided), value=(m.default_guidance or 1.0) if m else 1.0),
            gr.update(choices=m.scheduler_choices if m else ["default"], value="default"),
            gr.update(visible=bool(m and m.loras), value=1.0),
            gr.update(value=1 if kind == "text" else 4),
        ]

    kind = served.kind if served else None
    with gr.Blocks(title="difftune", analytics_enabled=False) as app:
        gr.Markdown(
            "# difftune\nGenerate with a trained model, scrub through its denoising steps, reconstruct a noised image."
        )
        model_status = gr.Markdown(model_markdown(), elem_id="model-status")
        with gr.Accordion("Model", open=served is None):
            model_box = gr.Textbox(label="Pipeline folder (or Hub id)", value=str(model or ""), elem_id="model-path")
            with gr.Row():
                lora_box = gr.Textbox(
                    label="LoRAs, one per line: PATH or PATH:SCALE",
                    value="\n".join(lora),
                    lines=2,
                    elem_id="model-loras",
                )
                embeddings_box = gr.Textbox(
                    label="Textual Inversion embeddings, one per line",
                    value="\n".join(embeddings),
                    lines=2,
                    elem_id="model-embeddings",
                )
            load_button = gr.Button("Load", elem_id="load")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                prompt = gr.Textbox(label="Prompt", lines=2, visible=kind == "text", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", visible=kind == "text", elem_id="negative-prompt")
                classes = [(str(i), i) for i in range(served.num_classes)] if kind == "class" else []
                class_label = gr.Dropdown(
                    label="Class",
                    choices=classes,
                    value=classes[0][1] if classes else None,
                    visible=kind == "class",
                    elem_id="class",
                )
                steps = gr.Slider(
                    1,
                    MAX_STEPS,
                    value=served.default_steps if served else 50,
                    step=1,
                    label="Steps",
                    elem_id="steps",
                )
                guidance = gr.Slider(
                    0.0,
                    20.0,
                    value=(served.default_guidance or 1.0) if served else 1.0,
                    step=0.1,
                    label="Guidance scale",
                    visible=bool(served and served.guided),
                    elem_id="guidance",
                )
                with gr.Row():
                    seed = gr.Number(label="Seed (image i: seed + i)", value=0, precision=0, minimum=0, elem_id="seed")
                    num_images = gr.Slider(
                        1,
                        MAX_IMAGES,
                        value=1 if kind == "text" else 4,
                        step=1,
                        label="Images",
                        elem_id="num-images",
                    )
                scheduler = gr.Dropdown(
                    label="Scheduler",
                    choices=served.scheduler_choices if served else ["default"],
                    value="default",
                    elem_id="scheduler",
                )
                lora_scale = gr.Slider(
                    0.0,
                    2.0,
                    value=1.0,
                    step=0.05,
                    label="LoRA scale (x each LoRA's own weight)",
                    visible=bool(served and served.loras),
                    elem_id="lora-scale",
                )
            with gr.Column(scale=2):
                with gr.Tabs():
                    with gr.Tab("Generate", id="generate-tab"):
                        generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                        generate_status = gr.Markdown(elem_id="generate-status")
                        gallery = gr.Gallery(
                            label="Results (newest first)",
                            columns=6,
                            fit_columns=False,
                            height=300,
                            format="png",
                            object_fit="contain",
                            elem_id="gallery",
                        )
                        with gr.Row(equal_height=False):
                            step_image = gr.Image(
                                label="Denoising steps (first image of the last generation)",
                                type="pil",
                                format="png",
                                interactive=False,
                                height=DISPLAY_SIZE + 40,
                                elem_id="step-image",
                            )
                            with gr.Column():
                                step_slider = gr.Slider(
                                    0, 1, value=0, step=1, label="Step", interactive=False, elem_id="step-slider"
                                )
                                step_view = gr.Radio(VIEW_CHOICES, value="sample", label="Show", elem_id="step-view")
                                step_label = gr.Markdown(elem_id="step-label")
                    with gr.Tab("Reconstruct (SDEdit)", id="reconstruct-tab"):
                        gr.Markdown(
                            "Upload an image, choose how much noise to add, and let the model denoise it back "
                            "(Meng et al. 2022). Prompt / class, steps, seed, scheduler and guidance come from the "
                            "controls on the left."
                        )
                        with gr.Row():
                            upload = gr.File(label="Image", type="filepath", elem_id="rec-file")
                            with gr.Column():
                                noise_level = gr.Slider(
                                    0.05,
                                    1.0,
                                    value=0.5,
                                    step=0.05,
                                    label="Noise level (1: pure noise)",
                                    elem_id="noise-level",
                                )
                                reconstruct_button = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct")
                        reconstruct_status = gr.Markdown(elem_id="rec-status")
                        with gr.Row():
                            rec_input = gr.Image(
                                label="Input, as the model sees it",
                                type="pil",
                                format="png",
                                interactive=False,
                                elem_id="rec-input",
                            )
                            rec_noised = gr.Image(
                                label="Noised", type="pil", format="png", interactive=False, elem_id="rec-noised"
                            )
                            rec_output = gr.Image(
                                label="Reconstruction",
                                type="pil",
                                format="png",
                                interactive=False,
                                elem_id="rec-output",
                            )
        record_state = gr.State(None)
        history_state = gr.State([])

        controls = [prompt, negative, class_label, steps, guidance, scheduler, lora_scale, num_images]
        settings = [prompt, negative, class_label, steps, guidance, seed, scheduler, lora_scale]

        # -- events ------------------------------------------------------------------------------------------------
        def on_load(path, loras_text, embeddings_text):
            holder.load(path, _lines(loras_text), _lines(embeddings_text), **load_kwargs)
            reset = [None, gr.update(value=0, maximum=1, interactive=False), None, ""]
            return [model_markdown(), *control_updates(), *reset]

        load_button.click(
            on_load,
            [model_box, lora_box, embeddings_box],
            [model_status, *controls, record_state, step_slider, step_image, step_label],
            show_progress_on=[model_status],
        )

        def on_generate(prompt_, negative_, class_, steps_, guidance_, seed_, scheduler_, lora_scale_, count, history):
            no_change = [gr.update()] * 6
            m = holder.model
            if m is None:
                return [*no_change, error_markdown(holder.error or "no model loaded")]
            try:
                steps_ = _int(steps_, "steps", 1, MAX_STEPS)
                count = _int(count, "images", 1, MAX_IMAGES)
                first_seed = _seed(seed_)
                with holder.lock:
                    if holder.model is not m:  # a load replaced the model meanwhile
                        m = holder.model
                    _apply_settings(m, scheduler_, lora_scale_)
                    result = generate_with_steps(
                        m.pipe,
                        steps=steps_,
                        seed=first_seed,
                        num_images=count,
                        prompt=prompt_ or "",
                        negative_prompt=negative_ or "",
                        class_label=int(class_ or 0),
                        guidance=float(guidance_) if m.guided else None,
                        model_id=m.model_id,
                    )
            except Exception as err:  # noqa: BLE001
                logger.error("generation failed: %s", _message(err).splitlines()[0])
                logger.debug("generation failed", exc_info=True)
                return [*no_change, error_markdown(_message(err))]
            what = f"class {result.settings['class_label']} · " if m.kind == "class" else ""
            new = [(for_display(image), f"{what}seed {first_seed + i}") for i, image in enumerate(result.images)]
            history = (new + list(history or []))[:GALLERY_LIMIT]
            record = result.record
            last = len(record) - 1
            status = (
                f"Generated {count} image{'s' if count > 1 else ''} in {result.seconds:.2f} s "
                f"({result.seconds / steps_:.3f} s per step, {result.settings['scheduler']})."
            )
            logger.info("%s", status)
            return [
                history,
                history,
                record,
                gr.update(value=last, maximum=max(last, 1), interactive=True),
                for_display(record.image(m.pipe, last)),
                record.label(last),
                status,
            ]

        generate_button.click(
            on_generate,
            [*settings, num_images, history_state],
            [gallery, history_state, record_state, step_slider, step_image, step_label, generate_status],
            show_progress_on=[generate_status, gallery],
        )

        def on_step(record: StepRecord | None, index, view):
            if record is None or not len(record):
                return gr.update(), ""
            m = holder.model
            if m is None or m.model_id != record.model_id:
                return gr.update(), "The model was reloaded since this generation: generate again."
            try:
                index = max(0, min(int(index), len(record) - 1))
                return for_display(record.image(m.pipe, index, view or "sample")), record.label(index)
            except Exception as err:  # noqa: BLE001
                logger.error("showing a step failed: %s", _message(err).splitlines()[0])
                return gr.update(), error_markdown(_message(err))

        step_slider.change(
            on_step, [record_state, step_slider, step_view], [step_image, step_label], show_progress="hidden"
        )
        step_view.change(
            on_step, [record_state, step_slider, step_view], [step_image, step_label], show_progress="hidden"
        )

        def on_upload(path):
            if not path:
                return None, ""
            m = holder.model
            try:
                image = load_image(path)
            except ValueError as err:
                return None, error_markdown(str(err))
            if m is None:
                return for_display(image), ""
            return for_display(fit_image(image, *m.pixel_size)), ""

        upload.upload(on_upload, [upload], [rec_input, reconstruct_status])

        def on_reconstruct(path, level, prompt_, negative_, class_, steps_, guidance_, seed_, scheduler_, lora_scale_):
            nothing = [gr.update()] * 3
            m = holder.model
            if m is None:
                return [*nothing, error_markdown(holder.error or "no model loaded")]
            if not path:
                return [*nothing, error_markdown("upload an image first")]
            try:
                image = load_image(path)
                steps_ = _int(steps_, "steps", 1, MAX_STEPS)
                with holder.lock:
                    m = holder.model
                    _apply_settings(m, scheduler_, lora_scale_)
                    result = reconstruct(
                        m.pipe,
                        image,
                        strength=float(level),
                        steps=steps_,
                        seed=_seed(seed_),
                        prompt=prompt_ or "",
                        negative_prompt=negative_ or "",
                        class_label=int(class_ or 0),
                        guidance=float(guidance_) if m.guided else None,
                    )
            except Exception as err:  # noqa: BLE001
                logger.error("reconstruction failed: %s", _message(err).splitlines()[0])
                logger.debug("reconstruction failed", exc_info=True)
                return [*nothing, error_markdown(_message(err))]
            status = (
                f"Noised to t = {result.timestep} and denoised in {result.denoising_steps} steps "
                f"({result.seconds:.2f} s)."
            )
            images = [result.original, result.noised, result.reconstruction]
            return [*(for_display(image) for image in images), status]

        reconstruct_button.click(
            on_reconstruct,
            [upload, noise_level, *settings],
            [rec_input, rec_noised, rec_output, reconstruct_status],
            show_progress_on=[reconstruct_status, rec_output],
        )
    app.holder = holder  # for tests and callers that want the model
    return app


def launch(app: gr.Blocks, port: int | None = None, *, block: bool = True, quiet: bool = False):
    """Serve on 127.0.0.1 only: no share link (no frpc download), no server-side rendering (no node), no MCP server,
    no analytics. `block=False` returns at once (call `app.close()` to stop)."""
    return app.launch(
        server_name=HOST,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=not block,
        quiet=quiet,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        max_file_size="50mb",
    )


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.app",
        description="A local web app (127.0.0.1) for a difftune model: generate, watch the denoising steps, "
        "reconstruct a noised image.",
    )
    parser.add_argument(
        "--model", default=None, help=f"pipeline folder or Hub id (default: the demo model, {DEMO_MODEL})"
    )
    parser.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA folder or file (repeat)"
    )
    parser.add_argument("--embeddings", action="append", default=[], help="Textual Inversion folder or file (repeat)")
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: 7860 or the next free)")
    parser.add_argument("--device", default=None, help="cuda, cpu, mps (default: the best available)")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA), float32, float16, bfloat16")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's; 1 can be much faster for "
        "small models on a machine whose cores are busy with other work)",
    )
    parser.add_argument("--debug", action="store_true", help="log tracebacks of failed loads and generations")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("httpx", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not args.debug else logging.INFO)
    if args.model is None:
        args.model = default_model()
        if not Path(args.model).is_dir():
            logger.warning("the demo model %s is not there yet: run `make demo` (or pass --model)", DEMO_MODEL)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    app = build_app(args.model, args.lora, args.embeddings, device=args.device, dtype=args.dtype)
    try:
        launch(app, args.port)
    except OSError as err:  # the port is taken
        print(f"pipelines.app: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
