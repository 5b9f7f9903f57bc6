"""Quantizing sinks: fill the tensors a quantized output weight is saved as, row chunk by row chunk.

The layouts (which tensors, their shapes, the quant-state blob) are ``formats.bnb``'s, ``formats.fp8``'s,
``formats.compressed_tensors``' and ``formats.mxfp4``'s; the bits are ``convert.kernels``'. Both executors (CPU
workers and the GPU path) write quantized outputs here, through ``pieces`` (the GPU copies them back itself) or
``write_rows``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from convert.kernels import fp8 as fp8_kernel
from convert.kernels import mxfp4 as mxfp4_kernel
from convert.kernels import packed_int, quant
from formats import compressed_tensors, fp8, mxfp4
from formats.bnb import BLOB, QuantSpec, chunk_rows, quant_state_blob
from formats.safetensors_file import DTYPE_NAMES, DTYPES
from formats.writer import ShardWriter


@dataclass
class RowSink:
    """What every sink shares: the weight it writes (the 16-bit ``dtype`` rows arrive in), and ``write_rows``,
    which writes the ``pieces`` of rows at once; subclasses add their ``spec``."""

    writer: ShardWriter
    name: str
    shape: tuple[int, ...]
    dtype: str

    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        write_pieces(self.writer, self.pieces(start, rows))

    def pieces(self, start: int, rows: torch.Tensor) -> list[Piece]:
        raise NotImplementedError


@dataclass
class StreamingQuantizer(RowSink):
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
class FP8Quantizer(RowSink):
    """Quantizes one output weight into ``X.weight`` + ``X.weight_scale_inv``, row chunk by row chunk, from any
    thread: every chunk (whole block rows, see ``formats.fp8.chunk_rows``) holds all the values its scales depend
    on, so it is quantized and written at once, with no state kept between chunks. Plan
    ``formats.fp8.serialized_tensors(...)`` in a ``ShardWriter`` first, as for ``StreamingQuantizer``."""

    spec: fp8.FP8Spec

    def pieces(self, start: int, rows: torch.Tensor) -> list[Piece]:
        block = self.spec.block
        assert block is None or start % block[0] == 0, "an FP8 chunk must start on a block row"
        q, inv = fp8_kernel.quantize(rows.reshape(len(rows), self.shape[1]), block)
        inv = inv.to(DTYPES[self.spec.scale_dtype])
        offset = 0 if block is None else start // block[0] * inv.shape[-1] * inv.element_size()
        return [(self.name, q.view(torch.uint8), start * self.shape[1]), (fp8.scale_name(self.name), inv, offset)]


@dataclass
class CompressedQuantizer(RowSink):
    """Quantizes one merged weight again in its compressed-tensors base weight's own scheme (values, packed or
    not, scales, zero points), row chunk by row chunk, from any thread: a chunk (``formats.compressed_tensors.
    chunk_rows``) holds every value its scales and packed zero-point words depend on, so nothing is kept between
    chunks. ``weight_shape`` is written once, at the start."""

    spec: compressed_tensors.CompressedSpec

    def __post_init__(self) -> None:
        if self.spec.layout.shape_info is not None:
            self.writer.write(self.spec.layout.shape_info.name, torch.tensor(self.shape, dtype=torch.int64))

    def pieces(self, start: int, rows: torch.Tensor) -> list[Piece]:
        c = self.spec.layout
        rows = rows.reshape(len(rows), self.shape[1])
        per_tensor = c.strategy == "tensor"
        mins, maxs = packed_int.min_max(rows, c.group_size, c.block, per_tensor)
        scale, zero_point = packed_int.qparams(mins, maxs, c.num_bits, c.kind, c.zero_point is None)
        scale = scale.to(DTYPES[c.scale.dtype])
        q = packed_int.quantize(rows, scale, zero_point, c.num_bits, c.kind, c.group_size, c.block)
        values = packed_int.pack_columns(q, c.num_bits) if c.packed else q.view(torch.uint8)
        scale_row = start // c.block[0] if c.block else start
        out = [(c.values.name, values, at_row(start, values)), (c.scale.name, scale, at_row(scale_row, scale))]
        if c.zero_point is not None:
            if c.packed and not per_tensor:  # packed by rows: a chunk starts on a word row (chunk_rows)
                out.append((c.zero_point.name, packed_int.pack_rows(zero_point, c.num_bits), at_row(start, None, c)))
            else:
                zero_point = zero_point.to(DTYPES[c.zero_point.dtype])
                out.append((c.zero_point.name, zero_point, at_row(start, zero_point)))
        return out


def at_row(row: int, part: torch.Tensor | None, packed: compressed_tensors.CompressedWeight | None = None) -> int:
    """Byte offset of ``row`` in a tensor whose rows are ``part``'s (or in ``packed``'s row-packed zero points,
    ``32 / num_bits`` rows a word row)."""
    if packed is not None:
        return row * packed.num_bits // 32 * packed.zero_point.shape[1] * 4
    return row * math.prod(part.shape[1:]) * part.element_size()


@dataclass
class Mxfp4Quantizer(RowSink):
    """Quantizes one merged experts weight into ``X_blocks`` + ``X_scales``, whole experts at a time (a chunk's
    groups never leave it): nothing is kept between chunks."""

    spec: mxfp4.Mxfp4Spec

    def pieces(self, start: int, rows: torch.Tensor) -> list[Piece]:
        blocks, scales = mxfp4_kernel.quantize(rows)
        return [
            (self.name + "_blocks", blocks, at_row(start, blocks)),
            (self.name + "_scales", scales, at_row(start, scales)),
        ]


SINKS: dict[type, type[RowSink]] = {
    fp8.FP8Spec: FP8Quantizer,
    compressed_tensors.CompressedSpec: CompressedQuantizer,
    mxfp4.Mxfp4Spec: Mxfp4Quantizer,
}


def streaming_quantizer(writer: ShardWriter, out) -> RowSink:
    """The sink of one quantized output tensor (a ``convert.plan.build.OutputTensor`` with ``quant`` set): by the
    class of its spec, bitsandbytes' ``StreamingQuantizer`` for a ``QuantSpec``."""
    kind = SINKS.get(type(out.quant), StreamingQuantizer)
    return kind(writer, out.name, out.shape, out.dtype, out.quant)
