"""MXFP4 (OCP microscaling FP4, gpt-oss's experts): dequantization, the torch reference of transformers' own, and
quantization, the rule of OpenAI's ``triton_kernels`` ``downcast_to_mxfp_torch`` (what transformers'
``quantize_to_mxfp4`` calls; it runs only through the triton_kernels hub, so this is its rule written again).

A weight is stored as ``*_blocks`` (uint8 (..., R, G, 16): 32 e2m1 values a block, two a byte, low nibble first)
and ``*_scales`` (uint8 (..., R, G): the block's E8M0 exponent, biased by 127). transformers'
``integrations/mxfp4.py`` ``_convert_moe_packed_tensors`` dequantizes ``lut[nibble]`` (in the output dtype) times
``2 ** (scale - 127)`` (``torch.ldexp``, the product rounded once to the output dtype), lays each row's blocks
end to end (R, G * 32) and transposes the last two dims: gpt-oss keeps its experts as (E, in, out).

Quantization of (n, in, out) weights (``quantize``), groups of 32 along ``in``: the values as bf16 (what
``quantize_to_mxfp4`` casts to) then fp32, ``amax / 6`` per group rounded UP to a power of two (its fp32 bits
``+ 0x7FFFFF`` masked to the exponent: the E8M0 scale, so no value exceeds 6 once divided), each value times the
scale's reciprocal rounded to the nearest e2m1 value, ties away from zero (downcast_to_mxfp_torch adds one at the
first dropped mantissa bit and truncates), the sign kept (``-0`` is code 8). An all-zero group gets scale byte 0.
Requantizing dequantized weights gives the same values back (a group's amax is ``v * 2**e`` with ``v`` in e2m1's
grid, its rounded scale ``2**e`` or a smaller power whose quotients are still on the grid), not always the same
bytes (a group whose largest value is 3 comes back as 6 at half the scale).
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, R, G, 16) blocks and (n, R, G) scales -> the (n, G * 32, R) weights, as transformers dequantizes them."""
    n, rows, groups, width = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    blocks = blocks.reshape(-1, width)
    values = torch.empty(blocks.shape[0], width * 2, dtype=dtype, device=blocks.device)
    values[:, 0::2] = lut[(blocks & 0x0F).to(torch.int)]
    values[:, 1::2] = lut[(blocks >> 4).to(torch.int)]
    torch.ldexp(values, scales.reshape(-1, 1).to(torch.int32) - 127, out=values)
    return values.view(n, rows, groups * width * 2).transpose(1, 2).contiguous()


# e2m1 magnitudes are codes 0..7 (0, 0.5, 1, 1.5, 2, 3, 4, 6); a magnitude at or above the midpoint below code i
# rounds to code i (ties away from zero).
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
SCALE_MANTISSA = 0x7FFFFF
SCALE_EXPONENT = 0x7F800000


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, G * 32, R) weights -> (n, R, G, 16) uint8 blocks and (n, R, G) uint8 E8M0 scales: the layout
    ``dequantize`` reads."""
    n, cols, rows = w.shape
    x = w.to(torch.bfloat16).to(torch.float32).transpose(1, 2).contiguous().view(n, rows, cols // 32, 32)
    amax = x.abs().amax(-1, keepdim=True)
    bits = ((amax / 6.0).view(torch.int32) + SCALE_MANTISSA) & SCALE_EXPONENT
    scale = bits.view(torch.float32)
    q = x * torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    midpoints = torch.tensor(MIDPOINTS, device=w.device)
    codes = torch.bucketize(q.abs(), midpoints, right=True).to(torch.uint8) | (torch.signbit(q).to(torch.uint8) << 3)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (bits >> 23).to(torch.uint8).squeeze(-1)
