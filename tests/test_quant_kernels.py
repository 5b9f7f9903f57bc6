"""convert.kernels.quant against bitsandbytes itself (CPU here; tests/test_quant_gpu.py does CUDA).

Every packed byte, absmax, nested absmax and offset must equal bitsandbytes' own ``quantize_4bit``, and every
dequantized value must equal its ``dequantize_4bit`` bit for bit.
"""

from __future__ import annotations

import logging

import pytest
import torch

from convert.kernels import quant as Q
from tests.helpers import bits, quant_sample

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "no CPU gemm kernel" notice at import
F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (7,), (64,), (200,), (1000,), (4097,), (3, 5), (48, 96), (33, 130), (16, 256)]






def bnb_dequantize(packed, state, shape):
    """bitsandbytes' dequantize_4bit; its CPU kernel mixes rows up when a row is not whole blocks, so such tensors
    are dequantized as one row (the layout is flat either way)."""
    if len(shape) > 1 and shape[-1] % state.blocksize and shape[-1] % 2 == 0:
        state.shape = torch.Size([state.shape.numel()])
    return F.dequantize_4bit(packed, state).reshape(shape)


def test_codes_equal_bitsandbytes():
    assert torch.equal(bits(Q.NF4_CODE), bits(F.get_4bit_type("nf4", device="cpu")))
    assert torch.equal(bits(Q.FP4_CODE), bits(F.get_4bit_type("fp4", device="cpu")))
    assert torch.equal(bits(Q.DYNAMIC_CODE), bits(F.create_dynamic_map(signed=True)))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_and_dequantize_4bit_equal_bitsandbytes(dtype, quant_type, double_quant):
    for shape in SHAPES:
        for blocksize in Q.BLOCKSIZES:
            x = quant_sample(shape, dtype, blocksize)
            packed, state = F.quantize_4bit(
                x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
            )
            q = Q.quantize_4bit(x, blocksize, quant_type, double_quant=double_quant)
            case = (shape, blocksize)
            assert q.packed.dtype == torch.uint8 and torch.equal(q.packed, packed), case
            assert q.absmax.dtype == state.absmax.dtype and torch.equal(bits(q.absmax), bits(state.absmax)), case
            if double_quant:
                assert torch.equal(bits(q.nested_absmax), bits(state.state2.absmax)), case
                assert q.offset == state.offset.item(), case
                assert torch.equal(bits(state.state2.code), bits(Q.DYNAMIC_CODE)), case
            else:
                assert q.nested_absmax is None and q.offset is None
            ours, theirs = Q.dequantize_4bit(q), bnb_dequantize(packed, state, shape)
            assert ours.shape == x.shape and ours.dtype == dtype
            if quant_type == "fp4":  # bitsandbytes' own CPU kernels disagree on the sign of FP4's zero
                ours, theirs = ours + 0.0, theirs + 0.0
            assert torch.equal(bits(ours), bits(theirs)), case


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nan_and_inf_blocks_as_bitsandbytes(quant_type):
    x = torch.randn(4, 64)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    x[3, :] = float("-inf")
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    q = Q.quantize_4bit(x, 64, quant_type)
    assert torch.equal(q.packed, packed) and torch.equal(bits(q.absmax), bits(state.absmax))


def test_dequantize_to_another_dtype():
    x = quant_sample((32, 64), torch.bfloat16, 64)
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    q = Q.quantize_4bit(x, 64, "nf4")
    state.dtype = torch.float16
    assert torch.equal(bits(Q.dequantize_4bit(q, torch.float16)), bits(F.dequantize_4bit(packed, state)))


