"""Fused LoRA / DoRA merge of one weight (or a row chunk of it) on the GPU, and its torch reference.

A merge moves bytes and does almost no arithmetic: ``W' = W + s * L @ R`` with ``L @ R``
of rank 8-128. One Triton program walks a stripe of rows tile by tile: it loads a tile of the
base (16/32-bit, or NF4/FP4 codes plus their fp32 absmax, dequantized in registers), computes
the tile's ``L @ R`` with ``tl.dot`` in IEEE fp32 (no TF32: PEFT's fp32 GEMM is the oracle),
adds, casts and stores. No full-size fp32 temporary exists; with the same input and output
dtype the write goes back into the base's own buffer, so a tensor needs no extra GPU memory.

DoRA (``W' = m / ||W + s*L@R|| * (W + s*L@R)``): along rows (``axis=1``, a Linear weight) one
launch: each program walks its rows twice, for the norms and then for the scaled write, the
second walk served from L2. Along stored columns (``axis=0``: Conv1D / fan_in_fan_out /
embeddings) a first launch stores partial sums of squares per row stripe (a ``1/BLOCK_M``
sized buffer, summed by torch in a fixed order, so the result is deterministic) and a second
one writes the scaled tiles.

``L`` is ``(M, K)`` and ``R`` ``(K, N)``, both fp32 and contiguous: ``B`` rows and ``A`` for a
Linear, ``A.T`` rows and ``B.T`` for a transposed weight. ``scale`` multiplies the product
after it is rounded, as PEFT's ``(B @ A) * scaling``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Tiles: the fastest of tools/bench_gpu_merge.py's sweep on an H100 (tools/results/bench_gpu_merge.md).
BLOCK_M, BLOCK_N, BLOCK_K = 32, 128, 16  # a LoRA program's stripe height, its column tile, the rank step
NUM_WARPS, NUM_STAGES = 4, 3
PROGRAMS = 1024  # about this many programs a launch (column splits of the stripes), a few per SM
DORA_ROWS, DORA_BLOCK_N, DORA_WARPS = 16, 256, 4  # DoRA rows kernel: rows a program, column tile
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


def dequantize_reference(q: Packed4bit) -> torch.Tensor:
    """``code[nibble] * absmax[block]`` in fp32, rounded to ``q.dtype``: bitsandbytes' dequantize_4bit."""
    n = q.shape[0] * q.shape[1]
    flat = q.packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].long()
    absmax = q.absmax.repeat_interleave(q.blocksize)[:n]
    return (q.code[nibbles] * absmax).to(q.dtype).reshape(q.shape)


