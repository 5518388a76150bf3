"""What the web app's page does (pipelines/app.py): one method per event (load a model, generate, show a step,
upload, reconstruct), on a `Callbacks` that holds the served model, and `wire_events`, which connects them to the
components of `pipelines.app_views.Page`. A callback returns what the page shows; every failure becomes an error
line in the page, never a traceback.
"""

from __future__ import annotations

import logging
import threading

from pipelines.app_model import ModelHolder, apply_settings, error_message, split_lines
from pipelines.app_views import (
    MAX_IMAGES,
    MAX_STEPS,
    Page,
    control_updates,
    error_markdown,
    for_display,
    import_gradio,
    model_markdown,
)
from pipelines.steps import StepRecord, fit_image, generate_with_steps, load_image, reconstruct

logger = logging.getLogger("pipelines.app")

GALLERY_LIMIT = 48  # images kept in the gallery, newest first


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


def _progress_tracker():
    """A gr.Progress() as the default of a handler's `progress` parameter: gradio sees it and shows the per-step
    progress it is told in the page. None without gradio (the model code imports this module too)."""
    try:
        return import_gradio().Progress()
    except ImportError:
        return None


PROGRESS = _progress_tracker()


class Stopped(Exception):
    """Raised between two denoising steps when the page's Stop button was pressed."""


def caption(settings: dict, index: int) -> str:
    """A gallery image's caption: prompt or class, steps, guidance and seed (image i of a run has seed + i)."""
    what = []
    if settings.get("prompt"):
        prompt = settings["prompt"]
        what.append(repr(prompt if len(prompt) <= 60 else prompt[:57] + "..."))
    if settings.get("class_label") is not None:
        what.append(f"class {settings['class_label']}")
    what.append(f"{settings['steps']} steps")
    if settings.get("guidance") is not None:
        what.append(f"guidance {float(settings['guidance']):g}")
    what.append(f"seed {settings['seed'] + index}")
    return " · ".join(what)


