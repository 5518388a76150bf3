"""The web app's page (pipelines/app.py), panel by panel: the model panel (status, folder, LoRAs, embeddings, Load),
the settings column (prompt / class, steps, guidance, seed, images, scheduler, LoRA scale), the Generate tab (gallery
and the denoising-step viewer) and the Reconstruct (SDEdit) tab. Each builder makes its components inside the Blocks
being built and returns them as a small dataclass; `pipelines.app_callbacks` wires their events.

What a model changes on the page (which controls show, their defaults) comes from one place, `control_values`, used
both when the page is built and when another model is loaded from it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipelines.app_model import ModelHolder, ServedModel, is_missing_demo

DEMO_HINT = (
    "The demo model is made by **`make demo`** (a few minutes on a CPU): run it first and reload this page, or type "
    "another pipeline folder under **Model** and press **Load**."
)

DISPLAY_SIZE = 256  # small model outputs (16 px digits) are enlarged (nearest neighbour) to about this for display
MAX_STEPS = 1000
MAX_IMAGES = 8
VIEW_CHOICES = [("noisy sample x_t", "sample"), ("predicted clean image x0", "x0")]
GUIDANCE_LABELS = {False: "Guidance scale", True: "Guidance (an input of the guidance-distilled model, not CFG)"}
# SDEdit's strength is the share of the sampling steps re-run, diffusers' image-to-image convention: at 1 denoising
# starts from the first sampling timestep (t = 980 of 0-999 with 50 DDIM steps), close to but not quite pure noise
NOISE_LEVEL_LABEL = (
    "Noise level: the share of the steps re-run (1 = from the first sampling step, e.g. t = 980 of 999 at 50 steps: "
    "almost pure noise)"
)


def import_gradio():
    """gradio, imported with its analytics off (no version check, no telemetry): set before the import and passed to
    every Blocks as well."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import gradio

    return gradio


# ---------------------------------------------------------------------------------------------------------------------
# what the page shows
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


def model_markdown(holder: ModelHolder) -> str:
    """The model status line: what is served, or why the last load failed (and what is still served; for the demo
    model that is not there yet, how to make it)."""
    if holder.error:
        still = f"\n\nStill serving {holder.model.describe()}" if holder.model else ""
        hint = f"\n\n{DEMO_HINT}" if holder.model is None and is_missing_demo(holder.requested) else ""
        return error_markdown(holder.error) + still + hint
    if holder.model is None:
        return "No model loaded: type a pipeline folder under **Model** and press **Load**."
    return holder.model.describe()


def control_values(m: ServedModel | None) -> dict[str, Any]:
    """Which settings show and their defaults for the model `m` (None: no model)."""
    kind = m.kind if m else None
    classes = [(str(i), i) for i in range(m.num_classes)] if m and kind == "class" else []
    return {
        "text": kind == "text",
        "negative": bool(kind == "text" and m.negative_prompt),
        "class": kind == "class",
        "classes": classes,
        "class_value": classes[0][1] if classes else None,
        "steps": m.default_steps if m else 50,
        "guided": bool(m and m.guided),
        "guidance": (m.default_guidance or 1.0) if m else 1.0,
        "guidance_label": GUIDANCE_LABELS[bool(m and m.guidance_input)],
        "schedulers": m.scheduler_choices if m else ["default"],
        "loras": bool(m and m.loras),
        "images": 1 if kind == "text" else 4,
    }


