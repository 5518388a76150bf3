"""Caption a folder of images with BLIP and write a Hugging Face ``datasets`` image-folder dataset.

The output is ``metadata.jsonl`` in the image folder, one ``{"file_name": <relative path>, "text": <caption>}`` line
per image, which ``datasets.load_dataset("imagefolder", data_dir=...)`` reads as an ``image`` and a ``text`` column,
the layout the LoRA and full fine-tuning recipes train from. Optionally a ``.txt`` sidecar per image (kohya layout).

Resuming and safety. Each process appends the captions of every finished batch to its own part file,
``.captioning/part-<rank>.jsonl`` in the image folder, flushed and fsynced; ``metadata.jsonl`` is only rewritten at the
end, by the main process, atomically (a temporary file in the same folder, then ``os.replace``). A run that is killed
therefore loses at most the batch in flight, and the next run with the same command skips every image found in the
part files, then folds them into ``metadata.jsonl``. Captions that existed before the run (a ``metadata.jsonl`` entry
or a ``.txt`` sidecar, typically written by a person) are kept unless ``overwrite`` is set; sidecar captions with no
metadata entry are copied into ``metadata.jsonl`` so the dataset sees them. Delete ``.captioning/`` to throw away
the captions of an interrupted run instead of resuming it.

Several processes (``accelerate launch``) split the sorted list of images still to caption; each writes only its
own part file, so no two processes ever write the same file.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from finetune.atomic import atomic_write_text, reporting_write_errors

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
METADATA_FILENAME = "metadata.jsonl"
STATE_DIRNAME = ".captioning"
SIDECAR_SUFFIX = ".txt"
# What datasets' imagefolder builder reads as images (PIL must also decode them).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Files an image folder may legitimately hold besides images; never reported as "not an image".
METADATA_FILENAMES = frozenset({"metadata.jsonl", "metadata.csv", "metadata.parquet"})
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
DECODING_CHOICES = ("beam", "sample")


# what to do after a write failed: the captions written so far are kept, and a new run captions only the rest
RERUN = "run the command again (captions written so far are kept)"


class CaptioningError(RuntimeError):
    """A problem with the user's input that stops the run before any caption is written (bad folder, bad model)."""


