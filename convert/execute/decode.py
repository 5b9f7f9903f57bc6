"""A checkpoint tensor as the logical tensor it stands for: its stored bytes, or its layout dequantized.

``formats/`` only says where a quantized weight's parts lie (``TensorInfo.layout``); the arithmetic
that turns them back into values is here, on top of ``convert.kernels``, so that sources stay free of
math and the kernels free of checkpoint layouts. Every executor reads base rows through ``read_rows``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from convert.kernels import fp8 as fp8_kernel
from convert.kernels import mxfp4 as mxfp4_kernel
from convert.kernels import packed_int, quant
from formats import bnb, compressed_tensors, fp8, mxfp4
from formats.errors import ConvertError
from formats.safetensors_file import TensorInfo, read_tensor

DEQUANT_TILE = 1 << 18  # values dequantized per kernel call while reading
ROUND_TRIP_CHUNK_ELEMENTS = 1 << 22  # the absmax pre-pass of double quantization reads this much at a time


def read_rows(
    info: TensorInfo, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows [start, stop) of the logical tensor, into ``buffer`` (a reusable uint8 CPU tensor) or new memory."""
    stop = info.rows if stop is None else stop
    if info.layout is None:
        return read_tensor(info, start, stop, buffer)
    decode = DECODERS.get(type(info.layout))
    if decode is None:
        raise ConvertError(f"{info.path}: tensor '{info.name}': no reader for {type(info.layout).__name__} weights")
    return decode(info.layout, start, stop, buffer)


def check_layouts(tensors: dict[str, TensorInfo]) -> None:
    """Refuse quantized weights whose stored code tables are not bitsandbytes': they would dequantize into a
    silently wrong model. Run once when a checkpoint is opened for a command, before any output byte."""
    for info in tensors.values():
        q = info.layout
        if isinstance(q, bnb.Packed4bit):
            _check_code(q.quant_map, quant.code_for(q.quant_type))
            if q.nested_quant_map is not None:
                _check_code(q.nested_quant_map, quant.DYNAMIC_CODE)


def _check_code(info: TensorInfo, expected: torch.Tensor) -> None:
    if info.dtype != "F32" or not torch.equal(read_tensor(info).reshape(-1), expected):
        raise ConvertError(f"{info.path}: tensor '{info.name}': not the code bitsandbytes uses for this quant type")


