"""The FP8 Triton kernels run by Triton's interpreter on the CPU, against their torch references, bit for bit.

Not collected by itself: ``tests/test_fp8_triton.py`` runs it with ``TRITON_INTERPRET=1`` in a subprocess, as that
variable must be set before triton is imported.
"""

from __future__ import annotations

import os

import pytest
import torch

from convert.kernels import fp8 as F
from convert.kernels import fp8_triton as T

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_fp8_triton.py"

SHAPES = [((72, 100), (32, 32)), ((128, 256), (128, 128)), ((5, 7), (128, 128)), ((130, 64), (64, 16))]


def sample(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Normal values across five decades of scale, an all-zero block row, a few large outliers."""
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[1])
    x[: min(4, shape[0])] = 0.0
    x[-1, 0] = 3e4
    return x.to(dtype)


@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_quantize(shape, block, dtype) -> None:
    w = sample(shape, dtype)
    q, inv = T.quantize(w, block)
    ref_q, ref_inv = F.quantize_torch(w, block)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(inv, ref_inv)


@pytest.mark.parametrize("shape,block", [*SHAPES, ((40, 48), None)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dequantize_from_any_row(shape, block, dtype) -> None:
    q, inv = F.quantize_torch(sample(shape, torch.float32), block)
    for first in (0, 3, shape[0] // 2):
        s = inv[first // block[0] :] if block else inv
        out = T.dequantize(q[first:], s, block, first, dtype)
        ref = F.dequantize_torch(q[first:], s, block, first, dtype)
        assert out.dtype == dtype and torch.equal(out, ref), first
