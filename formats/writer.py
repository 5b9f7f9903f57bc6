"""Streaming writer of Hugging Face safetensors shards.

The whole layout (which tensor goes in which shard, at which offset) is fixed
before the first byte is written, from shapes and dtypes alone. Each shard's
header is then written up front and tensor bytes are appended as they are
computed, so memory never holds more than the chunk being written.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from formats.errors import ConvertError
from formats.safetensors_file import TensorInfo, itemsize

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def parse_size(size: int | str) -> int:
    """Parse a shard size the way transformers' ``convert_file_size_to_int`` does ("5GB" = 5e9, "2GiB" = 2**31)."""
    if isinstance(size, int):
        return size
    text = size.strip()
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            number = int(text[: -len(unit)]) * factor
            # transformers: "5Gb" (lower-case b) means bits.
            return number // 8 if len(unit) == 2 and text.endswith("b") else number
    if re.fullmatch(r"\d+", text):
        return int(text)
    raise ValueError(f"size {size!r} is not an integer number of bytes or a string like '5GB', '500MB', '2GiB'")


def plan_shards(tensors: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most ``max_shard_size`` bytes (a larger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def encode_header(tensors: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header, padded with spaces to 8 bytes as safetensors does."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Writes planned tensors, strictly in plan order, into ``out_dir``.

    Call ``write`` (any number of chunks) or ``copy`` (bytes straight from a
    source file) for each tensor in turn; ``finish`` checks that everything was
    written and writes the index.
    """

    def __init__(self, out_dir: Path, tensors: list[PlannedTensor], max_shard_size: int):
        self.out_dir = out_dir
        self.shards = plan_shards(tensors, max_shard_size)
        self.names = shard_names(len(self.shards))
        self._queue = [(s, t) for s, shard in enumerate(self.shards) for t in shard]
        self._next = 0  # index into _queue of the tensor being written
        self._written = 0  # bytes of that tensor written so far
        self._file = None
        self._file_shard = -1
        self.bytes_written = 0

    @property
    def current(self) -> PlannedTensor:
        return self._queue[self._next][1]

    def _target(self, name: str):
        if self._next >= len(self._queue) or self.current.name != name:
            expected = self.current.name if self._next < len(self._queue) else "nothing"
            raise RuntimeError(f"writer got tensor '{name}' but expected {expected}")
        shard = self._queue[self._next][0]
        if shard != self._file_shard:
            self._close_file()
            self._file = open(self.out_dir / self.names[shard], "wb", buffering=0)
            self._file.write(encode_header(self.shards[shard], {"format": "pt"}))
            self._file_shard = shard
        return self._file

    def _advance(self, n: int) -> None:
        self._written += n
        self.bytes_written += n
        if self._written > self.current.nbytes:
            raise RuntimeError(f"tensor '{self.current.name}': wrote more bytes than planned")
        if self._written == self.current.nbytes:
            self._next += 1
            self._written = 0

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append the bytes of ``data`` (a CPU tensor, any dtype) to tensor ``name``."""
        self._write_all(self._target(name), memoryview(data.contiguous().view(-1).view(torch.uint8).numpy()))

    def _write_all(self, f, view: memoryview) -> None:
        if not view:
            self._advance(0)  # completes an empty tensor
        while view:
            n = f.write(view)
            view = view[n:]
            self._advance(n)

    def copy(self, name: str, source: TensorInfo) -> None:
        """Copy a tensor's bytes file-to-file without reading them into this process."""
        f = self._target(name)
        with open(source.path, "rb", buffering=0) as src:
            offset, left = source.offset, source.nbytes
            if not left:
                self._advance(0)
            while left:
                try:
                    n = os.copy_file_range(src.fileno(), f.fileno(), left, offset)
                    self._advance(n)
                except OSError:
                    n = 0
                if n == 0:  # not supported across these filesystems: plain read/write
                    chunk = os.pread(src.fileno(), min(left, 16 << 20), offset)
                    if not chunk:
                        raise ConvertError(f"{source.path}: tensor '{source.name}': file ended early (truncated)")
                    self._write_all(f, memoryview(chunk))
                    n = len(chunk)
                offset += n
                left -= n

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> list[str]:
        """Close the last shard, write the index when sharded; return the files written."""
        self._close_file()
        if self._next != len(self._queue):
            raise RuntimeError(f"output incomplete: tensor '{self.current.name}' was never written")
        if len(self.shards) > 1:
            weight_map = {t.name: self.names[s] for s, t in self._queue}
            total = sum(t.nbytes for _, t in self._queue)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            return [*self.names, INDEX_NAME]
        return list(self.names)
