"""Reading the images to caption: batches decoded in worker threads, the next batch while the model runs on this
one; a file that cannot be decoded is a failure of that file, never of the run."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


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
