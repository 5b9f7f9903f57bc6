"""The FP8 Triton kernels on a real GPU: the same bits as the torch references on the CPU (transformers'
``Fp8Quantize`` / ``Fp8Dequantize`` arithmetic), and as torch running that arithmetic on CUDA.

Skipped without CUDA; run for real on the GPU machine."""

from __future__ import annotations

import pytest
import torch

from convert.kernels import fp8 as F

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")
SHAPES = [((4096, 4096), (128, 128)), ((576, 7168), (128, 128)), ((1000, 300), (128, 128)), ((72, 100), (32, 32))]


def sample(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(shape[0] + shape[1])
    x = torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[1])
    x[:3] = 0.0
    return x.to(dtype)


@cuda
@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_quantize_on_cuda_equals_the_cpu_reference(shape, block, dtype) -> None:
    w = sample(shape, dtype)
    q, inv = F.quantize(w.cuda(), block)  # the Triton kernel
    ref_q, ref_inv = F.quantize_torch(w, block)
    assert torch.equal(q.cpu().view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(inv.cpu(), ref_inv)
    torch_q, torch_inv = F.quantize_torch(w.cuda(), block)  # torch's own CUDA ops, the same arithmetic
    assert torch.equal(torch_q.cpu().view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(
        torch_inv.cpu(), ref_inv
    )


@cuda
@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dequantize_on_cuda_equals_the_cpu_reference(shape, block, dtype) -> None:
    q, inv = F.quantize_torch(sample(shape, torch.float32), block)
    for first in (0, 5, shape[0] // 2):
        s = inv[first // block[0] :]
        out = F.dequantize(q[first:].cuda(), s.cuda(), block, first, dtype)  # the Triton kernel
        assert torch.equal(out.cpu(), F.dequantize_torch(q[first:], s, block, first, dtype)), first
