"""LoftQ for one weight matrix: a 4-bit ``Q`` and LoRA factors with ``Q + scaling * B @ A ~= W``.

The algorithm is the LoftQ paper's and PEFT's ``loftq_init``: starting from
``B @ A = 0``, alternate

    Q      = quant(W - scaling * B @ A)
    B, A   = best rank-r approximation of W - Q, split with sqrt(S) on each side

for ``iters`` rounds. PEFT's own ``loftq_init`` returns factors that assume
``scaling == 1`` (its A, B are ``sqrt(S) Vh`` and ``U sqrt(S)``); here both carry
``sqrt(S / scaling)``, so the LoRA layer's ``scaling * B @ A`` is the approximation
whatever ``lora_alpha``, ``r`` and rslora make the scaling, and the factors are
PEFT's exactly when the scaling is 1.

Two things make it fast and small where PEFT is slow and large:

- the rank-r approximation is a randomized truncated SVD (a Gaussian sketch of
  ``r + oversample`` columns, a few power iterations, then an exact SVD of the
  small projected matrix): a handful of (m, n) x (n, r + p) products instead of a
  full SVD of the whole matrix. ``svd="exact"`` runs PEFT's full SVD instead;
- quantization goes through the project's kernels (``convert.kernels.quant``,
  Triton on CUDA), which never build code-lookup temporaries, and the loop keeps
  one fp32 residual beside the fp32 weight: extra memory is about twice the
  matrix in fp32 (three times for a 16-bit input, counting its fp32 copy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from convert.kernels.quant import Quantized4bit, dequantize_4bit, quantize_4bit
from convert.options import SVD_METHODS

# Sketch width and power iterations of the randomized SVD. With 16 extra columns and
# 4 power iterations the LoftQ error stays within 0.3% of the exact SVD's on matrices
# with LLM-like spectra (tests/test_loftq.py), at a few percent of a full SVD's cost.
OVERSAMPLE = 16
POWER_ITERS = 4


@dataclass
class LoftQMatrix:
    """The result for one matrix: what the checkpoint stores and what the adapter stores."""

    quantized: Quantized4bit  # Q, exactly as written to the 4-bit base
    A: torch.Tensor  # lora_A.weight, (r, in_features) fp32
    B: torch.Tensor  # lora_B.weight, (out_features, r) fp32
    error: float  # ||W - Q - scaling * B @ A|| / ||W||
    quant_error: float  # ||W - quant(W)|| / ||W||: plain QLoRA's error, for comparison


@torch.no_grad()
def loftq_matrix(
    weight: torch.Tensor,
    *,
    rank: int,
    scaling: float = 1.0,
    iters: int = 5,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    svd: str = "randomized",
    seed: int = 0,
) -> LoftQMatrix:
    """LoftQ of one 2-D weight on its own device; A and B come back on that device in fp32.

    ``quantized`` records the weight's dtype, which is what its dequantized values are rounded
    to when loaded; the fp32 residuals and SVDs use exactly those values. (PEFT subtracts the
    fp32 dequantized Q and rounds it to 16 bits afterwards; for fp32 weights both are the same.)

    ``seed`` fixes the randomized SVD's sketch, so the same weight always gives the
    same result, whatever order the matrices of a model are processed in.
    """
    if weight.dim() != 2:
        raise ValueError(f"LoftQ needs a 2-D weight, got shape {tuple(weight.shape)}")
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    rank = min(rank, *weight.shape)
    W = weight.float()  # the input itself when already fp32: it is only read
    # Q as the model will compute with it: transformers dequantizes a 4-bit weight to the dtype it
    # was stored from, so for a 16-bit base the residual is taken against Q rounded to 16 bits.
    q_dtype = weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else torch.float32
    generator = torch.Generator(W.device).manual_seed(seed)
    norm = float(torch.linalg.vector_norm(W)) or 1.0
    residual = W  # what is quantized next: W - scaling * B @ A
    for i in range(iters):
        q = dataclasses.replace(quantize_4bit(residual, blocksize, quant_type, double_quant), dtype=weight.dtype)
        del residual  # free it before the dequantized copy takes its place
        if q_dtype == torch.float32:
            residual = dequantize_4bit(q, torch.float32)
            residual.neg_().add_(W)  # W - Q, bit-identical to PEFT's ``weight - dequantized_weight``
        else:
            residual = torch.sub(W, dequantize_4bit(q, q_dtype))  # 16-bit Q, promoted exactly
        if i == 0:
            quant_error = float(torch.linalg.vector_norm(residual)) / norm
        U, S, Vh = truncated_svd(residual, rank, svd, generator)
        root = (S / scaling).sqrt()
        B, A = U * root, root[:, None] * Vh
        if i + 1 < iters:
            torch.addmm(W, B, A, alpha=-scaling, out=residual)
    error = float(torch.linalg.vector_norm(residual.addmm_(B, A, alpha=-scaling))) / norm
    return LoftQMatrix(q, A.contiguous(), B.contiguous(), error, quant_error)


def truncated_svd(
    M: torch.Tensor, rank: int, method: str, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets of ``M``: (U (m, r), S (r,), Vh (r, n))."""
    if method == "exact":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    return randomized_svd(M, rank, OVERSAMPLE, POWER_ITERS, generator)


def randomized_svd(
    M: torch.Tensor, rank: int, oversample: int, power_iters: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko, Martinsson and Tropp's randomized SVD with subspace (power) iterations.

    Memory beyond ``M`` is a few (max(m, n), r + oversample) panels; the cost is
    ``2 * power_iters + 3`` thin products with ``M``. Re-orthonormalizing between
    products keeps small singular values from drowning in rounding, so fp32 is enough.
    """
    m, n = M.shape
    k = min(rank + oversample, m, n)
    sketch = torch.randn(n, k, device=M.device, dtype=M.dtype, generator=generator)
    Q = torch.linalg.qr(M @ sketch).Q
    for _ in range(power_iters):
        Q = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    U_small, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return (Q @ U_small[:, :rank]), S[:rank], Vh[:rank]
