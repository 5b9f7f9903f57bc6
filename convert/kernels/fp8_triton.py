"""Triton kernels for ``convert.kernels.fp8`` on CUDA: block-scaled FP8 dequantization and quantization.

The same arithmetic as the torch references (``fp8.dequantize_torch`` / ``fp8.quantize_torch``, i.e. transformers'
``Fp8Dequantize`` / ``Fp8Quantize``), with the reciprocals correctly rounded (``div_rn``: Triton's plain ``/`` is an
approximate division on the GPU), so the bits are the same on any device. One program dequantizes a 2-D tile
(scales gathered per element from the tile's block rows and columns); one program quantizes one whole
``bm x bn`` block, so its amax is a register reduction. Under the interpreter, fp32 -> bf16 and -> e4m3 are
rounded on the bits first (``merge_triton._round``, ``_to_e4m3``), as the GPU rounds them. NaN in a block is not
handled as torch does (Triton's max ignores NaN): checkpoints do not hold any. Tested on the CPU through
``TRITON_INTERPRET=1`` (tests/triton_fp8.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from convert.kernels.fp8 import FP8_DTYPE
from convert.kernels.merge_triton import _INTERPRETED, _round
from formats.fp8 import scale_grid

FP8_MAX = tl.constexpr(448.0)
TILE_ROWS, TILE_COLS, DEQUANTIZE_WARPS = 32, 128, 4


@triton.jit
def _to_e4m3(y):
    """fp32 (already clamped to +-448) -> e4m3, rounding to nearest even. The GPU does it in one instruction;
    Triton's interpreter (the CPU tests) mis-rounds values that are not on the e4m3 grid, so there the value is first
    rounded to the grid (spacing 2 ** (max(exponent, -6) - 3)) by the fp32 round-to-nearest-even of a magic add."""
    if _INTERPRETED:
        sign = y.to(tl.uint32, bitcast=True) & 0x80000000
        a = tl.abs(y)
        exponent = ((a.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
        spacing = ((tl.maximum(exponent, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
        a = ((a / spacing + 12582912.0) - 12582912.0) * spacing
        y = (a.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return y.to(tl.float8e4nv)


@triton.jit
def _dequantize_kernel(
    q_ptr, s_ptr, out_ptr, rows, cols, s_cols, first_row,
    BM: tl.constexpr, BN: tl.constexpr, PER_TENSOR: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64) * TILE_R + tl.arange(0, TILE_R)
    c = tl.program_id(1).to(tl.int64) * TILE_C + tl.arange(0, TILE_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    offsets = r[:, None] * cols + c[None, :]
    q = tl.load(q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if PER_TENSOR:
        s = tl.load(s_ptr).to(tl.float32)
    else:
        s_row = (first_row + r) // BM - first_row // BM
        s = tl.load(s_ptr + s_row[:, None] * s_cols + (c // BN)[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, _round(q * s, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_kernel(
    w_ptr, q_ptr, inv_ptr, rows, cols, grid_cols,
    BM: tl.constexpr, BN: tl.constexpr, TBM: tl.constexpr, TBN: tl.constexpr,
):  # fmt: skip
    block_row, block_col = tl.program_id(0), tl.program_id(1)
    i, j = tl.arange(0, TBM), tl.arange(0, TBN)
    r = block_row.to(tl.int64) * BM + i
    c = block_col.to(tl.int64) * BN + j
    mask = (i[:, None] < BM) & (j[None, :] < BN) & (r[:, None] < rows) & (c[None, :] < cols)
    offsets = r[:, None] * cols + c[None, :]
    x = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    # torch's ``448.0 / amax`` (a Python float over a tensor) is ``reciprocal(amax) * 448``: two roundings
    scale = tl.where(amax > 0, tl.math.div_rn(1.0, tl.where(amax > 0, amax, 1.0)) * FP8_MAX, 1.0)
    inv = tl.math.div_rn(1.0, scale)
    y = tl.minimum(tl.maximum(x * scale, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + offsets, _to_e4m3(y), mask=mask)
    tl.store(inv_ptr + block_row * grid_cols + block_col, inv)


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int] | None, first_row: int, dtype: torch.dtype
) -> torch.Tensor:
    """``fp8.dequantize_torch`` on the GPU (or the interpreter): same arguments, same bits."""
    rows, cols = q.shape
    out = torch.empty(rows, cols, dtype=dtype, device=q.device)
    if out.numel() == 0:
        return out
    scales = scales.contiguous()
    bm, bn = block or (1, 1)
    grid = (triton.cdiv(rows, TILE_ROWS), triton.cdiv(cols, TILE_COLS))
    _dequantize_kernel[grid](
        q.contiguous(), scales, out, rows, cols, scales.shape[-1] if block else 1, first_row,
        BM=bm, BN=bn, PER_TENSOR=block is None, TILE_R=TILE_ROWS, TILE_C=TILE_COLS, num_warps=DEQUANTIZE_WARPS,
    )  # fmt: skip
    return out


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8.quantize_torch`` on the GPU (or the interpreter) for block scales: (e4m3 values, fp32 inverse scales)."""
    rows, cols = w.shape
    grid_rows, grid_cols = scale_grid((rows, cols), block)
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=w.device)
    inv = torch.empty(grid_rows, grid_cols, dtype=torch.float32, device=w.device)
    if q.numel() == 0:
        return q, inv
    bm, bn = block
    _quantize_kernel[(grid_rows, grid_cols)](
        w.contiguous(), q, inv, rows, cols, grid_cols,
        BM=bm, BN=bn, TBM=triton.next_power_of_2(bm), TBN=triton.next_power_of_2(bn), num_warps=8,
    )  # fmt: skip
    return q, inv
