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
the original shape and dtype whose reads dequantize the requested rows, so the plan
and the pipeline see a plain 16-bit tensor. Writing: ``serialized_tensors`` lays out
the tensors a quantized output expands into (known from shape and settings alone, so
the shard writer plans them up front), and ``StreamingQuantizer`` fills them from row
chunks as they are computed. The bit-level work is ``convert.kernels.quant``.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from convert.kernels import quant
from formats.errors import ConvertError
from formats.safetensors_file import DTYPE_NAMES, DTYPES, TensorInfo, read_tensor
from formats.writer import PlannedTensor, ShardWriter

QUANT_TYPES = ("nf4", "fp4")
METHODS = ("nf4", "fp4", "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
NESTED_BLOCKSIZE = 256
STORAGE = {"uint8": "U8", "int8": "I8", "float16": "F16", "bfloat16": "BF16", "float32": "F32"}
TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
BLOB = ".quant_state.bitsandbytes__"
SUFFIXES_4BIT = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
# The longest repr of a float64 ("-2.2250738585072014e-308"): the quant-state blob is planned
# before the double-quant offset is known, so its JSON is padded with spaces (valid JSON) to this.
MAX_FLOAT_REPR = 24
DEQUANT_TILE = 1 << 18  # values dequantized per kernel call while reading
# Models whose Linear layers are transformers' Conv1D ((in, out) weights), which bitsandbytes stores transposed.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")


def codes(quant_type: str) -> torch.Tensor:
    return quant.NF4_CODE if quant_type == "nf4" else quant.FP4_CODE


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Packed4bit:
    """A 4-bit weight in a checkpoint; ``read_rows`` dequantizes exactly as ``bnb.functional.dequantize_4bit``."""

    packed: TensorInfo
    absmax: TensorInfo
    nested_absmax: TensorInfo | None
    offset: float | None
    blocksize: int
    quant_type: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def read_rows(self, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop), dequantized a tile of whole blocks at a time into ``buffer`` (or a new tensor):
        the kernel's temporaries (int64 codes, fp32 values) then stay a few MB whatever the chunk."""
        cols, n, bs = math.prod(self.shape[1:]), math.prod(self.shape), self.blocksize
        e0, e1 = start * cols, stop * cols
        out, tile = output(buffer, e1 - e0, self.dtype), max(bs, DEQUANT_TILE // bs * bs)
        for t0 in range(e0 // bs * bs, e1, tile):
            t1 = min(t0 + tile, n)
            packed = read_bytes(self.packed, t0 // 2, (t1 + 1) // 2)
            absmax = self.block_absmax(t0 // bs, -(-t1 // bs))
            values = quant.dequantize_blocks_4bit(packed, absmax, bs, self.quant_type, (t1 - t0,), self.dtype)
            lo, hi = max(t0, e0), min(t1, e1)
            out[lo - e0 : hi - e0] = values.reshape(-1)[lo - t0 : hi - t0]
        return out.view(stop - start, *self.shape[1:])

    def block_absmax(self, b0: int, b1: int) -> torch.Tensor:
        """fp32 absmax of blocks [b0, b1), undoing double quantization over whole nested blocks."""
        if self.nested_absmax is None:
            return read_tensor(self.absmax, b0, b1).float()
        n0 = b0 // NESTED_BLOCKSIZE
        qabsmax = read_tensor(self.absmax, n0 * NESTED_BLOCKSIZE, b1)
        nested = read_tensor(self.nested_absmax, n0, -(-b1 // NESTED_BLOCKSIZE))
        return quant.undo_double_quant(qabsmax, nested, self.offset)[b0 - n0 * NESTED_BLOCKSIZE :]


@dataclass(frozen=True)
class Int8Rows:
    """An LLM.int8 weight; ``read_rows`` gives fp32 ``weight * SCB / 127``, what PEFT merges the delta into."""

    weight: TensorInfo
    scb: TensorInfo

    def read_rows(self, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        cols = math.prod(self.weight.shape[1:])
        out = output(buffer, (stop - start) * cols, torch.float32).view(stop - start, cols)
        step = max(1, DEQUANT_TILE // max(1, cols))
        for r in range(start, stop, step):
            r1 = min(r + step, stop)
            scb = read_tensor(self.scb, r, r1)
            out[r - start : r1 - start] = quant.dequantize_int8(read_tensor(self.weight, r, r1), scb)
        return out


def output(buffer: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` values of ``dtype``: in the caller's reusable uint8 buffer when there is one."""
    if buffer is None:
        return torch.empty(n, dtype=dtype)
    return buffer[: n * dtype.itemsize].view(dtype)


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
    _check_code(parts[".quant_map"], codes(quant_type))
    offset = None
    if nested:
        if ".nested_quant_map" not in parts:
            raise ConvertError(f"{where}: double-quantized weight without its '{key}.nested_quant_map' tensor")
        _check_code(parts[".nested_quant_map"], quant.DYNAMIC_CODE)
        nested_info = parts[".nested_absmax"]
        if state.get("nested_blocksize") != NESTED_BLOCKSIZE or not isinstance(state.get("nested_offset"), float):
            raise ConvertError(f"{where}: quant state needs nested_blocksize 256 and a float nested_offset: {state}")
        if nested_info.shape != (-(-n_blocks // NESTED_BLOCKSIZE),) or nested_info.dtype != "F32":
            raise ConvertError(f"{nested_info.path}: tensor '{nested_info.name}': inconsistent with {n_blocks} blocks")
        offset = state["nested_offset"]
    source = Packed4bit(
        packed, absmax, parts.get(".nested_absmax"), offset, blocksize, quant_type, tuple(shape), DTYPES[dtype]
    )
    return logical(key, dtype, tuple(shape), packed, source)


def _check_code(info: TensorInfo, expected: torch.Tensor) -> None:
    if info.dtype != "F32" or not torch.equal(read_tensor(info).reshape(-1), expected):
        raise ConvertError(f"{info.path}: tensor '{info.name}': not the code bitsandbytes uses for this quant type")


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

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConvertError(f"--quantize {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.blocksize not in BLOCKSIZES:
            raise ConvertError(f"--blocksize {self.blocksize}: bitsandbytes accepts {list(BLOCKSIZES)}")
        if self.quant_storage not in STORAGE:
            raise ConvertError(f"--quant-storage {self.quant_storage!r}: expected one of {', '.join(STORAGE)}")
        if self.compute_dtype not in ("auto", *TORCH_NAMES.values()):
            raise ConvertError(f"--compute-dtype {self.compute_dtype!r}: expected auto, bfloat16, float16 or float32")


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


def should_quantize(
    name: str, shape: tuple[int, ...], dtype: str, skip: list[str], linear: Mapping[str, str] | None = None
) -> bool:
    """Whether transformers would hold this tensor quantized: the weight of a Linear not skipped.

    ``linear`` maps the checkpoint weights whose modules transformers' bitsandbytes integration replaces,
    from the model's real module types, to those modules' in-memory paths, which the skip rule is matched
    against as transformers matches it (``convert.architecture.quantized_weights``). Without it
    (callers that only have headers) Linear layers are told from embeddings by name: 2-D float
    ``*.weight`` not named like an embedding. The skip rule is transformers' ``should_convert_module``.
    """
    if not name.endswith(".weight") or len(shape) != 2 or dtype not in TORCH_NAMES:
        return False
    module = name.removesuffix(".weight") if linear is None else linear.get(name)
    if module is None:
        return False
    if linear is None and re.search(r"(^|\.)(embed\w*|wte|wpe|word_embeddings|position_embeddings)$", module):
        return False
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", module) or module.endswith(key) for key in skip)


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


@dataclass
class StreamingQuantizer:
    """Quantizes one output weight into its serialized tensors, row chunk by row chunk, from any thread.

    ``write_rows(start, rows)`` quantizes rows [start, start + len(rows)) (each chunk a whole
    number of blocks, see ``chunk_rows``) and writes the packed data at its planned offset at once.
    Double quantization needs the absmax of the whole tensor (its offset is their mean), so the
    fp32 absmax (n / blocksize floats) is kept until the last row arrives; then absmax, nested
    absmax and quant state are written. Rows may live on any device: the bytes are bitsandbytes'
    on that device (the absmax stays there too, so double quantization follows the same rule).
    Usable outside ``convert merge``: plan ``serialized_tensors(...)`` in a ``ShardWriter``, then
    feed rows here in any order (``quantize_tensor`` does it for a tensor in memory).
    """

    writer: ShardWriter
    name: str
    shape: tuple[int, ...]
    dtype: str  # the 16-bit dtype rows arrive in (and recorded in the quant state)
    spec: QuantSpec
    _absmax: torch.Tensor | None = None
    _rows_left: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rows_left = self.shape[0]
        if self.spec.method == "int8":
            self.writer.write(self.name.removesuffix(".weight") + ".weight_format", torch.zeros((), dtype=torch.uint8))
            return
        self.writer.write(self.name + ".quant_map", codes(self.spec.method))
        if self.spec.double_quant:
            self.writer.write(self.name + ".nested_quant_map", quant.DYNAMIC_CODE)
        else:
            self.writer.write(
                self.name + BLOB + self.spec.method, _bytes(quant_state_blob(self.shape, self.dtype, self.spec, None))
            )

    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        cols = math.prod(self.shape[1:])
        if self.spec.method == "int8":
            q, scb = quant.quantize_int8(rows.reshape(len(rows), cols).to(torch.float16))  # as bnb's Int8Params
            self.writer.write(self.name, q.cpu(), start * cols)
            self.writer.write(self.name.removesuffix(".weight") + ".SCB", scb.cpu(), start * 4)
        else:
            e0, bs = start * cols, self.spec.blocksize
            assert e0 % bs == 0, "a 4-bit chunk must start on a block boundary"
            packed, absmax = quant.quantize_blocks_4bit(rows.reshape(-1), bs, self.spec.method)
            self.writer.write(self.name, packed.cpu(), e0 // 2)
            if not self.spec.double_quant:
                self.writer.write(self.name + ".absmax", absmax.cpu(), e0 // bs * 4)
            else:
                with self._lock:
                    if self._absmax is None:
                        self._absmax = torch.empty(-(-math.prod(self.shape) // bs), device=absmax.device)
                self._absmax[e0 // bs : e0 // bs + len(absmax)] = absmax
        with self._lock:
            self._rows_left -= len(rows)
            last = self._rows_left == 0
        if last and self._absmax is not None:
            qabsmax, nested, offset = quant.double_quantize(self._absmax)
            self.writer.write(self.name + ".absmax", qabsmax.cpu())
            self.writer.write(self.name + ".nested_absmax", nested.cpu())
            blob = quant_state_blob(self.shape, self.dtype, self.spec, offset)
            self.writer.write(self.name + BLOB + self.spec.method, _bytes(blob))
            self._absmax = None


def _bytes(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.uint8)


def quantize_tensor(writer: ShardWriter, name: str, tensor: torch.Tensor, spec: QuantSpec, chunk_elements: int) -> None:
    """Quantize a whole in-memory tensor into its planned serialized tensors, in row chunks."""
    dtype = DTYPE_NAMES[tensor.dtype]
    sink = StreamingQuantizer(writer, name, tuple(tensor.shape), dtype, spec)
    step = max(1, chunk_elements // max(1, math.prod(tensor.shape[1:])))
    g = chunk_rows(tuple(tensor.shape), spec)
    step = max(g, step // g * g)
    for start in range(0, tensor.shape[0], step):
        sink.write_rows(start, tensor[start : start + step])
