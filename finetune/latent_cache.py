"""Latent caches: every image's VAE posterior moments (and every caption's text conditioning) computed once before
training, so that the loop neither decodes images nor runs the VAE or frozen text encoders.

`cache=memory` keeps them in dicts (small sets). `cache=disk` streams each into a folder per fingerprint,
`latents-<fingerprint>/` and `text-<fingerprint>/`, of safetensors shards of bounded size (`cache_shard_mb`, at most
MAX_SHARD_EXAMPLES examples or captions), each written atomically as it fills:

- Shards are planned from the examples alone (their order and sizes), before anything is encoded: shard k holds the
  same examples whoever encodes it. With N processes, process r encodes shards r, r + N, ...; every process then
  reads all of them. The files of a 2-process run are byte for byte those of a 1-process run.
- A shard on disk whose header carries the fingerprint is never encoded again: a killed run resumes where it
  stopped (at most one shard per process is lost), and a run with the same settings starts at once.
- Reading is per batch: an index (row, flipped) -> shard (caption -> shard), and a few memory-mapped shards open at
  a time, so the RAM a run needs does not grow with the dataset. (The text conditioning needs it as much as the
  latents: Stable Diffusion's 77 x 768 fp32 CLIP states are 236 KB per caption, 23 GB for 100k captions.)
- The latents' fingerprint covers everything that changes the latents (VAE weights and dtype, images, resolution or
  buckets, crop, flip, storage dtype); the text's its own (text encoders and tokenizers, captions and prompts).
  Changing one setting rebuilds only the cache it affects; the other is reused, and caches of other settings stay on
  disk for a later run that needs them.

This module knows no model: the method hands it a function that encodes a list of example (or caption) indices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from finetune import atomic

logger = logging.getLogger(__name__)

MAX_SHARD_EXAMPLES = 1024  # a shard is also the unit of resume and of progress from the other processes
OPEN_SHARDS = 4  # memory-mapped shards kept open by a reader
UNITS = {"images": "img", "captions": "text"}  # (tqdm's short units)
THEN = "run the training again (finished shards are kept), or keep the cache in memory (e.g. lora.cache=memory)"

Key = tuple[int, bool]  # (row, flipped)
# what the method's encoder yields per VAE batch: the keys, their moments [B, 2C, h, w], and how many images that was
Encoded = tuple[list[Key], torch.Tensor, int]
Encoder = Callable[[list[int]], Iterable[Encoded]]
# what a shard's encoder yields per batch: the named tensors to store, and how many examples (or captions) that was
TensorEncoder = Callable[[list[int]], Iterable[tuple[dict[str, torch.Tensor], int]]]


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


def tokenizer_identity(tokenizer: Any) -> dict | None:
    """What makes a tokenizer's token ids: its class, source, vocabulary (size and a digest of it), max length and
    padding side (None without one). The vocabulary is hashed, not named: a tokenizer edited in place is a new one."""
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return {
        "class": type(tokenizer).__name__,
        "source": getattr(tokenizer, "name_or_path", None),
        "vocab": [len(vocab), digest(sorted(vocab.items()))],
        "max_length": getattr(tokenizer, "model_max_length", None),
        "padding_side": getattr(tokenizer, "padding_side", None),
    }


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


def progress_bar(total: int, description: str, enabled: bool, unit: str = "images"):
    """A tqdm bar in images (or `unit`), with images/s and the ETA (main process only). Without a terminal (a job's
    log file), one log line every 30 s instead, once the phase has lasted 30 s (short phases log only their start and
    end)."""
    short = UNITS.get(unit, unit)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=description, unit=short, disable=not enabled, dynamic_ncols=True, smoothing=0.1)
    return tqdm(
        total=total,
        desc=description,
        unit=short,
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
    """VAE posterior moments per (row, flipped), and the text conditioning (a few named tensors) per caption: dicts
    (cache=memory), or `ShardedMoments` and `ShardedTexts` readers (cache=disk)."""

    def __init__(self, moments: Mapping[Key, torch.Tensor] | None = None):
        self.moments: Mapping[Key, torch.Tensor] = {} if moments is None else moments
        self.text: MutableMapping[str, dict[str, torch.Tensor]] = {}


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
    barrier: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """The latents' shards (`write_tensor_shards`): each VAE batch's moments stored per (row, flipped) in `dtype`."""

    def encode_moments(indices: list[int]):
        for keys, moments, count in encode(indices):
            yield {moments_key(key): value.to(dtype).contiguous() for key, value in zip(keys, moments)}, count

    return write_tensor_shards(folder, shards, fingerprint, encode_moments, rank, world, progress, barrier=barrier)


def write_tensor_shards(
    folder: Path,
    shards: list[Shard],
    fingerprint: str,
    encode: TensorEncoder,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    what: str = "latents",
    unit: str = "images",
    barrier: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Encode and write this process's share of the shards not yet on disk (shard k is process k % world's); the main
    process's bar also counts the other processes' shards as their files appear. Returns what was done. `barrier`
    (the accelerator's wait_for_everyone) runs once every process has looked at the disk."""
    folder.mkdir(parents=True, exist_ok=True)
    done = finished_shards(folder, shards, fingerprint)
    # every process agrees on what was on disk before any of them writes: without the wait a fast process's new
    # shard is counted as reused by a slower one (and the main process's log and bar undercount the work)
    barrier()
    todo = [s for s in shards if s.number not in done]
    mine = [s for s in todo if s.number % world == rank]
    others = {s.number: s for s in todo if s.number % world != rank}
    images = sum(len(s.indices) for s in todo)
    total = sum(len(s.indices) for s in shards)
    if rank == 0:
        logger.info(
            "cache: %s of %d %s in %s: %d shard(s), %d already on disk; encoding %d %s on %d process(es)",
            what,
            total,
            unit,
            folder,
            len(shards),
            len(done),
            images,
            unit,
            world,
        )
    bar = progress_bar(images, f"caching {what}", progress and rank == 0 and images > 0, unit)
    start, encoded, last_poll = time.perf_counter(), 0, 0.0

    def poll_others() -> None:  # the main process's bar counts the other processes' shards as they land
        for number in [n for n in others if (folder / others[n].name).is_file()]:
            bar.update(len(others.pop(number).indices))

    for shard in mine:
        tensors: dict[str, torch.Tensor] = {}
        for named, count in encode(list(shard.indices)):
            tensors.update(named)
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


