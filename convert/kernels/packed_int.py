"""compressed-tensors' integer weights (``pack-quantized`` int4/int8 with group or channel scales): unpacking and
dequantization, torch references of compressed-tensors' own code.

Packing (``compressed_tensors.compressors.pack_quantized.helpers.pack_to_int32``): a signed ``num_bits`` value ``q``
is stored as ``q + 2**(num_bits - 1)``, densely in int32 words, element ``i`` of a row at bit ``i * num_bits``
(little-endian), rows padded to whole words. Zero points of asymmetric weights are packed the same way along
dim 0 (``packed_dim=0``): one word holds ``32 / num_bits`` consecutive rows of one group column.

Dequantization (``compressed_tensors.quantization.lifecycle.forward._process_group`` / ``_dequantize``): in the
scale's dtype, ``(q.to(s.dtype) - zp.to(s.dtype)) * s`` per group of ``group_size`` columns, then cast to the
output dtype. Only widths that divide 32 (4 and 8 bits, what int4/int8 checkpoints use) never straddle words;
those are the ones read here.
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
