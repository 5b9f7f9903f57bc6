"""Fused LoRA / DoRA merge of one weight (or a row chunk of it) on the GPU, and its torch reference.

A merge moves bytes and does almost no arithmetic: ``W' = W + s * L @ R`` with ``L @ R``
of rank 8-128. One Triton program loads a tile of the base (16/32-bit, or NF4/FP4 codes
plus their fp32 absmax, dequantized in registers), computes the tile's ``L @ R`` with
``tl.dot`` in IEEE fp32 (no TF32: PEFT's fp32 GEMM is the oracle), adds, casts and stores.
No full-size fp32 temporary exists; with the same input and output dtype the write goes
back into the base's own buffer, so a tensor needs no extra GPU memory at all.

DoRA (``W' = m / ||W + s*L@R|| * (W + s*L@R)``): along rows (``axis=1``, a Linear weight)
one program holds one or two whole rows in registers (rows up to ``DORA_MAX_ROW``): it reads
them once, takes their norms, writes them scaled, moving the same bytes as a LoRA merge.
Along stored columns (``axis=0``: Conv1D / fan_in_fan_out / embeddings), or for wider rows, a
first launch stores each tile's partial sums of squares (a ``1/BLOCK`` sized buffer, summed by
torch in a fixed order, so the result is deterministic) and a second one writes the scaled tiles.

``L`` is ``(M, K)`` and ``R`` ``(K, N)``, both fp32 and contiguous: ``B`` rows and ``A`` for a
Linear, ``A.T`` rows and ``B.T`` for a transposed weight. ``scale`` multiplies the product
after it is rounded, as PEFT's ``(B @ A) * scaling``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 16  # the fastest of tools/bench_gpu_merge.py's sweep on an H100
NUM_WARPS = 4
USE_DOT = True  # tl.dot for the LoRA tile's product; False: rank-1 updates (the bench compares both)
# DoRA rows kernel: elements per program, widest row (wider rows spill registers: two launches are faster)
DORA_TILE, DORA_MAX_ROW, DORA_WARPS = 16384, 8192, 8

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
def _merged_tile(
    w_ptr, absmax_ptr, code_ptr, L_ptr, R_ptr, rm, rn, M, N, K: tl.constexpr, scale,
    QUANT: tl.constexpr, QBLOCK: tl.constexpr, DEQ_DTYPE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
):  # fmt: skip
    """The fp32 tile ``W[rm, rn] + scale * (L @ R)[rm, rn]``, its mask and flat indices.

    The product is ``tl.dot`` in IEEE fp32 (needs BM >= 16), or with USE_DOT off K rank-1
    updates in registers, for tiles of a few whole rows."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if USE_DOT:
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            lt = tl.load(L_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            rt = tl.load(R_ptr + rk[:, None] * N + rn[None, :], mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc += tl.dot(lt, rt, input_precision="ieee")
    else:
        for k in range(K):
            lk = tl.load(L_ptr + rm * K + k, mask=rm < M, other=0.0)
            rk = tl.load(R_ptr + k * N + rn, mask=rn < N, other=0.0)
            acc += lk[:, None] * rk[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    idx = rm[:, None].to(tl.int64) * N + rn[None, :]
    if QUANT:
        byte = tl.load(w_ptr + idx // 2, mask=mask, other=0)
        nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 15).to(tl.int32)
        w = tl.load(code_ptr + nibble, mask=mask, other=0.0) * tl.load(absmax_ptr + idx // QBLOCK, mask=mask, other=0.0)
        w = _round(w, DEQ_DTYPE).to(tl.float32)
    else:
        w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return w + acc * scale, mask, idx


@triton.jit
def _lora_kernel(
    w_ptr, absmax_ptr, code_ptr, L_ptr, R_ptr, factor_ptr, out_ptr, M, N, K: tl.constexpr, scale,
    QUANT: tl.constexpr, QBLOCK: tl.constexpr, DEQ_DTYPE: tl.constexpr,
    NORMS: tl.constexpr, AXIS: tl.constexpr, SCALED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
):  # fmt: skip
    """NORMS: store the tile's partial sums of squares along AXIS into out (fp32, one per row and
    column block or column and row block). Otherwise: store the merged tile, times factor along
    AXIS when SCALED, cast to out's dtype."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    t, mask, idx = _merged_tile(
        w_ptr, absmax_ptr, code_ptr, L_ptr, R_ptr, rm, rn, M, N, K, scale, QUANT, QBLOCK, DEQ_DTYPE, BM, BN, BK, USE_DOT
    )
    if NORMS:
        t = tl.where(mask, t, 0.0)
        if AXIS == 1:
            tl.store(out_ptr + rm.to(tl.int64) * tl.num_programs(1) + pid_n, tl.sum(t * t, axis=1), mask=rm < M)
        else:
            tl.store(out_ptr + pid_m.to(tl.int64) * N + rn, tl.sum(t * t, axis=0), mask=rn < N)
    else:
        if SCALED:
            if AXIS == 1:
                t = t * tl.load(factor_ptr + rm, mask=rm < M, other=0.0)[:, None]
            else:
                t = t * tl.load(factor_ptr + rn, mask=rn < N, other=0.0)[None, :]
        tl.store(out_ptr + idx, _round(t, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dora_rows_kernel(
    w_ptr, absmax_ptr, code_ptr, L_ptr, R_ptr, m_ptr, out_ptr, M, N, K: tl.constexpr, scale,
    QUANT: tl.constexpr, QBLOCK: tl.constexpr, DEQ_DTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """DoRA on BM whole rows held in registers (BN >= N): one read, the norms, ``m / norm`` (IEEE
    sqrt and divide), one write. The same bytes as a LoRA merge."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.arange(0, BN)
    t, mask, idx = _merged_tile(
        w_ptr, absmax_ptr, code_ptr, L_ptr, R_ptr, rm, rn, M, N, K, scale, QUANT, QBLOCK, DEQ_DTYPE, BM, BN, 16, False
    )
    t = tl.where(mask, t, 0.0)
    factor = tl.math.div_rn(tl.load(m_ptr + rm, mask=rm < M, other=1.0), tl.math.sqrt_rn(tl.sum(t * t, axis=1)))
    tl.store(out_ptr + idx, _round(t * factor[:, None], out_ptr.dtype.element_ty), mask=mask)


def _base_args(base: torch.Tensor | Packed4bit, dummy: torch.Tensor) -> dict:
    """The kernels' base pointers and switches; ``dummy`` stands for pointers never read."""
    if isinstance(base, Packed4bit):
        return dict(w_ptr=base.packed, absmax_ptr=base.absmax, code_ptr=base.code, QUANT=True,
                    QBLOCK=base.blocksize, DEQ_DTYPE=_TL_DTYPES[base.dtype])  # fmt: skip
    return dict(w_ptr=base, absmax_ptr=dummy, code_ptr=dummy, QUANT=False, QBLOCK=1, DEQ_DTYPE=_TL_DTYPES[base.dtype])


def _launch(base, L, R, scale, out, *, norms=False, axis=1, factor=None) -> None:
    M, N = base.shape
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _lora_kernel[grid](
        **_base_args(base, L), L_ptr=L, R_ptr=R, factor_ptr=factor if factor is not None else L, out_ptr=out,
        M=M, N=N, K=L.shape[1], scale=float(scale), NORMS=norms, AXIS=axis, SCALED=factor is not None,
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, USE_DOT=USE_DOT, num_warps=NUM_WARPS,
    )  # fmt: skip


def norms_triton(base: torch.Tensor | Packed4bit, L: torch.Tensor, R: torch.Tensor, scale: float, axis: int):
    """``||W + scale * L @ R||`` along ``axis`` (fp32), tile by tile: the merged weight never exists."""
    M, N = base.shape
    blocks = triton.cdiv(N, BLOCK_N) if axis == 1 else triton.cdiv(M, BLOCK_M)
    partial = torch.empty((M, blocks) if axis == 1 else (blocks, N), dtype=torch.float32, device=L.device)
    _launch(base, L, R, scale, partial, norms=True, axis=axis)
    return partial.sum(dim=1 if axis == 1 else 0).sqrt_()


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
    if out is None:
        out = torch.empty(base.shape, dtype=out_dtype, device=L.device)
    M, N = base.shape
    row = triton.next_power_of_2(N)
    if magnitude is not None and axis == 1 and row <= DORA_MAX_ROW:
        rows = max(1, DORA_TILE // row)
        _dora_rows_kernel[(triton.cdiv(M, rows),)](
            **_base_args(base, L), L_ptr=L, R_ptr=R, m_ptr=magnitude, out_ptr=out, M=M, N=N, K=L.shape[1],
            scale=float(scale), BM=rows, BN=row, num_warps=DORA_WARPS if row >= 8192 else 4,
        )  # fmt: skip
        return out
    factor = magnitude / norms_triton(base, L, R, scale, axis) if magnitude is not None else None
    _launch(base, L, R, scale, out, axis=axis, factor=factor)
    return out
