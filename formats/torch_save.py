"""Where the tensors of a ``torch.save`` file lie, without reading their bytes.

A ``torch.save`` file is an uncompressed zip: a small ``data.pkl`` record plus one
record per storage. Training checkpoints (DeepSpeed's rank files, DCP's storage
items, LitGPT's ``lit_model.pth``) are such zips, whole or embedded in a larger
file. ``torch.load(map_location="meta", weights_only=True)`` parses the pickle with
torch's restricted unpickler and gives meta tensors whose storage carries the
record's byte offset (``_checkpoint_offset``), reading only the zip directory and
``data.pkl``: the tensors' bytes are then read with ``pread`` exactly when needed.

Why not ``torch.load(mmap=True)``: every page a read touches stays mapped into the
process, so consolidating a model that way makes RSS grow to the model's size.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from formats.errors import ConvertError
from formats.safetensors_file import DTYPE_NAMES, itemsize


class FileWindow(io.RawIOBase):
    """Bytes [start, start + length) of a file as a seekable, read-only file (a zip embedded in a larger file)."""

    def __init__(self, path: Path, start: int = 0, length: int | None = None):
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self.start = start
        self.length = os.fstat(self._fd).st_size - start if length is None else length
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + offset
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        data = os.pread(self._fd, n, self.start + self.pos)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


@dataclass(frozen=True)
class Stored:
    """One tensor of a ``torch.save`` zip: its dtype (safetensors name), shape, and the absolute byte offset of
    its first element in ``path``; stored C-contiguous (checked), so rows are consecutive bytes."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def load_meta(path: Path, start: int = 0, length: int | None = None, allowed: Iterable = ()) -> object:
    """The object a ``torch.save`` zip at bytes [start, start + length) of ``path`` holds, its tensors on the
    meta device (no tensor byte read). ``allowed``: the non-tensor classes the format's pickle needs,
    allow-listed for torch's restricted unpickler (``weights_only=True``)."""
    try:
        with FileWindow(path, start, length) as window, torch.serialization.safe_globals(list(allowed)):
            return torch.load(window, map_location="meta", weights_only=True)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror or e}") from None
    except Exception as e:  # unpickling, zip and format errors all come as different types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{path}: cannot load safely (weights_only): {first}") from None


def stored(path: Path, tensor: torch.Tensor, where: str, start: int = 0, size: int | None = None) -> Stored:
    """Where a meta tensor from ``load_meta`` lies in ``path``, checked against the file's ``size`` (bytes of the
    zip starting at ``start``): a record running past the end is a truncated file."""
    if tensor.dtype not in DTYPE_NAMES:
        raise ConvertError(f"{path}: tensor '{where}': unsupported dtype {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ConvertError(f"{path}: tensor '{where}': stored with strides {tensor.stride()}, not contiguous")
    storage = tensor.untyped_storage()
    offset = getattr(storage, "_checkpoint_offset", None)
    if offset is None:
        raise ConvertError(f"{path}: tensor '{where}': no storage record offset (not a torch.save zip?)")
    element = tensor.element_size()
    if (tensor.storage_offset() + tensor.numel()) * element > storage.nbytes():
        raise ConvertError(f"{path}: tensor '{where}': runs past the end of its storage record")
    size = (path.stat().st_size - start) if size is None else size
    if offset + storage.nbytes() > size:
        raise ConvertError(
            f"{path}: tensor '{where}': storage record ends at byte {start + offset + storage.nbytes()} but the file "
            f"holds {start + size} (truncated file)"
        )
    return Stored(
        path, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), start + offset + tensor.storage_offset() * element
    )
