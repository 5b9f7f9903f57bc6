"""Fused LoRA / DoRA merge of one weight (or a row chunk of it) on the GPU, and its torch reference.

A merge moves bytes and does almost no arithmetic: ``W' = W + s * L @ R`` with ``L @ R``
of rank 8-128. One Triton program walks a stripe of rows tile by tile: it loads a tile of the
base (16/32-bit, or NF4/FP4 codes plus their fp32 absmax, dequantized in registers), computes
the tile's ``L @ R`` with ``tl.dot`` in IEEE fp32 (no TF32: PEFT's fp32 GEMM is the oracle),
adds, casts and stores. No full-size fp32 temporary exists; with the same input and output
dtype the write goes back into the base's own buffer, so a tensor needs no extra GPU memory.

DoRA (``W' = m / ||W + s*L@R|| * (W + s*L@R)``) takes two launches of the same kernel: the
first stores partial sums of squares of the merged tiles (per row and column split along rows,
``axis=1``, a Linear weight; per column and row stripe along stored columns, ``axis=0``:
Conv1D / fan_in_fan_out / embeddings), a small buffer summed in a fixed order, so the result is
deterministic; the second writes the scaled tiles, walking the programs in reverse so that it
starts on the tiles the first left in L2 (W is read twice: 3 bytes of traffic for each 2 of a
LoRA merge).

The product stays in fp32 FMAs: it is bit-identical to PEFT's fp32 GEMM here, where tensor-core
products (Triton's ``tf32x3``) are only as accurate, and were no faster on an H100
(tools/results/bench_gpu_merge.md).

``L`` is ``(M, K)`` and ``R`` ``(K, N)``, both fp32 and contiguous: ``B`` rows and ``A`` for a
Linear, ``A.T`` rows and ``B.T`` for a transposed weight. ``scale`` multiplies the product
after it is rounded, as PEFT's ``(B @ A) * scaling``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from convert.kernels.launch import FastLaunch

# Tiles: the fastest of tools/bench_gpu_merge.py's sweep on an H100 (tools/results/bench_gpu_merge.md).
BLOCK_M, BLOCK_N, BLOCK_K = 32, 128, 16  # a LoRA program's stripe height, its column tile, the rank step
NUM_WARPS, NUM_STAGES = 4, 3
QUANT_MAX_REGISTERS = 128  # 4-bit tiles: 4 blocks an SM instead of 3 (168 registers): 46-48% of copy, from 43-44%
PROGRAMS = 2048  # about this many programs a launch (column splits of the stripes), a dozen or more per SM
PRECISION = "ieee"  # the tile product in plain fp32 FMAs, as PEFT's fp32 GEMM (no TF32)
FUSE_4BIT = True  # 4-bit bases dequantized tile by tile inside the merge (else: a dequantize pass, then in place)

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@dataclass(frozen=True)
class Packed4bit:
    """A 4-bit base in bitsandbytes' block layout (QUANT_API.md): two codes a byte, the first in
    the high nibble, and one fp32 absmax per ``blocksize`` consecutive elements of the flat tensor."""

    packed: torch.Tensor  # uint8, (numel + 1) // 2 elements
    absmax: torch.Tensor  # float32, ceil(numel / blocksize) (double quant already undone)
    blocksize: int
    code: torch.Tensor  # float32 (16,): the NF4 or FP4 code book
    shape: tuple[int, int]
    dtype: torch.dtype  # bitsandbytes rounds dequantized values to the original dtype


Tensor = torch.Tensor
Base = torch.Tensor | Packed4bit  # a 16/32-bit base, or a 4-bit one the kernel dequantizes tile by tile


def dequantize_reference(q: Packed4bit) -> torch.Tensor:
    """``code[nibble] * absmax[block]`` in fp32, rounded to ``q.dtype``: bitsandbytes' dequantize_4bit."""
    n = q.shape[0] * q.shape[1]
    flat = q.packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].long()
    absmax = q.absmax.repeat_interleave(q.blocksize)[:n]
    return (q.code[nibbles] * absmax).to(q.dtype).reshape(q.shape)