class _OpenShards:
    """The memory-mapped shards of a reader, at most OPEN_SHARDS open at a time (the least recently used closed)."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.handles: OrderedDict[int, Any] = OrderedDict()

    def handle(self, number: int):
        handle = self.handles.pop(number, None)
        if handle is None:
            handle = safe_open(str(self.files[number]), "pt")
            while len(self.handles) >= OPEN_SHARDS:
                self.handles.popitem(last=False)
        self.handles[number] = handle
        return handle

    def __getstate__(self) -> dict:  # (DataLoader workers started by spawn: handles are reopened there)
        return {**self.__dict__, "handles": OrderedDict()}


class ShardedMoments(_OpenShards, Mapping):
    """(row, flipped) -> moments, read per lookup from memory-mapped shards (a few open at a time): the RAM it takes is
    the index (a few dozen bytes per example) and the open shards' touched pages, whatever the dataset's size."""

    def __init__(self, folder: Path, shards: list[Shard]):
        super().__init__([folder / shard.name for shard in shards])
        self.folder = folder
        self.index: dict[Key, int] = {}
        for number, path in enumerate(self.files):  # (each shard's header only)
            with safe_open(str(path), "pt") as handle:
                for name in handle.keys():
                    _, row, flip = name.split("/")
                    self.index[(int(row), bool(int(flip)))] = number

    def __getitem__(self, key: Key) -> torch.Tensor:
        key = (int(key[0]), bool(key[1]))
        return self.handle(self.index[key]).get_tensor(moments_key(key))  # (in the stored dtype)

    def __iter__(self) -> Iterator[Key]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def text_key(position: int, name: str) -> str:
    return f"t/{position}/{name}"


class ShardedTexts(_OpenShards, MutableMapping):
    """caption -> its conditioning ({name: tensor}), read per lookup from memory-mapped shards: caption i of the
    sorted captions is stored as `t/<i>/<name>` in the shard the plan gives it. Captions set afterwards (the
    validation prompts, encoded before the text encoders are freed) are kept in memory beside them."""

    def __init__(self, folder: Path, shards: list[Shard], texts: list[str]):
        super().__init__([folder / shard.name for shard in shards])
        self.folder = folder
        self.position = {text: position for position, text in enumerate(texts)}
        self.shard_of = {position: shard.number for shard in shards for position in shard.indices}
        self.names: dict[int, list[str]] = {}  # per shard: the conditioning's tensor names (read from its keys once)
        self.extra: dict[str, dict[str, torch.Tensor]] = {}

    def __getitem__(self, text: str) -> dict[str, torch.Tensor]:
        if text in self.extra:
            return self.extra[text]
        position = self.position[text]
        number = self.shard_of[position]
        handle = self.handle(number)
        if number not in self.names:  # every caption of a shard has the same names: the first one's
            keys = list(handle.keys())
            prefix = "/".join(keys[0].split("/", 2)[:2]) + "/"
            self.names[number] = sorted(key[len(prefix) :] for key in keys if key.startswith(prefix))
        return {name: handle.get_tensor(text_key(position, name)) for name in self.names[number]}

    def __setitem__(self, text: str, value: dict[str, torch.Tensor]) -> None:
        self.extra[text] = value

    def __delitem__(self, text: str) -> None:
        del self.extra[text]

    def __contains__(self, text: object) -> bool:
        return text in self.extra or text in self.position

    def __iter__(self) -> Iterator[str]:
        yield from self.position
        yield from (text for text in self.extra if text not in self.position)

    def __len__(self) -> int:
        return len(self.position) + sum(1 for text in self.extra if text not in self.position)


def disk_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def format_rate(images: int, seconds: float, unit: str = "images") -> str:
    return f"{images} {unit} in {seconds:.1f} s ({images / max(seconds, 1e-9):.0f} {unit}/s)"
