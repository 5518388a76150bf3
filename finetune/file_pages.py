"""Weights loaded from safetensors are memory-mapped views of the file (diffusers and transformers load them so):
reading them pulls the file's pages into the process, and those pages stay resident until every tensor of the file
is gone. Casting a frozen model to bf16 therefore holds the whole fp32 file *and* the bf16 copy at once (SD 1.5's
UNet: 3.4 + 1.7 GB). `replace_tensors` casts or moves tensor by tensor and hands each fp32 tensor's pages back to the
kernel (`madvise(MADV_DONTNEED)`) as soon as its copy exists, so the peak is the bf16 model plus one tensor.

Only pages of a private, file-backed mapping that lie wholly inside a replaced tensor are released, and only when no
other tensor of the module views them: such pages are clean copies of the file, which the kernel would read back if
anything touched them again (an anonymous page would be zeroed instead, so those are never touched). Elsewhere than
Linux nothing is released and the cast is the plain one."""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

MADV_DONTNEED = 4  # (the same value on every Linux architecture)


def file_backed_ranges() -> list[tuple[int, int]]:
    """The [start, end) address ranges of this process's private mappings of files, from /proc/self/maps."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        # address perms offset dev inode path: a private ("p") mapping of a real file (not [heap], [stack], anonymous)
        if len(fields) == 6 and fields[1].endswith("p") and fields[5].startswith("/") and fields[4] != "0":
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


class PageReleaser:
    """Releases the whole pages of a CPU tensor that lies in a private file mapping (see the module's docstring)."""

    def __init__(self, shared_pointers: set[int]):
        self.enabled = sys.platform.startswith("linux") and Path("/proc/self/maps").exists()
        self.ranges = file_backed_ranges() if self.enabled else []
        self.shared_pointers = shared_pointers
        self.released_bytes = 0
        if self.enabled:
            self.madvise = ctypes.CDLL(None, use_errno=True).madvise
            self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self.madvise.restype = ctypes.c_int

    def release(self, tensor: torch.Tensor) -> None:
        """Call only once `tensor` is no longer used: its content is dropped (a file page is read back on access)."""
        if not self.enabled or tensor.device.type != "cpu" or tensor.data_ptr() in self.shared_pointers:
            return
        begin, end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
        if not any(start <= begin and end <= stop for start, stop in self.ranges):
            return
        page = mmap.PAGESIZE
        first, last = -(-begin // page) * page, end // page * page  # whole pages only: a neighbour may share the ends
        if last > first and self.madvise(first, last - first, MADV_DONTNEED) == 0:
            self.released_bytes += last - first


def replace_tensors(module: torch.nn.Module, convert: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Replace every parameter's data and every buffer by `convert(parameter or buffer)` (a move and/or cast, as
    `module.to` would), one tensor at a time, releasing the memory-mapped file pages of each replaced CPU tensor.
    Returns the bytes released."""
    tensors = [tensor for _, tensor in module.named_parameters(remove_duplicate=False)]
    tensors += [tensor for _, tensor in module.named_buffers(remove_duplicate=False)]
    pointers = Counter(tensor.data_ptr() for tensor in tensors)
    releaser = PageReleaser({pointer for pointer, count in pointers.items() if count > 1})  # tied: left mapped
    for parameter in module.parameters():
        old = parameter.data
        new = convert(parameter)
        if new is not old:
            parameter.data = new
            releaser.release(old)
        del old
    for submodule in module.modules():
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None:
                new = convert(buffer)
                if new is not buffer:
                    submodule._buffers[name] = new
                    releaser.release(buffer)
    return releaser.released_bytes
