"""bitsandbytes checkpoints as transformers writes them: NF4/FP4 (4-bit) and LLM.int8 weights.

transformers saves a 4-bit ``Linear`` weight ``X.weight`` as several tensors
(``QuantState.as_dict(packed=True)``)::

    X.weight                                  packed nibbles, uint8 (or the quant_storage dtype), ((n+1)//2, 1)
    X.weight.absmax                           fp32 (n_blocks,), or uint8 with double quantization
    X.weight.quant_map                        fp32 (16,), the NF4/FP4 code
    X.weight.nested_absmax                    fp32 (ceil(n_blocks/256),)   } double quantization only
    X.weight.nested_quant_map                 fp32 (256,), dynamic code    }
    X.weight.quant_state.bitsandbytes__nf4    uint8 JSON: quant_type, blocksize, dtype, shape, nested_*

and an 8-bit one as ``X.weight`` (int8, same shape), ``X.SCB`` (fp32 row scales) and
``X.weight_format`` (uint8 0: row-major). ``config.json`` carries ``quantization_config``.

Reading: ``group_quantized`` folds each module's tensors into ONE logical tensor of
the original shape and dtype (``TensorInfo.layout`` says where its parts lie), so the
plan sees a plain 16-bit tensor; ``convert.execute.decode`` dequantizes its rows.
Writing: ``serialized_tensors`` lays out the tensors a quantized output expands into
(known from shape and settings alone, so the shard writer plans them up front);
``convert.execute.quantize_sink`` fills them from row chunks as they are computed.
This module is layout only: names, shapes, settings, no arithmetic on values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from formats.bnb_names import (  # noqa: F401  (re-exported: the format's names, as callers know them)
    BLOB,
    BLOCKSIZES,
    COMPUTE_DTYPES,
    CONV1D_MODEL_TYPES,
    METHODS,
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
    STORAGE,
    SUFFIXES_4BIT,
    TORCH_NAMES,
)
from formats.errors import ConvertError
from formats.safetensors_file import DTYPES, TensorInfo, read_tensor
from formats.writer import PlannedTensor

# The longest repr of a float64 ("-2.2250738585072014e-308"): the quant-state blob is planned
# before the double-quant offset is known, so its JSON is padded with spaces (valid JSON) to this.
MAX_FLOAT_REPR = 24


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Packed4bit:
    """Where a 4-bit weight's parts lie; ``convert.execute.decode`` dequantizes them as
    ``bnb.functional.dequantize_4bit`` does."""

    packed: TensorInfo
    absmax: TensorInfo
    quant_map: TensorInfo
    nested_absmax: TensorInfo | None
    nested_quant_map: TensorInfo | None
    offset: float | None
    blocksize: int
    quant_type: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Int8Rows:
    """Where an LLM.int8 weight's parts lie: int8 rows and their fp32 scales (``SCB``)."""

    weight: TensorInfo
    scb: TensorInfo


