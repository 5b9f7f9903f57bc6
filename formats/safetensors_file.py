"""A small, validating safetensors reader that can read row ranges.

``safetensors.safe_open`` maps the file, which is fine for reading but gives no
way to copy a tensor's bytes without decoding them and makes every read count
towards resident memory. Here a file is its parsed header plus a path: a tensor
is read (whole or by rows) with ``pread`` into a fresh buffer, and untouched
tensors can be copied file-to-file by the writer with ``copy_file_range``.

The header is checked before any tensor is used, because checkpoints come from
strangers: a lying length, offset or shape is reported, never trusted.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from formats.dtypes import FLOAT_DTYPES  # noqa: F401  (re-exported: callers know it from here)
from formats.errors import ConvertError

# safetensors dtype names <-> torch dtypes (the subset torch can hold).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# A real header is a few MB at most (a 70B model with 3000 tensors is ~300 KB);
# anything bigger is a hostile file trying to make us allocate.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: enough to read, slice or copy it."""

    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset of the first element in the file
    nbytes: int
    # Set for tensors that do not come from a safetensors file (``.bin`` checkpoints,
    # loaded with mmap): reads slice this instead of the file, and bytes cannot be
    # copied file-to-file.
    mapped: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # Set for a quantized weight (``formats.bnb``): where its stored parts lie (``convert.execute.decode`` turns
    # them into values); the stored bytes are not this tensor's, so they are never copied.
    layout: object | None = field(default=None, compare=False, repr=False)
    # Set for a tensor whose bytes are spread over several places (a training checkpoint's rank files): an
    # object whose ``read_rows(start, stop, buffer)`` assembles those rows; never copied file to file either.
    reader: object | None = field(default=None, compare=False, repr=False)

    @property
    def stored_as_is(self) -> bool:
        """Whether the tensor's bytes lie as they are at ``offset`` of ``path`` (so may be copied file to file)."""
        return self.mapped is None and self.layout is None and self.reader is None

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


def read_header(
    path: Path, read_at: Callable[[int, int], bytes] | None = None, size: int = 0
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; return its tensors (in file order) and metadata.

    ``read_at(offset, n)`` and ``size`` read a file that is not on disk yet: the Hub source
    (``formats.hub``) answers them with range requests, for a shard it will download later."""
    try:
        if read_at is None:
            size, read_at = path.stat().st_size, partial(_read_at, path)
        head = read_at(0, 8)
        if len(head) < 8:
            raise ConvertError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise ConvertError(f"{path}: safetensors header claims {header_len} bytes (limit {MAX_HEADER_BYTES})")
        if 8 + header_len > size:
            raise ConvertError(
                f"{path}: truncated or corrupt safetensors file: header of {header_len} bytes runs past "
                f"the end of the {size}-byte file"
            )
        raw = read_at(8, header_len)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: corrupt safetensors header: {e}") from None
    except RecursionError:  # JSON nested thousands deep: a hostile header, not a checkpoint
        raise ConvertError(f"{path}: corrupt safetensors header: nested too deeply") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ConvertError(f"{path}: corrupt safetensors header: __metadata__ is not a map of strings")
    data_start = 8 + header_len
    data_len = size - data_start
    tensors = [_tensor_info(path, name, entry, data_start, data_len) for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.offset, t.nbytes))  # as safetensors orders them: empty tensors first
    end, previous = data_start, None
    for t in tensors:
        if t.offset < end:
            raise ConvertError(f"{path}: tensor '{t.name}': data overlaps tensor '{previous}'")
        end, previous = t.offset + t.nbytes, t.name
    return {t.name: t for t in tensors}, metadata


def _read_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return os.pread(f.fileno(), n, offset)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate tensor name '{k}'")
        out[k] = v
    return out


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    where = f"{path}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise ConvertError(f"{where}: header entry is not an object")
    dtype = entry.get("dtype")
    if dtype not in DTYPES:
        raise ConvertError(f"{where}: unsupported dtype {dtype!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):  # bool is an int
        raise ConvertError(f"{where}: invalid shape {shape!r}")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ConvertError(f"{where}: invalid data_offsets {offsets!r}")
    begin, end = offsets
    if end > data_len:
        raise ConvertError(
            f"{where}: data ends at byte {end} but the file holds only {data_len} data bytes "
            "(truncated or corrupt file)"
        )
    nbytes = math.prod(shape) * itemsize(dtype)
    if end - begin != nbytes:
        raise ConvertError(
            f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets span {end - begin}"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, nbytes)


def read_tensor(
    info: TensorInfo, row_start: int = 0, row_stop: int | None = None, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Read rows [row_start, row_stop) of a tensor into ``buffer`` (a uint8 CPU tensor, reused by callers
    that read many chunks) or a new tensor; never an mmap, so nothing stays resident afterwards."""
    row_stop = info.rows if row_stop is None else row_stop
    if info.layout is not None:
        raise ValueError(f"tensor '{info.name}' is quantized: read it with convert.execute.decode.read_rows")
    if info.reader is not None:
        return info.reader.read_rows(row_start, row_stop, buffer)
    if info.mapped is not None:
        rows = info.mapped[row_start:row_stop] if info.shape else info.mapped
        return rows.clone() if buffer is None else _into(buffer, rows)
    nrows = row_stop - row_start
    shape = (nrows, *info.shape[1:]) if info.shape else ()
    nbytes = nrows * info.row_bytes
    buf = torch.empty(nbytes, dtype=torch.uint8) if buffer is None else buffer[:nbytes]
    view = byte_view(buf)
    pos, offset = 0, info.offset + row_start * info.row_bytes
    with open(info.path, "rb", buffering=0) as f:
        fd = f.fileno()
        while pos < len(view):
            n = os.preadv(fd, [view[pos:]], offset + pos)
            if n == 0:
                raise ConvertError(f"{info.path}: tensor '{info.name}': file ended early (truncated)")
            pos += n
    return buf.view(DTYPES[info.dtype]).reshape(shape)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable memoryview, without numpy (not a dependency).

    The view borrows the tensor's memory: the caller keeps the tensor alive while using it."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("byte_view needs a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _into(buffer: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    out = buffer[: tensor.nbytes].view(tensor.dtype).reshape(tensor.shape)
    out.copy_(tensor)
    return out
