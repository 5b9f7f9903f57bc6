"""Quantizing sink: fills the tensors a bitsandbytes output weight is saved as, row chunk by row chunk.

The layout (which tensors, their shapes, the quant-state blob) is ``formats.bnb``'s; the bits are
``convert.kernels.quant``'s. Both executors (CPU workers and the GPU path) write quantized outputs here.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from convert.kernels import fp8 as fp8_kernel
from convert.kernels import quant
from formats import fp8
from formats.bnb import BLOB, QuantSpec, chunk_rows, quant_state_blob
from formats.safetensors_file import DTYPE_NAMES, DTYPES
from formats.writer import ShardWriter


@dataclass
class StreamingQuantizer:
    """Quantizes one output weight into its serialized tensors, row chunk by row chunk, from any thread.

    ``write_rows(start, rows)`` quantizes rows [start, start + len(rows)) (each chunk a whole
    number of blocks, see ``chunk_rows``) and writes the packed data at its planned offset at once.
    Double quantization needs the absmax of the whole tensor (its offset is their mean), so the
    fp32 absmax (n / blocksize floats) is kept until the last row arrives; then absmax, nested
    absmax and quant state are written. Rows may live on any device: the bytes are bitsandbytes'
    on that device (the absmax stays there too, so double quantization follows the same rule).
    Usable outside ``convert merge``: plan ``serialized_tensors(...)`` in a ``ShardWriter``, then
    feed rows here in any order (``quantize_tensor`` does it for a tensor in memory).
    """

    writer: ShardWriter
    name: str
    shape: tuple[int, ...]
    dtype: str  # the 16-bit dtype rows arrive in (and recorded in the quant state)
    spec: QuantSpec
    _absmax: torch.Tensor | None = None
    _rows_left: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rows_left = self.shape[0]
        if self.spec.method == "int8":
            self.writer.write(self.name.removesuffix(".weight") + ".weight_format", torch.zeros((), dtype=torch.uint8))
            return
        self.writer.write(self.name + ".quant_map", quant.code_for(self.spec.method))
        if self.spec.double_quant:
            self.writer.write(self.name + ".nested_quant_map", quant.DYNAMIC_CODE)
        else:
            self.writer.write(
                self.name + BLOB + self.spec.method, _bytes(quant_state_blob(self.shape, self.dtype, self.spec, None))
            )

    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        write_pieces(self.writer, self.pieces(start, rows))

    def pieces(self, start: int, rows: torch.Tensor) -> list[Piece]:
        """The serialized bytes rows [start, start + len(rows)) become, on the rows' device, with their planned
        offsets (the GPU pipeline copies them back itself; ``write_rows`` writes them at once)."""
        cols = math.prod(self.shape[1:])
        if self.spec.method == "int8":
            q, scb = quant.quantize_int8(rows.reshape(len(rows), cols).to(torch.float16))  # as bnb's Int8Params
            out = [(self.name, q, start * cols), (self.name.removesuffix(".weight") + ".SCB", scb, start * 4)]
        else:
            e0, bs = start * cols, self.spec.blocksize
            assert e0 % bs == 0, "a 4-bit chunk must start on a block boundary"
            packed, absmax = quant.quantize_blocks_4bit(rows.reshape(-1), bs, self.spec.method)
            out = [(self.name, packed, e0 // 2)]
            if not self.spec.double_quant:
                out.append((self.name + ".absmax", absmax, e0 // bs * 4))
            else:
                with self._lock:
                    if self._absmax is None:
                        self._absmax = torch.empty(-(-math.prod(self.shape) // bs), device=absmax.device)
                self._absmax[e0 // bs : e0 // bs + len(absmax)] = absmax
        with self._lock:
            self._rows_left -= len(rows)
            last = self._rows_left == 0
        if last and self._absmax is not None:
            qabsmax, nested, offset = quant.double_quantize(self._absmax)
            blob = quant_state_blob(self.shape, self.dtype, self.spec, offset)
            out += [
                (self.name + ".absmax", qabsmax, 0),
                (self.name + ".nested_absmax", nested, 0),
                (self.name + BLOB + self.spec.method, _bytes(blob), 0),
            ]
            self._absmax = None
        return out


# A serialized tensor's bytes and where they go: (tensor name, values on any device, byte offset in the tensor).
Piece = tuple[str, torch.Tensor, int]


def write_pieces(writer: ShardWriter, pieces: list[Piece]) -> None:
    for name, values, offset in pieces:
        writer.write(name, values.cpu(), offset)


def _bytes(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.uint8)


def quantize_tensor(writer: ShardWriter, name: str, tensor: torch.Tensor, spec: QuantSpec, chunk_elements: int) -> None:
    """Quantize a whole in-memory tensor into its planned serialized tensors, in row chunks."""
    dtype = DTYPE_NAMES[tensor.dtype]
    sink = StreamingQuantizer(writer, name, tuple(tensor.shape), dtype, spec)
    step = max(1, chunk_elements // max(1, math.prod(tensor.shape[1:])))
    g = chunk_rows(tuple(tensor.shape), spec)
    step = max(g, step // g * g)
    for start in range(0, tensor.shape[0], step):
        sink.write_rows(start, tensor[start : start + step])


@dataclass
class FP8Quantizer:
    """Quantizes one output weight into ``X.weight`` + ``X.weight_scale_inv``, row chunk by row chunk, from any
    thread: every chunk (whole block rows, see ``formats.fp8.chunk_rows``) holds all the values its scales depend
    on, so it is quantized and written at once, with no state kept between chunks. Plan
    ``formats.fp8.serialized_tensors(...)`` in a ``ShardWriter`` first, as for ``StreamingQuantizer``."""

    writer: ShardWriter
    name: str
    shape: tuple[int, ...]
    dtype: str
    spec: fp8.FP8Spec

    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        write_pieces(self.writer, self.pieces(start, rows))

    def pieces(self, start: int, rows: torch.Tensor) -> list[Piece]:
        block = self.spec.block
        assert block is None or start % block[0] == 0, "an FP8 chunk must start on a block row"
        q, inv = fp8_kernel.quantize(rows.reshape(len(rows), self.shape[1]), block)
        inv = inv.to(DTYPES[self.spec.scale_dtype])
        offset = 0 if block is None else start // block[0] * inv.shape[-1] * inv.element_size()
        return [(self.name, q.view(torch.uint8), start * self.shape[1]), (fp8.scale_name(self.name), inv, offset)]


def streaming_quantizer(writer: ShardWriter, out) -> StreamingQuantizer | FP8Quantizer:
    """The sink of one quantized output tensor (a ``convert.plan.build.OutputTensor`` with ``quant`` set)."""
    kind = FP8Quantizer if isinstance(out.quant, fp8.FP8Spec) else StreamingQuantizer
    return kind(writer, out.name, out.shape, out.dtype, out.quant)
