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
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from formats.errors import ConvertError
from formats.safetensors_file import TensorInfo, byte_view, itemsize

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
    """Writes planned tensors into ``out_dir`` at their planned offsets, from any thread, in any order.

    Every shard is created with its header at once: the layout is fixed by the
    plan, so a tensor (or a row range of it) can be written as soon as it is
    computed, by whichever worker computed it. ``finish`` checks that every
    tensor got exactly its bytes and writes the index.

    ``on_shard_done(file_name)`` is called (from the writing thread) as soon as
    every byte of a shard is in its file, so that a sink such as a Hub upload can
    take the shard while the next one is being computed.

    ``done`` names shards already complete in ``out_dir`` (a resumed run,
    ``convert.output.stage``): they are left as they are, their tensors
    (``kept_tensors``) count as written, and writes to them are dropped.

    Several processes can share one layout (``convert.output.ranks``): ``elsewhere`` names tensors another
    process writes, treated as kept here (a shard holding only such tensors is never opened, one holding
    some of them is never reported done by this process); with ``attach`` the shard files already exist
    (``create_shard_files``, by one process) and are opened without truncating them, so that each process
    writes its tensors at their planned offsets. ``before_write`` is called before every write (it may
    raise to stop the writer's caller: another process failed); ``index=False`` leaves the index to
    another process.
    """

    def __init__(
        self,
        out_dir: Path,
        tensors: list[PlannedTensor],
        max_shard_size: int,
        on_shard_done: Callable[[str], None] | None = None,
        done: Collection[str] = (),
        *,
        elsewhere: Collection[str] = (),
        attach: bool = False,
        before_write: Callable[[], None] | None = None,
        index: bool = True,
    ):
        self.out_dir = out_dir
        self.shards = plan_shards(tensors, max_shard_size)
        self.names = shard_names(len(self.shards))
        self.on_shard_done = on_shard_done
        self.before_write = before_write
        self.index = index
        self._shard_of = {t.name: i for i, shard in enumerate(self.shards) for t in shard}
        self._left = [sum(t.nbytes for t in shard) for shard in self.shards]  # bytes not yet in each shard
        self._reported: set[int] = set()
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (fd, absolute offset, nbytes)
        self._written: dict[str, int] = {}
        self._ranges: dict[str, list[tuple[int, int]]] = {}
        self._lock = threading.Lock()
        self._fds: list[int] = []
        self.bytes_written = 0
        self.kept_tensors: set[str] = set()
        self.opened: list[str] = []  # the shard files this writer writes into
        self.elsewhere = set(elsewhere)
        for i, (shard, name) in enumerate(zip(self.shards, self.names, strict=True)):
            kept = [t for t in shard if name in done or t.name in self.elsewhere]
            if kept:
                self.kept_tensors.update(t.name for t in kept)
                self._written.update((t.name, t.nbytes) for t in kept)
                self._where.update((t.name, (-1, 0, t.nbytes)) for t in kept)
                self._reported.add(i)  # done, or not all of it written here: never reported by this writer
            if len(kept) < len(shard):
                self._open(shard, name, attach)

    def _open(self, shard: list[PlannedTensor], name: str, attach: bool) -> None:
        """Open one shard file for writing its tensors not kept: created with its header, or (``attach``) as
        another process created it."""
        header = encode_header(shard, {"format": "pt"})
        flags = os.O_WRONLY if attach else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(self.out_dir / name, flags, 0o644)
        self._fds.append(fd)
        self.opened.append(name)
        if not attach:
            _pwrite_all(fd, memoryview(header), 0)
        offset = len(header)
        for t in shard:
            if t.name not in self._where:
                self._where[t.name] = (fd, offset, t.nbytes)
                self._written[t.name] = 0
                self._ranges[t.name] = []
            offset += t.nbytes
        if not attach:
            os.ftruncate(fd, offset)

    def _claim(self, name: str, offset: int, n: int) -> None:
        """Record bytes [offset, offset + n) of a tensor as written; each byte may be written once."""
        with self._lock:
            if offset < 0 or offset + n > self._where[name][2]:
                raise RuntimeError(f"tensor '{name}': write of {n} bytes at {offset} is outside the tensor")
            if any(offset < end and start < offset + n for start, end in self._ranges[name]):
                raise RuntimeError(f"tensor '{name}': bytes at {offset} written twice")
            self._ranges[name].append((offset, offset + n))
            self._written[name] += n
            self.bytes_written += n

    def write(self, name: str, data: torch.Tensor, offset: int = 0) -> None:
        """Write the bytes of ``data`` (a CPU tensor) at byte ``offset`` within tensor ``name``."""
        if name in self.kept_tensors:
            return
        if self.before_write is not None:
            self.before_write()
        fd, start, _ = self._where[name]
        data = data.contiguous()
        view = byte_view(data)
        self._claim(name, offset, len(view))
        _pwrite_all(fd, view, start + offset)
        self._landed(name, len(view))

    def copy(self, name: str, source: TensorInfo) -> None:
        """Copy a tensor's bytes file-to-file without reading them into this process."""
        if name in self.kept_tensors:
            return
        if self.before_write is not None:
            self.before_write()
        fd, dst, nbytes = self._where[name]
        self._claim(name, 0, source.nbytes)
        with open(source.path, "rb", buffering=0) as src:
            done = 0
            while done < nbytes:
                left = nbytes - done
                try:
                    n = os.copy_file_range(src.fileno(), fd, left, source.offset + done, dst + done)
                except OSError:
                    n = 0
                if n == 0:  # not supported across these filesystems, or the source is short
                    chunk = os.pread(src.fileno(), min(left, 16 << 20), source.offset + done)
                    if not chunk:
                        raise ConvertError(f"{source.path}: tensor '{source.name}': file ended early (truncated)")
                    n = _pwrite_all(fd, memoryview(chunk), dst + done)
                done += n
        self._landed(name, nbytes)

    def _landed(self, name: str, n: int) -> None:
        """Count ``n`` bytes of tensor ``name`` as being in their file; report the shard once all of it is."""
        with self._lock:
            shard = self._shard_of[name]
            self._left[shard] -= n
            complete = self._left[shard] == 0 and shard not in self._reported
            if complete:
                self._reported.add(shard)
        if complete and self.on_shard_done is not None:
            self.on_shard_done(self.names[shard])

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def finish(self) -> list[str]:
        """Close the shards, write the index when sharded; return the files written."""
        self.close()
        for name, (_, _, nbytes) in self._where.items():
            if self._written[name] != nbytes:
                raise RuntimeError(f"output incomplete: tensor '{name}' got {self._written[name]} of {nbytes} bytes")
        for shard, name in enumerate(self.names):  # shards of empty tensors only: no write ever completed them
            if shard not in self._reported and self.on_shard_done is not None:
                self._reported.add(shard)
                self.on_shard_done(name)
        if len(self.shards) > 1 and self.index:
            weight_map = {t.name: name for shard, name in zip(self.shards, self.names, strict=True) for t in shard}
            total = sum(nbytes for _, _, nbytes in self._where.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            return [*self.names, INDEX_NAME]
        return list(self.names)


def create_shard_files(out_dir: Path, tensors: list[PlannedTensor], max_shard_size: int) -> None:
    """Create every shard file of a layout (header, then its full length) for writers that ``attach`` to them."""
    ShardWriter(out_dir, tensors, max_shard_size).close()


def _pwrite_all(fd: int, view: memoryview, offset: int) -> int:
    total = len(view)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    return total
