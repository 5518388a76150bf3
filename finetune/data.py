"""Data: image folders, Hub datasets and the embedded digits through `datasets`, with PIL/numpy transforms.

Every random choice made for an example (crop, flip, caption choice, caption dropout, and the diffusion noise
later) is drawn from a generator seeded by (seed, epoch, example index). Augmentation then does not depend on which
process loads the example, how batches are split, or whether the run was resumed: exact resume and multi-process
equivalence follow from it.

The front door of a local folder is ours, not `datasets`': metadata.jsonl / metadata.csv / metadata.parquet and .txt
captions are read line by line (`scan_folder`), so a bad line is reported with its file and line number and skipped
or, with `data.bad_metadata=error`, stops the job with that message; captions are checked at start only when the
method uses them; images the metadata does not list are used or skipped (`data.unlisted_images`); images over
`data.max_image_pixels` are never decoded whole. One summary line at start says what was found and what was left out.
"""

from __future__ import annotations

import codecs
import copy
import csv
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from finetune.buckets import Bucket, BucketPlan, bucket_name, cover_geometry
from finetune.conditioning import ConditioningImages, listed_conditioning_files
from finetune.config import ConfigError, DataConfig
from finetune.errors import RunError
from finetune.imaging import (
    EXIF_ORIENTATION,
    IMAGE_EXTENSIONS,
    ImageTooLarge,
    crop_geometry,
    image_to_tensor,
    open_image,
    record_path,
    size_conditioning,
)
from finetune.masks import LossMasks, is_loss_mask_file

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
VERIFY_CHUNK = 64  # images per task of the verification's thread pool
DETAIL_LINES = 20  # problems logged one by one at WARNING; past this many, at INFO (the summary has the count)


def _describe(source: Any, index: int) -> str:
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"example {index}"


