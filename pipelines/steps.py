"""Generation with its denoising steps kept, and SDEdit-style reconstruction of a noised image, for every pipeline
difftune trains: DDPM/DDIM pipelines (unconditional, distilled students), ClassConditionalDDPMPipeline, Stable
Diffusion 1.x/2.x and SDXL (with LoRAs and Textual Inversion embeddings, see `pipelines.load`), Stable Diffusion 3
and Flux (with LoRAs).

    gen = generate_with_steps(pipe, steps=50, seed=0, prompt="a toy")   # gen.images, gen.record
    gen.record.image(pipe, i)                                           # the image after step i (VAE-decoded)
    rec = reconstruct(pipe, Image.open("7.png"), strength=0.5, steps=50, seed=0)  # rec.noised, rec.reconstruction

Steps are captured by wrapping the scheduler's `step` for one call: the same mechanism serves every pipeline
(DDPMPipeline has no step callback), leaves the pipeline's own loop and its outputs untouched, and sees what a
`callback_on_step_end` cannot, the model's prediction of the clean image (x0) at each step. Only the first image of a
batch is kept, as tensors (latents for Stable Diffusion); an image is decoded when it is asked for, then cached.
Flux's latents, packed into 2x2-patch tokens while it samples, are kept unpacked ([1, C, H, W] like the others); the
x0 of a flow-matching step is x_t - sigma * v.
"""

from __future__ import annotations

import inspect
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from finetune import imaging

MAX_FRAMES = 101  # frames kept of one generation (the start and 100 steps); with more steps every k-th is kept
VIEWS = ("sample", "x0")  # the noisy sample x_t after a step, or the model's prediction of the clean image


# ---------------------------------------------------------------------------------------------------------------------
# what a pipeline is
# ---------------------------------------------------------------------------------------------------------------------
def pipeline_kind(pipe) -> str:
    """'text' (Stable Diffusion, SDXL, SD3, Flux), 'class' (class-conditional DDPM), 'unconditional' (DDPM/DDIM,
    distilled students): `finetune.imaging.pipeline_kind`, narrowed to what this module runs. ValueError for the
    others (inpainting, image-to-image, anything without those inputs)."""
    name = type(pipe).__name__
    if getattr(pipe, "controlnet", None) is not None:  # text-to-image following a control image
        return "text"
    try:
        kind = imaging.pipeline_kind(pipe)
    except ValueError:
        kind = None
    if kind in ("inpaint", "image-to-image"):
        raise ValueError(f"{name} needs an input image (inpainting, image-to-image): use python -m pipelines.generate")
    if kind == "text" and not hasattr(pipe, "vae"):
        # text-to-image here is latent (the steps are decoded with the VAE); a prompt in pixel space counts as the rest
        parameters = inspect.signature(pipe.__call__).parameters
        kind = "class" if "class_labels" in parameters else "unconditional" if "batch_size" in parameters else None
    if kind in ("text", "class") or kind == "unconditional" and hasattr(pipe, "unet"):  # unconditional: sized by it
        return kind
    raise ValueError(f"{name} is not a pipeline the app can run (text-to-image, class-conditional or DDPM/DDIM)")


def is_latent(pipe) -> bool:
    return getattr(pipe, "vae", None) is not None


