"""The captioning ledger: which images a folder holds, which already have a caption (``metadata.jsonl`` entries,
``.txt`` sidecars, the part files of an interrupted run), the part file each process appends to, and the atomic merge
into ``metadata.jsonl`` at the end; and the plan a run follows, computed from those files. Every process computes the
same plan from the same files, so every process agrees on the list that ``split_between_processes`` divides.

Why it is safe to kill a run at any moment is told in ``captioning.caption``'s docstring.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from captioning.errors import CaptioningError
from finetune.atomic import atomic_write_text, reporting_write_errors
from finetune.imaging import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from captioning.caption import CaptionOptions

METADATA_FILENAME = "metadata.jsonl"
STATE_DIRNAME = ".captioning"
SIDECAR_SUFFIX = ".txt"
IMAGE_SUFFIXES = frozenset(IMAGE_EXTENSIONS)  # the one list (finetune.imaging)
# Files an image folder may legitimately hold besides images; never reported as "not an image".
METADATA_FILENAMES = frozenset({"metadata.jsonl", "metadata.csv", "metadata.parquet"})

# what to do after a write failed: the captions written so far are kept, and a new run captions only the rest
RERUN = "run the command again (captions written so far are kept)"


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
# The plan: what this run captions, skips and imports
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
        raise CaptioningError(f"no images found under {image_dir} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
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
