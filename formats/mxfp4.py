"""MXFP4 checkpoints (``quant_method: mxfp4``), as gpt-oss ships its MoE experts.

An experts weight ``X`` (``model.layers.N.mlp.experts.gate_up_proj`` / ``down_proj``) is stored as::

    X_blocks   U8 (E, R, G, 16)   32 FP4 (e2m1) values a block, two a byte
    X_scales   U8 (E, R, G)       one E8M0 exponent a block

and read, as transformers' dequantizing load gives it, as ONE logical 16-bit tensor ``X`` of shape (E, G * 32, R)
(gpt-oss's (experts, in, out) parameter): ``group_mxfp4`` folds each pair into a ``TensorInfo`` whose layout is an
``Mxfp4Experts``, which dequantizes whole experts (the logical tensor's rows) at a time. The math is
``convert.kernels.mxfp4``; layouts and I/O only here.

Writing (``--quantize same``): a merged experts weight is written again as ``X_blocks`` + ``X_scales`` of the
same shapes (``Mxfp4Spec``, ``serialized_tensors``, one expert a chunk), quantized by ``convert.kernels.mxfp4``
(the rule of triton_kernels' ``downcast_to_mxfp_torch``, which transformers' ``quantize_to_mxfp4`` calls); one the
merge leaves alone is its two stored tensors copied (``stored_parts``), and the base's ``quantization_config`` is
kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from formats import bnb
from formats.errors import ConvertError
from formats.fp8 import output_dtype
from formats.safetensors_file import DTYPES, TensorInfo
from formats.writer import PlannedTensor

BLOCK = 32  # values a scale


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


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class Mxfp4Spec:
    """An experts weight written as MXFP4 blocks and scales (``--quantize same`` from an MXFP4 base)."""

    method: str = "mxfp4"  # what summaries print, as bnb.QuantSpec.method


def spec_of(info: TensorInfo, config: dict) -> Mxfp4Spec:
    """The spec a merged MXFP4 experts weight is written with (every MXFP4 weight is written alike)."""
    return Mxfp4Spec()


def stored_parts(layout: Mxfp4Experts) -> list[TensorInfo]:
    return [layout.blocks, layout.scales]


def serialized_tensors(name: str, shape: tuple[int, ...], dtype: str, spec: Mxfp4Spec) -> list[PlannedTensor]:
    """``name_blocks`` U8 (E, out, in / 32, 16) and ``name_scales`` U8 (E, out, in / 32) of a logical (E, in, out)
    weight (``dtype``, the 16-bit dtype rows arrive in, is unused: the signature is ``formats.bnb``')."""
    if len(shape) != 3 or shape[1] % BLOCK:
        raise ConvertError(f"tensor '{name}': shape {list(shape)} is not (experts, in, out) with in a multiple of 32")
    experts, cols, rows = shape
    grid = (experts, rows, cols // BLOCK)
    return [PlannedTensor(name + "_blocks", "U8", (*grid, BLOCK // 2)), PlannedTensor(name + "_scales", "U8", grid)]


def chunk_rows(shape: tuple[int, ...], spec: Mxfp4Spec) -> int:
    """Row granularity of a chunk: one expert (its blocks never cross experts)."""
    return 1
