"""convert.kernels.quant on CUDA (the Triton kernels) against bitsandbytes' CUDA kernels, byte for byte.

Skipped without CUDA; run for real on the GPU machine.
"""

from __future__ import annotations

import logging

import pytest
import torch

from convert.kernels import quant as Q
from tests.helpers import bits, quant_sample

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (7,), (4097,), (33, 130), (256, 4096), (1000, 1000)]


def sample(shape, dtype, blocksize: int, seed: int = 0) -> torch.Tensor:
    return quant_sample(shape, dtype, blocksize, seed, nan=True).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_4bit_equals_bitsandbytes_cuda(dtype, quant_type, double_quant):
    blocksizes = Q.BLOCKSIZES if dtype == torch.bfloat16 else (64, 4096)  # each is a Triton compile
    for shape in SHAPES:
        for blocksize in blocksizes:
            x = sample(shape, dtype, blocksize)
            packed, state = F.quantize_4bit(
                x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
            )
            q = Q.quantize_4bit(x, blocksize, quant_type, double_quant=double_quant)
            case = (shape, blocksize)
            assert q.packed.is_cuda and torch.equal(q.packed, packed), case
            assert q.absmax.dtype == state.absmax.dtype and torch.equal(bits(q.absmax), bits(state.absmax)), case
            if double_quant:
                assert torch.equal(bits(q.nested_absmax), bits(state.state2.absmax)), case
                assert float(q.offset) == state.offset.item(), case
            out = Q.dequantize_4bit(q)
            assert out.is_cuda and torch.equal(bits(out), bits(F.dequantize_4bit(packed, state).view(shape))), case


@pytest.mark.gpu
def test_cuda_chunks_concatenate_to_the_whole_tensor():
    x = sample((300, 4096), torch.bfloat16, 64, seed=1)
    whole = Q.quantize_4bit(x, 64, "nf4", double_quant=True)
    parts = [Q.quantize_blocks_4bit(x[i : i + 64], 64, "nf4") for i in range(0, 300, 64)]
    assert torch.equal(torch.cat([p for p, _ in parts]), whole.packed.view(-1))
    qabsmax, nested, offset = Q.double_quantize(torch.cat([a for _, a in parts]))
    assert torch.equal(qabsmax, whole.absmax) and torch.equal(nested, whole.nested_absmax)
    assert offset == float(whole.offset)
    absmax = Q.undo_double_quant(qabsmax, nested, offset)
    rows = []
    for k, (chunk, _) in enumerate(parts):
        shape = (min(64, 300 - 64 * k), 4096)
        rows.append(
            Q.dequantize_blocks_4bit(chunk, absmax[k * 4096 : (k + 1) * 4096], 64, "nf4", shape, torch.bfloat16)
        )
    assert torch.equal(bits(torch.cat(rows)), bits(Q.dequantize_4bit(whole)))


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_equals_the_torch_oracle_where_reciprocals_agree(quant_type):
    """The torch CUDA rule on the CPU uses IEEE 1/absmax where the GPU uses rcp.approx: blocks whose two
    reciprocals agree must quantize identically, and those are nearly all of them."""
    x = sample((4096, 1024), torch.bfloat16, 64, seed=2)
    packed, absmax = Q.quantize_blocks_4bit(x, 64, quant_type)
    ref_packed, ref_absmax = Q.quantize_blocks_4bit_torch(x.cpu(), 64, quant_type, rule="cuda")
    assert torch.equal(bits(absmax.cpu()), bits(ref_absmax))
    differ = (packed.cpu() != ref_packed).view(-1, 32).any(dim=1)
    approx = approx_reciprocal(absmax).cpu()
    assert not (differ & (approx == 1.0 / ref_absmax)).any()
    assert (approx == 1.0 / ref_absmax).float().mean() > 0.5


def approx_reciprocal(x: torch.Tensor) -> torch.Tensor:
    from convert.kernels import quant_triton

    out = torch.empty_like(x)
    quant_triton.reciprocal_kernel[(-(-x.numel() // 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_int8_equals_bitsandbytes_cuda(dtype):
    x = torch.randn(300, 1000)
    x[3, 5], x[4] = 60.0, 0.0
    x = x.half().cuda()  # bitsandbytes' CUDA kernel (and transformers) quantize fp16
    q, scb = Q.quantize_int8(x)
    ref_q, ref_scb, _ = F.int8_vectorwise_quant(x.clone())
    assert q.is_cuda and torch.equal(q, ref_q) and torch.equal(bits(scb), bits(ref_scb))
    out = Q.dequantize_int8(q, scb, dtype)
    assert torch.equal(bits(out), bits(F.int8_vectorwise_dequant(ref_q, ref_scb).to(dtype)))


@pytest.mark.gpu
def test_direct_launches_keep_each_specialization_apart():
    """After the first call of a specialization, launches skip Triton's binding (convert.kernels.launch). Inputs
    that Triton compiles separately (a misaligned address, a size not divisible by 16, a size of 1) must each still
    get their own kernel: every call, first or repeated, in any order, equals bitsandbytes."""
    from convert.kernels import quant_triton as T

    base = sample((8192 + 64,), torch.bfloat16, 64, seed=3)
    cases = [(0, 8192), (1, 8192), (0, 8191), (3, 1001), (0, 1), (8, 64), (0, 4096), (5, 4096)]
    for start, n in cases + cases[::-1]:
        x = base[start : start + n]
        for _ in range(2):
            packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
            ours, absmax = T.quantize_4bit(x, 64, "nf4")
            assert torch.equal(ours, packed.view(-1)) and torch.equal(bits(absmax), bits(state.absmax)), (start, n)
            stored = torch.zeros(packed.numel() + 16, dtype=torch.uint8, device="cuda")[start : start + packed.numel()]
            stored.copy_(packed.view(-1))  # the packed bytes at the same (mis)alignment
            back = T.dequantize_4bit(stored, state.absmax, 64, "nf4", n, torch.bfloat16)
            assert torch.equal(bits(back), bits(F.dequantize_4bit(packed, state).view(-1))), (start, n)
    assert (
        len(T._QUANTIZE_4BIT.compiled) >= 3 and len(T._DEQUANTIZE_4BIT.compiled) >= 3
    )  # aligned/misaligned, divisible by 16 or not, 1