def merge_reference(
    base: torch.Tensor | Packed4bit,
    L: torch.Tensor,
    R: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    magnitude: torch.Tensor | None = None,
    axis: int = 1,
) -> torch.Tensor:
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


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, rounding to nearest even. bf16 is rounded on the bits, because Triton's
    interpreter truncates fp32 -> bf16 (the GPU rounds; the result is the same value either way)."""
    if DTYPE == tl.bfloat16:
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
def _merged_tile(
    w_ptr, absmax_ptr, code_ptr, L_ptr, R_ptr, rm, n0, M, N, K: tl.constexpr, scale,
    QUANT: tl.constexpr, QBLOCK: tl.constexpr, DEQ_DTYPE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, EVICT: tl.constexpr,
):  # fmt: skip
    """``W + scale * (L @ R)`` on the tile at rows ``rm``, columns ``n0 + [0, BN)`` (fp32, 0
    outside the matrix).

    A 4-bit base (rows of an even length, so each row starts on a byte) loads a [BM, BN / 2]
    tile of bytes; each nibble is looked up in the 16-entry code (it stays in L1), multiplied by
    its block's absmax and rounded to the dtype bitsandbytes dequantizes to, and the two halves
    are interleaved back in registers. (Computing the product apart for even and odd columns,
    to skip the interleave before the add, measured half as fast on an H100.)"""
    product = _product(L_ptr, R_ptr, rm, n0 + tl.arange(0, BN), M, N, K, BM, BK, PRECISION)
    if QUANT:
        pairs = n0 // 2 + tl.arange(0, BN // 2)
        mask = (rm[:, None] < M) & (2 * pairs[None, :] < N)
        at = rm[:, None].to(tl.int64) * (N // 2) + pairs[None, :]
        byte = tl.load(w_ptr + at, mask=mask, other=0, eviction_policy=EVICT).to(tl.int32)
        absmax = tl.load(absmax_ptr + 2 * at // QBLOCK, mask=mask, other=0.0)
        high = tl.load(code_ptr + (byte >> 4)) * absmax
        low = tl.load(code_ptr + (byte & 15)) * absmax
        w = _round(tl.reshape(tl.join(high, low), (BM, BN)), DEQ_DTYPE).to(tl.float32)
        return w + product * scale
    rn = n0 + tl.arange(0, BN)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    w = tl.load(w_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], mask=mask, other=0.0, eviction_policy=EVICT)
    return w.to(tl.float32) + product * scale


@triton.jit
def _lora_kernel(
    w_ptr, absmax_ptr, code_ptr, L_ptr, R_ptr, factor_ptr, out_ptr, M, N, K: tl.constexpr, scale, SPLIT,
    QUANT: tl.constexpr, QBLOCK: tl.constexpr, DEQ_DTYPE: tl.constexpr,
    NORMS: tl.constexpr, AXIS: tl.constexpr, SCALED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program walks a stripe of BM rows, across its share (1 / SPLIT) of the column tiles:
    the loop lets loads of the next tile overlap the arithmetic of this one.

    NORMS: store the partial sums of squares along AXIS into out (fp32, one per row and split,
    or per column and row stripe). Otherwise: store the merged tile, times factor along AXIS when
    SCALED, rounded to out's dtype."""
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    tiles = tl.cdiv(N, BN)
    per_split = tl.cdiv(tiles, SPLIT)
    squares = tl.zeros((BM,), dtype=tl.float32)
    for tile in range(pid_s * per_split, tl.minimum(tiles, (pid_s + 1) * per_split)):
        n0 = tile * BN
        t = _merged_tile(
            w_ptr, absmax_ptr, code_ptr, L_ptr, R_ptr, rm, n0, M, N, K, scale, QUANT, QBLOCK, DEQ_DTYPE,
            BM, BN, BK, PRECISION, "",
        )  # fmt: skip
        rn = n0 + tl.arange(0, BN)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if NORMS:
            t = tl.where(mask, t, 0.0)
            if AXIS == 1:
                squares += tl.sum(t * t, axis=1)
            else:
                tl.store(out_ptr + pid_m.to(tl.int64) * N + rn, tl.sum(t * t, axis=0), mask=rn < N)
        else:
            if SCALED:
                if AXIS == 1:
                    t = t * tl.load(factor_ptr + rm, mask=rm < M, other=0.0)[:, None]
                else:
                    t = t * tl.load(factor_ptr + rn, mask=rn < N, other=0.0)[None, :]
            idx = rm[:, None].to(tl.int64) * N + rn[None, :]
            tl.store(out_ptr + idx, _round(t, out_ptr.dtype.element_ty), mask=mask)
    if NORMS and AXIS == 1:
        tl.store(out_ptr + rm.to(tl.int64) * SPLIT + pid_s, squares, mask=rm < M)


