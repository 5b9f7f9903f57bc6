"""Block-scaled FP8 checkpoints (``quant_method: fp8``) as DeepSeek-V3/R1, Kimi K2 and Qwen3-*-FP8 ship them.

A quantized Linear weight ``X.weight`` is stored as::

    X.weight             F8_E4M3 (R, C)
    X.weight_scale_inv   F32 (or BF16) (ceil(R / bm), ceil(C / bn)); a scalar with weight_block_size null
    X.activation_scale   F32 scalar, only with activation_scheme "static"

and ``config.json`` carries ``quantization_config`` ``{"quant_method": "fp8", "weight_block_size": [bm, bn],
"activation_scheme": ..., "fmt": "e4m3", "modules_to_not_convert": ...}`` (transformers' ``FineGrainedFP8Config``).
The scale may lie in another shard than its weight (DeepSeek-V3's index does that).

Reading: ``group_fp8`` folds each weight and its scales into ONE logical 16-bit tensor (``TensorInfo.layout`` a
``BlockFP8``), so the plan sees a plain tensor; ``convert.execute.decode`` dequantizes its rows.
Writing: ``serialized_tensors`` / ``chunk_rows`` / ``quantization_config`` mirror ``formats.bnb``'s writer side
(``convert.execute.quantize_sink`` fills the tensors). The math is ``convert.kernels.fp8``; this module holds
layouts and I/O only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from formats import bnb
from formats.dtypes import TORCH_NAMES
from formats.errors import ConvertError
from formats.safetensors_file import DTYPES, TensorInfo
from formats.writer import PlannedTensor

SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv, as transformers' Fp8Quantize names it
SCALE_DTYPES = ("F32", "BF16", "F16")
DEFAULT_BLOCK = (128, 128)


def output_dtype(config: dict) -> str:
    """The 16-bit dtype a quantized weight reads as: the model's ``torch_dtype`` (what transformers dequantizes
    to, the dtype of the module's parameters), bf16 when it names none or a non-float one."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return {v: k for k, v in TORCH_NAMES.items()}.get(name, "BF16")


@dataclass(frozen=True)
class BlockFP8:
    """Where an FP8 weight's parts lie; ``convert.execute.decode`` dequantizes them as transformers'
    ``Fp8Dequantize``."""

    weight: TensorInfo
    scale: TensorInfo
    block: tuple[int, int] | None
    dtype: torch.dtype
    activation_scale: TensorInfo | None = None


def scale_grid(shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, ...]:
    """The shape of ``weight_scale_inv`` for a weight of ``shape`` (2-D) in blocks of ``block``."""
    if block is None:
        return ()
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def block_size(config: dict, where: object) -> tuple[int, int] | None:
    """``weight_block_size`` of an fp8 ``quantization_config``: two positive ints, or None (per-tensor scales)."""
    qconfig = config.get("quantization_config") or {}
    if "weight_block_size" not in qconfig:
        return DEFAULT_BLOCK if qconfig.get("quant_method") == "fp8" else None
    block = qconfig["weight_block_size"]
    if block is None:
        return None
    if not isinstance(block, list | tuple) or len(block) != 2 or not all(type(b) is int and b > 0 for b in block):
        raise ConvertError(f"{where}: quantization_config.weight_block_size {block!r} is not two positive integers")
    return (block[0], block[1])


def group_fp8(tensors: dict[str, TensorInfo], config: dict) -> dict[str, TensorInfo]:
    """Fold every FP8 weight, its ``weight_scale_inv`` and ``activation_scale`` into one logical tensor.

    A checkpoint is read as FP8 when its config says ``quant_method: fp8`` or it holds ``*.weight_scale_inv``
    tensors. Every inconsistency (scales missing, a grid that does not fit the weight in its blocks, a weight that
    is not e4m3) is a ``ConvertError`` naming the file and tensor: it would otherwise read as a wrong model."""
    qconfig = config.get("quantization_config") or {}
    scales = [k for k in tensors if k.endswith(".weight" + SCALE_SUFFIX)]
    if not scales and qconfig.get("quant_method") != "fp8":
        return tensors
    first = tensors[scales[0]] if scales else next(iter(tensors.values()), None)
    block = block_size(config, first.path if first else "config.json")
    dtype = output_dtype(config)
    out: dict[str, TensorInfo] = {}
    folded = set()
    for key in scales:
        weight_name = key.removesuffix(SCALE_SUFFIX)
        scale = tensors[key]
        weight = tensors.get(weight_name)
        if weight is None:
            raise ConvertError(f"{scale.path}: tensor '{key}': its weight '{weight_name}' is missing")
        activation = tensors.get(weight_name.removesuffix(".weight") + ".activation_scale")
        layout = _layout(weight, scale, block, dtype, activation)
        folded |= {key, *([activation.name] if activation is not None else [])}
        out[weight_name] = bnb.logical(weight_name, dtype, weight.shape, weight, layout)
    for key, info in tensors.items():
        if key in folded or key in out:
            continue
        if info.dtype in ("F8_E4M3", "F8_E5M2"):
            raise ConvertError(f"{info.path}: tensor '{key}': FP8 weight without its '{key}{SCALE_SUFFIX}' scales")
        out[key] = info
    return {k: out[k] for k in tensors if k in out}  # in file order, as the plan lays shards out


