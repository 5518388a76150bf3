"""Latent caches: every image's VAE posterior moments (and every caption's text conditioning) computed once before
training, so that the loop neither decodes images nor runs the VAE or frozen text encoders.

`cache=memory` keeps them in dicts (small sets). `cache=disk` streams them into a folder per latent fingerprint,
`latents-<fingerprint>/`, of safetensors shards of bounded size (`cache_shard_mb`, at most MAX_SHARD_EXAMPLES
examples), each written atomically as it fills:

- Shards are planned from the examples alone (their order and latent shapes), before anything is encoded: shard k
  holds the same examples whoever encodes it. With N processes, process r encodes shards r, r + N, ...; every process
  then reads all of them. The files of a 2-process run are byte for byte those of a 1-process run.
- A shard on disk whose header carries the fingerprint is never encoded again: a killed run resumes where it
  stopped (at most one shard per process is lost), and a run with the same settings starts at once.
- Reading is per batch: an index (row, flipped) -> shard, and a few memory-mapped shards open at a time, so the RAM a
  run needs does not grow with the dataset.
- The fingerprint covers everything that changes the latents (VAE weights and dtype, images, resolution or buckets,
  crop, flip, storage dtype); the text cache (`text-<fingerprint>.safetensors`) has its own (text encoders,
  captions). Changing one setting rebuilds only the cache it affects; the other is reused, and caches of other
  settings stay on disk for a later run that needs them.

This module knows no model: the method hands it a function that encodes a list of example indices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from finetune import atomic

logger = logging.getLogger(__name__)

MAX_SHARD_EXAMPLES = 1024  # a shard is also the unit of resume and of progress from the other processes
OPEN_SHARDS = 4  # memory-mapped shards kept open by a reader
THEN = "run the training again (finished shards are kept), or keep the cache in memory (e.g. lora.cache=memory)"

Key = tuple[int, bool]  # (row, flipped)
# what the method's encoder yields per VAE batch: the keys, their moments [B, 2C, h, w], and how many images that was
Encoded = tuple[list[Key], torch.Tensor, int]
Encoder = Callable[[list[int]], Iterable[Encoded]]


def digest(value: Any) -> str:
    """sha256 of a JSON-able value (anything else by its str)."""
    return hashlib.sha256(json.dumps(value, default=str).encode()).hexdigest()


def module_config(module: Any) -> dict:
    """A diffusers (dict) or transformers (`to_dict`) module config as a plain dict; {} without one."""
    config = getattr(module, "config", None)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config) if isinstance(config, Mapping) else {}


def module_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's config (if any), parameter names, dtypes and bytes: a VAE changed in place is a new VAE."""
    hasher = hashlib.sha256(json.dumps(module_config(module), sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return hasher.hexdigest()


def files_digest(paths: Iterable[str | None]) -> str:
    """sha256 of each file's path, size and modification time (a record without a path counts by its position)."""
    hasher = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path) if path else None
        except OSError:
            stat = None
        hasher.update(f"{path}|{stat.st_size if stat else ''}|{stat.st_mtime_ns if stat else ''}\n".encode())
    return hasher.hexdigest()


class _LogLines:
    """A file for tqdm that logs each state of the bar as one INFO line (a log file, not a terminal)."""

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            logger.info("%s", text)

    def flush(self) -> None:
        pass


def progress_bar(total: int, description: str, enabled: bool):
    """A tqdm bar in images, with images/s and the ETA (main process only). Without a terminal (a job's log file),
    one log line every 30 s instead, once the phase has lasted 30 s (short phases log only their start and end)."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=description, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.1)
    return tqdm(
        total=total,
        desc=description,
        unit="img",
        disable=not enabled,
        file=_LogLines(),
        delay=30,
        mininterval=30,
        ascii=True,
        ncols=100,
    )


# ---------------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------------
class LatentCache:
    """VAE posterior moments per (row, flipped), and the text conditioning (a few named tensors) per caption. The
    moments are a dict (cache=memory) or a `ShardedMoments` reader (cache=disk)."""

    def __init__(self, moments: Mapping[Key, torch.Tensor] | None = None):
        self.moments: Mapping[Key, torch.Tensor] = {} if moments is None else moments
        self.text: dict[str, dict[str, torch.Tensor]] = {}

    def save_text(self, path: Path, fingerprint: str) -> None:
        texts = sorted(self.text)
        tensors = {}
        for i, text in enumerate(texts):
            tensors.update({f"t/{i}/{key}": value.contiguous() for key, value in self.text[text].items()})
        with atomic.atomic_path(path, then=THEN) as staging:  # a killed job never leaves half a cache to load
            save_file(tensors, str(staging), metadata={"fingerprint": fingerprint, "texts": json.dumps(texts)})

    @staticmethod
    def load_text(path: Path, fingerprint: str) -> dict[str, dict[str, torch.Tensor]] | None:
        """The text conditioning saved at `path` with this fingerprint, or None."""
        if not path.is_file() or shard_metadata(path).get("fingerprint") != fingerprint:
            return None
        texts, text = json.loads(shard_metadata(path)["texts"]), {}
        for key, value in load_file(str(path)).items():
            _, number, name = key.split("/", 2)
            text.setdefault(texts[int(number)], {})[name] = value
        return text


# ---------------------------------------------------------------------------------------------------------------------
# disk: planning, writing, reading
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    number: int
    indices: tuple[int, ...]  # the examples (indices into the source) it holds, in order

    @property
    def name(self) -> str:
        return f"shard-{self.number:05d}.safetensors"


def plan_shards(example_bytes: list[int], shard_bytes: int, max_examples: int = MAX_SHARD_EXAMPLES) -> list[Shard]:
    """Consecutive examples into shards of at most `shard_bytes` (one example at least) and `max_examples`."""
    shards, current, size = [], [], 0
    for index, nbytes in enumerate(example_bytes):
        if current and (size + nbytes > shard_bytes or len(current) >= max_examples):
            shards.append(Shard(len(shards), tuple(current)))
            current, size = [], 0
        current.append(index)
        size += nbytes
    if current:
        shards.append(Shard(len(shards), tuple(current)))
    return shards


def shard_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's header metadata ({} when it cannot be read): nothing else is read."""
    try:
        with safe_open(str(path), "pt") as handle:
            return handle.metadata() or {}
    except Exception:  # noqa: BLE001 - a damaged or foreign file is simply not a finished shard
        return {}


def moments_key(key: Key) -> str:
    return f"m/{key[0]}/{int(key[1])}"


def finished_shards(folder: Path, shards: list[Shard], fingerprint: str) -> set[int]:
    """The shards already on disk, complete, for this fingerprint and these examples."""
    done = set()
    for shard in shards:
        metadata = shard_metadata(folder / shard.name) if (folder / shard.name).is_file() else {}
        if metadata.get("fingerprint") == fingerprint and metadata.get("indices") == digest(shard.indices):
            done.add(shard.number)
    return done


def write_shards(
    folder: Path,
    shards: list[Shard],
    fingerprint: str,
    encode: Encoder,
    dtype: torch.dtype,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> dict[str, float]:
    """Encode and write this process's share of the shards not yet on disk (shard k is process k % world's); the main
    process's bar also counts the other processes' shards as their files appear. Returns what was done."""
    folder.mkdir(parents=True, exist_ok=True)
    done = finished_shards(folder, shards, fingerprint)
    todo = [s for s in shards if s.number not in done]
    mine = [s for s in todo if s.number % world == rank]
    others = {s.number: s for s in todo if s.number % world != rank}
    images = sum(len(s.indices) for s in todo)
    total = sum(len(s.indices) for s in shards)
    if rank == 0:
        logger.info(
            "cache: latents of %d images in %s: %d shard(s), %d already on disk; encoding %d images on %d process(es)",
            total,
            folder,
            len(shards),
            len(done),
            images,
            world,
        )
    bar = progress_bar(images, "caching latents", progress and rank == 0 and images > 0)
    start, encoded, last_poll = time.perf_counter(), 0, 0.0

    def poll_others() -> None:  # the main process's bar counts the other processes' shards as they land
        for number in [n for n in others if (folder / others[n].name).is_file()]:
            bar.update(len(others.pop(number).indices))

    for shard in mine:
        tensors: dict[str, torch.Tensor] = {}
        for keys, moments, count in encode(list(shard.indices)):
            for key, value in zip(keys, moments):
                tensors[moments_key(key)] = value.to(dtype).contiguous()
            encoded += count
            bar.update(count)
            if others and rank == 0 and time.perf_counter() - last_poll > 1.0:
                last_poll = time.perf_counter()
                poll_others()
        metadata = {"fingerprint": fingerprint, "indices": digest(shard.indices), "shard": str(shard.number)}
        with atomic.atomic_path(folder / shard.name, then=THEN) as staging:
            save_file(tensors, str(staging), metadata=metadata)
    while others and rank == 0 and not bar.disable:  # (the caller's barrier waits for them in any case)
        poll_others()
        time.sleep(0.5)
    bar.close()
    seconds = time.perf_counter() - start
    return {"shards": len(shards), "reused": len(done), "images": images, "encoded": encoded, "seconds": seconds}


class ShardedMoments(Mapping):
    """(row, flipped) -> moments, read per lookup from memory-mapped shards (a few open at a time): the RAM it takes is
    the index (a few dozen bytes per example) and the open shards' touched pages, whatever the dataset's size."""

    def __init__(self, folder: Path, shards: list[Shard]):
        self.folder = folder
        self.files = [folder / shard.name for shard in shards]
        self.index: dict[Key, int] = {}
        for number, path in enumerate(self.files):
            with safe_open(str(path), "pt") as handle:
                for name in handle.keys():
                    _, row, flip = name.split("/")
                    self.index[(int(row), bool(int(flip)))] = number
        self.handles: OrderedDict[int, Any] = OrderedDict()

    def __getitem__(self, key: Key) -> torch.Tensor:
        key = (int(key[0]), bool(key[1]))
        number = self.index[key]
        handle = self.handles.pop(number, None)
        if handle is None:
            handle = safe_open(str(self.files[number]), "pt")
            while len(self.handles) >= OPEN_SHARDS:
                self.handles.popitem(last=False)
        self.handles[number] = handle
        return handle.get_tensor(moments_key(key))  # (in the stored dtype)

    def __iter__(self) -> Iterator[Key]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:  # (DataLoader workers started by spawn: handles are reopened there)
        return {**self.__dict__, "handles": OrderedDict()}


def disk_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def format_rate(images: int, seconds: float) -> str:
    return f"{images} images in {seconds:.1f} s ({images / max(seconds, 1e-9):.0f} images/s)"
