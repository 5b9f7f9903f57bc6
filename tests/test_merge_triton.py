"""The fused merge kernels against their torch references: on the CPU through Triton's interpreter
(in a subprocess, because TRITON_INTERPRET must be set before triton is imported), on CUDA for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import squeezing_interpreter_index, subprocess_env, ulp_distance

ROOT = Path(__file__).resolve().parents[1]


def assert_close_merge(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """fp32 within the GPU tests' tolerance (the tile GEMM sums in its own order); 16-bit within 1 ulp."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, what
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7, msg=what)
    else:
        assert ulp_distance(ours, ref) <= 1, f"{what}: {ulp_distance(ours, ref)} ulp apart"


def quantized(weight: torch.Tensor, quant_type: str, device: str):
    """A base quantized by bitsandbytes itself, as the kernel's Packed4bit, and bitsandbytes' dequantization."""
    import bitsandbytes.functional as bnbf

    from convert.kernels.merge_triton import Packed4bit

    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type=quant_type)
    expected = bnbf.dequantize_4bit(packed, state)
    q = Packed4bit(
        packed.to(device), state.absmax.to(device), 64, state.code.float().to(device), tuple(weight.shape), weight.dtype
    )
    return q, expected


def run_checks(device: str) -> int:
    """Every kernel mode on small odd shapes (partial tiles, K over one block); returns the cases checked."""
    if device == "cpu":  # under TRITON_INTERPRET
        squeezing_interpreter_index()
    from convert.kernels.merge_triton import (
        dequantize_reference,
        merge_reference,
        merge_triton,
        norms_reference,
        norms_triton,
    )

    g = torch.Generator().manual_seed(0)
    checked = 0
    for dtype, out_dtype, (M, N, K), axis, dora in [
        (torch.bfloat16, torch.bfloat16, (70, 150, 4), 1, False),
        (torch.float32, torch.float32, (33, 129, 20), 1, False),
        (torch.float16, torch.float16, (65, 40, 8), 1, True),
        (torch.float32, torch.float32, (130, 72, 16), 0, True),
        (torch.bfloat16, torch.float32, (66, 140, 4), 0, True),
    ]:
        w = torch.randn(M, N, generator=g).to(dtype)
        L, R = torch.randn(M, K, generator=g) * 0.1, torch.randn(K, N, generator=g) * 0.1
        m = torch.rand(M if axis == 1 else N, generator=g) + 0.5 if dora else None
        args = (L.to(device), R.to(device), 1.5)
        mag = m.to(device) if dora else None
        ref = merge_reference(w, L, R, 1.5, out_dtype, m, axis)
        ours = merge_triton(w.to(device), *args, out_dtype, mag, axis).cpu()
        assert_close_merge(ours, ref, f"{dtype} {M}x{N} r{K} axis {axis} dora {dora}")
        if dora:
            n = norms_triton(w.to(device), *args, axis).cpu()
            torch.testing.assert_close(n, norms_reference(w, L, R, 1.5, axis), rtol=1e-6, atol=0)
        if dtype == out_dtype:  # in place: the result lands in the base's own buffer
            base = w.to(device)
            merge_triton(base, *args, out_dtype, mag, axis, out=base)
            assert torch.equal(base.cpu(), ours)
        checked += 1
    from convert.kernels import merge_triton as mt

    # the other launch shapes: several column tiles a stripe, split among programs, and a rank over one step
    saved = mt.BLOCK_N, mt.PROGRAMS
    try:
        mt.BLOCK_N, mt.PROGRAMS = 16, 4
        w = torch.randn(50, 70, generator=g).to(torch.bfloat16)
        L, R = torch.randn(50, 24, generator=g) * 0.1, torch.randn(24, 70, generator=g) * 0.1
        m = torch.rand(50, generator=g) + 0.5
        for mag in (None, m):
            ref = merge_reference(w, L, R, 0.75, torch.bfloat16, mag)
            ours = merge_triton(w.to(device), L.to(device), R.to(device), 0.75, torch.bfloat16,
                                None if mag is None else mag.to(device))  # fmt: skip
            assert_close_merge(ours.cpu(), ref, f"split column tiles, dora {mag is not None}")
            checked += 1
    finally:
        mt.BLOCK_N, mt.PROGRAMS = saved
    # rows of whole quantization blocks (the last column tile partly outside), of a partial block,
    # odd rows, or FUSE_4BIT off (dequantized first, then merged in place)
    cases = (("nf4", 192, True), ("fp4", 256, True), ("nf4", 100, True), ("fp4", 100, True), ("nf4", 99, True),
             ("fp4", 100, False))  # fmt: skip
    for quant_type, cols, fused in cases:
        mt.FUSE_4BIT = fused
        w = torch.randn(48, cols, generator=g).to(torch.bfloat16)
        q, expected = quantized(w, quant_type, device)
        assert torch.equal(dequantize_reference(quantized(w, quant_type, "cpu")[0]), expected)
        L, R = torch.randn(48, 8, generator=g) * 0.1, torch.randn(8, cols, generator=g) * 0.1
        for dora in (False, True):
            m = torch.rand(48, generator=g) + 0.5 if dora else None
            ref = merge_reference(expected, L, R, 2.0, torch.bfloat16, m)
            ours = merge_triton(q, L.to(device), R.to(device), 2.0, torch.bfloat16, m.to(device) if dora else None)
            assert_close_merge(ours.cpu(), ref, f"{quant_type} {cols} fused {fused} dora {dora}")
            checked += 1
    mt.FUSE_4BIT = True
    return checked


def test_kernels_in_triton_interpreter() -> None:
    env = subprocess_env(TRITON_INTERPRET="1")
    code = "from tests.test_merge_triton import run_checks; print('checked', run_checks('cpu'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checked 19" in done.stdout


@pytest.mark.gpu
def test_kernels_on_cuda() -> None:
    assert run_checks("cuda") == 19
