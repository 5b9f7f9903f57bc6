"""compressed-tensors' weights (``pack-quantized`` int4/int8, ``int-quantized`` int8, ``float-quantized`` fp8):
unpacking and dequantization, quantization and packing, torch references of compressed-tensors' own code.

Packing (``compressed_tensors.compressors.pack_quantized.helpers.pack_to_int32``): a signed ``num_bits`` value ``q``
is stored as ``q + 2**(num_bits - 1)``, densely in int32 words, element ``i`` of a row at bit ``i * num_bits``
(little-endian), rows padded to whole words. Zero points of asymmetric weights are packed the same way along
dim 0 (``packed_dim=0``): one word holds ``32 / num_bits`` consecutive rows of one group column.

Dequantization (``compressed_tensors.quantization.lifecycle.forward._process_group`` / ``_dequantize``): in the
scale's dtype, ``(q.to(s.dtype) - zp.to(s.dtype)) * s`` per group of ``group_size`` columns, then cast to the
output dtype. Only widths that divide 32 (4 and 8 bits, what int4/int8 checkpoints use) never straddle words;
those are the ones read here.

Quantization (``--quantize same``) is what llm-compressor's min-max observer and compressed-tensors' compressor do:
per tensor / channel / group / block the fp32 min and max (widened to hold 0), ``calculate_qparams``
(symmetric: ``scale = max(|min|, |max|) / ((q_max - q_min) / 2)``, i.e. ``amax / 7.5`` for int4, ``/ 127.5`` for
int8, ``/ 448`` for fp8; asymmetric: ``scale = (max - min) / (q_max - q_min)``, ``zp = round(clamp(q_min - min /
scale))``; zero scales become fp32's eps), the scale cast to the base's stored scale dtype, then ``quantize``:
``clamp(x / scale + zp, q_min, q_max)`` in the dtype torch promotes ``x`` and the scale to (bf16 / bf16 divides
in bf16, as compressed-tensors does), rounded half to even (int) or cast to e4m3 (fp8). A symmetric weight adds
its zero zero points too, as compressed-tensors does when the module holds them: ``-0.0`` becomes ``+0.0``.
"""

from __future__ import annotations

import torch