class Callbacks:
    """The page's event handlers; `holder` is the app's model, `load_kwargs` (device, dtype) go to every load. The
    methods keep their names (on_load, on_generate, ...): gradio names the page's functions after them."""

    def __init__(self, gr, holder: ModelHolder, load_kwargs: dict):
        self.gr = gr
        self.holder = holder
        self.load_kwargs = load_kwargs
        self.stop_requested = threading.Event()  # set by Stop, checked after every denoising step

    def on_load(self, path, loras_text, embeddings_text):
        """Load another model: its controls and defaults, and an empty step viewer. A load that fails changes
        nothing but the status line: the user's settings and the steps of the model still served stay."""
        gr = self.gr
        loaded = self.holder.load(path, split_lines(loras_text), split_lines(embeddings_text), **self.load_kwargs)
        if not loaded:
            return [model_markdown(self.holder), *[gr.update()] * (len(control_updates(gr, None)) + 4)]
        reset = [None, gr.update(value=0, maximum=1, interactive=False), None, ""]
        return [model_markdown(self.holder), *control_updates(gr, self.holder.model), *reset]

    def on_start(self):
        """A run starts: the previous status line goes (a stale 'Generated ...' would read as this run's)."""
        self.stop_requested.clear()
        return ""

    def on_stop(self):
        """The Stop button: the running generation stops after its current step."""
        self.stop_requested.set()

    def _step_done(self, progress, done: int, total: int) -> None:
        if self.stop_requested.is_set():
            raise Stopped(f"Stopped after step {done} of {total}.")
        if progress is not None:
            progress((done, total), desc="denoising", unit="steps")

    def on_generate(
        self,
        prompt_,
        negative_,
        class_,
        steps_,
        guidance_,
        seed_,
        scheduler_,
        lora_scale_,
        count,
        history,
        progress=PROGRESS,
    ):
        gr, holder = self.gr, self.holder
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
                apply_settings(m, scheduler_, lora_scale_)
                result = generate_with_steps(
                    m.pipe,
                    steps=steps_,
                    seed=first_seed,
                    num_images=count,
                    prompt=prompt_ or "",
                    negative_prompt=(negative_ or "") if m.negative_prompt else "",  # a hidden box keeps its text
                    class_label=int(class_ or 0),
                    guidance=float(guidance_) if m.guided else None,
                    model_id=m.model_id,
                    control_image=m.control_image,
                    on_step=lambda done, total: self._step_done(progress, done, total),
                )
        except Stopped as stopped:
            logger.info("%s", stopped)
            return [*no_change, str(stopped)]
        except Exception as err:  # noqa: BLE001
            logger.error("generation failed: %s", error_message(err).splitlines()[0])
            logger.debug("generation failed", exc_info=True)
            return [*no_change, error_markdown(error_message(err))]
        new = [(for_display(image), caption(result.settings, i)) for i, image in enumerate(result.images)]
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

    def on_step(self, record: StepRecord | None, index, view):
        gr = self.gr
        if record is None or not len(record):
            return gr.update(), ""
        m = self.holder.model
        if m is None or m.model_id != record.model_id:
            return gr.update(), "The model was reloaded since this generation: generate again."
        try:
            index = max(0, min(int(index), len(record) - 1))
            return for_display(record.image(m.pipe, index, view or "sample")), record.label(index)
        except Exception as err:  # noqa: BLE001
            logger.error("showing a step failed: %s", error_message(err).splitlines()[0])
            return gr.update(), error_markdown(error_message(err))

    def on_upload(self, path):
        if not path:
            return None, ""
        m = self.holder.model
        try:
            image = load_image(path)
        except ValueError as err:
            return None, error_markdown(str(err))
        if m is None:
            return for_display(image), ""
        return for_display(fit_image(image, *m.pixel_size)), ""

    def on_reconstruct(
        self, path, level, prompt_, negative_, class_, steps_, guidance_, seed_, scheduler_, lora_scale_
    ):
        holder = self.holder
        nothing = [self.gr.update()] * 3
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
                apply_settings(m, scheduler_, lora_scale_)
                result = reconstruct(
                    m.pipe,
                    image,
                    strength=float(level),
                    steps=steps_,
                    seed=_seed(seed_),
                    prompt=prompt_ or "",
                    negative_prompt=(negative_ or "") if m.negative_prompt else "",  # a hidden box keeps its text
                    class_label=int(class_ or 0),
                    guidance=float(guidance_) if m.guided else None,
                )
        except Exception as err:  # noqa: BLE001
            logger.error("reconstruction failed: %s", error_message(err).splitlines()[0])
            logger.debug("reconstruction failed", exc_info=True)
            return [*nothing, error_markdown(error_message(err))]
        status = (
            f"Noised to t = {result.timestep} and denoised in {result.denoising_steps} steps ({result.seconds:.2f} s)."
        )
        images = [result.original, result.noised, result.reconstruction]
        return [*(for_display(image) for image in images), status]


def wire_events(page: Page, callbacks: Callbacks) -> None:
    """Connect the page's buttons, sliders and upload to the callbacks (inside the gr.Blocks being built)."""
    model, settings, gen, rec = page.model, page.settings, page.generate, page.reconstruct
    model.load_button.click(
        callbacks.on_load,
        [model.path, model.loras, model.embeddings],
        [model.status, *settings.controls, page.record, gen.step_slider, gen.step_image, gen.step_label],
        show_progress_on=[model.status],
    )
    # Generate, or Enter in the prompt box: clear the last status, then generate with per-step progress
    for trigger in (gen.button.click, settings.prompt.submit):
        trigger(callbacks.on_start, None, [gen.status], queue=False, show_progress="hidden").then(
            callbacks.on_generate,
            [*settings.inputs, settings.num_images, page.history],
            [gen.gallery, page.history, page.record, gen.step_slider, gen.step_image, gen.step_label, gen.status],
            show_progress_on=[gen.status, gen.gallery],  # the per-step bar over the gallery
        )
    gen.stop.click(callbacks.on_stop, None, None, queue=False, show_progress="hidden")
    for changed in (gen.step_slider, gen.step_view):
        changed.change(
            callbacks.on_step,
            [page.record, gen.step_slider, gen.step_view],
            [gen.step_image, gen.step_label],
            show_progress="hidden",
        )
    rec.upload.change(callbacks.on_upload, [rec.upload], [rec.input, rec.status])  # dropped, pasted or chosen
    rec.button.click(callbacks.on_start, None, [rec.status], queue=False, show_progress="hidden").then(
        callbacks.on_reconstruct,
        [rec.upload, rec.noise_level, *settings.inputs],
        [rec.input, rec.noised, rec.output, rec.status],
        show_progress_on=[rec.status, rec.output],
    )
