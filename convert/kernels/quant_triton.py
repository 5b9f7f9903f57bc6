"""Triton kernels for ``quant`` on CUDA: bitsandbytes' CUDA rule, one pass over the 16-bit data each.

bitsandbytes' quantizer is slow (5-9% of copy bandwidth) because each CUDA block handles one small quantization
block through shared-memory CUB loads and a block-wide reduction. Here one program owns many quantization blocks as a
2-D tile, so the absmax is a register reduction along the tile's rows and the input is read once, coalesced.

Bit-exactness with ``libbitsandbytes_cuda`` (built with ``--use_fast_math``) needs its arithmetic, not just its
formulas: ``1.0f / absmax`` and ``127.0f / absmax`` are the approximate ``rcp.approx.ftz`` / ``div.approx.ftz`` PTX
instructions there, so the kernels emit the same through inline asm. Under ``TRITON_INTERPRET=1`` (CPU) there is no
PTX: those become IEEE divisions, the same as the torch oracle ``quant.quantize_blocks_4bit_torch(rule="cuda")``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from convert.kernels import quant
from convert.kernels.launch import FastLaunch

# Globals a @triton.jit function reads must be tl.constexpr.
FLT_MAX = tl.constexpr(3.4028234663852886e38)
N0, N1, N2, N3, N4, N5, N6, N7, N8, N9, N10, N11, N12, N13, N14 = (tl.constexpr(t) for t in quant.NF4_CUDA_THRESHOLDS)
F0, F1, F2, F3, F4, F5, F6 = (tl.constexpr(t) for t in quant.FP4_CUDA_THRESHOLDS)
# Tile shapes, the fastest of tools/bench_quant.py --tune on an H100 (tools/results/bench_quant.md).
QUANTIZE_ELEMENTS, QUANTIZE_WARPS = 2048, 8  # elements a program, warps (fastest on 1024..14336 x 4096)
DEQUANTIZE_ELEMENTS, DEQUANTIZE_WARPS = 4096, 8


@functools.cache
def code_table(name: str, device: torch.device) -> torch.Tensor:
    """A code table on ``device``, copied there once (a host-to-device copy per call would cost more than a
    small matrix's whole dequantization)."""
    return {"nf4": quant.NF4_CODE, "fp4": quant.FP4_CODE_SIGNED, "dynamic": quant.DYNAMIC_CODE}[name].to(device)


@triton.jit
def _reciprocal(x, APPROX: tl.constexpr):
    if APPROX:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 1.0 / x


@triton.jit
def _divide(a, b, APPROX: tl.constexpr):
    if APPROX:
        return tl.inline_asm_elementwise(
            "div.approx.ftz.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return a / b


@triton.jit
def reciprocal_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """The GPU's 1/x as the quantize kernel takes it (tests compare it with IEEE 1/x)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=1.0)
    tl.store(out_ptr + offsets, _reciprocal(x, True), mask=offsets < n)


@triton.jit
def _nf4_code(x):
    """dQuantizeNF4's decision tree, level by level: each level's threshold is picked by the bits found so far
    (4 compares and 11 selects instead of 15 compares). NaN fails every compare: code 0, as in CUDA."""
    b3 = x > N7
    b2 = x > tl.where(b3, N11, N3)
    b1 = x > tl.where(b3, tl.where(b2, N13, N9), tl.where(b2, N5, N1))
    t0_hi = tl.where(b2, tl.where(b1, N14, N12), tl.where(b1, N10, N8))
    t0_lo = tl.where(b2, tl.where(b1, N6, N4), tl.where(b1, N2, N0))
    b0 = x > tl.where(b3, t0_hi, t0_lo)
    return b3.to(tl.int32) * 8 + b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)


@triton.jit
def _fp4_code(x):
    """dQuantizeFP4: a 3-level tree on |x| (buckets 0..7 hold codes 0,1,6,7,4,5,2,3: bit 2 flips where bit 1 is
    set), plus the sign bit for x < 0."""
    a = tl.abs(x)
    b2 = a > F3
    b1 = a > tl.where(b2, F5, F1)
    b0 = a > tl.where(b2, tl.where(b1, F6, F4), tl.where(b1, F2, F0))
    code = (b2 ^ b1).to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)
    return code + (x < 0).to(tl.int32) * 8


@triton.jit
def _quantize_4bit_kernel(
    x_ptr, packed_ptr, absmax_ptr, n,
    BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr, NF4: tl.constexpr, APPROX: tl.constexpr,
):  # fmt: skip
    """One program: a [BLOCKS, BLOCKSIZE] tile of quantization blocks -> absmax per row, two codes a byte.

    Loaded once as a tile so the absmax is a row reduction in registers; elements past ``n`` load as 0.0, which is
    what bitsandbytes' kernel pads a partial last block with (they count in its absmax and quantize the odd
    element's partner). NaN is left out of the absmax (CUDA's fmaxf), starting from -FLT_MAX as bitsandbytes does.
    The element pairs that share a byte are split apart in registers (loading them as two stride-2 tiles instead
    measured 2.5x slower).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    offsets = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0).to(tl.float32)
    high, low = tl.split(tl.reshape(x, (BLOCKS, BLOCKSIZE // 2, 2)))
    pairs = rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]  # = byte offsets
    high_abs = tl.max(tl.where(high != high, -FLT_MAX, tl.abs(high)), axis=1)
    absmax = tl.maximum(high_abs, tl.max(tl.where(low != low, -FLT_MAX, tl.abs(low)), axis=1))
    inverse = _reciprocal(absmax, APPROX)[:, None]
    if NF4:
        byte = (_nf4_code(high * inverse) << 4) | _nf4_code(low * inverse)
    else:
        byte = (_fp4_code(high * inverse) << 4) | _fp4_code(low * inverse)
    tl.store(packed_ptr + pairs, byte.to(tl.uint8), mask=2 * pairs < n)
    tl.store(absmax_ptr + rows, absmax, mask=rows * BLOCKSIZE < n)


_QUANTIZE_4BIT = FastLaunch(_quantize_4bit_kernel)


def _blocks_per_program(blocksize: int, elements: int) -> int:
    return max(1, elements // blocksize)


def quantize_4bit(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 ((n + 1) // 2,), absmax fp32 (ceil(n / blocksize),)) of a flat tensor."""
    x = x.contiguous().view(-1)
    n = x.numel()
    n_blocks = triton.cdiv(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    if n:
        blocks = _blocks_per_program(blocksize, QUANTIZE_ELEMENTS)
        _QUANTIZE_4BIT(
            (triton.cdiv(n_blocks, blocks),), x, packed, absmax, n, blocksize, blocks, quant_type == "nf4", x.is_cuda,
            num_warps=QUANTIZE_WARPS,
        )  # fmt: skip
    return packed, absmax


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, code_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, out_ptr, n,
    BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr, NESTED: tl.constexpr,
):  # fmt: skip
    """One program: a [BLOCKS, BLOCKSIZE // 2] tile of packed bytes -> ``code[q] * absmax``, rounded once to the
    output dtype, the two nibbles of a byte interleaved back in place.

    The absmax is loaded once per row of the tile; the 16-entry code is gathered (it stays in L1). With double quant
    the row's absmax is rebuilt on the fly, ``nested_code[q] * nested_absmax + offset`` with two roundings as
    bitsandbytes' two steps (the launch turns off FMA contraction), so no fp32 absmax tensor is ever written.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    row_mask = rows * BLOCKSIZE < n
    if NESTED:
        q = tl.load(absmax_ptr + rows, mask=row_mask, other=0).to(tl.int32)
        absmax = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + rows // 256, mask=row_mask, other=0.0)
        absmax = absmax + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + rows, mask=row_mask, other=0.0)
    byte_offsets = rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    byte = tl.load(packed_ptr + byte_offsets, mask=byte_offsets * 2 < n, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4)) * absmax[:, None]
    low = tl.load(code_ptr + (byte & 15)) * absmax[:, None]
    values = tl.reshape(tl.join(high, low), (BLOCKS, BLOCKSIZE))
    offsets = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=offsets < n)


_DEQUANTIZE_4BIT = FastLaunch(_dequantize_4bit_kernel)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    n: int,
    dtype: torch.dtype,
    nested: tuple[torch.Tensor, float | torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat ``n`` values of ``dtype``; ``absmax`` is fp32, or uint8 with ``nested = (nested_absmax, offset)``.
    ``out``: n contiguous values of ``dtype`` to write into, on CUDA (the caller's buffer).

    The offset is read by the kernel from device memory, so a 0-d device tensor needs no host round trip."""
    if out is None or not packed.is_cuda:
        out = torch.empty(n, dtype=_store_dtype(dtype, packed), device=packed.device)
    if not n:
        return out.to(dtype)
    code = code_table(quant_type, packed.device)
    nested_absmax, offset = nested if nested is not None else (absmax, absmax)  # (unused pointers without nesting)
    if not isinstance(offset, torch.Tensor):
        offset = torch.tensor([offset], dtype=torch.float32, device=packed.device)
    blocks = _blocks_per_program(blocksize, DEQUANTIZE_ELEMENTS)
    options = {"enable_fp_fusion": False} if packed.is_cuda else {}
    _DEQUANTIZE_4BIT(
        (triton.cdiv(triton.cdiv(n, blocksize), blocks),), packed.contiguous(), code, absmax.contiguous(),
        code_table("dynamic", packed.device), nested_absmax.contiguous(), offset, out, n,
        blocksize, blocks, nested is not None, num_warps=DEQUANTIZE_WARPS, **options,
    )  # fmt: skip
    return out if out.dtype == dtype else out.to(dtype)


def _store_dtype(dtype: torch.dtype, like: torch.Tensor) -> torch.dtype:
    """The interpreter (CPU) rounds fp32 -> bf16 by truncation, unlike the GPU: there the kernel stores fp32 and
    torch rounds it."""
    return torch.float32 if dtype == torch.bfloat16 and not like.is_cuda else dtype


@triton.jit
def _double_quantize_kernel(absmax_ptr, mean_ptr, code_ptr, q_ptr, nested_ptr, n, APPROX: tl.constexpr):
    """One program per block of 256 absmax values: ``absmax - mean`` -> 8-bit dynamic code (kQuantizeBlockwise
    with the General8bit code). dQuantize<0> is transcribed step by step: a 7-step binary search over the 256
    sorted codes from pivot 127 (the codes gathered from L1), then the fp32 midpoint ``(neighbour + code) * 0.5``
    between the pivot and its neighbour on x's side decides. The mean stays on the device (no sync)."""
    offsets = tl.program_id(0) * 256 + tl.arange(0, 256)
    mask = offsets < n
    x = tl.where(mask, tl.load(absmax_ptr + offsets, mask=mask, other=0.0) - tl.load(mean_ptr), 0.0)
    nested = tl.max(tl.where(x != x, -FLT_MAX, tl.abs(x)), axis=0)
    tl.store(nested_ptr + tl.program_id(0), nested)
    x = x * _reciprocal(tl.zeros((256,), tl.float32) + nested, APPROX)
    pivot = tl.full((256,), 127, tl.int32)
    lower_pivot = tl.zeros((256,), tl.int32)
    upper_pivot = tl.full((256,), 255, tl.int32)
    lower = tl.full((256,), -1.0, tl.float32)
    upper = tl.full((256,), 1.0, tl.float32)
    val = tl.load(code_ptr + pivot)
    for i in tl.static_range(7):
        right = x > val
        lower_pivot, lower = tl.where(right, pivot, lower_pivot), tl.where(right, val, lower)
        upper_pivot, upper = tl.where(right, upper_pivot, pivot), tl.where(right, upper, val)
        pivot = pivot + tl.where(right, 64 >> i, -(64 >> i))
        val = tl.load(code_ptr + pivot)
    upper = tl.where(upper_pivot == 255, tl.load(code_ptr + upper_pivot), upper)
    lower = tl.where(lower_pivot == 0, tl.load(code_ptr + lower_pivot), lower)
    go_up = tl.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    go_down = tl.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    tl.store(q_ptr + offsets, tl.where(x > val, go_up, go_down).to(tl.uint8), mask=mask)


_DOUBLE_QUANTIZE = FastLaunch(_double_quantize_kernel)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 absmax, nested absmax fp32, offset as a 0-d device tensor) of an fp32 absmax."""
    mean = absmax.mean()  # torch's reduction, as bitsandbytes: the offset's last bit follows its summation order
    n = absmax.numel()
    q = torch.empty(n, dtype=torch.uint8, device=absmax.device)
    nested = torch.empty(triton.cdiv(n, 256), dtype=torch.float32, device=absmax.device)
    if n:
        dynamic = code_table("dynamic", absmax.device)
        _DOUBLE_QUANTIZE((nested.numel(),), absmax.contiguous(), mean, dynamic, q, nested, n, absmax.is_cuda)
    return q, nested, mean


@triton.jit
def _quantize_int8_kernel(x_ptr, q_ptr, scb_ptr, cols, BLOCK: tl.constexpr, CHUNKS: tl.constexpr, APPROX: tl.constexpr):
    """One program per row (LLM.int8 scales rows): absmax over the row in BLOCK-wide steps, then a second pass
    ``round(x * div.approx(127, absmax))`` (kInt8VectorQuant: MUFU.RCP, two FMULs, F2I round-half-even). A zero
    row gives 0 * inf = NaN, which F2I turns into 0; NaN is left out of the absmax as by fmaxf. The rounding adds
    and subtracts 1.5 * 2**23, so the launch turns FMA contraction off: it must round the fp32 product."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for chunk in range(CHUNKS):
        c = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * cols + c, mask=c < cols, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.where(x != x, 0.0, tl.abs(x)))
    absmax = tl.max(acc, axis=0)
    tl.store(scb_ptr + row, absmax)
    scale = _divide(tl.full((BLOCK,), 127.0, tl.float32), tl.zeros((BLOCK,), tl.float32) + absmax, APPROX)
    for chunk in range(CHUNKS):
        c = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * cols + c, mask=c < cols, other=0.0).to(tl.float32)
        y = x * scale
        rounded = (y + 12582912.0) - 12582912.0  # 1.5 * 2**23: fp32 addition rounds to the nearest even integer
        tl.store(q_ptr + row * cols + c, tl.where(y != y, 0.0, rounded).to(tl.int8), mask=c < cols)


_QUANTIZE_INT8 = FastLaunch(_quantize_int8_kernel)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    rows_view = x.view(-1, x.shape[-1])
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scb = torch.empty(rows_view.shape[0], dtype=torch.float32, device=x.device)
    if x.numel():
        cols = rows_view.shape[1]
        block = min(4096, triton.next_power_of_2(max(cols, 16)))
        options = {"enable_fp_fusion": False} if x.is_cuda else {}  # round x * scale, not an fma's exact product
        _QUANTIZE_INT8((rows_view.shape[0],), x, q, scb, cols, block, triton.cdiv(cols, block), x.is_cuda, **options)
    return q, scb


@triton.jit
def _dequantize_int8_kernel(q_ptr, scb_ptr, out_ptr, n, cols, BLOCK: tl.constexpr):
    """``q * SCB[row] * (1/127 in fp32)``, two roundings as torch does it, then the output dtype: elementwise, the
    row scale gathered from L1."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    q = tl.load(q_ptr + offsets, mask=mask, other=0).to(tl.float32)
    scb = tl.load(scb_ptr + offsets // cols, mask=mask, other=0.0)
    out = (q * scb) * 0.007874015718698502
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


_DEQUANTIZE_INT8 = FastLaunch(_dequantize_int8_kernel)


def dequantize_int8(q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = q.contiguous()
    out = torch.empty(q.shape, dtype=_store_dtype(dtype, q), device=q.device)
    if q.numel():
        block = 4096
        grid = (triton.cdiv(q.numel(), block),)
        _DEQUANTIZE_INT8(grid, q, scb.float().contiguous(), out, q.numel(), q.shape[-1], block)
    return out.to(dtype)
