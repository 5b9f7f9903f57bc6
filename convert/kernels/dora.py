"""DoRA merge on the CPU path, op for op as PEFT's ``DoraLinearVariant.merge_unsafe`` and
``DoraEmbeddingVariant.merge_unsafe`` (peft 0.21), so that the bits match ``merge_and_unload``.

PEFT computes, in fp32 (the adapter is upcast; a 16-bit base is promoted by the add):

    norm   = torch.linalg.norm(transpose(W, fan_in_fan_out) + delta_T, dim=1)   # per row of B @ A
    W'     = ((m / norm).view(...) * (W + delta)).to(W.dtype)                    # rounded once

A Linear weight's norm runs along its stored rows, so a row chunk holds everything its
norm needs and the CPU pipeline merges it chunk by chunk. Conv1D / ``fan_in_fan_out`` and
embeddings store the transpose: their norm runs down stored columns, over every row of
the tensor. Those are merged whole here, with PEFT's own expression, because a norm
accumulated chunk by chunk sums in another order and would differ in the last bit
(the GPU kernels do accumulate tile by tile: see ``convert.kernels.merge_triton``).
"""

from __future__ import annotations

import torch


def scale_rows_(merged: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``merged`` (fp32 whole rows of ``W + delta``) times ``m / ||row||``, in place."""
    factor = magnitude / torch.linalg.norm(merged, dim=1)
    return merged.mul_(factor.view(-1, 1))


def merge_columns(
    weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float, magnitude: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """A whole transposed weight (stored ``(in, out)``, or ``(vocab, dim)`` for an embedding), merged."""
    delta = torch.mm(B, A)  # (out, in): the layout PEFT's get_weight_norm sees
    if scale != 1.0:
        delta.mul_(scale)
    norm = torch.linalg.norm(weight.T + delta, dim=1)
    factor = magnitude / norm
    return (factor.view(1, -1) * (weight + delta.T)).to(dtype)
