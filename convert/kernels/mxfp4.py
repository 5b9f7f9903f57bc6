"""MXFP4 (OCP microscaling FP4, gpt-oss's experts): dequantization, the torch reference of transformers' own.

A weight is stored as ``*_blocks`` (uint8 (..., R, G, 16): 32 e2m1 values a block, two a byte, low nibble first)
and ``*_scales`` (uint8 (..., R, G): the block's E8M0 exponent, biased by 127). transformers'
``integrations/mxfp4.py`` ``_convert_moe_packed_tensors`` dequantizes ``lut[nibble]`` (in the output dtype) times
``2 ** (scale - 127)`` (``torch.ldexp``, the product rounded once to the output dtype), lays each row's blocks
end to end (R, G * 32) and transposes the last two dims: gpt-oss keeps its experts as (E, in, out).
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