def merge_reference(base: Base, L: Tensor, R: Tensor, scale: float, out_dtype: torch.dtype,
                    magnitude: Tensor | None = None, axis: int = 1) -> Tensor:  # fmt: skip
    """PEFT's merge in torch: fp32 ``W + (L @ R) * scale``, DoRA-scaled, rounded once to ``out_dtype``."""
    weight = dequantize_reference(base) if isinstance(base, Packed4bit) else base
    merged = weight.float() + (L @ R) * scale
    if magnitude is not None:
        factor = magnitude / torch.linalg.norm(merged, dim=axis)
        merged = merged * (factor.view(-1, 1) if axis == 1 else factor.view(1, -1))
    return merged.to(out_dtype)


def norms_reference(base: torch.Tensor | Packed4bit, L: torch.Tensor, R: torch.Tensor, scale: float, axis: int):
    weight = dequantize_reference(base) if isinstance(base, Packed4bit) else base
    return torch.linalg.norm(weight.float() + (L @ R) * scale, dim=axis)


# Triton's interpreter (the CPU tests) truncates fp32 -> bf16, where the GPU rounds to nearest
# even in one instruction: there the rounding is done on the bits. Its bf16 tl.dot is wrong too:
# there the pieces are multiplied as fp32 (the same products, exact either way).
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, rounding to nearest even (the same value on the GPU and in the interpreter)."""
    if _INTERPRETED and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _product(
    L_ptr, R_ptr, rm, cols, M, N, K: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr
):
    """``(L @ R)[rm, cols]`` in fp32: ``tl.dot`` over the rank in steps of BK (L's and R's small
    tiles come from L1/L2)."""
    acc = tl.zeros((BM, cols.shape[0]), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        lt = tl.load(L_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        rt = tl.load(R_ptr + rk[:, None] * N + cols[None, :], mask=(rk[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc += tl.dot(lt, rt, input_precision=PRECISION)
    return acc


@triton.jit
def _dequantized_tile(
    w_ptr, absmax_ptr, code_ptr, rm, n0, M, N, QBLOCK: tl.constexpr, DEQ_DTYPE: tl.constexpr,
    WHOLE_BLOCKS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """A [BM, BN] tile of a 4-bit base (rows of an even length, so each starts on a byte):
    ``code[nibble] * absmax`` rounded to DEQ_DTYPE, as bitsandbytes dequantizes (fp32, 0 outside).

    Each nibble is looked up in the 16-entry code (it stays in L1) and the two halves of the
    bytes are interleaved back in registers. WHOLE_BLOCKS (rows and the column tile made of whole
    quantization blocks): bytes loaded as [BM, BN / QBLOCK, QBLOCK / 2], one absmax load per
    block, 1.8x faster on an H100 than the general path's absmax load per byte."""
    if WHOLE_BLOCKS:
        j = tl.arange(0, BN // QBLOCK)
        first = rm[:, None].to(tl.int64) * N + n0 + j[None, :] * QBLOCK  # each block's first element
        blocks = (rm[:, None] < M) & (n0 + j[None, :] * QBLOCK < N)
        absmax = tl.load(absmax_ptr + first // QBLOCK, mask=blocks, other=0.0)[:, :, None]
        at = first[:, :, None] // 2 + tl.arange(0, QBLOCK // 2)[None, None, :]
        byte = tl.load(w_ptr + at, mask=blocks[:, :, None], other=0).to(tl.int32)
    else:
        pairs = n0 // 2 + tl.arange(0, BN // 2)
        at = rm[:, None].to(tl.int64) * (N // 2) + pairs[None, :]
        mask = (rm[:, None] < M) & (2 * pairs[None, :] < N)
        byte = tl.load(w_ptr + at, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(absmax_ptr + 2 * at // QBLOCK, mask=mask, other=0.0)
    high = tl.load(code_ptr + (byte >> 4)) * absmax
    low = tl.load(code_ptr + (byte & 15)) * absmax
    return _round(tl.reshape(tl.join(high, low), (BM, BN)), DEQ_DTYPE).to(tl.float32)


@triton.jit
def _merged_tile(
    w_ptr, absmax_ptr, code_ptr, L_ptr, R_ptr, rm, n0, M, N, K: tl.constexpr, scale,
    QUANT: tl.constexpr, QBLOCK: tl.constexpr, DEQ_DTYPE: tl.constexpr, WHOLE_BLOCKS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``W + scale * (L @ R)`` on the tile at rows ``rm``, columns ``n0 + [0, BN)`` (fp32, 0
    outside the matrix)."""
    product = _product(L_ptr, R_ptr, rm, n0 + tl.arange(0, BN), M, N, K, BM, BK, PRECISION)
    if QUANT:
        w = _dequantized_tile(w_ptr, absmax_ptr, code_ptr, rm, n0, M, N, QBLOCK, DEQ_DTYPE, WHOLE_BLOCKS, BM, BN)
        return w + product * scale
    rn = n0 + tl.arange(0, BN)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    w = tl.load(w_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], mask=mask, other=0.0)
    return w.to(tl.float32) + product * scale


@triton.jit
def _merge_kernel(
    w_ptr, absmax_ptr, code_ptr, L_ptr, R_ptr, factor_ptr, partial_ptr, out_ptr, M, N, K: tl.constexpr, scale,
    SPLIT, QUANT: tl.constexpr, QBLOCK: tl.constexpr, DEQ_DTYPE: tl.constexpr, WHOLE_BLOCKS: tl.constexpr,
    MODE: tl.constexpr, AXIS: tl.constexpr, REVERSE: tl.constexpr, SPLIT_P2: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program walks a stripe of BM rows, across its share (1 / SPLIT) of the column tiles:
    the loop lets loads of the next tile overlap the arithmetic of this one.

    MODE 0: store the merged tile, rounded to out's dtype. MODE 1: store its partial sums of
    squares along AXIS into partial (fp32, one per row and split, or per column and row stripe).
    MODE 2: store the merged tile times factor along AXIS. MODE 3 (DoRA along rows): times
    ``factor / sqrt(sum of the row's partials)``, IEEE sqrt and divide. REVERSE walks the
    programs in the opposite order, so that the first ones find in L2 what the previous launch
    read last."""
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    if REVERSE:
        pid_m, pid_s = tl.num_programs(0) - 1 - pid_m, tl.num_programs(1) - 1 - pid_s
    rm = pid_m * BM + tl.arange(0, BM)
    tiles = tl.cdiv(N, BN)
    per_split = tl.cdiv(tiles, SPLIT)
    squares = tl.zeros((BM,), dtype=tl.float32)
    if MODE == 3:
        s = tl.arange(0, SPLIT_P2)
        at = partial_ptr + rm[:, None].to(tl.int64) * SPLIT + s[None, :]
        partials = tl.load(at, mask=(rm[:, None] < M) & (s[None, :] < SPLIT), other=0.0)
        norm = tl.math.sqrt_rn(tl.sum(partials, axis=1))
        row_factor = tl.math.div_rn(tl.load(factor_ptr + rm, mask=rm < M, other=1.0), norm)
    for tile in range(pid_s * per_split, tl.minimum(tiles, (pid_s + 1) * per_split)):
        n0 = tile * BN
        t = _merged_tile(
            w_ptr, absmax_ptr, code_ptr, L_ptr, R_ptr, rm, n0, M, N, K, scale, QUANT, QBLOCK, DEQ_DTYPE,
            WHOLE_BLOCKS, BM, BN, BK, PRECISION,
        )  # fmt: skip
        rn = n0 + tl.arange(0, BN)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if MODE == 1:
            t = tl.where(mask, t, 0.0)
            if AXIS == 1:
                squares += tl.sum(t * t, axis=1)
            else:
                tl.store(partial_ptr + pid_m.to(tl.int64) * N + rn, tl.sum(t * t, axis=0), mask=rn < N)
        else:
            if MODE == 2 and AXIS == 1:
                t = t * tl.load(factor_ptr + rm, mask=rm < M, other=0.0)[:, None]
            if MODE == 2 and AXIS == 0:
                t = t * tl.load(factor_ptr + rn, mask=rn < N, other=0.0)[None, :]
            if MODE == 3:
                t = t * row_factor[:, None]
            idx = rm[:, None].to(tl.int64) * N + rn[None, :]
            tl.store(out_ptr + idx, _round(t, out_ptr.dtype.element_ty), mask=mask)
    if MODE == 1 and AXIS == 1:
        tl.store(partial_ptr + rm.to(tl.int64) * SPLIT + pid_s, squares, mask=rm < M)


_MERGE = FastLaunch(_merge_kernel)


def _base_args(base: torch.Tensor | Packed4bit, dummy: torch.Tensor) -> tuple[tuple, tuple]:
    """(w_ptr, absmax_ptr, code_ptr) and (QUANT, QBLOCK, DEQ_DTYPE, WHOLE_BLOCKS); ``dummy`` stands
    for pointers never read."""
    if isinstance(base, Packed4bit):
        whole = base.shape[1] % base.blocksize == 0 and BLOCK_N % base.blocksize == 0
        return (base.packed, base.absmax, base.code), (True, base.blocksize, _TL_DTYPES[base.dtype], whole)
    return (base, dummy, dummy), (False, 1, _TL_DTYPES[base.dtype], False)


def _splits(M: int, N: int) -> int:
    """Column splits so that the stripes give the GPU about ``PROGRAMS`` programs in all."""
    stripes, tiles = triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N)
    return max(1, min(tiles, PROGRAMS // stripes))


def _launch(base, L, R, scale, out, split, *, mode=0, axis=1, factor=None, partial=None, reverse=False) -> None:
    """One launch of ``_merge_kernel``; ``L`` stands for the pointers a mode does not read."""
    M, N = base.shape
    pointers, quant = _base_args(base, L)
    K = L.shape[1]
    BK = min(BLOCK_K, max(16, triton.next_power_of_2(K)))  # tl.dot takes at least 16
    _MERGE(
        (triton.cdiv(M, BLOCK_M), split),
        *pointers, L, R, L if factor is None else factor, L if partial is None else partial, out, M, N, K,
        float(scale), split, *quant, mode, axis, reverse, triton.next_power_of_2(split), BLOCK_M, BLOCK_N, BK,
        PRECISION, num_warps=NUM_WARPS, num_stages=NUM_STAGES, **({"maxnreg": QUANT_MAX_REGISTERS} if quant[0] else {}),
    )  # fmt: skip


def _partials(base: torch.Tensor | Packed4bit, L, R, scale, axis: int, split: int) -> torch.Tensor:
    """Sums of squares of ``W + scale * L @ R``: (M, split) along rows, (stripes, N) along columns."""
    M, N = base.shape
    shape = (M, split) if axis == 1 else (triton.cdiv(M, BLOCK_M), N)
    partial = torch.empty(shape, dtype=torch.float32, device=L.device)
    _launch(base, L, R, scale, L, split, mode=1, axis=axis, partial=partial)
    return partial


def norms_triton(base: torch.Tensor | Packed4bit, L: torch.Tensor, R: torch.Tensor, scale: float, axis: int):
    """``||W + scale * L @ R||`` along ``axis`` (fp32), tile by tile: the merged weight never exists."""
    base = _dense_if_needed(base)
    partial = _partials(base, L, R, scale, axis, _splits(*base.shape))
    return partial.sum(dim=1 if axis == 1 else 0).sqrt_()


def _dense_if_needed(base: torch.Tensor | Packed4bit, out: torch.Tensor | None = None) -> torch.Tensor | Packed4bit:
    """The fused 4-bit tile loader needs rows of whole bytes: a base with odd rows (any 4-bit base with
    ``FUSE_4BIT`` off) is dequantized first, into ``out`` when that can hold it (the merge then runs in place)."""
    if isinstance(base, Packed4bit) and (base.shape[1] % 2 or not FUSE_4BIT):
        from convert.kernels import quant_triton

        n = base.shape[0] * base.shape[1]
        into = out.view(-1) if out is not None and out.dtype == base.dtype and out.is_contiguous() else None
        code = "nf4" if base.code[0].item() == -1.0 else "fp4"
        flat = quant_triton.dequantize_4bit(base.packed.reshape(-1), base.absmax, base.blocksize, code, n, base.dtype,
                                            out=into)  # fmt: skip
        return flat.view(base.shape)
    return base


def merge_triton(base: Base, L: Tensor, R: Tensor, scale: float, out_dtype: torch.dtype,
                 magnitude: Tensor | None = None, axis: int = 1, out: Tensor | None = None) -> Tensor:  # fmt: skip
    """The Triton twin of ``merge_reference``. ``out`` may be ``base`` itself (same dtype): merged in place."""
    base = _dense_if_needed(base, out)
    if out is None:
        out = torch.empty(base.shape, dtype=out_dtype, device=L.device)
    split = _splits(*base.shape)
    if magnitude is None:
        _launch(base, L, R, scale, out, split)
    elif axis == 1:  # the row factors are computed from the partials by the write launch itself
        partial = _partials(base, L, R, scale, axis, split)
        _launch(base, L, R, scale, out, split, mode=3, factor=magnitude, partial=partial, reverse=True)
    else:
        factor = magnitude / _partials(base, L, R, scale, axis, split).sum(dim=0).sqrt_()
        _launch(base, L, R, scale, out, split, mode=2, axis=axis, factor=factor, reverse=True)
    return out
