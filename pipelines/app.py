"""A local web app for any model difftune trains: text-to-image Stable Diffusion 1.x/2.x and SDXL (with LoRAs and
Textual Inversion embeddings, SDXL's in either layout), Stable Diffusion 3 and Flux (with LoRAs), class-conditional
and unconditional DDPMs, distilled students. Generate with prompt / class, steps, guidance, seed, scheduler and
LoRA scale; scrub through the denoising steps of a generation; noise an uploaded image and let the model reconstruct
it (SDEdit).

    python -m pipelines.app                                      # the demo model (`make demo`)
    python -m pipelines.app --model outputs/digits-class-conditional
    python -m pipelines.app --model stable-diffusion-v1-5/stable-diffusion-v1-5 --lora outputs/sd-lora:0.8 \\
        --embeddings outputs/sd-textual-inversion-cat-toy --port 7860

It serves on 127.0.0.1 only, never makes a share link and sends no analytics. Errors (a folder that is not a
pipeline, a LoRA for another base model, an upload that is not an image) show in the page; another model can be
loaded from the page.

In-process (tests): `app = build_app("outputs/digits-unconditional"); launch(app, port, block=False)`, then
`app.close()`. Needs the `app` extra: `pip install -e ".[app]"`.

The app is four modules: this one (build_app, launch, the command line), `pipelines.app_model` (the served model:
loading, defaults, settings), `pipelines.app_views` (the page, panel by panel) and `pipelines.app_callbacks` (what
its events do). Every name this module had is still importable from here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.app_callbacks import GALLERY_LIMIT, Callbacks, wire_events
from pipelines.app_model import (
    DEMO_MODEL,
    ModelHolder,
    ServedModel,
    apply_settings,
    default_model,
    load_served_model,
)
from pipelines.app_views import (
    DISPLAY_SIZE,
    MAX_IMAGES,
    MAX_STEPS,
    VIEW_CHOICES,
    build_page,
    error_markdown,
    for_display,
    import_gradio,
)

if TYPE_CHECKING:
    import gradio as gr

__all__ = [
    "DEMO_MODEL",
    "DISPLAY_SIZE",
    "GALLERY_LIMIT",
    "HOST",
    "MAX_IMAGES",
    "MAX_STEPS",
    "VIEW_CHOICES",
    "ModelHolder",
    "ServedModel",
    "apply_settings",
    "build_app",
    "build_parser",
    "default_model",
    "error_markdown",
    "for_display",
    "import_gradio",
    "launch",
    "load_served_model",
    "main",
]

logger = logging.getLogger("pipelines.app")

HOST = "127.0.0.1"

_apply_settings = apply_settings  # its name when it lived here (tests import it)


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
    controlnet: str | None = None,
    control_image: str | None = None,
) -> gr.Blocks:
    """The app as a gr.Blocks (not launched). The model is loaded now (with a ControlNet and the control image every
    generation follows, when given); if that fails the page shows why and lets the user load another."""
    gr = import_gradio()
    holder = holder or ModelHolder()
    load_kwargs = {"device": device, "dtype": dtype}
    if model and holder.model is None and holder.error is None:
        control = {"controlnet": controlnet, "control_image": control_image} if controlnet or control_image else {}
        holder.load(model, list(lora), list(embeddings), **control, **load_kwargs)
    with gr.Blocks(title="difftune", analytics_enabled=False) as app:
        page = build_page(gr, holder, model, lora, embeddings)
        wire_events(page, Callbacks(gr, holder, load_kwargs))
    app.holder = holder  # for tests and callers that want the model
    return app


def launch(app: gr.Blocks, port: int | None = None, *, block: bool = True, quiet: bool = False):
    """Serve on 127.0.0.1 only: no share link (no frpc download), no server-side rendering (no node), no MCP server,
    no analytics. Prints one line with the address (gradio's own, which suggests `share=True`, is kept quiet).
    `block=False` returns at once (call `app.close()` to stop)."""
    result = app.launch(
        server_name=HOST,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        quiet=True,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        max_file_size="50mb",
    )
    if not quiet:
        print(f"difftune app on {app.local_url} (this machine only; Ctrl+C stops it)", flush=True)
    if block:
        app.block_thread()
    return result


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
    parser.add_argument("--controlnet", default=None, help="a trained ControlNet folder (with --control-image)")
    parser.add_argument("--control-image", default=None, help="the control image generations follow (--controlnet)")
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
    app = build_app(
        args.model,
        args.lora,
        args.embeddings,
        device=args.device,
        dtype=args.dtype,
        controlnet=args.controlnet,
        control_image=args.control_image,
    )
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