@dataclass(frozen=True)
class GenerationSettings:
    """How BLIP's text decoder produces a caption. Lengths count generated tokens only, never the prompt."""

    decoding: str = "beam"
    num_beams: int = 3
    top_p: float = 0.9
    temperature: float = 1.0
    min_new_tokens: int = 5
    max_new_tokens: int = 30

    def __post_init__(self) -> None:
        if self.decoding not in DECODING_CHOICES:
            raise CaptioningError(f"decoding must be one of {DECODING_CHOICES}, not {self.decoding!r}")
        if self.num_beams < 1:
            raise CaptioningError(f"num_beams must be at least 1, not {self.num_beams}")
        if not 0.0 < self.top_p <= 1.0:
            raise CaptioningError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.temperature <= 0.0:
            raise CaptioningError(f"temperature must be positive, not {self.temperature}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens or self.max_new_tokens < 1:
            raise CaptioningError(
                f"need 0 <= min length <= max length and max length >= 1, got {self.min_new_tokens}, "
                f"{self.max_new_tokens}"
            )

    def generate_kwargs(self) -> dict:
        lengths = {"min_new_tokens": self.min_new_tokens, "max_new_tokens": self.max_new_tokens}
        if self.decoding == "sample":
            # Nucleus sampling as in the BLIP paper: top_k=0 switches off transformers' default top-k of 50.
            sampling = {"do_sample": True, "num_beams": 1, "top_p": self.top_p, "top_k": 0}
            return {**sampling, "temperature": self.temperature, **lengths}
        return {"do_sample": False, "num_beams": self.num_beams, **lengths}


@dataclass(frozen=True)
class CaptionOptions:
    """Everything a captioning run needs besides the image folder."""

    model: str = DEFAULT_MODEL
    batch_size: int = 8
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    prompt: str | None = None
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_column: str = "text"
    write_txt: bool = False
    overwrite: bool = False
    dtype: str = "auto"
    device: str | None = None
    num_workers: int = 4
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise CaptioningError(f"batch size must be at least 1, not {self.batch_size}")
        if self.dtype not in DTYPE_CHOICES:
            raise CaptioningError(f"dtype must be one of {DTYPE_CHOICES}, not {self.dtype!r}")
        if self.caption_column == "file_name" or not self.caption_column:
            raise CaptioningError(f"invalid caption column {self.caption_column!r}")


@dataclass
class ProcessReport:
    """What one process did; the main process gathers these from every process."""

    captioned: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class CaptionSummary:
    image_dir: Path
    captioned: list[str]
    failed: list[tuple[str, str]]
    not_images: list[str]
    skipped_existing: int
    resumed: int
    imported_sidecars: int
    metadata_entries: int
    missing_files_in_metadata: list[str]
    seconds: float
    num_processes: int = 1

    @property
    def images_per_second(self) -> float:
        return len(self.captioned) / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        lines = [
            f"Captioned {len(self.captioned)} images"
            + (f" on {self.num_processes} processes" if self.num_processes > 1 else "")
            + f" in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s); "
            f"skipped {self.skipped_existing + self.resumed} already captioned"
            + (f" ({self.resumed} from an interrupted run)" if self.resumed else "")
            + f"; failed {len(self.failed)}."
        ]
        for file_name, reason in self.failed:
            lines.append(f"  failed: {file_name}: {reason}")
        if self.not_images:
            lines.append(f"Ignored {len(self.not_images)} files that are not images: {', '.join(self.not_images)}")
        if self.imported_sidecars:
            lines.append(f"Copied {self.imported_sidecars} existing .txt captions into {METADATA_FILENAME}.")
        if self.missing_files_in_metadata:
            lines.append(
                f"Warning: {len(self.missing_files_in_metadata)} {METADATA_FILENAME} entries name files that do not "
                f"exist (kept as they are): {', '.join(self.missing_files_in_metadata[:10])}"
            )
        lines.append(f"Wrote {self.image_dir / METADATA_FILENAME} ({self.metadata_entries} entries).")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Files: discovery, existing captions, part files, atomic metadata writes
# ----------------------------------------------------------------------------------------------------------------


def normalize_file_name(file_name: str) -> str:
    """The form used to compare ``file_name`` values: forward slashes, no ``./``."""
    return posixpath.normpath(file_name.replace("\\", "/"))


def discover_files(image_dir: Path) -> tuple[list[str], list[str]]:
    """Sorted relative paths (forward slashes) of the images under ``image_dir``, and of the other files.

    Hidden files and folders (``.captioning``, ``.DS_Store``...) are left out, as datasets' imagefolder does. Caption
    sidecars of images and metadata files do not count as "other files".
    """
    images, others = [], []
    for root, dir_names, file_names in os.walk(image_dir):
        dir_names[:] = sorted(name for name in dir_names if not name.startswith("."))
        relative_root = Path(root).relative_to(image_dir)
        for name in sorted(file_names):
            if name.startswith("."):
                continue
            relative = (relative_root / name).as_posix()
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                images.append(relative)
            else:
                others.append(relative)
    image_stems = {posixpath.splitext(image)[0] for image in images}
    not_images = [
        other
        for other in others
        if posixpath.basename(other) not in METADATA_FILENAMES
        and not (other.endswith(SIDECAR_SUFFIX) and posixpath.splitext(other)[0] in image_stems)
    ]
    return sorted(images), not_images


def sidecar_path(image_dir: Path, file_name: str) -> Path:
    return (image_dir / file_name).with_suffix(SIDECAR_SUFFIX)


def read_sidecar(path: Path) -> str:
    """The caption in a ``.txt`` sidecar, or "" when there is none."""
    if not path.is_file():
        return ""
    try:
        # errors="replace": a caption saved in another encoding is still a person's caption, to keep, not a crash.
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as error:
        raise CaptioningError(f"cannot read the caption file {path}: {error}") from error


def read_metadata(metadata_path: Path) -> list[dict]:
    """The records of an existing ``metadata.jsonl``, in order. A malformed line stops the run: rewriting the file
    would drop it, and it may hold a person's work."""
    if not metadata_path.exists():
        return []
    records = []
    with open(metadata_path, encoding="utf-8") as metadata_file:
        for line_number, line in enumerate(metadata_file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CaptioningError(
                    f"{metadata_path} line {line_number} is not valid JSON ({error}); fix or move the file first"
                ) from None
            if not isinstance(record, dict):
                raise CaptioningError(f"{metadata_path} line {line_number} is not a JSON object; fix it first")
            records.append(record)
    return records


def has_caption(record: dict, caption_column: str) -> bool:
    """Whether a metadata entry holds a caption. Empty text counts as none; any other value (a list of captions, say)
    counts as one, so that it is never replaced without overwrite."""
    caption = record.get(caption_column)
    return caption is not None and (not isinstance(caption, str) or bool(caption.strip()))


def captioned_file_names(records: list[dict], caption_column: str) -> set[str]:
    return {
        normalize_file_name(record["file_name"])
        for record in records
        if isinstance(record.get("file_name"), str) and has_caption(record, caption_column)
    }


def read_part_files(state_dir: Path) -> dict[str, str]:
    """file_name → caption from the part files of this or an interrupted run (later lines win).

    A line that does not parse is the write a kill interrupted; its image is simply captioned again.
    """
    captions: dict[str, str] = {}
    if not state_dir.is_dir():
        return captions
    for part_path in sorted(state_dir.glob("part-*.jsonl")):
        with open(part_path, encoding="utf-8") as part_file:
            for line in part_file:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("file_name"), str):
                    captions[normalize_file_name(record["file_name"])] = str(record.get("text", ""))
    return captions


class PartFileWriter:
    """Append-only JSON-lines file of one process; every batch is flushed and fsynced before the next starts."""

    def __init__(self, path: Path):
        with reporting_write_errors(path, RERUN):
            path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_last_line(path)
            self.path = path
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close(), lives across batches

    def append(self, records: list[dict]) -> None:
        # One write per batch, so an interruption leaves at most one partial line, at the end.
        with reporting_write_errors(self.path, RERUN):
            self._file.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _drop_partial_last_line(path: Path) -> None:
    """Cut a line a kill left unfinished, so that the next append does not glue a record onto it."""
    if not path.exists():
        return
    content = path.read_bytes()
    if content and not content.endswith(b"\n"):
        with open(path, "r+b") as part_file:
            part_file.truncate(content.rfind(b"\n") + 1)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the new file, never a half-written one (the
    file keeps its permissions); a full disk or a read-only folder is a RunError naming the file."""
    atomic_write_text(path, text, then=RERUN)


def merge_into_metadata(
    metadata_path: Path, records: list[dict], new_captions: dict[str, str], caption_column: str
) -> int:
    """Write ``records`` with ``new_captions`` applied: matching entries get the new caption (their other columns
    are kept), other entries stay as they are, new images are appended in file-name order. Returns the entry count.
    """
    remaining = dict(new_captions)
    merged = []
    for record in records:
        file_name = record.get("file_name")
        key = normalize_file_name(file_name) if isinstance(file_name, str) else None
        if key is not None and key in new_captions:
            record = {**record, caption_column: new_captions[key]}
            remaining.pop(key, None)
        merged.append(record)
    merged.extend({"file_name": name, caption_column: remaining[name]} for name in sorted(remaining))
    write_text_atomically(metadata_path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in merged))
    return len(merged)


# ----------------------------------------------------------------------------------------------------------------
# The plan: what this run captions, skips and imports. Every process computes it from the same files, so every
# process agrees on the list that split_between_processes divides.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CaptionPlan:
    images: list[str]
    not_images: list[str]
    metadata_records: list[dict]
    to_caption: list[str]
    resumed: int
    skipped_existing: int
    imported_sidecars: dict[str, str]
    missing_files_in_metadata: list[str]


def plan_run(image_dir: Path, options: CaptionOptions) -> CaptionPlan:
    if not image_dir.exists():
        raise CaptioningError(f"image folder does not exist: {image_dir}")
    if not image_dir.is_dir():
        raise CaptioningError(f"not a folder: {image_dir}")
    images, not_images = discover_files(image_dir)
    if not images:
        raise CaptioningError(
            f"no images found under {image_dir} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    records = read_metadata(image_dir / METADATA_FILENAME)
    already_captioned = captioned_file_names(records, options.caption_column)
    part_captions = read_part_files(image_dir / STATE_DIRNAME)

    to_caption, imported_sidecars = [], {}
    resumed = skipped_existing = 0
    for image in images:
        if image in part_captions:
            resumed += 1  # captioned by an interrupted run: resume, never redo, even with overwrite
            continue
        if options.overwrite:
            to_caption.append(image)
            continue
        if image in already_captioned:
            skipped_existing += 1
            continue
        sidecar_caption = read_sidecar(sidecar_path(image_dir, image))
        if sidecar_caption:
            skipped_existing += 1
            imported_sidecars[image] = sidecar_caption
            continue
        to_caption.append(image)

    image_set = set(images)
    missing = sorted(
        normalize_file_name(record["file_name"])
        for record in records
        if isinstance(record.get("file_name"), str) and normalize_file_name(record["file_name"]) not in image_set
    )
    return CaptionPlan(
        images=images,
        not_images=not_images,
        metadata_records=records,
        to_caption=to_caption,
        resumed=resumed,
        skipped_existing=skipped_existing,
        imported_sidecars=imported_sidecars,
        missing_files_in_metadata=missing,
    )


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str, device):
    import torch

    if dtype == "auto":
        # Half precision is BLIP's usual inference setting on GPUs; CPUs run float32 (float16 matmuls are slow there).
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def format_caption(caption: str, prefix: str, suffix: str) -> str:
    """Trigger words and the caption, joined by single spaces (write "sks toy," to get a comma)."""
    return " ".join(part for part in (prefix.strip(), caption.strip(), suffix.strip()) if part)


class BlipCaptioner:
    """Batched captioning with ``BlipForConditionalGeneration`` + ``BlipProcessor``.

    With a prompt ("a photograph of") BLIP continues the prompt, and the caption starts with it, as in BLIP's
    conditional captioning.
    """

    def __init__(self, model, processor, *, generation: GenerationSettings, prompt: str | None = None):
        self.model = model.eval()
        self.processor = processor
        self.generation = generation
        self.prompt = prompt.strip() if prompt and prompt.strip() else None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        size = getattr(processor.image_processor, "size", None) or {}
        self.image_size = max(size.get("height", 0), size.get("width", 0), size.get("shortest_edge", 0)) or None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device,
        dtype: str = "auto",
        generation: GenerationSettings | None = None,
        prompt: str | None = None,
    ) -> BlipCaptioner:
        import torch
        from transformers import AutoConfig, BlipConfig, BlipForConditionalGeneration, BlipProcessor

        device = torch.device(device)
        try:
            # trust_remote_code stays off: only transformers' own BLIP code runs.
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
        except (OSError, ValueError) as error:
            raise CaptioningError(f"cannot load a model config from {name_or_path!r}: {error}") from error
        if not isinstance(config, BlipConfig):
            raise CaptioningError(
                f"{name_or_path!r} is a {type(config).__name__} ({config.model_type!r}); this tool runs BLIP "
                "captioning checkpoints (model_type 'blip'), e.g. Salesforce/blip-image-captioning-large"
            )
        try:
            # safetensors only: a pickled checkpoint from the internet can run code when it is loaded.
            model = BlipForConditionalGeneration.from_pretrained(
                name_or_path, config=config, dtype=resolve_dtype(dtype, device), use_safetensors=True
            )
            processor = BlipProcessor.from_pretrained(name_or_path)
        except OSError as error:
            raise CaptioningError(
                f"cannot load BLIP weights and processor from {name_or_path!r} (safetensors weights are required): "
                f"{error}"
            ) from error
        return cls(model.to(device), processor, generation=generation or GenerationSettings(), prompt=prompt)

    def caption(self, images: Sequence) -> list[str]:
        import torch

        if self.prompt is not None:
            # Every image gets the same prompt, so the token rows have equal length and need no padding.
            inputs = self.processor(images=list(images), text=[self.prompt] * len(images), return_tensors="pt")
        else:
            inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {name: tensor.to(self.device) for name, tensor in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            output_ids = self.model.generate(**inputs, **self.generation.generate_kwargs())
        return [caption.strip() for caption in self.processor.batch_decode(output_ids, skip_special_tokens=True)]


# ----------------------------------------------------------------------------------------------------------------
# Image loading with prefetch
# ----------------------------------------------------------------------------------------------------------------


def load_image(path: Path, target_size: int | None = None):
    """Decode ``path`` to an RGB PIL image, upright as its EXIF orientation says (`finetune.imaging.load_image`)."""
    from finetune.imaging import load_image as load

    # JPEG can decode at 1/2, 1/4, 1/8 scale: much faster for photos far larger than the model's input.
    return load(path, "RGB", draft_size=target_size)


@dataclass
class LoadedBatch:
    file_names: list[str]
    images: list
    failures: list[tuple[str, str]]


def iter_loaded_batches(
    image_dir: Path, file_names: list[str], batch_size: int, num_workers: int, target_size: int | None
) -> Iterator[LoadedBatch]:
    """Batches of decoded images; the next batch decodes in worker threads while the model runs on this one."""

    def load(file_name: str):
        try:
            return load_image(image_dir / file_name, target_size), None
        except Exception as error:  # noqa: BLE001 - any decoder error on one bad file must not stop the run
            return None, f"{type(error).__name__}: {error}"

    def submit(pool: ThreadPoolExecutor, batch: list[str]) -> tuple[list[str], list[Future]]:
        return batch, [pool.submit(load, file_name) for file_name in batch]

    batches = [file_names[start : start + batch_size] for start in range(0, len(file_names), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        in_flight: deque = deque(submit(pool, batch) for batch in batches[:2])
        next_batch = 2
        while in_flight:
            batch, futures = in_flight.popleft()
            if next_batch < len(batches):
                in_flight.append(submit(pool, batches[next_batch]))
                next_batch += 1
            loaded = LoadedBatch([], [], [])
            for file_name, future in zip(batch, futures):
                image, error = future.result()
                if image is None:
                    loaded.failures.append((file_name, error))
                else:
                    loaded.file_names.append(file_name)
                    loaded.images.append(image)
            yield loaded


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def caption_images(
    captioner: BlipCaptioner,
    image_dir: Path,
    file_names: list[str],
    options: CaptionOptions,
    writer: PartFileWriter,
    *,
    progress_description: str = "captioning",
    show_progress: bool = True,
) -> ProcessReport:
    """Caption ``file_names`` (relative to ``image_dir``) batch by batch, persisting each batch before the next."""
    from tqdm.auto import tqdm

    report = ProcessReport()
    progress = tqdm(total=len(file_names), desc=progress_description, unit="img", disable=not show_progress)
    try:
        batches = iter_loaded_batches(image_dir, file_names, options.batch_size, options.num_workers,
                                      captioner.image_size)
        for batch in batches:
            for file_name, reason in batch.failures:
                progress.write(f"skipping {file_name}: cannot read it as an image ({reason})")
            report.failed.extend(batch.failures)
            records = []
            if batch.images:
                captions = captioner.caption(batch.images)
                for file_name, caption in zip(batch.file_names, captions):
                    text = format_caption(caption, options.caption_prefix, options.caption_suffix)
                    if options.write_txt:
                        # Before the part file: if a kill lands in between, the next run finds the sidecar and keeps
                        # it as an existing caption rather than losing a caption the part file never got.
                        write_text_atomically(sidecar_path(image_dir, file_name), text + "\n")
                    records.append({"file_name": file_name, "text": text})
                writer.append(records)
                report.captioned.extend(record["file_name"] for record in records)
            progress.update(len(batch.file_names) + len(batch.failures))
            progress.set_postfix(failed=len(report.failed), refresh=False)
    finally:
        progress.close()
    return report


def caption_folder(image_dir: str | Path, options: CaptionOptions) -> CaptionSummary:
    """Caption every image under ``image_dir`` that has no caption yet, on every process of the accelerate launch,
    and merge the result into ``image_dir/metadata.jsonl``. Returns the summary (on every process)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    image_dir = Path(image_dir).resolve()
    # PartialState only sets up gloo on CPU processes when asked to: `accelerate launch --cpu` and
    # ACCELERATE_USE_CPU=1 reach Accelerator, not PartialState, and without this every process would caption all.
    use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (options.device or "").startswith("cpu")
    state = PartialState(cpu=use_cpu)
    plan = plan_run(image_dir, options)
    state_dir = image_dir / STATE_DIRNAME
    # Nobody writes before every process has read the same part files and metadata, or the plans would differ.
    state.wait_for_everyone()

    started = time.perf_counter()
    report = ProcessReport()
    if plan.to_caption:
        device = torch.device(options.device) if options.device else state.device
        torch.manual_seed(options.seed + state.process_index)  # sampling differs per process, reproducibly
        # The main process downloads the checkpoint first; the others then read it from the cache.
        with state.main_process_first():
            captioner = BlipCaptioner.from_pretrained(
                options.model, device=device, dtype=options.dtype, generation=options.generation,
                prompt=options.prompt,
            )
        started = time.perf_counter()
        with state.split_between_processes(plan.to_caption) as my_share:
            writer = PartFileWriter(state_dir / f"part-{state.process_index}.jsonl")
            try:
                description = "captioning"
                if state.num_processes > 1:
                    description += f" (process 1 of {state.num_processes}, {len(my_share)} images)"
                report = caption_images(
                    captioner, image_dir, list(my_share), options, writer,
                    progress_description=description,
                    show_progress=options.show_progress and state.is_main_process,
                )
            finally:
                writer.close()
    reports = gather_object([report])
    state.wait_for_everyone()
    seconds = time.perf_counter() - started

    entries = 0
    if state.is_main_process:
        image_set = set(plan.images)
        # Part files can outlive an image the user deleted since; an entry for a missing file would break loading.
        part_captions = {name: text for name, text in read_part_files(state_dir).items() if name in image_set}
        new_captions = {**plan.imported_sidecars, **part_captions}
        entries = merge_into_metadata(
            image_dir / METADATA_FILENAME, plan.metadata_records, new_captions, options.caption_column
        )
        # Only after metadata.jsonl holds every caption: a kill before this line just repeats the merge next time.
        shutil.rmtree(state_dir, ignore_errors=True)
    state.wait_for_everyone()

    return CaptionSummary(
        image_dir=image_dir,
        captioned=sorted(file_name for process_report in reports for file_name in process_report.captioned),
        failed=sorted(failure for process_report in reports for failure in process_report.failed),
        not_images=plan.not_images,
        skipped_existing=plan.skipped_existing,
        resumed=plan.resumed,
        imported_sidecars=len(plan.imported_sidecars),
        metadata_entries=entries,
        missing_files_in_metadata=plan.missing_files_in_metadata,
        seconds=seconds,
        num_processes=state.num_processes,
    )


def push_captioned_dataset(image_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None):
    """Load the captioned folder as a ``datasets`` imagefolder and upload it with ``Dataset.push_to_hub``.

    ``token`` defaults to the logged-in token (``hf auth login`` or ``HF_TOKEN``); it is passed on, never printed.
    """
    import datasets

    dataset = datasets.load_dataset("imagefolder", data_dir=str(image_dir), split="train")
    dataset.push_to_hub(repo_id, private=private, token=token)
    return dataset