def control_updates(gr, m: ServedModel | None) -> list:
    """Visibility and defaults of the controls for the model `m`, in the order of `Settings.controls`."""
    v = control_values(m)
    return [
        gr.update(visible=v["text"]),  # prompt
        gr.update(visible=v["negative"]),  # negative prompt (not for Flux, which ignores it)
        gr.update(visible=v["class"], choices=v["classes"], value=v["class_value"]),
        gr.update(value=v["steps"]),
        gr.update(visible=v["guided"], value=v["guidance"], label=v["guidance_label"]),
        gr.update(choices=v["schedulers"], value="default"),
        gr.update(visible=v["loras"], value=1.0),
        gr.update(value=v["images"]),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# the panels
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ModelPanel:
    status: Any
    path: Any
    loras: Any
    embeddings: Any
    load_button: Any


@dataclass
class Settings:
    prompt: Any
    negative: Any
    class_label: Any
    steps: Any
    guidance: Any
    seed: Any
    num_images: Any
    scheduler: Any
    lora_scale: Any

    @property
    def controls(self) -> list:
        """The controls a model load updates, in the order of `control_updates`."""
        return [
            self.prompt,
            self.negative,
            self.class_label,
            self.steps,
            self.guidance,
            self.scheduler,
            self.lora_scale,
            self.num_images,
        ]

    @property
    def inputs(self) -> list:
        """What a generation or reconstruction reads, in the order of the callbacks' parameters."""
        return [
            self.prompt,
            self.negative,
            self.class_label,
            self.steps,
            self.guidance,
            self.seed,
            self.scheduler,
            self.lora_scale,
        ]


@dataclass
class GenerateTab:
    button: Any
    stop: Any
    status: Any
    gallery: Any
    step_image: Any
    step_slider: Any
    step_view: Any
    step_label: Any


@dataclass
class ReconstructTab:
    upload: Any
    noise_level: Any
    button: Any
    status: Any
    input: Any
    noised: Any
    output: Any


@dataclass
class Page:
    model: ModelPanel
    settings: Settings
    generate: GenerateTab
    reconstruct: ReconstructTab
    record: Any  # gr.State: the StepRecord of the last generation
    history: Any  # gr.State: the gallery's (image, caption) pairs, newest first


def model_panel(gr, holder: ModelHolder, model: str | None, lora: Sequence[str], embeddings: Sequence[str]):
    status = gr.Markdown(model_markdown(holder), elem_id="model-status")
    with gr.Accordion("Model", open=holder.model is None):
        path = gr.Textbox(label="Pipeline folder (or Hub id)", value=str(model or ""), elem_id="model-path")
        with gr.Row():
            loras = gr.Textbox(
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
    return ModelPanel(status, path, loras, embeddings_box, load_button)


def settings_column(gr, served: ServedModel | None) -> Settings:
    v = control_values(served)
    # one line that grows: Enter generates (a multi-line box would take Enter as a new line)
    prompt = gr.Textbox(
        label="Prompt", lines=1, max_lines=4, placeholder="Enter generates", visible=v["text"], elem_id="prompt"
    )
    negative = gr.Textbox(label="Negative prompt", visible=v["negative"], elem_id="negative-prompt")
    class_label = gr.Dropdown(
        label="Class",
        choices=v["classes"],
        value=v["class_value"],
        visible=v["class"],
        elem_id="class",
    )
    steps = gr.Slider(1, MAX_STEPS, value=v["steps"], step=1, label="Steps", elem_id="steps")
    guidance = gr.Slider(
        0.0,
        20.0,
        value=v["guidance"],
        step=0.1,
        label=v["guidance_label"],
        visible=v["guided"],
        elem_id="guidance",
    )
    with gr.Row():
        seed = gr.Number(label="Seed (image i: seed + i)", value=0, precision=0, minimum=0, elem_id="seed")
        num_images = gr.Slider(1, MAX_IMAGES, value=v["images"], step=1, label="Images", elem_id="num-images")
    scheduler = gr.Dropdown(label="Scheduler", choices=v["schedulers"], value="default", elem_id="scheduler")
    lora_scale = gr.Slider(
        0.0,
        2.0,
        value=1.0,
        step=0.05,
        label="LoRA scale (x each LoRA's own weight)",
        visible=v["loras"],
        elem_id="lora-scale",
    )
    return Settings(prompt, negative, class_label, steps, guidance, seed, num_images, scheduler, lora_scale)


def generate_tab(gr) -> GenerateTab:
    with gr.Row():
        button = gr.Button("Generate", variant="primary", scale=3, elem_id="generate")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
    status = gr.Markdown(elem_id="generate-status")
    gr.Markdown("**Results** (newest first)", elem_id="gallery-title")
    gallery = gr.Gallery(
        label="Results",
        show_label=False,  # its floating label would cover the first thumbnail: the title above says it
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
            step_slider = gr.Slider(0, 1, value=0, step=1, label="Step", interactive=False, elem_id="step-slider")
            step_view = gr.Radio(VIEW_CHOICES, value="sample", label="Show", elem_id="step-view")
            step_label = gr.Markdown(elem_id="step-label")
    return GenerateTab(button, stop, status, gallery, step_image, step_slider, step_view, step_label)


def image_drop(gr, **kwargs):
    """gr.Image as a drop zone (drop, paste, click) with a preview, handing the app the uploaded file's path even when
    it is not an image, so the page says so in its own words (gradio's preprocessing would fail with a bare toast).
    (Its preprocess is wrapped on the instance: a subclass of a gradio component makes gradio write a .pyi stub
    beside this file.)"""
    drop = gr.Image(type="filepath", **kwargs)
    original = drop.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except Exception:  # noqa: BLE001 - not an image: pipelines.steps.load_image reports it
            return None if payload is None else payload.path

    drop.preprocess = preprocess
    return drop


def reconstruct_tab(gr) -> ReconstructTab:
    gr.Markdown(
        "Upload an image, choose how much noise to add, and let the model denoise it back "
        "(Meng et al. 2022). Prompt / class, steps, seed, scheduler and guidance come from the "
        "controls on the left."
    )
    with gr.Row():
        upload = image_drop(
            gr,
            label="Image: drop it here, paste it (Ctrl+V) or click to choose",
            sources=["upload", "clipboard"],
            height=DISPLAY_SIZE,
            elem_id="rec-file",
        )
        with gr.Column():
            noise_level = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label=NOISE_LEVEL_LABEL, elem_id="noise-level")
            button = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct")
    status = gr.Markdown(elem_id="rec-status")
    with gr.Row():
        shown_input = gr.Image(
            label="Input, as the model sees it", type="pil", format="png", interactive=False, elem_id="rec-input"
        )
        noised = gr.Image(label="Noised", type="pil", format="png", interactive=False, elem_id="rec-noised")
        output = gr.Image(label="Reconstruction", type="pil", format="png", interactive=False, elem_id="rec-output")
    return ReconstructTab(upload, noise_level, button, status, shown_input, noised, output)


def build_page(
    gr, holder: ModelHolder, model: str | None, lora: Sequence[str] = (), embeddings: Sequence[str] = ()
) -> Page:
    """Every component of the page, inside the gr.Blocks being built: the model panel on top, the settings on the
    left, the Generate and Reconstruct tabs on the right, and the page's state."""
    gr.Markdown(
        "# difftune\nGenerate with a trained model, scrub through its denoising steps, reconstruct a noised image."
    )
    model_section = model_panel(gr, holder, model, lora, embeddings)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            settings = settings_column(gr, holder.model)
        with gr.Column(scale=2):
            with gr.Tabs():
                with gr.Tab("Generate", id="generate-tab"):
                    generate = generate_tab(gr)
                with gr.Tab("Reconstruct (SDEdit)", id="reconstruct-tab"):
                    reconstruct = reconstruct_tab(gr)
    record = gr.State(None)
    history = gr.State([])
    return Page(model_section, settings, generate, reconstruct, record, history)
