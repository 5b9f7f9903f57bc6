"""Block-scaled FP8 (e4m3) dequantization and quantization: torch references, Triton on CUDA.

The format (DeepSeek-V3/R1, Kimi K2, Qwen3-*-FP8, transformers' ``FineGrainedFP8Config``): a weight ``W`` of shape
(R, C) is stored as ``q`` (float8_e4m3fn, same shape) and ``s = weight_scale_inv`` of shape
(ceil(R / bm), ceil(C / bn)), one fp32 per ``bm x bn`` block (the last row/column of blocks may be partial, as
DeepSeek-V3's 576-row ``kv_a_proj_with_mqa`` is); ``W ~= q * s`` blockwise. ``block=None`` is one scale per tensor.

Dequantization is transformers' ``Fp8Dequantize._dequantize_one`` (``integrations/finegrained_fp8.py``):
``(q.to(float32) * s.to(float32)).to(dtype)``, one fp32 product rounded once, which is also what DeepSeek's
``inference/kernel.py`` ``weight_dequant`` computes (fp32 ``x * s``, stored in the default bf16 dtype).

Quantization is transformers' ``Fp8Quantize._quantize_one`` (what ``save_pretrained`` of a quantized model writes):
per block ``amax = max|W|`` in fp32, ``scale = 448 / amax`` (1 where amax is 0; torch computes a Python float over
a tensor as ``reciprocal(amax) * 448``, two roundings, which the Triton kernel copies), ``inv = 1 / scale`` stored,
``q = clamp(W * scale, -448, 448).to(float8_e4m3fn)`` (round to nearest even). Partial edge blocks take the amax
of the values they hold (transformers' own quantizer only takes shapes that divide; DeepSeek's checkpoints ship
partial blocks and every FP8 kernel reads them with ceil-divided grids).

Everything works on row ranges: ``first_row`` is the weight row the given rows start at, and the scale rows passed
are those from block row ``first_row // bm`` on, so a reader can dequantize any row range of a weight.
"""

from __future__ import annotations

import torch

from formats.fp8 import scale_grid

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
FP8_MIN = torch.finfo(FP8_DTYPE).min


def expand_scales(scales: torch.Tensor, rows: int, cols: int, block: tuple[int, int] | None, first_row: int):
    """fp32 scales broadcast to the (rows, cols) values starting at weight row ``first_row``."""
    s = scales.to(torch.float32)
    if block is None:
        return s.reshape(())
    bm, bn = block
    index = (torch.arange(first_row, first_row + rows, device=s.device) // bm) - first_row // bm
    return s[index].repeat_interleave(bn, dim=1)[:, :cols]


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int] | None, first_row: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rows of a block-scaled FP8 weight as ``dtype``; CUDA tensors go through the Triton kernel."""
    if q.is_cuda:
        from convert.kernels import fp8_triton

        return fp8_triton.dequantize(q, scales, block, first_row, dtype)
    return dequantize_torch(q, scales, block, first_row, dtype)


def dequantize_torch(
    q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int] | None, first_row: int, dtype: torch.dtype
) -> torch.Tensor:
    """The reference: ``(q.float() * s.float()).to(dtype)`` with ``s`` broadcast over its blocks."""
    rows, cols = q.shape
    return (q.to(torch.float32) * expand_scales(scales, rows, cols, block, first_row)).to(dtype)


def quantize(w: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn values, fp32 ``weight_scale_inv``) of rows of whole block rows (the tensor's last may be
    partial); CUDA tensors go through the Triton kernel."""
    if w.is_cuda and block is not None:
        from convert.kernels import fp8_triton

        return fp8_triton.quantize(w, block)
    return quantize_torch(w, block)


def quantize_torch(w: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``Fp8Quantize._quantize_one``, op for op, on a zero-padded copy where blocks are partial
    (zeros change no block's amax)."""
    rows, cols = w.shape
    x = w.to(torch.float32)
    if block is None:
        max_abs = x.abs().amax()
        bm, bn, rt, ct = rows, cols, 1, 1
    else:
        bm, bn = block
        rt, ct = scale_grid((rows, cols), block)
        if (rt * bm, ct * bn) != (rows, cols):
            x = torch.nn.functional.pad(x, (0, ct * bn - cols, 0, rt * bm - rows))
        max_abs = x.reshape(rt, bm, ct, bn).abs().amax(dim=(1, 3))
    safe_max_abs = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    scales = FP8_MAX / safe_max_abs
    scales = torch.where(max_abs > 0, scales, torch.ones_like(scales))
    inv_scales = (1.0 / scales).to(torch.float32)
    if block is None:
        q = torch.clamp(x * scales, min=FP8_MIN, max=FP8_MAX).to(FP8_DTYPE)
        return q, inv_scales
    scaled = x.reshape(rt, bm, ct, bn) * scales[:, None, :, None]
    q = torch.clamp(scaled, min=FP8_MIN, max=FP8_MAX).to(FP8_DTYPE).reshape(rt * bm, ct * bn)
    return q[:rows, :cols].contiguous(), inv_scales
