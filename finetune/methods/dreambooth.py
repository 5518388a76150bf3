"""DreamBooth (Ruiz et al. 2022): teach a text-to-image model (SD 1.x/2.x, SDXL) a subject from a few photos, bound
to a rare identifier.

Trains: the whole UNet in fp32 (`use_lora: false`, EMA allowed) or LoRA layers on its attention projections
(`use_lora: true`, through peft); optionally the text encoders too (all their weights, or LoRA layers). Data: the
instance images in `instance_data_dir` with one `instance_prompt` that contains the `trigger` (e.g. "a photo of sks
dog"), or per-image captions (`use_captions`: metadata.jsonl or .txt files) that each contain it. Loss: the diffusion
objective on VAE latents. Saves: a complete pipeline folder of the base model's family (full fine-tune) or
`pytorch_lora_weights.safetensors` (`pipe.load_lora_weights(output_dir)`), and a model card.

Prior preservation (`with_prior_preservation`). Images of the subject's class ("a photo of a dog") keep the model
from forgetting what the class looks like and from attaching the identifier to every dog. The class images live in
`class_data_dir` (default `<output_dir>/class_images`; the data wrapper is finetune/prior_preservation.py); when it
holds fewer than `num_class_images` readable images, the base model generates the missing ones before training:
missing image number i is `class_<i>.png`, drawn with its own seed (from `train.seed` and i), so the result does not
depend on how many processes share the work (they take every n-th index) nor on interruptions: an image is written
to a temporary name and renamed, images already in the folder are kept byte for byte, and a restarted run generates
only what is still missing.

How the prior loss is weighted (the semantics differ from the diffusers script, the expectation does not). diffusers'
`train_dreambooth.py` builds every batch of B instance images *and* B class images and minimises
`mse(instance) + prior_loss_weight * mse(class)`. Here (kohya's regularisation-image scheme) the class images are
ordinary examples of the dataset: an epoch holds M = max(instance images x data.repeats, class images) instance
examples (the instance set repeated) and M class examples, shuffled together, and every example carries a
`loss_weight` that `TextToImageMethod.loss_weights` applies: 2 for instance examples, 2 x prior_loss_weight for class
examples. A batch is then a random mix, with half of its examples from each set on average, and the expected loss,
E[mean(w * mse)] = 1/2 * 2 E[mse_instance] + 1/2 * 2 prior_loss_weight E[mse_class], equals the diffusers loss. A
batch of train_batch_size=2B here costs what diffusers' batch B with prior preservation costs (2B images); the
per-batch instance/class split varies (it is exact only on average), which every seed, resume and process count
reproduces identically because the examples are drawn from the seeded data order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune import atomic
from finetune.adapters import LoraOptions, add_lora, save_kohya, save_lora
from finetune.config import Config, ConfigError, option
from finetune.data import (
    IMAGE_EXTENSIONS,
    ImageRecords,
    TrainingExamples,
    find_unreadable_images,
    load_records,
)
from finetune.imaging import record_path
from finetune.methods.base import eval_mode
from finetune.methods.lora import lora_card, lora_modules
from finetune.prior_preservation import (
    CLASS_IMAGE_PATTERN,
    PriorPreservationExamples,
    class_image_files,
    class_image_seed,
    missing_class_indices,
)
from finetune.text_to_image import TextToImageMethod, TextToImageOptions

logger = logging.getLogger(__name__)

METADATA_FILES = {"metadata.jsonl", "metadata.csv", "metadata.parquet"}


@dataclass
class DreamBoothOptions(LoraOptions, TextToImageOptions):
    use_lora: bool = option(
        False,
        "Train LoRA layers (rank, alpha, target_modules ...) and save pytorch_lora_weights.safetensors. Off: train "
        "the whole UNet (fp32) and save a complete pipeline folder.",
    )
    instance_data_dir: str | None = option(
        None, "Folder of the subject's images (required). Other files in it are skipped and counted."
    )
    instance_prompt: str | None = option(
        None, "Prompt of every instance image, containing the trigger, e.g. 'a photo of sks dog'."
    )
    trigger: str = option(
        "sks",
        "The identifier the subject is bound to (a rare token); it must appear as a word in instance_prompt and in "
        "every caption.",
    )
    use_captions: bool = option(
        False,
        "Per-image captions instead of instance_prompt: metadata.jsonl (data.caption_column) or a .txt file next to "
        "each image. Images without one use instance_prompt.",
    )
    train_text_encoder: bool = option(
        False, "Also train the text encoder: all its weights, or a LoRA on its attention projections with use_lora."
    )
    with_prior_preservation: bool = option(
        False, "Prior preservation: also train on class images (generated when missing) with prior_loss_weight."
    )
    class_data_dir: str | None = option(
        None,
        "Folder of class images, filled up to num_class_images by the base model. None: <output_dir>/class_images.",
    )
    class_prompt: str | None = option(
        None,
        "Prompt of the class images, without the trigger, e.g. 'a photo of dog'. Prior preservation needs it or "
        "class_prompts.",
    )
    class_prompts: list[str] | None = option(
        None,
        "Several class prompts instead of one (e.g. every kind of subject the model should keep drawing as before): "
        "missing class image i is drawn from prompt i mod n, its prompt saved beside it as class_<i>.txt, and each "
        "class image trains with its own caption. A .txt next to any class image is its caption (kohya's captioned "
        "regularisation images).",
    )
    num_class_images: int = option(
        100, "Class images to train on; missing ones are generated before training (existing ones are kept)."
    )
    prior_loss_weight: float = option(1.0, "Weight of the class images' loss relative to the instance images'.")
    sample_batch_size: int = option(4, "Images per pipeline call when generating class images.")
    class_inference_steps: int | None = option(
        None, "Sampling steps of generated class images. None: diffusion.num_inference_steps."
    )
    class_guidance_scale: float = option(7.5, "Guidance scale of generated class images.")

    def __post_init__(self):
        LoraOptions.__post_init__(self)
        TextToImageOptions.__post_init__(self)
        if not self.trigger.strip():
            raise ConfigError("trigger must be a non-empty word, e.g. 'sks'")
        if self.num_class_images < 1:
            raise ConfigError(f"num_class_images must be >= 1, got {self.num_class_images}")
        if self.prior_loss_weight < 0:
            raise ConfigError(f"prior_loss_weight must be >= 0, got {self.prior_loss_weight}")
        if self.sample_batch_size < 1:
            raise ConfigError(f"sample_batch_size must be >= 1, got {self.sample_batch_size}")
        if self.class_inference_steps is not None and self.class_inference_steps < 1:
            raise ConfigError(f"class_inference_steps must be >= 1 or null, got {self.class_inference_steps}")
        if self.class_prompts is not None:
            if not self.class_prompts:
                raise ConfigError("class_prompts is empty: give at least one prompt, or null to use class_prompt")
            blank = [i for i, prompt in enumerate(self.class_prompts) if not prompt.strip()]
            if blank:
                raise ConfigError(f"class_prompts[{blank[0]}] is empty: every class prompt needs text")


def contains_trigger(text: str, trigger: str) -> bool:
    """The trigger appears as a whole word (not inside another word: 'sks' is not in 'asks')."""
    return re.search(rf"(?<!\w){re.escape(trigger.strip())}(?!\w)", text) is not None


def non_image_files(folder: Path) -> list[Path]:
    """Files of an image folder that are not images, leaving out metadata files, .txt captions of images and hidden
    folders (e.g. the .cache/ that `hf download --local-dir` writes)."""
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts[:-1])
    ]
    stems = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    return sorted(
        p
        for p in files
        if p.suffix.lower() not in IMAGE_EXTENSIONS
        and p.name not in METADATA_FILES
        and not (p.suffix == ".txt" and p.with_suffix("") in stems)
    )


class DreamBooth(TextToImageMethod):
    name = "dreambooth"
    summary = (
        "DreamBooth: a subject from a few images bound to a trigger word, full UNet or LoRA, with prior preservation"
    )
    Options = DreamBoothOptions

    # -- checks ------------------------------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: Config) -> None:
        super().check_config(config)
        options, section = config.method_options, config.method
        if not options.instance_data_dir:
            raise ConfigError(
                f"{section}.instance_data_dir is required: the folder of your subject's images (data.dataset is not "
                f"used by {section})"
            )
        if not options.use_captions and not options.instance_prompt:
            raise ConfigError(
                f"{section}.instance_prompt is required, e.g. 'a photo of {options.trigger} dog' (or set "
                f"{section}.use_captions=true for per-image captions)"
            )
        if options.instance_prompt and not contains_trigger(options.instance_prompt, options.trigger):
            raise ConfigError(
                f"{section}.instance_prompt {options.instance_prompt!r} does not contain the trigger "
                f"{options.trigger!r}: the subject is learnt under that identifier. Put it in the prompt (e.g. 'a "
                f"photo of {options.trigger} dog') or set {section}.trigger to the identifier your prompt uses."
            )
        if options.with_prior_preservation:
            if not options.class_prompt and not options.class_prompts:
                raise ConfigError(
                    f"{section}.with_prior_preservation needs {section}.class_prompt, the subject's class without "
                    f"the trigger, e.g. 'a photo of dog' (or {section}.class_prompts, several of them)"
                )
            named = [("class_prompt", options.class_prompt)] if options.class_prompt else []
            named += [(f"class_prompts[{i}]", prompt) for i, prompt in enumerate(options.class_prompts or [])]
            for key, prompt in named:
                if contains_trigger(prompt, options.trigger):
                    raise ConfigError(
                        f"{section}.{key} {prompt!r} contains the trigger {options.trigger!r}: class images must "
                        "show the class in general, e.g. 'a photo of dog'"
                    )
            instance = Path(options.instance_data_dir).expanduser().resolve()
            classes = cls.class_folder(config).resolve()
            if classes == instance or instance in classes.parents:
                raise ConfigError(
                    f"{section}.class_data_dir {str(classes)!r} is inside instance_data_dir: class images would be "
                    "read as instance images. Use a folder outside it."
                )
        if options.export_kohya and not options.use_lora:
            raise ConfigError(f"{section}.export_kohya needs {section}.use_lora=true")

    @classmethod
    def image_folder(cls, config: Config) -> Path | None:
        folder = config.method_options.instance_data_dir  # (missing: check_config says so first)
        return Path(folder).expanduser() if folder else None

    @staticmethod
    def class_folder(config: Config) -> Path:
        folder = config.method_options.class_data_dir
        return Path(folder).expanduser() if folder else Path(config.train.output_dir) / "class_images"

    # -- data --------------------------------------------------------------------------------------------------------
    def instance_columns(self) -> list[str]:
        captions = [self.config.data.caption_column] if self.options.use_captions else []
        return captions + self.mask_columns()

    def build_source(self):
        """The instance images (checked: non-images and unreadable files skipped and counted, captions and their
        trigger); with prior preservation, a count of the readable class images already there."""
        options, section = self.options, self.config.method
        folder = Path(options.instance_data_dir).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{section}.instance_data_dir: the folder {str(folder)!r} does not exist")
        self.instance_folder = folder
        data = dataclasses.replace(self.config.data, dataset=str(folder))
        not_images = non_image_files(folder)
        columns = self.instance_columns()
        # the columns asked for are checked line by line (captions only with use_captions: without them a caption
        # that is a number or null is no concern of DreamBooth's)
        records = load_records(data, columns=columns)
        for column in columns:
            if column not in records.column_names:
                hint = (
                    "Give captions in metadata.jsonl or as a .txt file next to each image, or set data.caption_column."
                    if column == self.config.data.caption_column
                    else "Add it to metadata.jsonl or name an existing column."
                )
                raise ConfigError(
                    f"{section}: column {column!r} not found in {str(folder)!r} (columns: "
                    f"{', '.join(records.column_names)}). {hint}"
                )
        instance = ImageRecords(
            records, data, channels=3, columns=columns, source=str(folder), verify_memo=self.verify_memo
        )
        self.skipped_instance_files = {
            "not images": [str(p.relative_to(folder)) for p in not_images],
            "unreadable": [Path(name).name for _, name, _ in instance.skipped],
        }
        skipped = sum(len(v) for v in self.skipped_instance_files.values())
        if skipped:
            logger.warning(
                "instance_data_dir %s: training on %d images; skipped %d file(s): %d not images (%s), %d unreadable "
                "(%s)",
                folder,
                len(instance),
                skipped,
                len(not_images),
                ", ".join(self.skipped_instance_files["not images"][:5]) or "-",
                len(instance.skipped),
                ", ".join(self.skipped_instance_files["unreadable"][:5]) or "-",
            )
        if options.use_captions:
            self.check_captions(instance)
        if options.with_prior_preservation:
            self.class_dir = self.class_folder(self.config)
            self.existing_class_images = self.readable(class_image_files(self.class_dir))
            self.class_captions(self.existing_class_images)  # uncaptioned images without a class_prompt: say so now
        return instance

    def plan_lines(self) -> list[str]:
        if not self.options.with_prior_preservation:
            return []
        found, wanted = len(self.existing_class_images), self.options.num_class_images
        todo = f"the base model draws the other {wanted - found} at start" if found < wanted else "none to draw"
        return [
            f"prior preservation: {wanted} class images of {self.class_prompts_label()} in {self.class_dir}: "
            f"{found} there, {todo} (they add to each epoch's examples)"
        ]

    def class_prompts_label(self) -> str:
        """The class prompt, or the class prompts in short, for the plan, the log and the card."""
        prompts = self.options.class_prompts
        if not prompts:
            return repr(self.options.class_prompt)
        shown = ", ".join(repr(p) for p in prompts[:3])
        return f"{len(prompts)} prompts ({shown}{', ...' if len(prompts) > 3 else ''})"

    def class_prompt_for(self, index: int) -> str:
        """The prompt missing class image `index` is drawn from: class_prompts in turn, else class_prompt."""
        prompts = self.options.class_prompts
        return prompts[index % len(prompts)] if prompts else self.options.class_prompt

    def check_captions(self, instance: ImageRecords) -> None:
        column, trigger, section = self.config.data.caption_column, self.options.trigger, self.config.method
        missing, untriggered = [], []
        for row in instance.indices:
            value = instance.column_values[column][row]
            name = record_path(instance.image_sources[row]) or f"row {row}"
            captions = value if isinstance(value, (list, tuple)) else [value]
            if not any(isinstance(c, str) and c.strip() for c in captions):
                if not self.options.instance_prompt:
                    missing.append(Path(name).name)
                continue
            if not all(isinstance(c, str) and contains_trigger(c, trigger) for c in captions):
                untriggered.append(Path(name).name)
        if missing:
            raise ConfigError(
                f"{section}.use_captions: {len(missing)} image(s) have no caption ({', '.join(missing[:5])}) and "
                f"{section}.instance_prompt is not set. Add captions or an instance_prompt for them."
            )
        if untriggered:
            raise ConfigError(
                f"{section}.use_captions: {len(untriggered)} caption(s) do not contain the trigger {trigger!r} "
                f"({', '.join(untriggered[:5])}). Put it in every caption, or set {section}.trigger."
            )

    @staticmethod
    def readable(paths: list[Path]) -> list[Path]:
        bad = {index for index, _, _ in find_unreadable_images([str(p) for p in paths])}
        if bad:
            logger.warning("skipped %d unreadable class image(s): %s", len(bad), [paths[i].name for i in sorted(bad)])
        return [p for i, p in enumerate(paths) if i not in bad]

    def caption_for(self, example: dict, rng: np.random.Generator) -> str:
        if example.pop("prior", False):
            return example.pop(self.config.data.caption_column)  # class_records gave every class image its caption
        if not self.options.use_captions:
            return self.options.instance_prompt
        value = example.get(self.config.data.caption_column)
        if value is None or (isinstance(value, str) and not value.strip()):
            example.pop(self.config.data.caption_column, None)
            return self.options.instance_prompt
        return super().caption_for(example, rng)

    def all_captions(self) -> list[str]:
        captions = [c for c in (self.options.instance_prompt, self.options.class_prompt) if c]
        source = self.train_dataset.source
        if isinstance(source, PriorPreservationExamples):
            captions.extend(source.classes.column_values[self.config.data.caption_column])
        if self.options.use_captions:
            instance = source.instance if isinstance(source, PriorPreservationExamples) else source
            for row in instance.indices:
                value = instance.column_values[self.config.data.caption_column][row]
                captions.extend(value if isinstance(value, (list, tuple)) else [value])
        return [c for c in captions if isinstance(c, str) and c.strip()]

    def default_prompt(self) -> str:
        return self.options.instance_prompt or (self.all_captions() or ["a photo"])[0]

    def cache_fingerprint(self) -> str:
        """The latents' fingerprint, and which images they are: the instance folder and the class images. The prompts
        (instance, class, captions) change only the text conditioning: they are in its fingerprint (the texts), so a
        new instance_prompt re-encodes the text and keeps the latents."""
        source = self.train_dataset.source
        class_files = [p.name for p in source.classes.image_sources] if hasattr(source, "classes") else []
        key = [
            super().cache_fingerprint(),
            str(self.instance_folder.resolve()),
            str(self.class_dir.resolve()) if class_files else None,
            class_files,
        ]
        return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()

    # -- models ------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        if self.options.with_prior_preservation:
            self.accelerator.wait_for_everyone()  # every process counted the class images before anyone writes
            self.generate_class_images()
            classes = self.class_records()
            self.train_dataset = TrainingExamples(
                PriorPreservationExamples(
                    self.train_dataset.source, classes, self.config.data.repeats, self.options.prior_loss_weight
                ),
                self.config.train.seed,
                1,
                transform=self.make_example,
                min_length=self.config.train.train_batch_size * self.accelerator.num_processes,
            )
            logger.info(
                "prior preservation: %d instance images, %d class images, %d examples per epoch",
                len(self.train_dataset.source.instance),
                len(classes),
                len(self.train_dataset),
            )

    def configure_trainable(self) -> None:
        if self.options.use_lora:
            add_lora(self.parts(), self.options, self.family)
            return
        self.denoiser.requires_grad_(True)
        self.denoiser.train()
        if self.options.train_text_encoder:
            for name in self.family.trainable_text_encoder_names():
                getattr(self, name).requires_grad_(True)
                getattr(self, name).train()

    # -- class images ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_class_images(self) -> list[Path]:
        """Fill class_data_dir up to num_class_images; this process writes every n-th missing index. Returns the
        files this process wrote."""
        missing = self.options.num_class_images - len(self.existing_class_images)
        if missing <= 0:
            return []
        taken = {p.name for p in self.class_dir.iterdir()} if self.class_dir.is_dir() else set()
        indices = missing_class_indices(taken, missing)
        mine = indices[self.accelerator.process_index :: self.accelerator.num_processes]
        logger.info(
            "generating %d class image(s) in %s (%s), %d on this process",
            missing,
            self.class_dir,
            self.class_prompts_label(),
            len(mine),
        )
        with atomic.reporting_write_errors(self.class_dir, "run the training again"):
            self.class_dir.mkdir(parents=True, exist_ok=True)
        written = []
        if mine:
            resolution = self.config.data.resolution
            steps = self.options.class_inference_steps or self.config.diffusion.num_inference_steps
            parts = self.parts(unwrap=True)
            with eval_mode(parts[self.family.denoiser], *self.text_encoders.values()):
                pipe = self.pipeline()
                pipe.set_progress_bar_config(disable=True)
                batch_size = self.options.sample_batch_size
                for start in range(0, len(mine), batch_size):
                    chunk = mine[start : start + batch_size]
                    generators = [
                        torch.Generator().manual_seed(class_image_seed(self.config.train.seed, i)) for i in chunk
                    ]
                    prompts = [self.class_prompt_for(i) for i in chunk]
                    with self.accelerator.autocast():
                        images = pipe(
                            prompts,
                            num_inference_steps=steps,
                            guidance_scale=self.options.class_guidance_scale,
                            generator=generators,
                            height=resolution,
                            width=resolution,
                            **self.generation_inputs(len(chunk)),
                        ).images
                    for index, prompt, image in zip(chunk, prompts, images):
                        path = self.class_dir / CLASS_IMAGE_PATTERN.format(index=index)
                        if self.options.class_prompts:  # the caption first: an image is never without its prompt
                            atomic.atomic_write_text(path.with_suffix(".txt"), prompt, then="run the training again")
                        # a killed job never leaves a half-written class image (the next start removes the temporary)
                        with atomic.atomic_path(path, then="run the training again") as staging:
                            image.save(staging, format="PNG")
                        written.append(path)
                    logger.info("class images: %d/%d on this process", start + len(chunk), len(mine))
        self.accelerator.wait_for_everyone()
        return written

    def class_records(self) -> ImageRecords:
        """The first num_class_images readable class images (sorted by name)."""
        import datasets

        files = self.readable(class_image_files(self.class_dir))[: self.options.num_class_images]
        if not files:
            raise ConfigError(f"{self.config.method}.class_data_dir {str(self.class_dir)!r} holds no class images")
        if len(files) < self.options.num_class_images:
            logger.warning("only %d class images (num_class_images=%d)", len(files), self.options.num_class_images)
        data = dataclasses.replace(
            self.config.data, dataset=str(self.class_dir), max_samples=None, verify_images=False
        )
        columns = {data.image_column: [str(p) for p in files], data.caption_column: self.class_captions(files)}
        records = datasets.Dataset.from_dict(columns)
        classes = ImageRecords(records, data, channels=3, columns=[data.caption_column], source=str(self.class_dir))
        classes.image_sources = files  # Paths: the cache fingerprint names them
        return classes

    def class_captions(self, files: list[Path]) -> list[str]:
        """Each class image's caption: the .txt beside it (written with class_prompts, or a captioned
        regularisation folder), else class_prompt."""
        captions, uncaptioned = [], []
        for path in files:
            text_file = path.with_suffix(".txt")
            caption = text_file.read_text(encoding="utf-8", errors="replace").strip() if text_file.is_file() else ""
            if not caption and not self.options.class_prompt:
                uncaptioned.append(path.name)
            captions.append(caption or self.options.class_prompt)
        if uncaptioned:
            raise ConfigError(
                f"{self.config.method}.class_data_dir {str(self.class_dir)!r}: {len(uncaptioned)} class image(s) "
                f"have no caption ({', '.join(uncaptioned[:5])}): put a .txt with its prompt next to each, or set "
                f"{self.config.method}.class_prompt for them"
            )
        return captions

    # -- outputs -----------------------------------------------------------------------------------------------------
    def base_component(self, name: str) -> torch.nn.Module:
        """A frozen component as the base model has it: reloaded when it was cast to a lower precision here."""
        module = getattr(self, name)
        if module is not None and all(p.dtype == torch.float32 for p in self.unwrap(module).parameters()):
            return self.unwrap(module)
        if module is None and name in self.config.model.drop_text_encoders:  # left out of the pipeline too
            return None
        return self.family.load_component(self.config, name)  # (also a text encoder freed after caching)

    def base_scheduler(self):
        """The base model's own sampling scheduler (what users of the saved pipeline expect), with this run's
        prediction type; DDIM when it cannot be read."""
        import diffusers

        model = self.config.model
        try:
            config = diffusers.DDIMScheduler.load_config(
                model.pretrained_model_name_or_path, subfolder="scheduler", revision=model.revision
            )
            scheduler_class = getattr(diffusers, config.get("_class_name", ""), diffusers.DDIMScheduler)
        except (OSError, ValueError):
            return self.family.sampling_scheduler(self.noise_scheduler)
        if "prediction_type" in config:  # (flow-matching schedulers have none: they predict the velocity)
            config = {**config, "prediction_type": self.prediction_type}
        return scheduler_class.from_config(config)

    def save(self, output_dir: Path) -> None:
        if self.options.use_lora:
            modules = lora_modules(self)
            save_lora(output_dir, modules, self.family, inpainting=self.inpainting)
            if self.options.export_kohya:
                save_kohya(output_dir, modules, self.family)
            return
        # the complete pipeline of the family: trained parts as trained (fp32), frozen ones as the base has them
        parts = self.parts(unwrap=True)
        for name in ("vae", *self.family.text_encoders):
            if parts[name] is None or not any(p.requires_grad for p in parts[name].parameters()):
                parts[name] = self.base_component(name)
        pipe = self.family.pipeline(parts, self.base_scheduler(), inpainting=self.inpainting)
        pipe.save_pretrained(output_dir, safe_serialization=True)

    def card(self) -> dict[str, Any]:
        base = self.config.model.pretrained_model_name_or_path
        prompt = self.card_prompt()  # the instance prompt (or a caption): what the subject was trained under
        if self.options.use_lora:
            facts = lora_card(self, self.options.trigger)
            load = (
                f"{self.usage_loading(base)}\n"
                'pipe.load_lora_weights("OUTPUT_DIR_OR_REPO_ID")  # pytorch_lora_weights.safetensors'
            )
        else:
            facts = {**self.license_facts(), "base_model": base, "tags": self.card_tags()}
            facts["pipeline_tag"] = self.pipeline_tag()
            load = f"{self.usage_loading('OUTPUT_DIR_OR_REPO_ID')}  # the complete fine-tuned pipeline"
        prior = (
            f" with prior preservation ({len(self.train_dataset.source.classes)} class images of "
            f"{self.class_prompts_label()}, prior_loss_weight {self.options.prior_loss_weight})"
            if self.options.with_prior_preservation
            else ""
        )
        kind = "LoRA" if self.options.use_lora else "full UNet"
        return {
            **facts,
            "tags": ["dreambooth", *facts["tags"]],
            "trigger": self.options.trigger,
            "prompt": prompt,
            "dataset": str(self.options.instance_data_dir),
            "description": (
                f"DreamBooth ({kind}{' and text encoder' if self.options.train_text_encoder else ''}) of "
                f"`{base}` on the images in `{self.options.instance_data_dir}`{prior}. Put `{self.options.trigger}` "
                f"in the prompt, as in the instance prompt `{prompt}`."
            ),
            "usage": f"""
{load}
{self.usage_call(prompt)}
""",
        }
