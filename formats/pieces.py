"""A tensor whose bytes lie in several places: the shards of a training checkpoint's rank files.

Each piece is a box of the whole tensor (offsets and sizes per dimension, as DCP's
``ChunkStorageMetadata`` records them), stored C-contiguous at a byte offset of a
file. DeepSpeed ZeRO-3 partitions the *flattened* parameter instead, so its pieces
are boxes of the flat view (``flat=True``). ``read_rows`` preads only the bytes of
the requested rows, straight into the caller's buffer where a piece holds whole
rows: host memory stays at one chunk, never the tensor or the rank file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from formats.errors import ConvertError
from formats.safetensors_file import DTYPES, byte_view, itemsize


@dataclass(frozen=True)
class Piece:
    """Box [offsets, offsets + sizes) of the tensor (or of its flat view), C-contiguous at ``offset`` of ``path``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    path: Path
    offset: int


@dataclass(frozen=True)
class Pieces:
    """The ``TensorInfo.reader`` of a tensor assembled from pieces."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    flat: bool = False

    @property
    def grid(self) -> tuple[int, ...]:
        """The shape the pieces' boxes are boxes of."""
        return (math.prod(self.shape),) if self.flat or not self.shape else self.shape

    def read_rows(self, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        grid, dtype = self.grid, DTYPES[self.dtype]
        cols = math.prod(self.shape[1:]) if self.shape else 1
        g0, g1 = (start * cols, stop * cols) if self.flat or not self.shape else (start, stop)
        nbytes = (stop - start) * cols * itemsize(self.dtype)
        raw = torch.empty(nbytes, dtype=torch.uint8) if buffer is None else buffer[:nbytes]
        out = raw.view(dtype).view(g1 - g0, *grid[1:])
        for p in self.pieces:
            a, b = max(g0, p.offsets[0]), min(g1, p.offsets[0] + p.sizes[0])
            if a >= b:
                continue
            src = p.offset + (a - p.offsets[0]) * math.prod(p.sizes[1:]) * itemsize(self.dtype)
            if p.sizes[1:] == grid[1:]:  # whole rows: straight into the output
                pread_exactly(p.path, byte_view(out[a - g0 : b - g0]), src, self.name)
                continue
            part = torch.empty((b - a, *p.sizes[1:]), dtype=dtype)
            pread_exactly(p.path, byte_view(part), src, self.name)
            box = tuple(slice(o, o + s) for o, s in zip(p.offsets[1:], p.sizes[1:], strict=True))
            out[(slice(a - g0, b - g0), *box)] = part
        return out.view(stop - start, *self.shape[1:]) if self.shape else out.view(())


def pread_exactly(path: Path, view: memoryview, offset: int, name: str) -> None:
    """Fill ``view`` with the bytes at ``offset`` of ``path``; a short file is a truncated checkpoint."""
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < len(view):
            n = os.preadv(f.fileno(), [view[pos:]], offset + pos)
            if n == 0:
                raise ConvertError(f"{path}: tensor '{name}': file ended early (truncated)")
            pos += n


def check_cover(where: Path, name: str, grid: tuple[int, ...], pieces: list[Piece]) -> None:
    """The pieces must tile the tensor exactly: inside it, not overlapping, nothing missing."""
    for p in pieces:
        if not len(p.offsets) == len(p.sizes) == len(grid) or any(
            o < 0 or o + s > d for o, s, d in zip(p.offsets, p.sizes, grid, strict=True)
        ):
            raise ConvertError(
                f"{where}: tensor '{name}': chunk at {list(p.offsets)} of size {list(p.sizes)} "
                f"lies outside its shape {list(grid)}"
            )
    for i, p in enumerate(pieces):
        for q in pieces[i + 1 :]:
            if all(a < c + t and c < a + s for a, s, c, t in zip(p.offsets, p.sizes, q.offsets, q.sizes, strict=True)):
                raise ConvertError(
                    f"{where}: tensor '{name}': chunks at {list(p.offsets)} and {list(q.offsets)} overlap"
                )
    if sum(math.prod(p.sizes) for p in pieces) != math.prod(grid):
        raise ConvertError(f"{where}: tensor '{name}': its chunks do not cover its shape {list(grid)} (missing shard?)")