def read_bytes(info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Bytes [start, stop) of a tensor stored as (k, 1) rows of any dtype (the quant_storage)."""
    size = DTYPES[info.dtype].itemsize
    rows = read_tensor(info, start // size, -(-stop // size))
    return rows.reshape(-1).view(torch.uint8)[start - start // size * size :][: stop - start]


def is_quantized(tensors: dict[str, TensorInfo]) -> bool:
    return any(BLOB in k or k.endswith(".SCB") or k.endswith(SUFFIXES_4BIT) for k in tensors)


def group_quantized(tensors: dict[str, TensorInfo], config: dict) -> dict[str, TensorInfo]:
    """Fold every quantized module's tensors into one logical tensor (``TensorInfo.layout`` set).

    Every inconsistency is a ``ConvertError`` naming the file and tensor: a wrong quant state
    would otherwise dequantize into a silently wrong model.
    """
    if not is_quantized(tensors):
        return tensors
    check_not_conv1d(config, next(t for k, t in tensors.items() if companion_of(k)[0] is not None).path)
    qconfig = config.get("quantization_config") or {}
    config_dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    int8_dtype = {v: k for k, v in TORCH_NAMES.items()}.get(str(config_dtype).removeprefix("torch."), "F32")
    parts: dict[str, dict[str, TensorInfo]] = {}  # weight -> its companion tensors, by suffix (".absmax", ...)
    for key, info in tensors.items():
        weight, suffix = companion_of(key)
        if weight is not None:
            parts.setdefault(weight, {})[suffix] = info
    if qconfig.get("load_in_4bit"):  # a packed weight whose quant state is missing entirely
        for key, info in tensors.items():
            if key.endswith(".weight") and len(info.shape) == 2 and info.shape[1] == 1:
                parts.setdefault(key, {})
    out: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        if companion_of(key)[0] is not None:
            continue
        if key not in parts:
            out[key] = info
        elif {".SCB", "_format"} & parts[key].keys():
            out[key] = _int8_tensor(key, info, tensors, int8_dtype)
        else:
            out[key] = _4bit_tensor(key, info, parts[key])
    for weight, companions in parts.items():
        if weight not in tensors:
            companion = next(iter(companions.values()))
            raise ConvertError(f"{companion.path}: tensor '{companion.name}': its weight '{weight}' is missing")
    return out


def check_not_conv1d(config: dict, where: object) -> None:
    """Refuse quantization with Conv1D models: their weights are quantized transposed, which is not done here yet."""
    if config.get("model_type") in CONV1D_MODEL_TYPES:
        raise ConvertError(
            f"{where}: {config['model_type']} models have Conv1D layers, which bitsandbytes stores transposed; "
            "quantized checkpoints of them are not supported yet"
        )


def companion_of(key: str) -> tuple[str | None, str]:
    """(the weight a quant-state tensor belongs to, its suffix): ``X.weight.absmax`` -> (``X.weight``,
    ``.absmax``), ``X.SCB`` -> (``X.weight``, ``.SCB``); (None, "") for any other tensor."""
    if BLOB in key:
        weight = key.split(BLOB)[0]
    elif key.endswith(SUFFIXES_4BIT):
        weight = key.rsplit(".", 1)[0]
    elif key.endswith(".SCB"):
        return key[: -len("SCB")] + "weight", ".SCB"
    elif key.endswith(".weight_format"):
        weight = key[: -len("_format")]
    else:
        return None, ""
    return weight, key[len(weight) :]


def _int8_tensor(key: str, weight: TensorInfo, tensors: dict[str, TensorInfo], dtype: str) -> TensorInfo:
    module = key.removesuffix(".weight")
    where = f"{weight.path}: tensor '{key}'"
    scb = tensors.get(module + ".SCB")
    if scb is None:
        raise ConvertError(f"{where}: int8 weight without its '{module}.SCB' scales")
    if weight.dtype != "I8" or len(weight.shape) != 2:
        raise ConvertError(f"{where}: an LLM.int8 weight must be 2-D int8, got {weight.dtype} {list(weight.shape)}")
    if scb.dtype != "F32" or scb.shape != weight.shape[:1]:
        raise ConvertError(
            f"{scb.path}: tensor '{scb.name}': expected F32 [{weight.shape[0]}] row scales, got {scb.dtype} "
            f"{list(scb.shape)}"
        )
    fmt = tensors.get(module + ".weight_format")
    if fmt is not None and int(read_tensor(fmt).reshape(-1)[0]) != 0:
        raise ConvertError(
            f"{fmt.path}: tensor '{fmt.name}': only row-major int8 weights (weight_format 0) are supported"
        )
    return logical(key, dtype, weight.shape, weight, Int8Rows(weight, scb))


def logical(name: str, dtype: str, shape: tuple[int, ...], stored: TensorInfo, source: object) -> TensorInfo:
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    return TensorInfo(name, dtype, tuple(shape), stored.path, stored.offset, nbytes, layout=source)


def _4bit_tensor(key: str, packed: TensorInfo, parts: dict[str, TensorInfo]) -> TensorInfo:
    where = f"{packed.path}: tensor '{key}'"
    blobs = [k for k in parts if k.startswith(BLOB)]
    if len(blobs) != 1:
        raise ConvertError(f"{where}: 4-bit weight without exactly one '{key}{BLOB}nf4|fp4' quant state")
    for needed in (".absmax", ".quant_map"):
        if needed not in parts:
            raise ConvertError(f"{where}: 4-bit weight without its '{key}{needed}' tensor")
    blob_info = parts[blobs[0]]
    try:
        state = json.loads(bytes(read_tensor(blob_info).reshape(-1).view(torch.uint8).tolist()).decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{blob_info.path}: tensor '{blob_info.name}': unreadable quant state: {e}") from None
    if not isinstance(state, dict):
        raise ConvertError(f"{blob_info.path}: tensor '{blob_info.name}': quant state is not a JSON object")
    quant_type, blocksize, shape = state.get("quant_type"), state.get("blocksize"), state.get("shape")
    if quant_type not in QUANT_TYPES or blobs[0] != BLOB + quant_type:
        raise ConvertError(f"{where}: unknown 4-bit quant type {quant_type!r} (expected nf4 or fp4)")
    if blocksize not in BLOCKSIZES:
        raise ConvertError(f"{where}: blocksize {blocksize!r} is not one bitsandbytes can load {list(BLOCKSIZES)}")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ConvertError(f"{where}: invalid shape {shape!r} in the quant state")
    dtype = {v: k for k, v in TORCH_NAMES.items()}.get(state.get("dtype"))
    if dtype is None:
        raise ConvertError(f"{where}: quant state dtype {state.get('dtype')!r} is not float16, bfloat16 or float32")
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    size = DTYPES[packed.dtype].itemsize
    if packed.nbytes != (n + 1) // (2 * size) * size:
        raise ConvertError(f"{where}: {packed.nbytes} packed bytes do not hold the {n} values of shape {shape}")
    nested = ".nested_absmax" in parts
    absmax = parts[".absmax"]
    if absmax.shape != (n_blocks,) or absmax.dtype != ("U8" if nested else "F32"):
        raise ConvertError(
            f"{absmax.path}: tensor '{absmax.name}': {absmax.dtype} {list(absmax.shape)} is inconsistent with "
            f"{n} values in blocks of {blocksize} ({'U8' if nested else 'F32'} [{n_blocks}] expected)"
        )
    offset = None
    if nested:
        if ".nested_quant_map" not in parts:
            raise ConvertError(f"{where}: double-quantized weight without its '{key}.nested_quant_map' tensor")
        nested_info = parts[".nested_absmax"]
        if state.get("nested_blocksize") != NESTED_BLOCKSIZE or not isinstance(state.get("nested_offset"), float):
            raise ConvertError(f"{where}: quant state needs nested_blocksize 256 and a float nested_offset: {state}")
        if nested_info.shape != (-(-n_blocks // NESTED_BLOCKSIZE),) or nested_info.dtype != "F32":
            raise ConvertError(f"{nested_info.path}: tensor '{nested_info.name}': inconsistent with {n_blocks} blocks")
        offset = state["nested_offset"]
    source = Packed4bit(
        packed,
        absmax,
        parts[".quant_map"],
        parts.get(".nested_absmax"),
        parts.get(".nested_quant_map"),
        offset,
        blocksize,
        quant_type,
        tuple(shape),
        DTYPES[dtype],
    )
    return logical(key, dtype, tuple(shape), packed, source)


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class QuantSpec:
    """How output weights are quantized: the CLI's --quantize and friends."""

    method: str  # nf4 | fp4 | int8
    blocksize: int = 64
    double_quant: bool = True
    quant_storage: str = "uint8"
    compute_dtype: str = "auto"  # recorded in quantization_config; auto = the output dtype
    skip_modules: tuple[str, ...] = ()


def spec_of(tensors: dict[str, TensorInfo], config: dict) -> QuantSpec | None:
    """The settings a bitsandbytes checkpoint was quantized with (None for a 16-bit one), from its weights'
    quant states and its ``quantization_config``: what ``--quantize`` must be given to write it again."""
    qconfig = config.get("quantization_config") or {}
    skip = tuple(qconfig.get("llm_int8_skip_modules") or ())
    for info in tensors.values():
        if isinstance(info.layout, Int8Rows):
            return QuantSpec("int8", skip_modules=skip)
        if isinstance(info.layout, Packed4bit):
            q = info.layout
            storage = qconfig.get("bnb_4bit_quant_storage", "uint8")
            compute = qconfig.get("bnb_4bit_compute_dtype", "auto")
            return QuantSpec(q.quant_type, q.blocksize, q.nested_absmax is not None, storage, compute, skip)
    return None


def quantization_config(spec: QuantSpec, out_dtype: str) -> dict:
    """The ``quantization_config`` transformers' ``BitsAndBytesConfig.to_dict()`` writes for these settings."""
    four = spec.method != "int8"
    return {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": TORCH_NAMES.get(out_dtype, "float32")
        if spec.compute_dtype == "auto"
        else spec.compute_dtype,
        "bnb_4bit_quant_storage": spec.quant_storage,
        "bnb_4bit_quant_type": spec.method if four else "fp4",
        "bnb_4bit_use_double_quant": four and spec.double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": ["lm_head", *[m for m in spec.skip_modules if m != "lm_head"]],
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }


def serialized_tensors(name: str, shape: tuple[int, ...], dtype: str, spec: QuantSpec) -> list[PlannedTensor]:
    """The tensors one quantized weight ``name`` is saved as, in the order they are planned."""
    n = math.prod(shape)
    if spec.method == "int8":
        module = name.removesuffix(".weight")
        return [
            PlannedTensor(name, "I8", shape),
            PlannedTensor(module + ".SCB", "F32", shape[:1]),
            PlannedTensor(module + ".weight_format", "U8", ()),
        ]
    size = DTYPES[STORAGE[spec.quant_storage]].itemsize
    if (n + 1) // 2 % size:
        raise ConvertError(
            f"tensor '{name}': {n} values do not fill whole {spec.quant_storage} words (--quant-storage uint8 does)"
        )
    n_blocks = -(-n // spec.blocksize)
    tensors = [
        PlannedTensor(name, STORAGE[spec.quant_storage], ((n + 1) // (2 * size), 1)),
        PlannedTensor(name + ".absmax", "U8" if spec.double_quant else "F32", (n_blocks,)),
        PlannedTensor(name + ".quant_map", "F32", (16,)),
    ]
    if spec.double_quant:
        tensors += [
            PlannedTensor(name + ".nested_absmax", "F32", (-(-n_blocks // NESTED_BLOCKSIZE),)),
            PlannedTensor(name + ".nested_quant_map", "F32", (256,)),
        ]
    blob = quant_state_blob(shape, dtype, spec, offset=None)
    return [*tensors, PlannedTensor(name + BLOB + spec.method, "U8", (len(blob),))]


def quant_state_blob(shape: tuple[int, ...], dtype: str, spec: QuantSpec, offset: float | torch.Tensor | None) -> bytes:
    """``pack_dict_to_tensor`` of ``QuantState.as_dict``'s non-tensor items, padded to a length fixed in advance."""
    state: dict = {
        "quant_type": spec.method,
        "blocksize": spec.blocksize,
        "dtype": TORCH_NAMES[dtype],
        "shape": list(shape),
    }
    if not spec.double_quant:
        return json.dumps(state).encode()
    offset = None if offset is None else float(offset)  # a device tensor when quantized on CUDA
    state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset)
    size = len(json.dumps({**state, "nested_offset": 0.0}).encode()) - len("0.0") + MAX_FLOAT_REPR
    return json.dumps(state).encode().ljust(size) if offset is not None else b" " * size


def chunk_rows(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Row granularity of chunks of a 4-bit output: each chunk must hold whole quantization blocks."""
    if spec.method == "int8":
        return 1
    cols = math.prod(shape[1:])
    return spec.blocksize // math.gcd(spec.blocksize, cols)
