"""compressed-tensors checkpoints (``quant_method: compressed-tensors``), as llm-compressor writes them.

``quantization_config`` holds ``format`` (or one per group, ``mixed-precision``), ``config_groups`` (each a
``targets`` list, module class names or ``re:`` regexes on module names, and ``weights`` args: ``num_bits``,
``type`` int|float, ``strategy`` tensor|channel|group|block, ``group_size``, ``block_structure``, ``symmetric``)
and ``ignore``. A quantized Linear ``X`` is stored as::

    float-quantized (fp8)   X.weight F8_E4M3 (R, C), X.weight_scale, [X.input_scale]
    int-quantized (int8)    X.weight I8 (R, C), X.weight_scale, [X.weight_zero_point], [X.input_scale]
    pack-quantized (int4/8) X.weight_packed I32 (R, ceil(C * bits / 32)), X.weight_shape I64 [2] = (R, C),
                            X.weight_scale, [X.weight_zero_point I32 (ceil(R * bits / 32), groups), packed by rows]

with ``weight_scale`` of shape [1] (tensor), (R, 1) (channel), (R, C / group_size) (group) or
(ceil(R / bm), ceil(C / bn)) (block). ``group_compressed`` folds them into one logical 16-bit tensor per weight
(``TensorInfo.layout`` a ``CompressedWeight``), dequantized as compressed-tensors' own ``decompress`` does; the
math is ``convert.kernels.packed_int`` (and ``convert.kernels.fp8`` for blocks). Layouts and I/O only here.

Writing (``--quantize same``): ``spec_of`` says how a merged weight is written again in its base weight's own
scheme (a ``CompressedSpec``: the base's parts, so the same names, dtypes, shapes and packing), refusing schemes
whose scales cannot be computed again from the weight alone (an observer other than min-max, activation
ordering, a ``scale_dtype`` of its own; zero points are int8, as compressed-tensors infers them);
``serialized_tensors`` / ``chunk_rows`` lay it out as ``formats.fp8``'s do, ``stored_parts`` lists what a weight
the merge leaves alone is copied as, and the base's ``quantization_config`` is written unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from formats import bnb
from formats.errors import ConvertError
from formats.fp8 import output_dtype
from formats.safetensors_file import DTYPES, TensorInfo, read_tensor
from formats.writer import PlannedTensor

FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")
STRATEGIES = ("tensor", "channel", "group", "block")
COMPANIONS = (".weight_scale", ".weight_zero_point", ".weight_shape", ".input_scale", ".weight_packed")
BITS = (4, 8)  # pack-quantized integer widths read here
OBSERVERS = (None, "minmax", "memoryless_minmax", "static_minmax")  # whose scales --quantize same computes again


@dataclass(frozen=True)
class CompressedWeight:
    """Where one quantized weight's parts lie; ``convert.execute.decode`` dequantizes them as compressed-tensors'
    ``decompress`` of its format."""

    values: TensorInfo  # weight (F8_E4M3 / I8) or weight_packed (I32)
    scale: TensorInfo
    zero_point: TensorInfo | None
    num_bits: int
    packed: bool
    strategy: str
    group_size: int | None
    block: tuple[int, int] | None
    shape: tuple[int, int]
    dtype: torch.dtype
    input_scale: TensorInfo | None = None
    shape_info: TensorInfo | None = None  # weight_shape of a packed weight

    @property
    def kind(self) -> str:
        """compressed-tensors' ``type``: "float" (e4m3 values) or "int"."""
        return "float" if self.values.dtype == "F8_E4M3" else "int"


