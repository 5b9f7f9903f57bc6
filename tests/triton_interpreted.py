"""The Triton kernels run by Triton's interpreter on the CPU, against the torch oracle of bitsandbytes' CUDA rule.

Not collected by itself: ``tests/test_quant_triton.py`` runs it with ``TRITON_INTERPRET=1`` in a subprocess, as
that variable must be set before triton is imported. Under the interpreter the kernels use IEEE division where the
GPU uses ``rcp.approx`` / ``div.approx``, exactly as the oracle does; everything else is the same code.
"""

from __future__ import annotations

import os

import pytest
import torch

from convert.kernels import quant as Q
from convert.kernels import quant_triton as T

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_quant_triton.py"

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def sample(n: int, dtype: torch.dtype, blocksize: int) -> torch.Tensor:
    """Normal values, an all-zero first block, a NaN and an outlier in the second block, tiny values."""
    g = torch.Generator().manual_seed(n * 7 + blocksize)
    x = torch.randn(n, generator=g)
    x[: min(n, blocksize)] = 0.0
    if n > blocksize + 10:
        x[blocksize + 3], x[blocksize + 9] = float("nan"), 40.0
    if n > 2 * blocksize + 3:
        x[2 * blocksize : 2 * blocksize + 3] = torch.tensor([1e-3, -1e-3, -0.0])
    return x.to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_4bit(dtype, quant_type):
    for n in (1, 7, 64, 65, 1000, 4097):
        for blocksize in (32, 64, 256, 4096):
            x = sample(n, dtype, blocksize)
            packed, absmax = T.quantize_4bit(x, blocksize, quant_type)
            ref_packed, ref_absmax = Q.quantize_blocks_4bit_torch(x, blocksize, quant_type, rule="cuda")
            assert torch.equal(packed, ref_packed), (n, blocksize)
            assert torch.equal(bits(absmax), bits(ref_absmax)), (n, blocksize)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_4bit_with_and_without_double_quant(dtype, quant_type):
    for n in (1, 7, 64, 1000, 4097):
        for blocksize in (32, 64, 4096):
            x = sample(n, torch.float32, blocksize).nan_to_num()
            packed, absmax = Q.quantize_blocks_4bit_torch(x, blocksize, quant_type, rule="cuda")
            out = T.dequantize_4bit(packed, absmax, blocksize, quant_type, n, dtype)
            ref = Q.dequantize_blocks_4bit_torch(packed, absmax, blocksize, quant_type, (n,), dtype, rule="cuda")
            assert torch.equal(bits(out), bits(ref)), (n, blocksize)
            qabsmax, nested_absmax, offset = Q.double_quantize_torch(absmax, rule="cuda")
            nested = (nested_absmax, offset)
            out = T.dequantize_4bit(packed, qabsmax, blocksize, quant_type, n, dtype, nested)
            full_absmax = Q.undo_double_quant(qabsmax, nested_absmax, offset)
            ref = Q.dequantize_blocks_4bit_torch(packed, full_absmax, blocksize, quant_type, (n,), dtype, rule="cuda")
            assert torch.equal(bits(out), bits(ref)), (n, blocksize)


def test_double_quantize():
    for n in (1, 5, 256, 257, 3000):
        absmax = sample(n, torch.float32, 64).nan_to_num().abs() + 0.5
        absmax[0], absmax[-1] = 0.0, 30.0  # a zero block's absmax, an outlier's
        q, nested_absmax, mean = T.double_quantize(absmax)
        ref_q, ref_nested, ref_offset = Q.double_quantize_torch(absmax, rule="cuda")
        assert torch.equal(q, ref_q) and torch.equal(bits(nested_absmax), bits(ref_nested)), n
        assert mean.item() == ref_offset


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8(dtype):
    x = torch.randn(37, 70, generator=torch.Generator().manual_seed(5))
    x[3, 5], x[4], x[5, 3] = 60.0, 0.0, float("nan")
    x[6] = (torch.arange(70) - 35.0) / 2  # many exact halves after scaling
    x = x.to(dtype)
    q, scb = T.quantize_int8(x)
    ref_q, ref_scb = Q.quantize_int8_torch(x, rule="cuda")
    assert torch.equal(q, ref_q) and torch.equal(bits(scb), bits(ref_scb))
    for out_dtype in DTYPES:
        assert torch.equal(bits(T.dequantize_int8(q, scb, out_dtype)), bits(Q.dequantize_int8(q, scb, out_dtype)))