@triton.jit
def _dora_rows_kernel(
    w_ptr, absmax_ptr, code_ptr, L_ptr, R_ptr, m_ptr, out_ptr, M, N, K: tl.constexpr, scale,
    QUANT: tl.constexpr, QBLOCK: tl.constexpr, DEQ_DTYPE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """DoRA along rows in one launch: a program walks its BM whole rows twice, first for their
    norms, then to write ``m / norm`` times the merged tiles (IEEE sqrt and divide). The first
    walk asks L2 to keep the rows, so that the second finds part of them there."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    squares = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        t = _merged_tile(
            w_ptr, absmax_ptr, code_ptr, L_ptr, R_ptr, rm, n0, M, N, K, scale, QUANT, QBLOCK, DEQ_DTYPE,
            BM, BN, BK, PRECISION, "evict_last",
        )  # fmt: skip
        squares += tl.sum(t * t, axis=1)  # outside the matrix the tile is 0
    factor = tl.math.div_rn(tl.load(m_ptr + rm, mask=rm < M, other=1.0), tl.math.sqrt_rn(squares))
    for n0 in range(0, N, BN):
        t = _merged_tile(
            w_ptr, absmax_ptr, code_ptr, L_ptr, R_ptr, rm, n0, M, N, K, scale, QUANT, QBLOCK, DEQ_DTYPE,
            BM, BN, BK, PRECISION, "evict_first",
        )  # fmt: skip
        rn = n0 + tl.arange(0, BN)
        idx = rm[:, None].to(tl.int64) * N + rn[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out_ptr + idx, _round(t * factor[:, None], out_ptr.dtype.element_ty), mask=mask)


def _base_args(base: torch.Tensor | Packed4bit, dummy: torch.Tensor) -> dict:
    """The kernels' base pointers and switches; ``dummy`` stands for pointers never read."""
    if isinstance(base, Packed4bit):
        return dict(w_ptr=base.packed, absmax_ptr=base.absmax, code_ptr=base.code, QUANT=True,
                    QBLOCK=base.blocksize, DEQ_DTYPE=_TL_DTYPES[base.dtype])  # fmt: skip
    return dict(w_ptr=base, absmax_ptr=dummy, code_ptr=dummy, QUANT=False, QBLOCK=1, DEQ_DTYPE=_TL_DTYPES[base.dtype])


def _rank_args(L: torch.Tensor) -> dict:
    K = L.shape[1]
    return dict(K=K, BK=min(BLOCK_K, max(16, triton.next_power_of_2(K))), PRECISION=PRECISION)


def _splits(M: int, N: int) -> int:
    """Column splits so that the stripes give the GPU about ``PROGRAMS`` programs in all."""
    stripes, tiles = triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N)
    return max(1, min(tiles, PROGRAMS // stripes))


def _launch(base, L, R, scale, out, *, norms=False, axis=1, factor=None, split=None) -> None:
    M, N = base.shape
    split = split or _splits(M, N)
    _lora_kernel[(triton.cdiv(M, BLOCK_M), split)](
        **_base_args(base, L), L_ptr=L, R_ptr=R, factor_ptr=factor if factor is not None else L, out_ptr=out,
        M=M, N=N, scale=float(scale), SPLIT=split, NORMS=norms, AXIS=axis, SCALED=factor is not None,
        BM=BLOCK_M, BN=BLOCK_N, **_rank_args(L), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip


def norms_triton(base: torch.Tensor | Packed4bit, L: torch.Tensor, R: torch.Tensor, scale: float, axis: int):
    """``||W + scale * L @ R||`` along ``axis`` (fp32), tile by tile: the merged weight never exists.
    Partial sums go to a small buffer (one per row and split, or per column and row stripe) that
    torch sums in a fixed order, so the result is deterministic."""
    base = _dense_if_needed(base)
    M, N = base.shape
    split = _splits(M, N) if axis == 1 else 1
    shape = (M, split) if axis == 1 else (triton.cdiv(M, BLOCK_M), N)
    partial = torch.empty(shape, dtype=torch.float32, device=L.device)
    _launch(base, L, R, scale, partial, norms=True, axis=axis, split=split)
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


def merge_triton(
    base: torch.Tensor | Packed4bit,
    L: torch.Tensor,
    R: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    magnitude: torch.Tensor | None = None,
    axis: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton twin of ``merge_reference``. ``out`` may be ``base`` itself (same dtype): merged in place."""
    base = _dense_if_needed(base, out)
    if out is None:
        out = torch.empty(base.shape, dtype=out_dtype, device=L.device)
    M, N = base.shape
    if magnitude is not None and axis == 1:
        _dora_rows_kernel[(triton.cdiv(M, DORA_ROWS),)](
            **_base_args(base, L), L_ptr=L, R_ptr=R, m_ptr=magnitude, out_ptr=out, M=M, N=N, scale=float(scale),
            BM=DORA_ROWS, BN=DORA_BLOCK_N, **_rank_args(L), num_warps=DORA_WARPS, num_stages=NUM_STAGES,
        )  # fmt: skip
        return out
    factor = magnitude / norms_triton(base, L, R, scale, axis) if magnitude is not None else None
    _launch(base, L, R, scale, out, axis=axis, factor=factor)
    return out
