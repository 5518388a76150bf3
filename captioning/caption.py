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

The package, seam by seam: ``captioning.ledger`` (the files: images, existing captions, part files, metadata, and the
plan a run follows), ``captioning.model`` (BLIP and its generation settings), ``captioning.loader`` (images decoded in
worker threads), this module (the options, the run across processes, the summary, the Hub push) and
``captioning.__main__`` (the command line). Every name this module had is still importable from here.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from captioning.errors import CaptioningError
from captioning.ledger import (
    IMAGE_SUFFIXES,
    METADATA_FILENAME,
    METADATA_FILENAMES,
    RERUN,
    SIDECAR_SUFFIX,
    STATE_DIRNAME,
    CaptionPlan,
    PartFileWriter,
    captioned_file_names,
    discover_files,
    has_caption,
    merge_into_metadata,
    normalize_file_name,
    plan_run,
    read_metadata,
    read_part_files,
    read_sidecar,
    sidecar_path,
    write_text_atomically,
)
from captioning.loader import LoadedBatch, iter_loaded_batches, load_image
from captioning.model import (
    DECODING_CHOICES,
    DEFAULT_MODEL,
    DTYPE_CHOICES,
    BlipCaptioner,
    GenerationSettings,
    resolve_dtype,
)

__all__ = [
    "DECODING_CHOICES",
    "DEFAULT_MODEL",
    "DTYPE_CHOICES",
    "IMAGE_SUFFIXES",
    "METADATA_FILENAME",
    "METADATA_FILENAMES",
    "RERUN",
    "SIDECAR_SUFFIX",
    "STATE_DIRNAME",
    "BlipCaptioner",
    "CaptionOptions",
    "CaptionPlan",
    "CaptionSummary",
    "CaptioningError",
    "GenerationSettings",
    "LoadedBatch",
    "PartFileWriter",
    "ProcessReport",
    "caption_folder",
    "caption_images",
    "captioned_file_names",
    "discover_files",
    "format_caption",
    "has_caption",
    "iter_loaded_batches",
    "load_image",
    "merge_into_metadata",
    "normalize_file_name",
    "plan_run",
    "push_captioned_dataset",
    "read_metadata",
    "read_part_files",
    "read_sidecar",
    "resolve_dtype",
    "sidecar_path",
    "write_text_atomically",
]


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
# The run
# ----------------------------------------------------------------------------------------------------------------


def format_caption(caption: str, prefix: str, suffix: str) -> str:
    """Trigger words and the caption, joined by single spaces (write "sks toy," to get a comma)."""
    return " ".join(part for part in (prefix.strip(), caption.strip(), suffix.strip()) if part)


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
        batches = iter_loaded_batches(
            image_dir, file_names, options.batch_size, options.num_workers, captioner.image_size
        )
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
                options.model,
                device=device,
                dtype=options.dtype,
                generation=options.generation,
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
                    captioner,
                    image_dir,
                    list(my_share),
                    options,
                    writer,
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