def process_split() -> tuple[int, int]:
    """(this process's rank, the number of processes) of a launched job; (0, 1) outside one (tests, `difftune plan`,
    a job before its Accelerator exists)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def file_state(source: Any) -> tuple[str, list[int]] | None:
    """(path, [size, modification time in ns]) of an image record that is a file; None for bytes or a missing file."""
    path = record_path(source)
    if path is None or (isinstance(source, dict) and source.get("bytes")):
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return path, [stat.st_size, stat.st_mtime_ns]


def read_verified(memo: Path | None, max_pixels: int | None) -> dict[str, list]:
    """What earlier runs' verification found (`find_unreadable_images`' memo): path -> [size, mtime_ns, reason or
    None]; {} without a memo, or for one made with another data.max_image_pixels (its 'too large' verdicts)."""
    if memo is None:
        return {}
    try:
        saved = json.loads(memo.read_text())
    except (OSError, ValueError):  # none yet, or damaged: everything is checked (and the memo rewritten)
        return {}
    if not isinstance(saved, dict) or saved.get("max_image_pixels") != max_pixels:
        return {}
    files = saved.get("files")
    return files if isinstance(files, dict) else {}


def find_unreadable_images(
    sources: Sequence[Any], num_threads: int = 8, max_pixels: int | None = None, memo: Path | None = None
) -> list[tuple[int, str, str]]:
    """Check every image (`imaging.check_image`: PNG chunks verified, JPEG decoded at 1/8 scale, other formats
    decoded); return (index, name, reason) for the ones that cannot be read (or, with `max_pixels`, are too large:
    their reason starts with 'too large'), in index order. With N processes each checks every N-th image (its share)
    and the findings are gathered (accelerate's `gather_object`), so every process returns the same list: every
    process must call this, with the same sources. The main process shows a bar over its share (images/s, ETA) and
    logs start and end.

    With a `memo` file (a disk cache's folder), a file whose size and modification time are those it had when it was
    last checked keeps that verdict without being opened (the proxy the caches' fingerprints, `datasets` and kohya
    use for "unchanged"): a reused cache of 100k images does not re-read 100k headers. The main process rewrites the
    memo when anything was checked."""
    import time

    from finetune.imaging import check_image
    from finetune.latent_cache import format_rate, progress_bar

    def check(item: tuple[int, Any]):
        index, source = item
        try:
            check_image(source, max_pixels)
            return None
        except ImageTooLarge as err:
            return index, _describe(source, index), str(err)
        except Exception as err:  # noqa: BLE001 - any decoding failure means: skip this file
            return index, _describe(source, index), f"{type(err).__name__}: {err}"

    known = read_verified(memo, max_pixels)

    def check_chunk(chunk: list[tuple[int, Any]]) -> tuple[list[tuple[int, str, str]], dict[str, list], int]:
        """The chunk's findings, its files' new memo entries, and how many were checked (not known unchanged)."""
        found, entries, checked = [], {}, 0
        for index, source in chunk:
            state = file_state(source) if memo is not None else None
            before = known.get(state[0]) if state is not None else None
            if before is not None and before[:2] == state[1]:
                bad = None if before[2] is None else (index, _describe(source, index), before[2])
            else:
                bad, checked = check((index, source)), checked + 1
                if state is not None:
                    entries[state[0]] = [*state[1], None if bad is None else bad[2]]
            if bad is not None:
                found.append(bad)
        return found, entries, checked

    rank, world = process_split()
    main = rank == 0
    share = [(index, sources[index]) for index in range(rank, len(sources), world)]  # interleaved: even in any order
    if main:
        on = f" on {world} processes ({len(share)} on each)" if world > 1 else ""
        logger.info("data: verifying %d images (data.verify_images)%s", len(sources), on)
    start, found, entries, checked = time.perf_counter(), [], {}, 0
    description = "verifying" if world == 1 else f"verifying (this process's 1/{world})"
    # in chunks: a small PNG checks in ~0.1 ms, about what a thread pool's future costs (threads still help where the
    # decoder releases the GIL: JPEGs, large files)
    chunks = [share[first : first + VERIFY_CHUNK] for first in range(0, len(share), VERIFY_CHUNK)]
    with ThreadPoolExecutor(max_workers=num_threads) as pool, progress_bar(len(share), description, main) as bar:
        for chunk, (bad, new, count) in zip(chunks, pool.map(check_chunk, chunks)):
            bar.update(len(chunk))
            found += bad
            entries.update(new)
            checked += count
    if world > 1:  # every process gets every process's findings: all of them keep the same examples
        from accelerate.utils import gather_object

        gathered = gather_object([(found, entries, checked)])
        found = sorted(bad for part, _, _ in gathered for bad in part)
        entries = {path: entry for _, part, _ in gathered for path, entry in part.items()}
        checked = sum(count for _, _, count in gathered)
    if main:
        unchanged = f", {len(sources) - checked} unchanged since they were last checked" if memo is not None else ""
        logger.info(
            "data: verified %s, %d unreadable or too large%s",
            format_rate(len(sources), time.perf_counter() - start),
            len(found),
            unchanged,
        )
        if memo is not None and entries:
            from finetune import atomic

            memo.parent.mkdir(parents=True, exist_ok=True)
            saved = {"max_image_pixels": max_pixels, "files": {**known, **entries}}
            atomic.atomic_write_text(memo, json.dumps(saved), then="run the training again")
    return found


# ---------------------------------------------------------------------------------------------------------------------
# the front door of a folder: metadata and captions read by us, line by line
# ---------------------------------------------------------------------------------------------------------------------
class Records:
    """Columns of equal length as plain lists: the part of `datasets.Dataset` ImageRecords uses. A folder's rows come
    from our own reading of its metadata, so a caption that is a number on line 13 never meets pyarrow's typed
    columns; `report` says what the reading found."""

    def __init__(self, columns: dict[str, list], report: DataReport | None = None):
        self.columns, self.report = columns, report

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    def __getitem__(self, column: str) -> list:
        return self.columns[column]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def select(self, indices) -> Records:
        indices = list(indices)
        return Records({name: [values[i] for i in indices] for name, values in self.columns.items()}, self.report)


@dataclass
class Problem:
    """One bad metadata line / row / caption file: where (file and line) and what is wrong."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class DataReport:
    """What reading a folder or dataset found: the one summary line at start and its details."""

    source: str
    total: int = 0  # image files in the folder (readable or not) / rows of a dataset
    metadata: str | None = None  # 'metadata.jsonl', ..., '.txt captions' or None
    uses_captions: bool = False
    unlisted_policy: str = "use"
    unlisted_rows: set[int] = field(default_factory=set)  # rows of unlisted images (kept with 'use')
    unlisted_skipped: list[str] = field(default_factory=list)
    bad: list[Problem] = field(default_factory=list)
    bad_noun: str = "line"
    excluded_rows: set[int] = field(default_factory=set)  # rows left out for a bad value (datasets, not folders)
    notes: list[str] = field(default_factory=list)  # logged, not counted: folders named like images, ignored files


MISSING = object()


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def caption_problem(value: Any, column: str) -> str | None:
    """Why `value` cannot be a caption (text, or a non-empty list of texts: one is drawn each time), or None."""
    if value is MISSING:
        return f"no caption: no {column!r} key (data.caption_column)"
    if value is None:
        return f"caption {column!r} is null or empty"
    if isinstance(value, str):
        return None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            return f"caption {column!r} is an empty list"
        other = next(v for v in value if not isinstance(v, str))
        return f"caption {column!r} is a list holding {_kind(other)}, not only text"
    return f"caption {column!r} is {_kind(value)}, not text"


def label_problem(value: Any, column: str) -> str | None:
    """Why `value` cannot be an integer class label, or None."""
    if value is MISSING:
        return f"no {column!r} key (data.label_column)"
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return None
    return f"label {column!r} is {_kind(value) if not isinstance(value, str) else repr(value)}, not an integer"


def value_problem(value: Any, column: str) -> str | None:
    if value is MISSING:
        return f"no {column!r} key"
    if value is None:
        return f"{column!r} is null"
    return None


def column_checks(config: DataConfig, columns: Sequence[str]) -> dict[str, Callable[[Any, str], str | None]]:
    """The per-row check of each column a method asked for (the image column is checked by decoding)."""
    checks = {}
    for column in columns:
        if column == config.image_column:
            continue
        if column == config.caption_column:
            checks[column] = caption_problem
        elif column == config.label_column:
            checks[column] = label_problem
        else:
            checks[column] = value_problem
    return checks


def _is_main_process() -> bool:
    # data code runs before (and without) an Accelerator in tests; the launcher's RANK says which process this is
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def _bad(report: DataReport, policy: str, problem: Problem, fix: str) -> None:
    """Count a bad line (skip), or stop at it (error) with the message naming the file and line."""
    if policy == "error":
        raise ConfigError(
            f"data: {problem.where} in {report.source}: {problem.reason}. {fix}, or set data.bad_metadata=skip to "
            f"skip bad {report.bad_noun}s (they are counted)"
        )
    report.bad.append(problem)


def _decode_utf16(raw: bytes) -> str | None:
    """Whole-file text for UTF-16 files (a BOM says so), else None: UTF-8 is decoded line by line by the caller.
    Raises ValueError (the reason) for a UTF-16 BOM on something that is not UTF-16."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"starts with a UTF-16 byte-order mark but is not valid UTF-16 ({err.reason} at byte {err.start}); "
                "save it as UTF-8"
            ) from err
    return None


def _decode_text(raw: bytes, path: Path) -> str | None:
    try:
        return _decode_utf16(raw)
    except ValueError as err:
        raise ConfigError(f"data: {str(path)!r} {err}") from err


def _utf8_problem(err: UnicodeDecodeError, line: bytes) -> str:
    hint = " (it looks like UTF-16 without a byte-order mark: save the file as UTF-8)" if b"\x00" in line else ""
    return f"not valid UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1}){hint}"


def _text_lines(path: Path, name: str) -> list[tuple[int, str | Problem]]:
    """(line number, text) of every non-blank line; a line that is not UTF-8 comes as a Problem. A UTF-8 BOM is
    dropped, UTF-16 with a BOM is read as such."""
    raw = path.read_bytes()
    text = _decode_text(raw, path)
    if text is not None:
        return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    lines = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            lines.append((number, Problem(f"{name} line {number}", _utf8_problem(err, line))))
            continue
        if "\x00" in text:  # valid UTF-8, but no text file holds NULs: UTF-16 (ASCII-range) without a BOM
            text = Problem(
                f"{name} line {number}",
                "holds NUL bytes: it looks like UTF-16 without a byte-order mark (save the file as UTF-8)",
            )
        lines.append((number, text))
    return lines


def read_jsonl(path: Path, name: str) -> list[tuple[str, dict | Problem]]:
    rows = []
    for number, line in _text_lines(path, name):
        where = f"{name} line {number}"
        if isinstance(line, Problem):
            rows.append((where, line))
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append((where, Problem(where, f"not JSON: {err.msg} (column {err.colno})")))
            continue
        if not isinstance(value, dict):
            rows.append((where, Problem(where, f"not a JSON object but {_kind(value)}")))
            continue
        rows.append((where, value))
    return rows


def read_csv(path: Path, name: str) -> list[tuple[str, dict | Problem]]:
    """Rows of a CSV with a header line; cells are text (an empty caption cell is no caption), other columns whose
    every cell is an integer become integers (as `datasets` would read them)."""
    raw = path.read_bytes()
    text = _decode_text(raw, path)
    if text is None:
        text = raw.decode("utf-8-sig", errors="surrogateescape")  # undecodable bytes are reported per row below
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, header, previous = [], None, 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            rows.append(
                (f"{name} line {reader.line_num}", Problem(f"{name} line {reader.line_num}", f"not CSV ({err})"))
            )
            if reader.line_num == previous:
                break  # the reader cannot get past it
            previous = reader.line_num
            continue
        first, previous = previous + 1, reader.line_num
        where = f"{name} line {first}"
        if not any(c.strip() for c in cells):
            continue
        bad_text = next((c for c in cells if any("\udc80" <= ch <= "\udcff" for ch in c)), None)
        if bad_text is not None:
            line = bad_text.encode("utf-8", errors="surrogateescape")
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                rows.append((where, Problem(where, _utf8_problem(err, line))))
            continue
        if header is None:
            header = [c.strip() for c in cells]
            continue
        if len(cells) != len(header):
            rows.append((where, Problem(where, f"{len(cells)} fields, the header line has {len(header)}")))
            continue
        rows.append((where, dict(zip(header, cells))))
    objects = [row for _, row in rows if isinstance(row, dict)]
    for column in header or []:
        cells = [row[column] for row in objects if row[column].strip()]
        numeric = bool(cells) and all(c.strip().lstrip("-").isdigit() for c in cells)
        for row in objects:
            if column == "file_name":
                continue
            if not row[column].strip():
                row[column] = None
            elif numeric:
                row[column] = int(row[column])
    return rows


def read_parquet(path: Path, name: str) -> list[tuple[str, dict | Problem]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - any failure to read it is a bad file, reported in one line
        raise ConfigError(f"data: {name} cannot be read as Parquet ({type(err).__name__}: {err})") from err
    return [(f"{name} row {i + 1}", row) for i, row in enumerate(table.to_pylist())]


READERS = {"metadata.jsonl": read_jsonl, "metadata.csv": read_csv, "metadata.parquet": read_parquet}


def _image_files(
    folder: Path, report: DataReport, masks: bool = False, text_files: set[str] | None = None
) -> list[str]:
    """Relative paths of the files named like images, sorted; hidden files and folders are left out (as `datasets`
    does), and with `masks` the loss masks beside them (`<name>.mask.png`). Links are not followed into folders (no
    loops); a link that leads nowhere stays, to be counted as unreadable. A folder named like an image is noted and
    searched like any folder. `text_files` receives the relative paths of the .txt files seen on the way (caption
    files: one listing, not a stat per image). Plain strings, not Paths: 100k names take 0.2 s, not 2 s."""
    found = []
    for root, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        relative_root = os.path.relpath(root, folder)
        prefix = "" if relative_root == "." else relative_root.replace(os.sep, "/") + "/"
        for name in dirnames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                report.notes.append(f"{prefix}{name}/ is a folder, not an image")
        for name in filenames:
            if name.startswith("."):
                continue
            extension = os.path.splitext(name)[1].lower()
            if extension == ".txt" and text_files is not None:
                text_files.add(prefix + name)
            if masks and is_loss_mask_file(name):
                continue
            if extension in IMAGE_EXTENSIONS:
                found.append(prefix + name)
    return sorted(found)


def _caption_file(relative: str) -> str:
    """The .txt caption beside an image (kohya's format): `a/b.png` -> `a/b.txt`, as Path.with_suffix does."""
    return os.path.splitext(relative)[0] + ".txt"


def _listed_file(value: Any, folder: Path) -> tuple[str | None, str | None]:
    """(relative path, None) of a metadata file_name, or (None, why it cannot be used)."""
    if value is MISSING:
        return None, "no 'file_name' key"
    if not isinstance(value, str) or not value.strip():
        return None, f"file_name is {_kind(value) if not isinstance(value, str) else 'empty'}, not a file name"
    relative = os.path.normpath(value.strip()).replace(os.sep, "/")
    if os.path.isabs(relative) or relative == ".." or relative.startswith("../"):
        return None, f"file_name {value!r} is outside the folder"
    path = folder / relative
    if path.is_dir():
        return None, f"file_name {value!r} is a folder, not an image file"
    if not os.path.lexists(path):
        return None, f"file_name {value!r}: no such file in {str(folder)!r}"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return None, f"file_name {value!r} is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))})"
    return relative, None


def scan_folder(folder: Path, config: DataConfig, columns: Sequence[str] = ()) -> Records:
    """An image folder's rows, read by us: image paths plus the metadata's columns (or .txt captions).

    Every bad metadata line / caption file is counted in the report (or, with data.bad_metadata=error, stops the
    job naming file:line); the image it names is left out. The columns in `columns` are checked on every line (a
    caption must be text); the others come along unchecked, so a method that does not use captions never fails on
    one. Images the metadata does not list follow data.unlisted_images.
    """
    report = DataReport(str(folder), unlisted_policy=config.unlisted_images)
    text_files: set[str] = set()
    images = _image_files(folder, report, masks=config.masked_loss, text_files=text_files)
    report.total = len(images)
    checks = column_checks(config, columns)
    report.uses_captions = config.caption_column in checks
    metadata = [name for name in METADATA_FILES if (folder / name).is_file()]
    values: dict[str, dict] = {}  # relative path -> its metadata values
    excluded: set[str] = set()  # images named by a bad line
    listed = metadata or (report.uses_captions and any(_caption_file(i) in text_files for i in images))
    keys: set[str] = set()  # the metadata's columns (any line that is a JSON object: a column no line has is unknown)
    if metadata:
        name = metadata[0]
        report.metadata = name
        report.notes += [f"{other} ignored: {name} is read (one metadata file per folder)" for other in metadata[1:]]
        values, excluded, keys = _read_metadata(folder, name, config, checks, report)
    elif listed:  # kohya's format: a .txt caption beside each image
        report.metadata, report.bad_noun = ".txt captions", "caption file"
        values, excluded = _read_sidecars(folder, images, config, report, text_files)
        keys = {config.caption_column}
    if config.masked_loss:  # the loss masks the metadata names are not training images either
        masks = {v.get(config.loss_mask_column) for v in values.values()}
        images = [i for i in images if i not in masks]
    if config.conditioning_image_column in columns:  # conditioning images, and the subfolders holding them, too
        kept = _without_conditioning_files(images, [v.get(config.conditioning_image_column) for v in values.values()])
        report.total -= len(images) - len(kept)
        images = kept
    paths = sorted((set(images) | set(values)) - excluded)
    unlisted = [p for p in paths if p not in values] if listed else []
    if config.label_column in checks and unlisted:
        report.unlisted_policy = "skip"  # an image without a line has no class label: it cannot be used
    if unlisted and report.unlisted_policy == "skip":
        report.unlisted_skipped = unlisted
        paths = [p for p in paths if p in values]
    keys = sorted(keys - {"file_name", config.image_column})
    root = str(folder)  # (as str(folder / p) spells it: the paths are in the cache's fingerprint)
    table: dict[str, list] = {config.image_column: [os.path.join(root, p.replace("/", os.sep)) for p in paths]}
    for key in keys:
        # an unlisted image has no caption: the empty prompt (kohya's behaviour); other columns have no value
        blank = "" if key == config.caption_column else None
        table[key] = [values[p].get(key, blank) if p in values else blank for p in paths]
    report.unlisted_rows = {i for i, p in enumerate(paths) if listed and p not in values}
    return Records(table, report)


def _without_conditioning_files(images: list[str], listed: list[Any]) -> list[str]:
    """The training images of a folder without the conditioning images its metadata names, nor any other image in a
    subfolder holding them (a conditioning/ folder is not training data, listed or not)."""
    named = {os.path.normpath(name).replace(os.sep, "/") for name in listed_conditioning_files(listed)}
    folders = {Path(name).parent for name in named} - {Path(".")}

    def is_training_image(image: str) -> bool:
        parent = Path(image).parent
        return image not in named and not any(folder == parent or folder in parent.parents for folder in folders)

    return [image for image in images if is_training_image(image)]


def _read_metadata(
    folder: Path, name: str, config: DataConfig, checks: dict, report: DataReport
) -> tuple[dict[str, dict], set[str], set[str]]:
    policy, fix = config.bad_metadata, "Fix or delete the line"
    rows = READERS[name](folder / name, name)
    report.bad_noun = "row" if name.endswith(".parquet") else "line"
    objects = [row for _, row in rows if isinstance(row, dict)]
    keys = {key for row in objects for key in row}
    if objects and "file_name" not in keys:
        raise ConfigError(
            f"data: {str(folder / name)!r}: no line has a 'file_name' key (keys found: {', '.join(sorted(keys))}). "
            'Name each image in it, e.g. {"file_name": "0001.png", "' + config.caption_column + '": "a caption"}'
        )
    if checks and rows and not objects:
        first = next(row for _, row in rows if isinstance(row, Problem))
        raise ConfigError(
            f"data: {str(folder / name)!r} has no usable line ({len(rows)} bad, first {first}). Each line must be "
            '{"file_name": "<image>", "' + config.caption_column + '": "<caption>"} (UTF-8)'
        )
    # a column no line has is a wrong column name, not a bad line: require_columns names it with the valid ones
    checks = {column: check for column, check in checks.items() if column in keys}
    values: dict[str, dict] = {}
    first_line: dict[str, str] = {}
    excluded: set[str] = set()
    for where, row in rows:
        if isinstance(row, Problem):
            _bad(report, policy, row, fix)
            continue
        relative, why = _listed_file(row.get("file_name", MISSING), folder)
        if why is None and relative in first_line:
            why = f"file_name {relative!r} repeats {first_line[relative]} (the first one is used)"
            relative = None
        if why is None:
            why = next((p for c, check in checks.items() if (p := check(row.get(c, MISSING), c))), None)
            if why is not None:
                excluded.add(relative)
        if why is not None:
            _bad(report, policy, Problem(where, why), fix)
            continue
        first_line[relative] = where.split(" ", 1)[1]
        values[relative] = {k: v for k, v in row.items() if k != "file_name"}
    return values, excluded - set(values), keys


def _read_sidecars(
    folder: Path, images: list[str], config: DataConfig, report: DataReport, text_files: set[str]
) -> tuple[dict[str, dict], set[str]]:
    values: dict[str, dict] = {}
    excluded: set[str] = set()
    root = str(folder)
    for relative in images:
        where = _caption_file(relative)
        if where not in text_files:
            continue
        try:
            with open(os.path.join(root, where), "rb") as handle:
                raw = handle.read()
        except (FileNotFoundError, IsADirectoryError):  # a link to nothing or to a folder: no caption file, as before
            continue
        except OSError as err:
            problem = Problem(where, f"cannot be read ({type(err).__name__}: {err.strerror or err})")
        else:
            try:
                text = _decode_utf16(raw)
                if text is None:  # (not the "utf-8-sig" codec: a Python-level decoder, 10x slower per file)
                    text = raw[len(codecs.BOM_UTF8) :] if raw.startswith(codecs.BOM_UTF8) else raw
                    text = text.decode("utf-8")
            except UnicodeDecodeError as err:
                problem = Problem(where, _utf8_problem(err, raw))
            except ValueError as err:
                problem = Problem(where, str(err))
            else:
                values[relative] = {config.caption_column: text.strip()}
                continue
        excluded.add(relative)
        _bad(report, config.bad_metadata, problem, "Fix or delete the caption file")
    return values, excluded


def check_dataset_columns(records, config: DataConfig, columns: Sequence[str], report: DataReport) -> None:
    """Rows of a Hub (or other `datasets`) dataset whose caption / label is not usable: counted and left out, or
    with data.bad_metadata=error the first one stops the job. Found at start, never mid-training."""
    report.bad_noun = "row"
    for column, check in column_checks(config, columns).items():
        if column not in records.column_names:
            continue
        for row, value in enumerate(records[column]):
            why = check(value, column)
            if why is not None and row not in report.excluded_rows:
                _bad(report, config.bad_metadata, Problem(f"row {row}", why), "Fix the row")
                report.excluded_rows.add(row)


def load_records(config: DataConfig, dataset: str | None = None, columns: Sequence[str] = ()):
    """The rows of an image folder (read by `scan_folder`) or a Hub dataset (a `datasets.Dataset` with its image
    column undecoded). `columns` are the columns the method uses: they are checked on every row."""
    name = dataset or config.dataset
    folder = Path(name).expanduser()
    if folder.is_dir():
        records = scan_folder(folder, config, columns)
        if not records.report.total:
            raise ConfigError(
                f"data.dataset: the folder {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        return records
    if name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name):
        raise ConfigError(f"data.dataset: the folder {name!r} does not exist")
    import datasets

    try:
        records = datasets.load_dataset(name, config.dataset_config_name, split=config.split)
    except Exception as err:  # noqa: BLE001 - not found, offline, no such split: one line, not a traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(
            f"data.dataset: cannot load the dataset {name!r} (split {config.split!r}): {type(err).__name__}: {first}"
        ) from err
    for column in {config.image_column, *columns}:  # images (and conditioning images) decoded by us, when used
        if column in records.column_names and isinstance(records.features.get(column), datasets.Image):
            records = records.cast_column(column, datasets.Image(decode=False))
    return records


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def require_columns(records, columns: dict[str, str], source: str) -> None:
    """Fail with the list of available columns when a configured column is missing."""
    for column, option_name in columns.items():
        if column not in records.column_names:
            raise ConfigError(
                f"{option_name}: column {column!r} not found in {source!r}. Available columns: "
                f"{', '.join(records.column_names)}. Set {option_name}=<one of them>."
            )


def _names(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(Path(i).name if "/" in i or os.sep in i else i for i in items[:limit])
    return shown + (f", +{len(items) - limit} more" if len(items) > limit else "")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class ImageRecords(torch.utils.data.Dataset):
    """Images (and chosen columns) of a folder or dataset, with unreadable and too large images dropped and counted,
    and rows a report excludes left out; logs the one summary line of what was found."""

    def __init__(
        self,
        records,
        config: DataConfig,
        channels: int,
        columns: Sequence[str] = (),
        source: str = "",
        report: DataReport | None = None,
        verify_memo: Path | None = None,
    ):
        source = source or config.dataset
        require_columns(records, {config.image_column: "data.image_column"}, source)
        report = report or getattr(records, "report", None)
        total = len(records)
        if config.max_samples is not None:
            records = records.select(range(min(config.max_samples, len(records))))
        self.config = config
        self.channels = channels
        self.columns = list(columns)
        self.source_name = source
        self.report = report
        self.image_sources = records[config.image_column]
        self.column_values = {c: records[c] for c in self.columns}
        mask_column = config.loss_mask_column
        if config.masked_loss and mask_column not in self.columns and mask_column in records.column_names:
            self.column_values[mask_column] = records[mask_column]  # (read by LossMasks, not put in examples)
        # a conditioning image (method controlnet) comes cut with its image, not as the column's value
        conditioning = config.conditioning_image_column
        self.conditioning_column = conditioning if conditioning in self.columns else None
        excluded = report.excluded_rows if report is not None else set()
        self.indices = [i for i in range(len(records)) if i not in excluded]
        self.skipped: list[tuple[int, str, str]] = []
        self.too_large: list[tuple[int, str, str]] = []
        self.failed_rows: set[int] = set()  # rows that could not be read during training (replaced, see get)
        self.decode_pixels = True  # False once a latent cache holds every image: get() then returns no pixels
        self.image_sizes: dict[int, tuple[int, int]] = {}  # (w, h) of each row once seen (size conditioning)
        self.row_buckets: dict[int, Bucket] | None = None  # row -> bucket (w, h) once `use_buckets` has run
        if config.verify_images:
            found = find_unreadable_images(
                [self.image_sources[i] for i in self.indices], max_pixels=config.max_image_pixels, memo=verify_memo
            )
            found = [(self.indices[i], name, reason) for i, name, reason in found]
            self.too_large = [bad for bad in found if bad[2].startswith("too large")]
            self.skipped = found
            bad = {index for index, _, _ in found}
            self.indices = [i for i in self.indices if i not in bad]
            unreadable = [bad for bad in found if not bad[2].startswith("too large")]
            if unreadable and _is_main_process():
                logger.warning(
                    "skipped %d unreadable image(s) of %d: %s%s",
                    len(unreadable),
                    len(records),
                    ", ".join(name for _, name, _ in unreadable[:5]),
                    " ..." if len(unreadable) > 5 else "",
                )
        if config.aspect_buckets:  # each image's bucket needs its size: read from its header, once, here
            self.read_sizes(len(records))
        cut = total - len(records)
        summary = self.summary(cut)
        if report is not None and _is_main_process():
            self.log_details()
            anything_left_out = report.bad or report.unlisted_skipped or self.skipped or cut or report.unlisted_rows
            logger.log(logging.WARNING if anything_left_out else logging.INFO, "%s", summary)
        if not self.indices:
            what = (
                "readable" if self.skipped and not (report and (report.bad or report.unlisted_skipped)) else "usable"
            )
            raise ConfigError(f"data.dataset: {source!r} has no {what} images ({summary.split(': ', 1)[1]})")
        if report is not None and report.uses_captions and report.metadata and not self.captioned_count():
            raise ConfigError(
                f"data.dataset: none of the images in {source!r} has a usable caption ({summary.split(': ', 1)[1]}). "
                f"Fix the captions ({report.metadata}), or set data.caption_column to the column that holds them"
            )

    def read_sizes(self, total: int, num_threads: int = 8) -> None:
        """Every image's (w, h) from its header (`image_size`: nothing decoded); one whose header cannot be read is
        skipped and counted as unreadable (or too large), as `data.verify_images` would."""

        def read(row: int):
            try:
                width, height = self.image_size(row)
                if width < 1 or height < 1:
                    raise ValueError("empty image")
                return None
            except Exception as err:  # noqa: BLE001 - any failure to read the header means: skip this file
                reason = str(err) if isinstance(err, ImageTooLarge) else f"{type(err).__name__}: {err}"
                return row, _describe(self.image_sources[row], row), reason

        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            found = [bad for bad in pool.map(read, self.indices) if bad is not None]
        if not found:
            return
        self.skipped += found
        self.too_large += [bad for bad in found if bad[2].startswith("too large")]
        bad = {row for row, _, _ in found}
        self.indices = [i for i in self.indices if i not in bad]
        unreadable = [bad for bad in found if not bad[2].startswith("too large")]
        if unreadable and _is_main_process():
            logger.warning(
                "skipped %d unreadable image(s) of %d: %s%s",
                len(unreadable),
                total,
                ", ".join(name for _, name, _ in unreadable[:5]),
                " ..." if len(unreadable) > 5 else "",
            )

    # -- aspect-ratio buckets (finetune/buckets.py) ------------------------------------------------------------------
    def can_use_buckets(self) -> bool:
        return True

    def use_buckets(self, plan: BucketPlan) -> None:
        """Put every image in its bucket (from its size); with data.bucket_no_upscale an image under one bucket step
        is left out, with a warning naming it."""
        buckets = {row: plan.bucket_for(self.image_size(row)) for row in self.indices}
        small = [row for row in self.indices if buckets[row] is None]
        if small and _is_main_process():
            logger.warning(
                "data: %d image(s) smaller than one bucket step (%d px) left out (data.bucket_no_upscale): %s",
                len(small),
                plan.step,
                _names([_describe(self.image_sources[row], row) for row in small]),
            )
        self.indices = [row for row in self.indices if buckets[row] is not None]
        if not self.indices:
            raise ConfigError(
                f"data.bucket_no_upscale: every image of {self.source_name!r} is smaller than one bucket step "
                f"({plan.step} px); set data.bucket_no_upscale=false"
            )
        self.row_buckets = {row: bucket for row, bucket in buckets.items() if bucket is not None}

    def example_buckets(self) -> list[Bucket]:
        """The bucket of each example (index), after `use_buckets`."""
        return [self.row_buckets[row] for row in self.indices]

    def bucket_images(self) -> Counter:
        return Counter(self.example_buckets())

    def captioned_count(self) -> int:
        unlisted = self.report.unlisted_rows if self.report is not None else set()
        return sum(1 for i in self.indices if i not in unlisted)

    def summary(self, cut: int = 0) -> str:
        """'data: 16 images in ./photos: 12 with captions, 2 not listed in metadata.jsonl (used without caption),
        1 unreadable (truncated.png), 1 line skipped (metadata.jsonl line 16: not JSON)'"""
        report = self.report
        if report is None:
            return f"data: {len(self.indices)} examples from {self.source_name}"
        noun = "images in" if Path(report.source).is_dir() else "rows of"
        parts = []
        unlisted_used = sum(1 for i in self.indices if i in report.unlisted_rows)
        listed_used = len(self.indices) - unlisted_used
        if report.uses_captions:
            parts.append(f"{listed_used} with captions")
        else:
            parts.append(f"{len(self.indices)} used")
        where = "a .txt caption" if report.metadata == ".txt captions" else report.metadata
        if report.uses_captions and unlisted_used:
            without = "without a .txt caption" if report.metadata == ".txt captions" else f"not listed in {where}"
            parts.append(f"{unlisted_used} {without} (used without caption)")
        if report.unlisted_skipped:
            without = "without a .txt caption" if report.metadata == ".txt captions" else f"not listed in {where}"
            why = "data.unlisted_images=skip" if self.config.unlisted_images == "skip" else "no label"
            parts.append(f"{len(report.unlisted_skipped)} {without} (skipped: {why})")
        unreadable = [name for _, name, reason in self.skipped if not reason.startswith("too large")]
        if unreadable:
            parts.append(f"{len(unreadable)} unreadable ({_names(unreadable)})")
        if self.too_large:
            parts.append(
                f"{len(self.too_large)} over data.max_image_pixels ({_names([n for _, n, _ in self.too_large])})"
            )
        if report.bad:
            shown = "; ".join(str(p) for p in report.bad[:2]) + (
                f"; +{len(report.bad) - 2} more" if len(report.bad) > 2 else ""
            )
            parts.append(f"{_plural(len(report.bad), report.bad_noun)} skipped ({shown})")
        if cut:
            parts.append(f"{cut} left out by data.max_samples")
        return f"data: {report.total} {noun} {report.source}: {', '.join(parts)}"

    def log_details(self) -> None:
        report = self.report
        details = [f"{p}; skipped" for p in report.bad]
        details += [f"{name}: {reason}; skipped" for _, name, reason in self.skipped]
        unlisted = "no .txt caption" if report.metadata == ".txt captions" else f"not listed in {report.metadata}"
        details += [f"{name}: {unlisted}; skipped" for name in report.unlisted_skipped]
        details += report.notes
        for number, line in enumerate(details):
            logger.log(logging.WARNING if number < DETAIL_LINES else logging.INFO, "data: %s", line)
        rows = [i for i in self.indices if i in report.unlisted_rows]
        if rows and report.uses_captions:
            names = [Path(str(self.image_sources[i])).name for i in rows if i < len(self.image_sources)]
            logger.info("data: used without caption (%s): %s", unlisted, ", ".join(names))

    def __len__(self) -> int:
        return len(self.indices)

    def open_row(self, index: int) -> tuple[int, Image.Image]:
        """The image of example `index`, or, when it cannot be read any more (deleted or damaged after the start),
        the next readable one (of the same bucket, with buckets: a batch keeps one shape), with a warning: a long
        run does not die on one file; a run whose files are all gone stops with a one-line error."""
        count = len(self.indices)
        rows = [self.indices[(index + offset) % count] for offset in range(count)]
        where = ""
        if self.row_buckets is not None:
            bucket = self.row_buckets[self.indices[index]]
            rows = [row for row in rows if self.row_buckets[row] == bucket]
            count, where = len(rows), f" in bucket {bucket_name(bucket)}"
        for row in rows:
            if row in self.failed_rows:
                continue
            try:
                return row, open_image(self.image_sources[row], self.config.max_image_pixels)
            except Exception as err:  # noqa: BLE001 - any failure to read a file that was readable at start
                self.failed_rows.add(row)
                logger.warning(
                    "data: %s cannot be read any more (%s: %s): deleted or damaged since the start? Another image "
                    "of the dataset takes its place from now on",
                    _describe(self.image_sources[row], row),
                    type(err).__name__,
                    err,
                )
        raise RunError(
            f"data.dataset: none of the {count} images of {self.source_name!r}{where} can be read any more (deleted "
            "or damaged during training); restore them and resume with checkpoint.resume_from_checkpoint=latest"
        )

    def image_size(self, row: int) -> tuple[int, int]:
        """(w, h) of a row's image as decoded (JPEGs over max_image_pixels decode reduced), from its header when it
        has not been decoded in this process (a latent cache read from disk)."""
        if row not in self.image_sizes:
            with open_image(self.image_sources[row], self.config.max_image_pixels, header=True) as image:
                width, height = image.size
                if image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # to_mode's exif_transpose turns it
                    width, height = height, width
            self.image_sizes[row] = (width, height)
        return self.image_sizes[row]

    @property
    def loss_masks(self) -> LossMasks | None:
        """Each row's loss mask (data.masked_loss), found and checked once."""
        if not self.config.masked_loss:
            return None
        if getattr(self, "_loss_masks", None) is None:
            self._loss_masks = LossMasks.find(self, self.config)
        return self._loss_masks

    @property
    def conditioning(self) -> ConditioningImages | None:
        """Each row's conditioning image (data.conditioning_image_column, controlnet), found and checked once."""
        if self.conditioning_column is None:
            return None
        if getattr(self, "_conditioning", None) is None:
            self._conditioning = ConditioningImages.find(self, self.config)
        return self._conditioning

    def get(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        row = self.indices[index]
        bucket = self.row_buckets[row] if self.row_buckets is not None else None  # (w, h) with buckets, else None
        mask_rng = copy.deepcopy(rng) if self.config.masked_loss else None  # the mask is cut with the same draws
        control_rng = copy.deepcopy(rng) if self.conditioning_column else None  # so is the conditioning image
        if self.decode_pixels:
            row, image = self.open_row(index)
            sizes: dict[str, torch.Tensor] = {}
            pixels, flipped = image_to_tensor(
                image,
                self.config.resolution,
                self.channels,
                rng,
                self.config.center_crop,
                self.config.random_flip,
                sizes,
                bucket,
            )
            example = {"pixel_values": pixels, "flipped": flipped, "row": row, **sizes}
        else:  # cached latents (center crops only): the same draws as image_to_tensor, no image work
            if row in self.failed_rows:  # it failed while the cache was built: its stand-in's latents are there
                row = next(
                    r
                    for r in self.indices[index:] + self.indices[:index]
                    if r not in self.failed_rows and (bucket is None or self.row_buckets[r] == bucket)
                )
            flipped = bool(self.config.random_flip and rng.random() < 0.5)
            size = self.image_size(row)
            resolution = self.config.resolution
            if bucket is None:
                new_size, corner = crop_geometry(size, resolution, rng, center_crop=True)
            else:
                new_size, corner = cover_geometry(size, bucket, rng, center_crop=True)
            example = {
                "flipped": flipped,
                "row": row,
                **size_conditioning(size, new_size, corner, bucket or resolution, flipped),
            }
        example.update({c: self.column_values[c][row] for c in self.columns})
        if mask_rng is not None:
            example["loss_mask"] = self.loss_masks.cut(row, mask_rng, bucket)
        if control_rng is not None:
            example.pop(self.conditioning_column)
            example["conditioning_pixel_values"] = self.conditioning.cut(row, control_rng, bucket)
        return example


class DigitsRecords(torch.utils.data.Dataset):
    """The embedded digits as ready tensors (no decoding), with an integer 'label' and a caption-ready digit name."""

    def __init__(self, config: DataConfig, split: str = "all", exclude_labels: Sequence[int] = ()):
        from finetune.digits import load_digits_tensors

        images, labels = load_digits_tensors(config.resolution, split)
        if config.channels == 3:  # gray replicated: what RGB models (a Stable Diffusion VAE) take
            images = images.expand(-1, 3, -1, -1).contiguous()
        if exclude_labels:
            keep = ~torch.isin(labels, torch.tensor(list(exclude_labels)))
            images, labels = images[keep], labels[keep]
        if config.max_samples is not None:
            images, labels = images[: config.max_samples], labels[: config.max_samples]
        self.config, self.images, self.labels = config, images, labels
        self.channels = images.shape[1]
        self.skipped: list = []

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        pixels = self.images[index]
        flipped = bool(self.config.random_flip and rng.random() < 0.5)
        if flipped:
            pixels = pixels.flip(-1)
        resolution = self.config.resolution
        sizes = size_conditioning((resolution, resolution), (resolution, resolution), (0, 0), resolution, flipped)
        return {"pixel_values": pixels, "flipped": flipped, "row": index, "label": int(self.labels[index]), **sizes}


class TrainingExamples(torch.utils.data.Dataset):
    """Wraps a records source with repeats, per-example seeded randomness and an optional per-example transform.

    Each example gets `seed`: an integer drawn from (seed, epoch, index), from which the training step draws the
    example's noise and timestep.
    """

    def __init__(
        self,
        source,
        seed: int,
        repeats: int = 1,
        transform: Callable[[dict, np.random.Generator], dict] | None = None,
        min_length: int = 1,
    ):
        self.source, self.seed, self.transform = source, seed, transform
        # a dataset smaller than one global batch would give an empty epoch with drop_last: repeat it enough
        self.repeats = max(repeats, -(-min_length // max(len(source), 1)))
        # in shared memory: persistent DataLoader workers hold their own copy of this dataset, and must see the epoch
        # the loop sets (their augmentation and noise seeds depend on it)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.source) * self.repeats

    # -- aspect-ratio buckets: the source's, repeated (finetune/buckets.py) ------------------------------------------
    def can_use_buckets(self) -> bool:
        return hasattr(self.source, "use_buckets") and self.source.can_use_buckets()

    def use_buckets(self, plan: BucketPlan) -> None:
        self.source.use_buckets(plan)

    def example_buckets(self) -> list[Bucket]:
        """The bucket of every index of an epoch."""
        return self.source.example_buckets() * self.repeats

    def bucket_images(self) -> Counter:
        """Images (not repeats) per bucket."""
        return self.source.bucket_images()

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        example = self.source.get(index % len(self.source), rng)
        if self.transform is not None:
            example = self.transform(example, rng)
        example["seed"] = int(rng.integers(0, 2**62))
        return example


# per-example bookkeeping a method reads on the host (the latent cache's keys, the seeds of the example's noise):
# the loop leaves these batch entries on the CPU (finetune.speed.batch_to_device)
HOST_KEYS = ("row", "flipped", "seed")


def collate_examples(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, turn numbers into tensors, keep strings and other values as lists."""
    batch: dict[str, Any] = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        elif isinstance(values[0], float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch


def build_image_source(
    config: DataConfig,
    columns: Sequence[str] = (),
    channels: int | None = None,
    exclude_labels: Sequence[int] = (),
    verify_memo: Path | None = None,
):
    """The training images named by `data.dataset`: the digits (without the classes in `exclude_labels`) or an image
    folder / Hub dataset. `verify_memo`: the file where data.verify_images keeps its verdicts between runs (see
    `find_unreadable_images`)."""
    if config.dataset == "digits":
        return DigitsRecords(config, exclude_labels=exclude_labels)
    channels = channels or config.channels or 3
    records = load_records(config, columns=columns)
    required = {column: f"data.{_column_option(config, column)}" for column in columns}
    require_columns(records, required, config.dataset)
    report = getattr(records, "report", None)
    if report is None:  # a Hub dataset: its captions / labels are checked here, at start
        report = DataReport(config.dataset, total=len(records), uses_captions=config.caption_column in columns)
        check_dataset_columns(records, config, columns, report)
    return ImageRecords(
        records, config, channels, columns, source=config.dataset, report=report, verify_memo=verify_memo
    )


def _column_option(config: DataConfig, column: str) -> str:
    for option_name in ("caption_column", "label_column", "image_column", "conditioning_image_column"):
        if getattr(config, option_name) == column:
            return option_name
    return "columns"
