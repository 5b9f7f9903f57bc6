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

import torch
import triton
import triton.language as tl

from convert.kernels import quant

# Globals a @triton.jit function reads must be tl.constexpr.
FLT_MAX = tl.constexpr(3.4028234663852886e38)
N0, N1, N2, N3, N4, N5, N6, N7, N8, N9, N10, N11, N12, N13, N14 = (tl.constexpr(t) for t in quant.NF4_CUDA_THRESHOLDS)
F0, F1, F2, F3, F4, F5, F6 = (tl.constexpr(t) for t in quant.FP4_CUDA_THRESHOLDS)
# Tile sizes (tools/bench_quant.py measures them): 16 KiB of bf16 per program, enough bytes in flight per SM.
ELEMENTS_PER_PROGRAM = 8192
NUM_WARPS = 8


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
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    offsets = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0).to(tl.float32)
    absmax = tl.max(tl.where(x != x, -FLT_MAX, tl.abs(x)), axis=1)
    scaled = x * _reciprocal(absmax, APPROX)[:, None]
    codes = _nf4_code(scaled) if NF4 else _fp4_code(scaled)
    high, low = tl.split(tl.reshape(codes, (BLOCKS, BLOCKSIZE // 2, 2)))
    byte_offsets = rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + byte_offsets, ((high << 4) | low).to(tl.uint8), mask=byte_offsets * 2 < n)
    tl.store(absmax_ptr + rows, absmax, mask=rows * BLOCKSIZE < n)


def _blocks_per_program(blocksize: int) -> int:
    return max(1, ELEMENTS_PER_PROGRAM // blocksize)


def quantize_4bit(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 ((n + 1) // 2,), absmax fp32 (ceil(n / blocksize),)) of a flat tensor."""
    x = x.contiguous().view(-1)
    n = x.numel()
    n_blocks = triton.cdiv(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    if n:
        blocks = _blocks_per_program(blocksize)
        _quantize_4bit_kernel[(triton.cdiv(n_blocks, blocks),)](
            x, packed, absmax, n, BLOCKSIZE=blocksize, BLOCKS=blocks, NF4=quant_type == "nf4", APPROX=x.is_cuda,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return packed, absmax


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, code_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset, out_ptr, n,
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
        absmax = absmax + offset
    else:
        absmax = tl.load(absmax_ptr + rows, mask=row_mask, other=0.0)
    byte_offsets = rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    byte = tl.load(packed_ptr + byte_offsets, mask=byte_offsets * 2 < n, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4)) * absmax[:, None]
    low = tl.load(code_ptr + (byte & 15)) * absmax[:, None]
    values = tl.reshape(tl.join(high, low), (BLOCKS, BLOCKSIZE))
    offsets = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=offsets < n)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    n: int,
    dtype: torch.dtype,
    nested: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Flat ``n`` values of ``dtype``; ``absmax`` is fp32, or uint8 with ``nested = (code, nested_absmax, offset)``."""
    out = torch.empty(n, dtype=_store_dtype(dtype, packed), device=packed.device)
    if not n:
        return out.to(dtype)
    code = (quant.FP4_CODE_SIGNED if quant_type == "fp4" else quant.NF4_CODE).to(packed.device)
    nested_code, nested_absmax, offset = nested if nested is not None else (code, absmax, 0.0)
    blocks = _blocks_per_program(blocksize)
    options = {"enable_fp_fusion": False} if packed.is_cuda else {}
    _dequantize_4bit_kernel[(triton.cdiv(triton.cdiv(n, blocksize), blocks),)](
        packed.contiguous(), code, absmax.contiguous(), nested_code.to(packed.device, torch.float32).contiguous(),
        nested_absmax.contiguous(), float(offset), out, n,
        BLOCKSIZE=blocksize, BLOCKS=blocks, NESTED=nested is not None, num_warps=NUM_WARPS, **options,
    )  # fmt: skip
    return out.to(dtype)


def _store_dtype(dtype: torch.dtype, like: torch.Tensor) -> torch.dtype:
    """The interpreter (CPU) rounds fp32 -> bf16 by truncation, unlike the GPU: there the kernel stores fp32 and
    torch rounds it."""
    return torch.float32 if dtype == torch.bfloat16 and not like.is_cuda else dtype


@triton.jit
def _quantize_int8_kernel(x_ptr, q_ptr, scb_ptr, cols, BLOCK: tl.constexpr, APPROX: tl.constexpr):
    """One program per row (LLM.int8 scales rows): absmax over the row in BLOCK-wide steps, then a second pass
    ``round(x * div.approx(127, absmax))`` (kInt8VectorQuant: MUFU.RCP, two FMULs, F2I round-half-even). A zero
    row gives 0 * inf = NaN, which F2I turns into 0; NaN is left out of the absmax as by fmaxf. The rounding adds
    and subtracts 1.5 * 2**23, so the launch turns FMA contraction off: it must round the fp32 product."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, cols, BLOCK):
        c = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * cols + c, mask=c < cols, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.where(x != x, 0.0, tl.abs(x)))
    absmax = tl.max(acc, axis=0)
    tl.store(scb_ptr + row, absmax)
    scale = _divide(tl.full((BLOCK,), 127.0, tl.float32), tl.zeros((BLOCK,), tl.float32) + absmax, APPROX)
    for start in range(0, cols, BLOCK):
        c = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * cols + c, mask=c < cols, other=0.0).to(tl.float32)
        y = x * scale
        rounded = (y + 12582912.0) - 12582912.0  # 1.5 * 2**23: fp32 addition rounds to the nearest even integer
        tl.store(q_ptr + row * cols + c, tl.where(y != y, 0.0, rounded).to(tl.int8), mask=c < cols)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    rows_view = x.view(-1, x.shape[-1])
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scb = torch.empty(rows_view.shape[0], dtype=torch.float32, device=x.device)
    if x.numel():
        block = min(4096, triton.next_power_of_2(max(rows_view.shape[1], 16)))
        options = {"enable_fp_fusion": False} if x.is_cuda else {}  # round x * scale, not an fma's exact product
        _quantize_int8_kernel[(rows_view.shape[0],)](
            x, q, scb, rows_view.shape[1], BLOCK=block, APPROX=x.is_cuda, **options
        )
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


def dequantize_int8(q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = q.contiguous()
    out = torch.empty(q.shape, dtype=_store_dtype(dtype, q), device=q.device)
    if q.numel():
        block = 4096
        _dequantize_int8_kernel[(triton.cdiv(q.numel(), block),)](
            q, scb.float().contiguous(), out, q.numel(), q.shape[-1], BLOCK=block
        )
    return out.to(dtype)