@pytest.mark.parametrize("blocksize,rows", [(64, 3), (4096, 32)])
def test_chunks_concatenate_to_the_whole_tensor(blocksize, rows):
    """The streaming rule of QUANT_API.md: row chunks of whole blocks (the last one shorter), double quant at the
    end; dequantizing the same row chunks gives the whole tensor's rows."""
    x = quant_sample((97, 640), torch.bfloat16, blocksize, seed=3)
    whole = Q.quantize_4bit(x, blocksize, "nf4", double_quant=True)
    parts = [Q.quantize_blocks_4bit(x[i : i + rows], blocksize, "nf4") for i in range(0, 97, rows)]
    assert parts[-1][0].numel() < parts[0][0].numel()
    packed = torch.cat([p for p, _ in parts])
    absmax = torch.cat([a for _, a in parts])
    assert torch.equal(packed, whole.packed.view(-1)) and torch.equal(
        absmax, F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")[1].absmax
    )
    qabsmax, nested, offset = Q.double_quantize(absmax)
    assert torch.equal(qabsmax, whole.absmax) and torch.equal(nested, whole.nested_absmax) and offset == whole.offset
    full_absmax = Q.undo_double_quant(qabsmax, nested, offset)
    chunks, start = [], 0
    for (chunk_packed, chunk_absmax), i in zip(parts, range(0, 97, rows), strict=True):
        n_rows = min(rows, 97 - i)
        chunk_absmax = full_absmax[start : start + chunk_absmax.numel()]
        start += chunk_absmax.numel()
        chunks.append(Q.dequantize_blocks_4bit(chunk_packed, chunk_absmax, blocksize, "nf4", (n_rows, 640), x.dtype))
    assert torch.equal(bits(torch.cat(chunks)), bits(Q.dequantize_4bit(whole)))


def test_bad_arguments_are_refused():
    x = torch.randn(64)
    with pytest.raises(ValueError, match="blocksize"):
        Q.quantize_4bit(x, blocksize=16)
    with pytest.raises(ValueError, match="quant_type"):
        Q.quantize_4bit(x, quant_type="int4")
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        Q.quantize_4bit(x.double())


# ------------------------------------------------------------------------------------------------ CUDA rule


def dquantize_nf4(x: float) -> int:
    """csrc/kernels.cu's dQuantizeNF4, transcribed: the oracle of the torch CUDA rule on CPU."""
    t = [torch.tensor(v, dtype=torch.float32).item() for v in Q.NF4_CUDA_THRESHOLDS]
    if x > t[7]:
        if x > t[11]:
            return (15 if x > t[14] else 14) if x > t[13] else (13 if x > t[12] else 12)
        return (11 if x > t[10] else 10) if x > t[9] else (9 if x > t[8] else 8)
    if x > t[3]:
        return (7 if x > t[6] else 6) if x > t[5] else (5 if x > t[4] else 4)
    return (3 if x > t[2] else 2) if x > t[1] else (1 if x > t[0] else 0)


def dquantize_fp4(x: float) -> int:
    sign = 0b1000 if x < 0 else 0
    a = abs(x)
    t = [torch.tensor(v, dtype=torch.float32).item() for v in Q.FP4_CUDA_THRESHOLDS]
    if a > t[3]:
        return sign + ((0b011 if a > t[6] else 0b010) if a > t[5] else (0b101 if a > t[4] else 0b100))
    return sign + ((0b111 if a > t[2] else 0b110) if a > t[1] else (0b001 if a > t[0] else 0b000))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_rule_is_the_cuda_decision_tree(quant_type):
    x = torch.cat([torch.randn(2000), torch.tensor(Q.NF4_CUDA_THRESHOLDS + Q.FP4_CUDA_THRESHOLDS)])
    x = torch.cat([x, -x, torch.tensor([0.0, -0.0, 1e-40, float("nan")])]).view(1, -1)  # one block, absmax 1
    x = x / x.nan_to_num().abs().max()
    packed, absmax = Q.quantize_blocks_4bit_torch(torch.cat([x.view(-1), torch.ones(1)]), 8192, quant_type, "cuda")
    codes = torch.stack([packed >> 4, packed & 15], 1).view(-1)[: x.numel()]
    tree = dquantize_nf4 if quant_type == "nf4" else dquantize_fp4
    scaled = (x.view(-1) * (1.0 / absmax[0])).tolist()
    assert codes.tolist() == [tree(v) for v in scaled]


# ------------------------------------------------------------------------------------------------------ int8


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_equals_bitsandbytes(dtype):
    x = torch.randn(37, 70).to(dtype)
    x[3, 5] = 60.0  # an outlier
    x[4] = 0.0  # a zero row
    q, scb = Q.quantize_int8(x)
    ref_q, ref_scb, _ = F.int8_vectorwise_quant(x.clone())
    assert q.dtype == torch.int8 and torch.equal(q, ref_q)
    assert scb.dtype == torch.float32 and torch.equal(bits(scb), bits(ref_scb))
    for out_dtype in DTYPES:
        ours = Q.dequantize_int8(q, scb, out_dtype)
        theirs = F.int8_vectorwise_dequant(ref_q, ref_scb).to(out_dtype)
        assert torch.equal(bits(ours), bits(theirs))