def denoiser(pipe):
    """The pipeline's denoising model: its UNet, or its transformer (SD3, Flux)."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    raise ValueError(f"{type(pipe).__name__} has neither a UNet nor a transformer")


def uses_negative_prompt(pipe) -> bool:
    """Whether a negative prompt changes the image: FluxPipeline takes one but uses it only with true CFG
    (true_cfg_scale > 1, twice the compute), which difftune does not run."""
    parameters = inspect.signature(pipe.__call__).parameters
    return "negative_prompt" in parameters and "true_cfg_scale" not in parameters


def guidance_is_an_input(pipe) -> bool:
    """Whether guidance is an input of the model (guidance-distilled FLUX.1-dev) rather than classifier-free."""
    transformer = getattr(pipe, "transformer", None)
    return bool(transformer is not None and transformer.config.get("guidance_embeds", False))


def fresh_scheduler(scheduler, name: str | None = None):
    """A new scheduler (no state from an earlier run) from `scheduler`'s config: its own class, or the diffusers class
    that `pipelines.load.SCHEDULERS` names (a flow-matching one for SD3 and Flux: `pipelines.load.FLOW_SCHEDULERS`)."""
    import diffusers

    from pipelines.load import SCHEDULERS, scheduler_class_name

    if name in (None, "", "default"):
        cls = type(scheduler)
    elif name in SCHEDULERS:
        cls = getattr(diffusers, scheduler_class_name(scheduler, name, "this model"))
    else:
        raise ValueError(f"scheduler {name!r} is not one of default, {', '.join(SCHEDULERS)}")
    return cls.from_config(scheduler.config)


def packs_latents(pipe) -> bool:
    """Whether the pipeline samples packed latents (Flux: 2x2 patches as tokens, [B, H/2 * W/2, 4C])."""
    return callable(getattr(type(pipe), "_unpack_latents", None))


def latent_unpacker(pipe, height: int, width: int):
    """For a pipeline that packs its latents, the function that unpacks them to [B, C, H, W] for an image of height x
    width pixels (its own `_unpack_latents`); None for the others."""
    if not packs_latents(pipe):
        return None
    unpack, factor = type(pipe)._unpack_latents, pipe.vae_scale_factor
    return lambda tokens: unpack(tokens, height, width, factor)


def _generators(seed: int, n: int) -> list[torch.Generator]:
    """Image i uses seed + i (as `python -m pipelines.generate` does), so any image can be made again alone."""
    return [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# the steps of one generation
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Frame:
    step: int  # 0: the starting noise (or noised image); i: after the i-th scheduler step
    timestep: int | None  # the timestep the step started from (None for frame 0)
    sample: torch.Tensor  # x_t (first image of the batch, CPU float32, one item: [1, C, H, W])
    x0: torch.Tensor | None  # the model's prediction of the clean image at this step (None for frame 0)


@dataclass
class StepRecord:
    """The kept frames of one generation and the decoded images, cached by (frame index, view)."""

    frames: list[Frame] = field(default_factory=list)
    total_steps: int = 0
    latent: bool = False
    model_id: int | None = None
    cache: dict[tuple[int, str], Image.Image] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frames)

    def label(self, index: int) -> str:
        frame = self.frames[index]
        if frame.step == 0:
            return f"step 0 of {self.total_steps}: the starting noise"
        return f"step {frame.step} of {self.total_steps} (from t = {frame.timestep})"

    def image(self, pipe, index: int, view: str = "sample") -> Image.Image:
        """The image of frame `index`: the noisy sample ('sample') or the predicted clean image ('x0'; frame 0 has
        none and shows the starting noise)."""
        if view not in VIEWS:
            raise ValueError(f"view {view!r} is not one of {VIEWS}")
        index = max(0, min(int(index), len(self.frames) - 1))
        key = (index, view)
        if key not in self.cache:
            frame = self.frames[index]
            tensor = frame.x0 if view == "x0" and frame.x0 is not None else frame.sample
            self.cache[key] = to_images(pipe, tensor)[0]
        return self.cache[key]


class StepRecorder:
    """Wraps `scheduler.step` while active and keeps the first image of the batch before the first step and after
    every `every`-th step (and the last). x_t of samplers that scale it by sigma (Euler) is kept as
    x_t / sqrt(sigma^2 + 1), the variance-preserving equivalent, so that it decodes like the others."""

    def __init__(self, scheduler, total_steps: int, max_frames: int = MAX_FRAMES, unpack=None, on_step=None):
        self.scheduler = scheduler
        self.on_step = on_step  # on_step(done, total) after every step; it may raise to stop the generation
        self.unpack = unpack  # packed latents (Flux) -> [B, C, H, W]: `latent_unpacker`
        self.total_steps = max(1, int(total_steps))
        self.every = max(1, math.ceil(self.total_steps / max(1, max_frames - 1)))
        self.frames: list[Frame] = []
        self.calls = 0
        self.first_timestep: int | None = None
        self._last: Frame | None = None
        self._original = None

    def __enter__(self) -> StepRecorder:
        self._original = self.scheduler.step
        self.scheduler.step = self._step  # an instance attribute: shadows the method of this scheduler only
        return self

    def __exit__(self, *exc) -> None:
        del self.scheduler.step
        if self._last is not None and (not self.frames or self.frames[-1] is not self._last):
            self.frames.append(self._last)

    def record(self, latent: bool, model_id: int | None = None) -> StepRecord:
        return StepRecord(frames=list(self.frames), total_steps=self.calls, latent=latent, model_id=model_id)

    @property
    def start(self) -> torch.Tensor | None:
        return self.frames[0].sample if self.frames else None

    # -- internals -------------------------------------------------------------------------------------------------
    def _sigma_scale(self) -> float:
        """1 / sqrt(sigma^2 + 1) for the sample at the scheduler's step_index if it scales samples by sigma (Euler);
        1 otherwise."""
        scheduler = self.scheduler
        if float(getattr(scheduler, "init_noise_sigma", 1.0)) <= 1.0 or not hasattr(scheduler, "sigmas"):
            return 1.0
        index = getattr(scheduler, "step_index", None)
        if index is None:
            return 1.0
        index = min(int(index), len(scheduler.sigmas) - 1)
        return 1.0 / math.sqrt(float(scheduler.sigmas[index]) ** 2 + 1.0)

    def _x0(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor | None:
        """x0 from the model output for samplers that do not return it: DPM-Solver++ and PNDM on VP schedules, and
        flow matching, where x_t = (1 - sigma) x0 + sigma noise and the model predicts v = noise - x0, so
        x0 = x_t - sigma v (called after the step, which has moved step_index on: its sigma is the one before)."""
        from pipelines.load import is_flow_matching

        scheduler = self.scheduler
        if is_flow_matching(scheduler):
            index = getattr(scheduler, "step_index", None)
            if index is None or index < 1:
                return None
            sigma = float(scheduler.sigmas[index - 1])
            return sample.float() - sigma * model_output.float()
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is None or float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0:
            return None
        try:
            alpha = alphas[int(timestep)].to(sample.device, torch.float32)
        except (IndexError, TypeError, ValueError, RuntimeError):
            return None
        x, out = sample.float(), model_output.float()
        kind = scheduler.config.get("prediction_type", "epsilon")
        if kind == "epsilon":
            return (x - (1 - alpha).sqrt() * out) / alpha.sqrt()
        if kind == "v_prediction":
            return alpha.sqrt() * x - (1 - alpha).sqrt() * out
        if kind == "sample":
            return out
        return None

    def _kept(self, tensor: torch.Tensor) -> torch.Tensor:
        """The first item of a batch as it is kept: CPU float32, unpacked."""
        tensor = tensor[:1].detach().float().cpu()
        return self.unpack(tensor) if self.unpack is not None else tensor

    def _step(self, model_output, timestep, sample, *args, **kwargs):
        t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
        t = int(round(float(t)))
        if self.calls == 0:
            start = self._kept(sample) * self._sigma_scale()
            self.frames.append(Frame(step=0, timestep=None, sample=start, x0=None))
            self.first_timestep = t
        output = self._original(model_output, timestep, sample, *args, **kwargs)
        self.calls += 1
        is_tuple = isinstance(output, tuple)
        prev = output[0] if is_tuple else output.prev_sample
        x0 = output[1] if is_tuple and len(output) > 1 else getattr(output, "pred_original_sample", None)
        if not isinstance(x0, torch.Tensor) or x0.shape != prev.shape:
            x0 = self._x0(model_output, timestep, sample)
        frame = Frame(
            step=self.calls,
            timestep=t,
            sample=self._kept(prev) * self._sigma_scale(),
            x0=None if x0 is None else self._kept(x0),
        )
        self._last = frame
        if self.calls % self.every == 0:
            self.frames.append(frame)
        if self.on_step is not None:
            self.on_step(self.calls, self.total_steps)
        return output


# ---------------------------------------------------------------------------------------------------------------------
# tensors <-> images
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def to_images(pipe, tensor: torch.Tensor) -> list[Image.Image]:
    """Model-space tensors ([-1, 1] pixels, or latents decoded with the pipeline's VAE) to PIL images."""
    if is_latent(pipe):
        vae = pipe.vae
        latents = tensor.to(vae.device, vae.dtype) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            latents = latents + shift
        tensor = vae.decode(latents).sample
    array = (tensor.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
    array = (array * 255).round().astype(np.uint8)
    if array.shape[-1] == 1:
        return [Image.fromarray(item[..., 0], mode="L") for item in array]
    return [Image.fromarray(item[..., :3]) for item in array]


def model_image_size(pipe) -> tuple[int, int, int]:
    """(height, width, channels) of the images the pipeline makes: its denoiser's sample size (x the VAE's factor for
    latents). Flux's transformer has none (it takes any size): its VAE's sample size, 1024 for FLUX.1 as for SD3."""
    model = denoiser(pipe)
    size = model.config.get("sample_size")
    if size is None and is_latent(pipe):
        factor = pipe.vae_scale_factor * (2 if packs_latents(pipe) else 1)  # Flux: 2x2 packing as well
        size = pipe.vae.config.get("sample_size") or pipe.default_sample_size * pipe.vae_scale_factor
        size = [side // factor * factor for side in ((size, size) if isinstance(size, int) else size)]
        return size[0], size[1], 3
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if is_latent(pipe):
        factor = getattr(pipe, "vae_scale_factor", 2 ** (len(pipe.vae.config.block_out_channels) - 1))
        return height * factor, width * factor, 3
    return height, width, model.config.in_channels


def load_image(path) -> Image.Image:
    """An uploaded file as a PIL image; ValueError naming the file when it is not an image PIL can read."""
    from pathlib import Path

    name = Path(str(path)).name
    try:
        return imaging.load_image(path, verify=True)  # verify: catches truncated and corrupt files
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error, ... for broken files
        detail = str(err).replace(str(path), name) or type(err).__name__
        raise ValueError(f"{name!r} is not an image that can be read (PNG, JPEG, WebP, ...): {detail}") from None


def fit_image(image: Image.Image, height: int, width: int, channels: int) -> Image.Image:
    """Center-crop to the model's aspect ratio, resize, and convert to its channels (transparency on white)."""
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """[1, C, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Generation:
    images: list[Image.Image]
    record: StepRecord
    seconds: float
    settings: dict[str, Any]


def check_negative_prompt(pipe) -> None:
    if not uses_negative_prompt(pipe):
        raise ValueError(
            f"{type(pipe).__name__} does not use a negative prompt (only with true CFG, which difftune does not run): "
            "leave it empty"
        )


def _class_labels(pipe, class_label: int, n: int) -> list[int]:
    num_classes = pipe.config.num_classes or pipe.unet.config.num_class_embeds
    if not 0 <= int(class_label) < num_classes:
        raise ValueError(f"class {class_label} is outside [0, {num_classes})")
    return [int(class_label)] * n


def generate_with_steps(
    pipe,
    *,
    steps: int,
    seed: int = 0,
    num_images: int = 1,
    prompt: str = "",
    negative_prompt: str = "",
    class_label: int = 0,
    guidance: float | None = None,
    max_frames: int = MAX_FRAMES,
    model_id: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
    control_image: Image.Image | None = None,
) -> Generation:
    """`num_images` images (image i from seed + i) and the denoising steps of the first one. The pipeline's scheduler
    is used as it is (set `pipe.scheduler` first to change it). `on_step(done, total)` is called after every step
    (progress); an exception it raises stops the generation and comes out of this call. With a ControlNet: follows
    `control_image`."""
    kind = pipeline_kind(pipe)
    steps, num_images = int(steps), int(num_images)
    if steps < 1 or num_images < 1:
        raise ValueError("steps and the number of images must be >= 1")
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "generator": _generators(seed, num_images)}
    unpack = None
    if kind == "text":
        height, width, _ = model_image_size(pipe)
        kwargs.update(prompt=prompt or "", num_images_per_prompt=num_images, height=height, width=width)
        unpack = latent_unpacker(pipe, height, width)
        if negative_prompt:
            check_negative_prompt(pipe)
            kwargs["negative_prompt"] = negative_prompt
        if guidance is not None:
            kwargs["guidance_scale"] = float(guidance)
        if getattr(pipe, "controlnet", None) is not None:
            if control_image is None:
                raise ValueError(f"{type(pipe).__name__} runs a ControlNet: it needs a control image")
            kwargs["image"] = control_image
    elif kind == "class":
        kwargs["class_labels"] = _class_labels(pipe, class_label, num_images)
        if guidance is not None:
            kwargs["guidance_scale"] = float(guidance)
    else:
        kwargs["batch_size"] = num_images
    start = time.perf_counter()
    with StepRecorder(pipe.scheduler, steps, max_frames, unpack, on_step) as recorder:
        images = pipe(**kwargs).images
    seconds = time.perf_counter() - start
    settings = {"seed": int(seed), "steps": steps, "scheduler": type(pipe.scheduler).__name__}
    if kind == "text":
        settings.update(prompt=prompt, negative_prompt=negative_prompt, guidance=guidance)
    elif kind == "class":
        settings.update(class_label=int(class_label), guidance=guidance)
    return Generation(list(images), recorder.record(is_latent(pipe), model_id), seconds, settings)


# ---------------------------------------------------------------------------------------------------------------------
# SDEdit: noise an image to a level, denoise it back
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Reconstruction:
    original: Image.Image  # the input as the model sees it (cropped, resized, its channels)
    noised: Image.Image
    reconstruction: Image.Image
    timestep: int  # the noise level as a timestep of the training schedule
    denoising_steps: int
    seconds: float


def start_index(num_steps: int, strength: float) -> int:
    """Index into the timesteps where denoising starts (the image-to-image convention of diffusers): strength 1
    starts from pure noise at the first timestep, strength 0.5 halfway."""
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"the noise level must be in (0, 1], got {strength}")
    denoise = min(int(num_steps * float(strength)), num_steps)
    if denoise < 1:
        raise ValueError(
            f"noise level {strength} with {num_steps} steps leaves no step to denoise: raise the noise level or steps"
        )
    return num_steps - denoise


@torch.no_grad()
def _reconstruct_pixels(pipe, kind: str, x0: torch.Tensor, strength, steps, seed, class_label, guidance):
    scheduler = fresh_scheduler(pipe.scheduler)  # set_begin_index must not stay on the pipeline's scheduler
    scheduler.set_timesteps(steps)
    begin = start_index(steps, strength) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    timesteps = scheduler.timesteps[begin:]
    device, dtype = pipe.unet.device, pipe.unet.dtype
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn(x0.shape, generator=generator).to(device, dtype)
    x0 = x0.to(device, dtype)
    noised = scheduler.add_noise(x0, noise, timesteps[:1])
    labels = null = None
    guided = False
    if kind == "class":
        labels = torch.tensor(_class_labels(pipe, class_label, 1), device=device)
        guided = guidance is not None and float(guidance) != 1.0
        if guided and pipe.null_class_label is None:
            raise ValueError("guidance != 1 needs a model trained with label dropout (no null class here)")
        null = torch.full_like(labels, pipe.null_class_label) if guided else None
    step_kwargs = {}
    parameters = inspect.signature(scheduler.step).parameters
    if "generator" in parameters:
        step_kwargs["generator"] = generator
    if "eta" in parameters:
        step_kwargs["eta"] = 0.0
    x = noised
    for t in timesteps:
        if labels is None:
            output = pipe.unet(x, t).sample
        elif guided:
            both = pipe.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
            conditional, unconditional = both.chunk(2)
            output = unconditional + float(guidance) * (conditional - unconditional)
        else:
            output = pipe.unet(x, t, class_labels=labels).sample
        x = scheduler.step(output, t, x, **step_kwargs).prev_sample
    return noised, x, int(timesteps[0]), len(timesteps)


_IMG2IMG: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def img2img_for(pipe):
    """The image-to-image pipeline of `pipe`'s family (SD: StableDiffusionImg2ImgPipeline, SDXL, SD3, Flux: theirs)
    on the same components (the same modules: LoRAs, embeddings), made once."""
    if pipe not in _IMG2IMG:
        from diffusers import AutoPipelineForImage2Image
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # from_pipe's notes on dtypes of modules it only shares
        try:
            img2img = AutoPipelineForImage2Image.from_pipe(pipe)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        img2img.set_progress_bar_config(disable=True)
        _IMG2IMG[pipe] = img2img
    return _IMG2IMG[pipe]


def reconstruct(
    pipe,
    image: Image.Image,
    *,
    strength: float,
    steps: int,
    seed: int = 0,
    prompt: str = "",
    negative_prompt: str = "",
    class_label: int = 0,
    guidance: float | None = None,
) -> Reconstruction:
    """SDEdit (Meng et al. 2022): noise `image` to the level `strength` (the timestep at that fraction of the
    sampling schedule), then denoise it with the model. Pixel pipelines run the scheduler loop here; latent pipelines
    run their family's image-to-image pipeline (StableDiffusionImg2ImgPipeline, its XL, SD3 and Flux kin) on the
    same components (LoRAs and embeddings included)."""
    kind = pipeline_kind(pipe)
    steps = int(steps)
    height, width, channels = model_image_size(pipe)
    original = fit_image(image, height, width, channels)
    start = time.perf_counter()
    if kind == "text":
        begin = start_index(steps, strength)
        img2img = img2img_for(pipe)
        img2img.scheduler = fresh_scheduler(pipe.scheduler)  # set_begin_index must not stay on pipe's scheduler
        kwargs: dict[str, Any] = {
            "prompt": prompt or "",
            "image": original,
            "strength": float(strength),
            "num_inference_steps": steps,
            "generator": _generators(seed, 1),
        }
        if "height" in inspect.signature(img2img.__call__).parameters:
            # SD3's and Flux's image-to-image pipelines resize the image to this, by default their 1024 px
            kwargs.update(height=height, width=width)
        if negative_prompt:
            check_negative_prompt(img2img)
            kwargs["negative_prompt"] = negative_prompt
        if guidance is not None:
            kwargs["guidance_scale"] = float(guidance)
        with StepRecorder(img2img.scheduler, steps, unpack=latent_unpacker(img2img, height, width)) as recorder:
            result = img2img(**kwargs).images[0]
        noised = to_images(pipe, recorder.start)[0]
        seconds = time.perf_counter() - start
        return Reconstruction(original, noised, result, recorder.first_timestep, steps - begin, seconds)
    x0 = to_tensor(original)
    noised, result, timestep, count = _reconstruct_pixels(pipe, kind, x0, strength, steps, seed, class_label, guidance)
    noised_image, result_image = to_images(pipe, torch.cat([noised, result]))
    return Reconstruction(original, noised_image, result_image, timestep, count, time.perf_counter() - start)