def output(buffer: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` values of ``dtype``: in the caller's reusable uint8 buffer when there is one."""
    if buffer is None:
        return torch.empty(n, dtype=dtype)
    return buffer[: n * dtype.itemsize].view(dtype)


def packed_4bit_rows(q: bnb.Packed4bit, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop), dequantized as ``bnb.functional.dequantize_4bit`` a tile of whole blocks at a time:
    the kernel's temporaries (int64 codes, fp32 values) then stay a few MB whatever the chunk."""
    cols, n, bs = math.prod(q.shape[1:]), math.prod(q.shape), q.blocksize
    e0, e1 = start * cols, stop * cols
    out, tile = output(buffer, e1 - e0, q.dtype), max(bs, DEQUANT_TILE // bs * bs)
    for t0 in range(e0 // bs * bs, e1, tile):
        t1 = min(t0 + tile, n)
        packed = bnb.read_bytes(q.packed, t0 // 2, (t1 + 1) // 2)
        absmax = block_absmax(q, t0 // bs, -(-t1 // bs))
        values = quant.dequantize_blocks_4bit(packed, absmax, bs, q.quant_type, (t1 - t0,), q.dtype)
        lo, hi = max(t0, e0), min(t1, e1)
        out[lo - e0 : hi - e0] = values.reshape(-1)[lo - t0 : hi - t0]
    return out.view(stop - start, *q.shape[1:])


def block_absmax(q: bnb.Packed4bit, b0: int, b1: int) -> torch.Tensor:
    """fp32 absmax of blocks [b0, b1), undoing double quantization over whole nested blocks."""
    if q.nested_absmax is None:
        return read_tensor(q.absmax, b0, b1).float()
    n0 = b0 // bnb.NESTED_BLOCKSIZE
    qabsmax = read_tensor(q.absmax, n0 * bnb.NESTED_BLOCKSIZE, b1)
    nested = read_tensor(q.nested_absmax, n0, -(-b1 // bnb.NESTED_BLOCKSIZE))
    return quant.undo_double_quant(qabsmax, nested, q.offset)[b0 - n0 * bnb.NESTED_BLOCKSIZE :]


def int8_rows(q: bnb.Int8Rows, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``weight * SCB / 127``, what PEFT merges the delta into."""
    cols = math.prod(q.weight.shape[1:])
    out = output(buffer, (stop - start) * cols, torch.float32).view(stop - start, cols)
    step = max(1, DEQUANT_TILE // max(1, cols))
    for r in range(start, stop, step):
        r1 = min(r + step, stop)
        scb = read_tensor(q.scb, r, r1)
        out[r - start : r1 - start] = quant.dequantize_int8(read_tensor(q.weight, r, r1), scb)
    return out


@dataclass(frozen=True)
class RoundTrip:
    """A 16-bit tensor read as ``dequantize(quantize(W))``, bit for bit as bitsandbytes gives it.

    Row ranges are widened to whole blocks, quantized and dequantized. With double
    quantization the dequantizing absmax depends on the mean of the whole tensor's
    absmax, so a first read of the tensor computes it; it is dropped after the last row.
    """

    source: TensorInfo
    spec: bnb.QuantSpec
    device: torch.device
    _state: dict = field(default_factory=dict, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False)

    def read_rows(self, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        if self.spec.method == "int8":
            rows = read_tensor(self.source, start, stop).to(self.device, torch.float16)  # as bnb's Int8Params
            return quant.dequantize_int8(*quant.quantize_int8(rows)).cpu()
        shape, bs = self.source.shape, self.spec.blocksize
        cols, n = math.prod(shape[1:]), math.prod(shape)
        e0, e1 = start * cols, stop * cols
        first, last = e0 // bs * bs, min(-(-e1 // bs) * bs, n)
        r0, r1 = first // cols, -(-last // cols)
        flat = read_tensor(self.source, r0, r1).reshape(-1)[first - r0 * cols : last - r0 * cols].to(self.device)
        packed, absmax = quant.quantize_blocks_4bit(flat, bs, self.spec.method)
        if self.spec.double_quant:
            absmax = self.dequantized_absmax()[first // bs : first // bs + len(absmax)]
        dtype = flat.dtype
        values = quant.dequantize_blocks_4bit(packed, absmax, bs, self.spec.method, (last - first,), dtype)
        with self._lock:
            self._state["rows_read"] = self._state.get("rows_read", 0) + stop - start
            if self._state["rows_read"] >= self.source.rows:
                self._state.clear()
        return values.reshape(-1)[e0 - first : e1 - first].reshape(stop - start, *shape[1:]).cpu()

    def dequantized_absmax(self) -> torch.Tensor:
        with self._lock:
            if "absmax" not in self._state:
                rows, bs = self.source.rows, self.spec.blocksize
                # a multiple of blocksize rows holds whole blocks whatever the row length
                step = bs * max(1, ROUND_TRIP_CHUNK_ELEMENTS // (math.prod(self.source.shape[1:]) * bs))
                chunks = (
                    read_tensor(self.source, r, min(r + step, rows)).to(self.device) for r in range(0, rows, step)
                )
                absmax = torch.cat([quant.quantize_blocks_4bit(c, bs, self.spec.method)[1] for c in chunks])
                self._state["absmax"] = quant.undo_double_quant(*quant.double_quantize(absmax))
            return self._state["absmax"]


def fp8_rows(q: fp8.BlockFP8, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop) of a block-scaled FP8 weight as transformers' ``Fp8Dequantize`` gives them, a tile of
    whole block rows at a time, into ``buffer`` (or a new tensor)."""
    cols = q.weight.shape[1]
    out = output(buffer, (stop - start) * cols, q.dtype).view(stop - start, cols)
    bm = q.block[0] if q.block else 1
    step = max(bm, DEQUANT_TILE // max(1, cols) // bm * bm)
    r0 = start
    while r0 < stop:
        r1 = min((r0 // step + 1) * step, stop)  # tiles start on block rows, whatever ``start`` is
        values = read_tensor(q.weight, r0, r1)
        s = read_tensor(q.scale, r0 // bm, -(-r1 // bm)) if q.block else read_tensor(q.scale)
        out[r0 - start : r1 - start] = fp8_kernel.dequantize(values, s, q.block, r0, q.dtype)
        r0 = r1
    return out


def compressed_rows(
    c: compressed_tensors.CompressedWeight, start: int, stop: int, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows [start, stop) of a compressed-tensors weight as its ``decompress`` gives them, a tile at a time."""
    cols = c.shape[1]
    out = output(buffer, (stop - start) * cols, c.dtype).view(stop - start, cols)
    align = c.block[0] if c.block else 32 // c.num_bits if c.zero_point is not None else 1
    step = max(align, DEQUANT_TILE // max(1, cols) // align * align)
    r0 = start
    while r0 < stop:
        r1 = min((r0 // step + 1) * step, stop)
        q = read_tensor(c.values, r0, r1)
        if c.packed:
            q = packed_int.unpack_columns(q, c.num_bits, cols)
        if c.block is not None:  # in the scale's dtype first, as compressed-tensors' _process_block
            s = read_tensor(c.scale, r0 // c.block[0], -(-r1 // c.block[0]))
            values = fp8_kernel.dequantize(q, s, c.block, r0, s.dtype).to(c.dtype)
        else:
            s = read_tensor(c.scale) if c.strategy == "tensor" else read_tensor(c.scale, r0, r1)
            values = packed_int.dequantize(q, s, zero_points(c, r0, r1), c.group_size, c.dtype)
        out[r0 - start : r1 - start] = values
        r0 = r1
    return out


def zero_points(c: compressed_tensors.CompressedWeight, r0: int, r1: int) -> torch.Tensor | None:
    if c.zero_point is None:
        return None
    if c.strategy == "tensor":
        return read_tensor(c.zero_point)
    if not c.packed:
        return read_tensor(c.zero_point, r0, r1)
    per = 32 // c.num_bits
    words = read_tensor(c.zero_point, r0 // per, -(-r1 // per))
    return packed_int.unpack_rows(words, c.num_bits, r0, r1 - r0)


def mxfp4_rows(m: mxfp4.Mxfp4Experts, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Experts [start, stop) of an MXFP4 weight, one expert at a time: the kernel's temporaries stay one expert's
    size."""
    _, rows, groups, width = m.blocks.shape
    per_expert = rows * groups * width * 2
    out = output(buffer, (stop - start) * per_expert, m.dtype).view(stop - start, groups * width * 2, rows)
    for e in range(start, stop):
        values = mxfp4_kernel.dequantize(read_tensor(m.blocks, e, e + 1), read_tensor(m.scales, e, e + 1), m.dtype)
        out[e - start] = values[0]
    return out


DECODERS: dict[type, Callable[..., torch.Tensor]] = {
    bnb.Packed4bit: packed_4bit_rows,
    bnb.Int8Rows: int8_rows,
    RoundTrip: RoundTrip.read_rows,
    fp8.BlockFP8: fp8_rows,
    compressed_tensors.CompressedWeight: compressed_rows,
    mxfp4.Mxfp4Experts: mxfp4_rows,
}
