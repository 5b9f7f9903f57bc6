"""MXFP4 checkpoints (``quant_method: mxfp4``), as gpt-oss ships its MoE experts.

An experts weight ``X`` (``model.layers.N.mlp.experts.gate_up_proj`` / ``down_proj``) is stored as::

    X_blocks   U8 (E, R, G, 16)   32 FP4 (e2m1) values a block, two a byte
    X_scales   U8 (E, R, G)       one E8M0 exponent a block

and read, as transformers' dequantizing load gives it, as ONE logical 16-bit tensor ``X`` of shape (E, G * 32, R)
(gpt-oss's (experts, in, out) parameter): ``group_mxfp4`` folds each pair into a ``TensorInfo`` whose layout is an
``Mxfp4Experts``, which dequantizes whole experts (the logical tensor's rows) at a time. The math is
``convert.kernels.mxfp4``; layouts and I/O only here. Writing MXFP4 is not done (no CPU reference quantizer:
transformers quantizes through the GPU-only triton_kernels hub).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from formats import bnb
from formats.errors import ConvertError
from formats.fp8 import output_dtype
from formats.safetensors_file import DTYPES, TensorInfo


@dataclass(frozen=True)
class Mxfp4Experts:
    """Where an MXFP4 experts weight's parts lie (``convert.execute.decode`` dequantizes experts [start, stop))."""

    blocks: TensorInfo
    scales: TensorInfo
    dtype: torch.dtype


def group_mxfp4(tensors: dict[str, TensorInfo], config: dict) -> dict[str, TensorInfo]:
    """Fold every ``X_blocks`` + ``X_scales`` pair into one logical tensor ``X``; a missing or inconsistent half
    is a ``ConvertError`` naming the file and tensor."""
    if (config.get("quantization_config") or {}).get("quant_method") != "mxfp4":
        return tensors
    dtype = output_dtype(config)
    out: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        if key.endswith("_scales") and key.removesuffix("_scales") + "_blocks" in tensors:
            continue
        if not key.endswith("_blocks"):
            if key.endswith("_scales"):
                raise ConvertError(
                    f"{info.path}: tensor '{key}': its '{key.removesuffix('_scales')}_blocks' is missing"
                )
            out[key] = info
            continue
        name = key.removesuffix("_blocks")
        scales = tensors.get(name + "_scales")
        if scales is None:
            raise ConvertError(f"{info.path}: tensor '{key}': MXFP4 blocks without their '{name}_scales'")
        if info.dtype != "U8" or len(info.shape) != 4 or info.shape[-1] != 16:
            raise ConvertError(
                f"{info.path}: tensor '{key}': expected U8 (experts, rows, groups, 16) blocks, got "
                f"{info.dtype} {list(info.shape)}"
            )
        if scales.dtype != "U8" or scales.shape != info.shape[:-1]:
            raise ConvertError(
                f"{scales.path}: tensor '{scales.name}': expected U8 scales of shape "
                f"{list(info.shape[:-1])}, got {scales.dtype} {list(scales.shape)}"
            )
        experts, rows, groups, width = info.shape
        out[name] = bnb.logical(
            name, dtype, (experts, groups * width * 2, rows), info, Mxfp4Experts(info, scales, DTYPES[dtype])
        )
    return out
