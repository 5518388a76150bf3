"""Atomic writes: a file or folder of ours appears under its final name complete, or not at all.

Every writer (checkpoints, the final model, model card, config.yaml, loss curve, sample grids, class images, latent
caches, captions, generated images) writes to a temporary name in the same folder, fsyncs, and renames; a failure
removes the temporary, and a kill leaves it under a name `remove_stale_temporaries` recognises and deletes on the next
start. A full disk or a refused write (read-only file system, permissions) becomes one `RunError` line naming the
path and what to do, instead of a traceback.

This module imports nothing of ours but `finetune.errors`, so that the captioning and generation commands can use it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from finetune.errors import RunError

logger = logging.getLogger(__name__)

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS}
# the same failures as the text of errors that carry no errno (safetensors' SafetensorError wraps Rust's io::Error)
NO_SPACE_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
READ_ONLY_TEXT = ("read-only file system", "os error 30")
PERMISSION_TEXT = ("permission denied", "os error 13", "operation not permitted")

# names of our temporaries: `.<name>.<8 random characters>.tmp` (files, from mkstemp), `.<name>.staging.tmp` and
# `.<name>.old.tmp` (folders), `.checkpoint-<step>.tmp` (checkpoints, one name on every process)
TEMPORARY_PATTERN = re.compile(r"^\..+\.(?:[a-z0-9_]{8}|staging|old)\.tmp$|^\.checkpoint-\d+\.tmp$")


def is_temporary(name: str) -> bool:
    return bool(TEMPORARY_PATTERN.match(name))


def write_error(error: BaseException, path: str | Path, then: str = "run the command again") -> RunError | None:
    """The one-line RunError for a full disk or a refused write at `path`, or None for any other error (a bug keeps
    its traceback). `then` says how to carry on once the cause is fixed."""
    code = getattr(error, "errno", None)
    text = str(error).lower()
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if code in NO_SPACE or any(s in text for s in NO_SPACE_TEXT):
        return RunError(
            f"no space left on the device while writing {path}: free some space (`df -h {folder}`), then {then}"
        )
    if code == errno.EROFS or any(s in text for s in READ_ONLY_TEXT):
        return RunError(
            f"cannot write {path}: the file system is read-only; choose a folder on a writable disk, or {then} once "
            "it is writable"
        )
    if code in REFUSED or any(s in text for s in PERMISSION_TEXT):
        return RunError(
            f"cannot write {path}: permission denied; make {folder} writable (or choose another folder), then {then}"
        )
    return None


@contextlib.contextmanager
def reporting_write_errors(path: str | Path, then: str = "run the command again") -> Iterator[None]:
    """Turn a full disk or a refused write inside the block into a RunError naming `path`."""
    try:
        yield
    except RunError:
        raise
    except Exception as err:
        run_error = write_error(err, path, then)
        if run_error is None:
            raise
        raise run_error from err


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_path(path: str | Path) -> None:
    """Flush a file (or a folder's entries) to the disk; best effort where the file system cannot."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True, then: str = "run the command again") -> Iterator[Path]:
    """A temporary file beside `path` for the block to write; afterwards it is fsynced and renamed to `path`, so that
    readers see the old file or the new one, never half of one. With overwrite=False an existing `path` is never
    replaced (FileExistsError, the temporary removed). Writers that pick a format from the file name must name it
    (`image.save(tmp, format="PNG")`): the temporary ends in `.tmp`."""
    path = Path(path)
    temporary: Path | None = None
    with reporting_write_errors(path, then):
        descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(descriptor)
        temporary = Path(name)
        try:
            yield temporary
            fsync_path(temporary)
            # mkstemp makes the file readable by its owner only: give it the mode a plain write would
            os.chmod(temporary, path.stat().st_mode & 0o7777 if path.exists() else _default_file_mode())
            if overwrite:
                os.replace(temporary, path)
            else:
                _link_new(temporary, path)
            fsync_path(path.parent)
        finally:
            temporary.unlink(missing_ok=True)


def _link_new(temporary: Path, path: Path) -> None:
    """Give `temporary` the name `path` unless that exists (atomically where the file system has hard links)."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # no hard links here (FAT, some network file systems): check, then rename
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(temporary, path)


def atomic_write_text(path: str | Path, text: str, then: str = "run the command again") -> Path:
    with atomic_path(path, then=then) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes, then: str = "run the command again") -> Path:
    with atomic_path(path, then=then) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def replace_folder(source: Path, target: Path) -> None:
    """Put the complete folder `source` under the name `target`. An older `target` is renamed aside first (a rename
    cannot replace a non-empty folder), so that a kill leaves the old or the new folder under `target`, never a mix."""
    aside = target.with_name(f".{target.name}.old.tmp")
    if aside.exists():
        shutil.rmtree(aside)
    if target.exists():
        os.replace(target, aside)
    os.replace(source, target)
    shutil.rmtree(aside, ignore_errors=True)


def move_into(staging: Path, folder: Path) -> list[Path]:
    """Move every entry of the complete folder `staging` into `folder` (replacing entries of the same name: files by
    one rename each, folders with `replace_folder`), then remove `staging`. Returns the moved paths."""
    moved = []
    for entry in sorted(staging.iterdir()):
        target = folder / entry.name
        if entry.is_dir() and not entry.is_symlink():
            replace_folder(entry, target)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
        moved.append(target)
    staging.rmdir()
    fsync_path(folder)
    return moved


@contextlib.contextmanager
def staged_folder(final: Path, then: str = "run the command again") -> Iterator[Path]:
    """An empty `.<name>.staging.tmp` folder beside `final` for the block to fill; afterwards its files are fsynced
    and it replaces `final` (see `replace_folder`). On any failure the staging folder is removed."""
    staging = final.with_name(f".{final.name}.staging.tmp")
    with reporting_write_errors(final, then):
        try:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
            yield staging
            fsync_tree(staging)
            replace_folder(staging, final)
            fsync_path(final.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_contents(folder: Path, name: str, then: str = "run the command again") -> Iterator[Path]:
    """An empty `.<name>.staging.tmp` folder inside `folder` for the block to fill; afterwards its files are fsynced
    and moved into `folder` (see `move_into`), so that no file is ever half-written under its final name. On any
    failure the staging folder is removed and `folder` keeps what it held."""
    staging = folder / f".{name}.staging.tmp"
    with reporting_write_errors(folder, then):
        try:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
            yield staging
            fsync_tree(staging)
            move_into(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_temporaries(*folders: Path) -> list[Path]:
    """Delete the temporaries (see TEMPORARY_PATTERN) that killed writers left directly in `folders`, with a log line
    each. Only names of that pattern are touched: a folder of someone else's files stays as it is."""
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if not is_temporary(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            logger.info("removed %s, left by a run that was interrupted while writing it", entry)
            removed.append(entry)
    return removed