def is_compressed(config: dict) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def group_compressed(tensors: dict[str, TensorInfo], config: dict) -> dict[str, TensorInfo]:
    """Fold every compressed-tensors weight and its companions into one logical tensor (``layout`` set); any
    inconsistency is a ``ConvertError`` naming the file and tensor."""
    if not is_compressed(config):
        return tensors
    qconfig = config["quantization_config"]
    where = next(iter(tensors.values())).path if tensors else "config.json"
    groups = qconfig.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise ConvertError(f"{where}: quantization_config.config_groups is not an object")
    dtype = output_dtype(config)
    modules = [k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale")]
    out: dict[str, TensorInfo] = {}
    folded: set[str] = set()
    for module in modules:
        info = _weight(module, tensors, _scheme(module, groups, tensors[module + ".weight_scale"]), qconfig, dtype)
        out[module + ".weight"] = info
        folded |= {module + suffix for suffix in COMPANIONS} | {module + ".weight"}
    result: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        if key in folded:
            if key.endswith((".weight", ".weight_packed")):  # the logical weight takes its stored values' place
                result[key.rsplit(".", 1)[0] + ".weight"] = out[key.rsplit(".", 1)[0] + ".weight"]
            continue
        if key.endswith(COMPANIONS[1:]):
            module = key.rsplit(".", 1)[0]
            raise ConvertError(f"{info.path}: tensor '{key}': its module's '{module}.weight_scale' is missing")
        if info.dtype in ("F8_E4M3", "F8_E5M2") or key.endswith(".weight_packed"):
            raise ConvertError(f"{info.path}: tensor '{key}': quantized weight without its '.weight_scale' scales")
        result[key] = info
    return result


def _scheme(module: str, groups: dict, scale: TensorInfo) -> dict:
    """The ``config_groups`` entry that quantized ``module``: the first whose targets name it (exactly or by an
    ``re:`` regex), else the first targeting a module class (a checkpoint does not record classes; only Linear-like
    modules have weight scales)."""
    by_class = None
    for group in groups.values():
        targets = group.get("targets") or [] if isinstance(group, dict) else []
        for target in targets:
            if target.startswith("re:") and re.match(target[3:], module) or target == module:
                return group
            if by_class is None and not target.startswith("re:") and "." not in target:
                by_class = group
    if by_class is None:
        raise ConvertError(f"{scale.path}: tensor '{scale.name}': its module matches no config_groups targets")
    return by_class


def _weight(module: str, tensors: dict[str, TensorInfo], scheme: dict, qconfig: dict, dtype: str) -> TensorInfo:
    scale = tensors[module + ".weight_scale"]
    where = f"{scale.path}: tensor '{scale.name}'"
    args = scheme.get("weights") or {}
    fmt = scheme.get("format") or qconfig.get("format")
    if fmt not in FORMATS:
        raise ConvertError(f"{where}: compressed-tensors format {fmt!r} is not one read here ({', '.join(FORMATS)})")
    bits, kind, strategy = args.get("num_bits"), args.get("type"), args.get("strategy")
    if strategy not in STRATEGIES:
        raise ConvertError(f"{where}: weight strategy {strategy!r} is not supported (expected {', '.join(STRATEGIES)})")
    packed = fmt == "pack-quantized"
    if packed:
        values, shape_info = tensors.get(module + ".weight_packed"), tensors.get(module + ".weight_shape")
        if values is None or shape_info is None:
            raise ConvertError(f"{where}: pack-quantized weight without '{module}.weight_packed' and '.weight_shape'")
        shape = tuple(int(d) for d in read_tensor(shape_info).reshape(-1).tolist())
        if kind != "int" or bits not in BITS:
            raise ConvertError(f"{where}: pack-quantized {kind} {bits}-bit weights are not supported (int4, int8 are)")
        words = -(-shape[1] * bits // 32) if len(shape) == 2 else -1
        if values.dtype != "I32" or len(shape) != 2 or values.shape != (shape[0], words):
            raise ConvertError(
                f"{values.path}: tensor '{values.name}': {values.dtype} {list(values.shape)} does not hold a packed "
                f"{bits}-bit weight of shape {list(shape)}"
            )
    else:
        values = tensors.get(module + ".weight")
        if values is None:
            raise ConvertError(f"{where}: its weight '{module}.weight' is missing")
        expected = "F8_E4M3" if kind == "float" else "I8"
        if bits != 8 or values.dtype != expected or len(values.shape) != 2:
            raise ConvertError(
                f"{values.path}: tensor '{values.name}': expected a 2-D {expected} weight for {kind} {bits}-bit "
                f"weights, got {values.dtype} {list(values.shape)}"
            )
        shape = values.shape
    rows, cols = shape
    group_size = args.get("group_size") if strategy == "group" else None
    block = tuple(args.get("block_structure") or ()) if strategy == "block" else None
    if strategy == "group" and (not isinstance(group_size, int) or group_size <= 0 or cols % group_size):
        raise ConvertError(f"{where}: {cols} columns do not divide into groups of {group_size!r}")
    if strategy == "block" and (len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)):
        raise ConvertError(f"{where}: block_structure {args.get('block_structure')!r} is not two positive integers")
    grid = {
        "tensor": ((1,), ()),
        "channel": ((rows, 1),),
        "group": ((rows, cols // group_size),) if group_size else (),
        "block": ((-(-rows // block[0]), -(-cols // block[1])),) if block else (),
    }[strategy]
    if scale.shape not in grid or scale.dtype not in ("F32", "BF16", "F16"):
        raise ConvertError(
            f"{where}: {scale.dtype} scales of shape {list(scale.shape)} do not fit weight {list(shape)} with "
            f"strategy {strategy} (expected a float tensor of shape {list(grid[0])})"
        )
    zero_point = tensors.get(module + ".weight_zero_point")
    if args.get("symmetric", True) is False:
        if zero_point is None:
            raise ConvertError(f"{where}: asymmetric weight without its '{module}.weight_zero_point'")
        if strategy == "block" or kind == "float":
            raise ConvertError(f"{where}: zero points of {kind} {strategy} weights are not supported")
        zp_shape = (-(-rows * bits // 32), grid[0][1]) if packed and strategy != "tensor" else scale.shape
        if zero_point.shape != zp_shape:
            raise ConvertError(
                f"{zero_point.path}: tensor '{zero_point.name}': shape {list(zero_point.shape)}, expected "
                f"{list(zp_shape)}"
            )
    else:
        zero_point = None  # a symmetric scheme's zero points are zeros (compressed-tensors drops them)
    layout = CompressedWeight(
        values, scale, zero_point, bits, packed, strategy, group_size, block, (rows, cols), DTYPES[dtype],
        tensors.get(module + ".input_scale"), tensors.get(module + ".weight_shape") if packed else None,
    )  # fmt: skip
    return bnb.logical(module + ".weight", dtype, (rows, cols), values, layout)


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class CompressedSpec:
    """How one merged weight is written again as its base weight was (``--quantize same``): ``layout``'s scheme
    and parts (their names, dtypes and shapes)."""

    layout: CompressedWeight
    method: str = "compressed-tensors"  # what summaries print, as bnb.QuantSpec.method


def spec_of(info: TensorInfo, config: dict) -> CompressedSpec:
    """The spec a merged ``info`` (a ``CompressedWeight``) is written with; a ``ConvertError`` naming the file and
    tensor for a scheme whose scales could not be computed again from the merged weight as the base's were."""
    layout = info.layout
    scale = layout.scale
    module = scale.name.removesuffix(".weight_scale")
    args = _scheme(module, config["quantization_config"].get("config_groups") or {}, scale).get("weights") or {}
    where = f"{scale.path}: tensor '{scale.name}': --quantize same"
    if args.get("observer") not in OBSERVERS:
        raise ConvertError(
            f"{where}: weights quantized with observer {args['observer']!r} cannot be quantized again (its scales "
            "are not the min-max of the weight; minmax is supported)"
        )
    for unsupported in ("actorder", "scale_dtype"):  # GPTQ's column order; scales rounded to a dtype of their own
        if args.get(unsupported) not in (None, False):
            raise ConvertError(f"{where}: weights with {unsupported} {args[unsupported]!r} are not supported")
    return CompressedSpec(layout)


def stored_parts(layout: CompressedWeight) -> list[TensorInfo]:
    """The base tensors one weight is stored as, in checkpoint order: what an unchanged weight is copied as."""
    parts = [layout.values, layout.shape_info, layout.scale, layout.zero_point, layout.input_scale]
    return [p for p in parts if p is not None]


def serialized_tensors(name: str, shape: tuple[int, ...], dtype: str, spec: CompressedSpec) -> list[PlannedTensor]:
    """The tensors a merged weight ``name`` is saved as: its base weight's values (packed), shape, scales and zero
    points, with the same names, dtypes and shapes (``input_scale`` is copied apart; ``dtype``, the 16-bit dtype
    rows arrive in, is unused: the signature is ``formats.bnb.serialized_tensors``')."""
    layout = spec.layout
    if tuple(shape) != layout.shape:
        raise ConvertError(f"tensor '{name}': shape {list(shape)} is not its base weight's {list(layout.shape)}")
    parts = [p for p in stored_parts(layout) if p is not layout.input_scale]
    return [PlannedTensor(p.name, p.dtype, p.shape) for p in parts]


def chunk_rows(shape: tuple[int, ...], spec: CompressedSpec) -> int:
    """Row granularity of a chunk: whole block rows, the whole tensor for one scale, whole words of row-packed zero
    points, else one row (channel and group scales are per row)."""
    layout = spec.layout
    if layout.strategy == "tensor":
        return shape[0]
    if layout.block is not None:
        return layout.block[0]
    return 32 // layout.num_bits if layout.packed and layout.zero_point is not None else 1