def _layout(
    weight: TensorInfo, scale: TensorInfo, block: tuple[int, int] | None, dtype: str, activation: TensorInfo | None
) -> BlockFP8:
    where = f"{weight.path}: tensor '{weight.name}'"
    if weight.dtype != "F8_E4M3":
        raise ConvertError(f"{where}: an FP8 weight must be F8_E4M3, got {weight.dtype}")
    if len(weight.shape) != 2:
        raise ConvertError(f"{where}: only 2-D FP8 weights are supported, got shape {list(weight.shape)}")
    if scale.dtype not in SCALE_DTYPES:
        raise ConvertError(
            f"{scale.path}: tensor '{scale.name}': scales of dtype {scale.dtype} are not supported "
            f"(expected {', '.join(SCALE_DTYPES)})"
        )
    grid = scale_grid(weight.shape, block)
    if (scale.shape != grid) and not (block is None and scale.shape == (1,)):
        raise ConvertError(
            f"{scale.path}: tensor '{scale.name}': scale grid {list(scale.shape)} does not fit weight "
            f"{list(weight.shape)} in blocks of {list(block) if block else 'the whole tensor'} "
            f"(expected {list(grid)})"
        )
    if activation is not None and activation.shape not in ((), (1,)):
        raise ConvertError(f"{activation.path}: tensor '{activation.name}': expected a scalar activation scale")
    return BlockFP8(weight, scale, block, DTYPES[dtype], activation)


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class FP8Spec:
    """How output weights are written as block-scaled FP8: ``--quantize fp8`` (128x128, fp32 scales) or
    ``--quantize same`` from an FP8 base (its block size and scale dtype)."""

    block: tuple[int, int] | None = DEFAULT_BLOCK
    scale_dtype: str = "F32"
    method: str = "fp8"  # what summaries and fingerprints print, as bnb.QuantSpec.method


def spec_of(tensors: dict[str, TensorInfo]) -> FP8Spec | None:
    """The settings of an FP8 base's weights (None when it has none): what ``--quantize same`` writes again."""
    for info in tensors.values():
        if isinstance(info.layout, BlockFP8):
            return FP8Spec(info.layout.block, info.layout.scale.dtype)
    return None


def layout_module(spec: object):
    """The module whose ``serialized_tensors`` / ``chunk_rows`` lay out outputs quantized with ``spec``: the one
    that defines its class (this one for an ``FP8Spec``, ``formats.bnb`` for a ``QuantSpec``,
    ``formats.compressed_tensors`` / ``formats.mxfp4`` for theirs)."""
    return sys.modules[type(spec).__module__]


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def serialized_tensors(name: str, shape: tuple[int, ...], dtype: str, spec: FP8Spec) -> list[PlannedTensor]:
    """The tensors one FP8 weight ``name`` is saved as (``dtype``, the 16-bit dtype rows arrive in, is unused:
    the signature is ``formats.bnb.serialized_tensors``')."""
    if len(shape) != 2:
        raise ConvertError(f"tensor '{name}': only 2-D weights can be written as FP8, got shape {list(shape)}")
    grid = scale_grid(shape, spec.block)
    return [PlannedTensor(name, "F8_E4M3", shape), PlannedTensor(scale_name(name), spec.scale_dtype, grid)]


def chunk_rows(shape: tuple[int, ...], spec: FP8Spec) -> int:
    """Row granularity of an FP8 output's chunks: whole block rows (the whole tensor for one per-tensor scale)."""
    return spec.block[0] if spec.block else shape[0]


def quantization_config(spec: FP8Spec, skip_modules: list[str]) -> dict:
    """The ``quantization_config`` DeepSeek-V3 and Qwen3-*-FP8 ship (transformers' ``FineGrainedFP8Config`` and
    vLLM's ``Fp8Config`` read it): dynamic activation scales, e4m3, the block size and the modules left 16-bit."""
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "modules_to_not_convert": list(skip_modules),
        "quant_method": "fp8",
        "weight_block_size": list(spec.block) if spec.block else None,
    }
