"""LoftQ on one matrix: PEFT's ``loftq_init`` (1 iteration, exact SVD) and a float64 reference as oracles."""

from __future__ import annotations

import inspect
import types

import bitsandbytes.functional as bnbF
import pytest
import torch

from convert.kernels.loftq import loftq_matrix, randomized_svd
from convert.kernels.quant import dequantize_4bit, quantize_4bit
from convert.plan.lora import lora_scaling

loftq_utils = pytest.importorskip("peft.utils.loftq_utils")


def peft_loftq_init_on_cpu():
    """PEFT's ``loftq_init``, unchanged but for its compute device.

    PEFT hard-codes ``compute_device = "cuda"`` (or "xpu"). The function's code object
    is copied with that one constant replaced by "cpu"; every operation is PEFT's own,
    with bitsandbytes' ``Params4bit`` quantizing on the CPU.
    """
    f = inspect.unwrap(loftq_utils.loftq_init)
    assert "cuda" in f.__code__.co_consts, "PEFT's loftq_init changed: re-check how it picks its device"
    consts = tuple("cpu" if c == "cuda" else c for c in f.__code__.co_consts)
    return types.FunctionType(f.__code__.replace(co_consts=consts), f.__globals__, f.__name__, f.__defaults__)


def llm_like(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A weight with an LLM-like spectrum: power-law singular values, a noise floor and a few outlier columns."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64)).Q
    s = (1 + torch.arange(k, dtype=torch.float64)) ** -0.7
    W = (U * s) @ V.T + 0.1 * torch.randn(rows, cols, generator=g, dtype=torch.float64) / k**0.5
    W[:, torch.randperm(cols, generator=g)[:3]] *= 5
    return (W * 0.02 / W.std()).float()


def reference_error(W: torch.Tensor, rank: int, iters: int, quant_type: str, double_quant: bool) -> float:
    """The same algorithm in float64 with exact SVDs and bitsandbytes' quantizer: the error to match."""
    W64, low_rank = W.double(), torch.zeros(W.shape, dtype=torch.float64)
    for _ in range(iters):
        packed, state = bnbF.quantize_4bit(
            (W64 - low_rank).float(), blocksize=64, quant_type=quant_type, compress_statistics=double_quant
        )
        Q = bnbF.dequantize_4bit(packed, state).double()
        U, S, Vh = torch.linalg.svd(W64 - Q, full_matrices=False)
        low_rank = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    return float((W64 - Q - low_rank).norm() / W64.norm())


def relative_error(W: torch.Tensor, result, scaling: float) -> float:
    effective = dequantize_4bit(result.quantized, torch.float32) + scaling * result.B @ result.A
    return float((W - effective).norm() / W.norm())


# rows of a multiple of 64 elements: bitsandbytes 0.50's CPU dequantization is wrong for others
@pytest.mark.parametrize("shape", [(96, 192), (192, 128)])
def test_one_iteration_exact_equals_peft(shape):
    W = llm_like(*shape)
    q_peft, A_peft, B_peft = peft_loftq_init_on_cpu()(W, num_bits=4, reduced_rank=8, num_iter=1)
    ours = loftq_matrix(W, rank=8, scaling=1.0, iters=1, svd="exact")
    assert torch.equal(dequantize_4bit(ours.quantized, torch.float32), q_peft)
    torch.testing.assert_close(ours.A, A_peft, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.B, B_peft, rtol=1e-6, atol=1e-7)


def test_several_iterations_exact_track_peft():
    """PEFT with scaling 1 and the same (exact) SVD: the same alternation, the same result."""
    W = llm_like(128, 192, seed=3)
    q_peft, A_peft, B_peft = peft_loftq_init_on_cpu()(W, num_bits=4, reduced_rank=8, num_iter=3)
    ours = loftq_matrix(W, rank=8, iters=3, svd="exact")
    peft_error = float((W - q_peft - B_peft @ A_peft).norm() / W.norm())
    assert relative_error(W, ours, 1.0) == pytest.approx(peft_error, rel=1e-5)


@pytest.mark.parametrize(
    "iters, svd, quant_type, double_quant",
    [
        (1, "randomized", "nf4", False),
        (5, "randomized", "nf4", False),
        (5, "exact", "nf4", False),
        (3, "randomized", "fp4", False),
        (3, "randomized", "nf4", True),
    ],
)
def test_error_within_1pct_of_float64_reference(iters, svd, quant_type, double_quant):
    for seed, shape in enumerate([(128, 256), (256, 128)]):
        W = llm_like(*shape, seed=seed)
        ours = loftq_matrix(
            W, rank=8, scaling=2.0, iters=iters, svd=svd, quant_type=quant_type, double_quant=double_quant
        )
        reference = reference_error(W, 8, iters, quant_type, double_quant)
        error = relative_error(W, ours, 2.0)
        assert error <= 1.01 * reference, (seed, error, reference)
        assert ours.error == pytest.approx(error, rel=1e-4)
        alone = loftq_matrix(W, rank=8, iters=1, quant_type=quant_type, double_quant=double_quant)
        plain = relative_error(W, alone, 0.0)  # Q alone
        assert ours.quant_error == pytest.approx(plain, rel=1e-6)
        assert error < 0.9 * plain  # LoftQ really does reduce the error


def test_more_iterations_reduce_the_error():
    W = llm_like(128, 256, seed=5)
    errors = [loftq_matrix(W, rank=8, iters=n).error for n in (1, 2, 5)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("rank, alpha, rslora", [(8, 16, False), (8, 8, True), (4, 1, False)])
def test_scaling_is_in_the_factors(rank, alpha, rslora):
    """PEFT's own loftq_init assumes scaling 1; here scaling * B @ A is the same low-rank term whatever the scaling."""
    W = llm_like(96, 128, seed=7)
    unit = loftq_matrix(W, rank=rank, scaling=1.0, iters=2, svd="exact")
    scaling = lora_scaling(rank, alpha, rslora)
    scaled = loftq_matrix(W, rank=rank, scaling=scaling, iters=2, svd="exact")
    assert torch.equal(scaled.quantized.packed, unit.quantized.packed)
    torch.testing.assert_close(scaling * scaled.B @ scaled.A, unit.B @ unit.A, rtol=1e-4, atol=1e-7)
    # balanced like PEFT's: each factor carries sqrt of the singular values (over the scaling)
    torch.testing.assert_close(scaled.A.norm(dim=1), scaled.B.norm(dim=0), rtol=1e-4, atol=1e-7)


def test_quantized_is_the_projects_quantizer_output():
    """The stored Q is exactly the quantizer's output for the last residual (bitsandbytes' bytes)."""
    W = llm_like(64, 128, seed=2)
    result = loftq_matrix(W, rank=4, iters=1)
    expected = quantize_4bit(W, 64, "nf4")
    assert torch.equal(result.quantized.packed, expected.packed)
    assert torch.equal(result.quantized.absmax, expected.absmax)


def test_randomized_svd_finds_the_top_subspace():
    W = llm_like(200, 120, seed=4).double()
    U, S, Vh = randomized_svd(W, 8, 16, 4, torch.Generator().manual_seed(0))
    S_exact = torch.linalg.svdvals(W)[:8]
    torch.testing.assert_close(S, S_exact, rtol=1e-4, atol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(8, dtype=W.dtype), rtol=0, atol=1e-10)


def test_deterministic_and_rejects_bad_input():
    W = llm_like(64, 96)
    a, b = loftq_matrix(W, rank=4, iters=2), loftq_matrix(W, rank=4, iters=2)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    with pytest.raises(ValueError, match="2-D"):
        loftq_matrix(W[0], rank=4)
    with pytest.raises(ValueError, match="iters"):
        loftq_matrix(W, rank=4, iters=0)


@pytest.mark.gpu
def test_cuda_memory_and_agreement_with_cpu():
    W = llm_like(2048, 2048, seed=1).to(torch.bfloat16)
    w = W.cuda()
    loftq_matrix(w, rank=16, iters=1)  # cuBLAS/cuSOLVER workspaces and Triton kernels exist before measuring
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = loftq_matrix(w, rank=16, scaling=1.0, iters=5)
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 3 * W.numel() * 4, f"extra GPU memory {extra} > 3x the matrix in fp32"
    cpu = loftq_matrix(W, rank=16, scaling=1.0, iters=5)
    assert result.error <= 1.01 * cpu.error
    assert result.A.is_cuda and result.quantized.packed.is_cuda