def unpack_columns(words: torch.Tensor, num_bits: int, cols: int) -> torch.Tensor:
    """int8 values of rows packed along dim 1: (rows, words) int32 -> (rows, cols)."""
    per = 32 // num_bits
    shifts = torch.arange(0, 32, num_bits, dtype=torch.int32, device=words.device)
    values = (words.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    return (values.reshape(words.shape[0], words.shape[1] * per)[:, :cols] - (1 << (num_bits - 1))).to(torch.int8)


def unpack_rows(words: torch.Tensor, num_bits: int, first_row: int, rows: int) -> torch.Tensor:
    """int8 values of rows [first_row, first_row + rows) packed along dim 0; ``words`` are the packed rows from
    word row ``first_row * num_bits // 32`` on."""
    per = 32 // num_bits
    shifts = torch.arange(0, 32, num_bits, dtype=torch.int32, device=words.device)
    values = (words.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << num_bits) - 1)  # (words, per, groups)
    values = values.reshape(-1, words.shape[1])
    skip = first_row - first_row // per * per
    return (values[skip : skip + rows] - (1 << (num_bits - 1))).to(torch.int8)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """compressed-tensors' dequantization of rows of integer (or fp8) values ``q`` (rows, cols).

    ``scale`` (and ``zero_point``) are those rows' own: (rows, cols / group_size) for groups, (rows, 1) per
    channel, one value per tensor; ``group_size`` None for the last two (they broadcast as they are)."""
    x = q.to(scale.dtype)
    if group_size is not None:
        x = x.unflatten(-1, (x.shape[-1] // group_size, group_size))
        scale = scale.unsqueeze(-1)
        zero_point = zero_point.unsqueeze(-1) if zero_point is not None else None
    elif scale.ndim == 1:  # one value per tensor, stored as [1]
        scale = scale.reshape(())
        zero_point = zero_point.reshape(()) if zero_point is not None else None
    if zero_point is not None:
        x = x - zero_point.to(scale.dtype)
    x = x * scale
    return x.flatten(start_dim=-2).to(dtype) if group_size is not None else x.to(dtype)


def value_range(num_bits: int, kind: str) -> tuple[float, float]:
    """(q_min, q_max) of ``num_bits`` signed integers or of e4m3 (``kind`` "int" / "float")."""
    if kind == "float":
        return float(torch.finfo(torch.float8_e4m3fn).min), float(torch.finfo(torch.float8_e4m3fn).max)
    return float(-(1 << (num_bits - 1))), float((1 << (num_bits - 1)) - 1)


def min_max(w: torch.Tensor, group_size: int | None, block: tuple[int, int] | None, per_tensor: bool):
    """fp32 minima and maxima in the shape of the scales: one per tensor ([1]), row ((R, 1) channel), group of
    ``group_size`` columns or ``block`` (zero-padded where partial: the zero changes no qparams, which hold 0
    anyway)."""
    x = w.to(torch.float32)
    if per_tensor:
        return x.amin().reshape(1), x.amax().reshape(1)
    if block is not None:
        x = blocked(x, block)
        return x.amin((1, 3)), x.amax((1, 3))
    if group_size is not None:
        x = x.unflatten(-1, (x.shape[-1] // group_size, group_size))
        return x.amin(-1), x.amax(-1)
    return x.amin(1, keepdim=True), x.amax(1, keepdim=True)


def blocked(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(R, C) zero-padded to whole ``block``s and viewed as (R / bm, bm, C / bn, bn)."""
    (rows, cols), (bm, bn) = x.shape, block
    rt, ct = -(-rows // bm), -(-cols // bn)
    x = torch.nn.functional.pad(x, (0, ct * bn - cols, 0, rt * bm - rows))
    return x.reshape(rt, bm, ct, bn)


def qparams(mins: torch.Tensor, maxs: torch.Tensor, num_bits: int, kind: str, symmetric: bool):
    """compressed-tensors' ``calculate_qparams`` (no global scale, no ``scale_dtype``): fp32 scales and int8 zero
    points (zeros when symmetric)."""
    mins, maxs = torch.minimum(mins, torch.zeros_like(mins)), torch.maximum(maxs, torch.zeros_like(maxs))
    q_min, q_max = value_range(num_bits, kind)
    # Divided by a tensor, not a Python number: CUDA divides by a number as a product with its reciprocal, 1 ulp
    # off the true quotient that the CPU (and compressed-tensors on it) computes.
    steps = torch.full_like(maxs, (q_max - q_min) / 2 if symmetric else q_max - q_min)
    if symmetric:
        scale = torch.maximum(mins.abs(), maxs.abs()) / steps
        zero_point = torch.zeros_like(scale)
    else:
        scale = (maxs - mins) / steps
        zero_point = torch.clamp(q_min - mins / scale, q_min, q_max)
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    return scale, torch.round(torch.clamp(zero_point, -128, 127)).to(torch.int8)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    num_bits: int,
    kind: str,
    group_size: int | None,
    block: tuple[int, int] | None,
) -> torch.Tensor:
    """compressed-tensors' ``quantize`` of rows ``x`` (R, C) with those rows' scales and zero points: int8 values
    (int) or float8_e4m3fn (float)."""
    rows, cols = x.shape
    if block is not None:  # as compressed-tensors' _process_block: padded, scales broadcast over their blocks
        x = blocked(x, block)
        scale, zero_point = scale[:, None, :, None], zero_point[:, None, :, None]
    elif group_size is not None:
        x = x.unflatten(-1, (cols // group_size, group_size))
        scale, zero_point = scale.unsqueeze(-1), zero_point.unsqueeze(-1)
    scaled = x / scale
    scaled = scaled + zero_point.to(x.dtype)
    q_min, q_max = value_range(num_bits, kind)
    scaled = torch.clamp(scaled, q_min, q_max)
    q = scaled.to(torch.float8_e4m3fn) if kind == "float" else torch.round(scaled).to(torch.int8)
    if block is not None:
        return q.reshape(scale.shape[0] * block[0], -1)[:rows, :cols].contiguous()
    return q.reshape(rows, cols)


def pack_columns(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """``pack_to_int32`` of int8 values (rows, cols): (rows, ceil(cols * num_bits / 32)) int32 words, element ``i``
    at bit ``i * num_bits``, as ``q + 2**(num_bits - 1)``, padding bits zero."""
    per = 32 // num_bits
    rows, cols = q.shape
    words = -(-cols // per)
    u = torch.nn.functional.pad(q.to(torch.int64) + (1 << (num_bits - 1)), (0, words * per - cols))
    shifts = torch.arange(0, 32, num_bits, dtype=torch.int64, device=q.device)
    packed = (u.view(rows, words, per) << shifts).sum(-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def pack_rows(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """``pack_to_int32(..., packed_dim=0)`` (zero points): ``32 / num_bits`` consecutive rows a word."""
    return pack_columns(q.t(), num_bits).t().contiguous()
