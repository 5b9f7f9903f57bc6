"""Quantization steps of a merge plan: bitsandbytes output (``--quantize``) and ``--merge-into dequantized``.

Both only annotate the plan built from headers; the bytes move in the pipeline as
for any merge. ``--quantize`` marks the weights transformers would hold quantized,
and the executors write them through ``convert.execute.quantize_sink``.
``--merge-into dequantized`` makes every such weight of a 16-bit base read as its
round trip through the quantization the adapter was trained against (QLoRA), so
that the delta is added to the weights the adapter actually saw.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from convert.execute.decode import RoundTrip
from convert.options import FORMAT_METHODS, MERGE_INTO
from convert.plan import architecture
from convert.plan.build import OutputTensor, Plan
from formats import bnb, compressed_tensors, fp8, mxfp4
from formats.errors import ConvertError

# What ``--quantize same`` writes weight by weight in its base weight's scheme: quant_method -> layout, its module.
REQUANTIZED = {
    "compressed-tensors": (compressed_tensors.CompressedWeight, compressed_tensors),
    "mxfp4": (mxfp4.Mxfp4Experts, mxfp4),
}

# How PEFT's ``PeftModel.create_or_update_model_card`` records the base's quantization in an adapter's README.md.
RECORD_PREFIX = "The following `bitsandbytes` quantization config was used during training:"


def check_spec(spec: bnb.QuantSpec) -> None:
    """Refuse settings bitsandbytes cannot load, naming the option."""
    if spec.method not in bnb.METHODS:
        raise ConvertError(f"--quantize {spec.method!r}: expected one of {', '.join(bnb.METHODS)}")
    if spec.blocksize not in bnb.BLOCKSIZES:
        raise ConvertError(f"--blocksize {spec.blocksize}: bitsandbytes accepts {list(bnb.BLOCKSIZES)}")
    if spec.quant_storage not in bnb.STORAGE:
        raise ConvertError(f"--quant-storage {spec.quant_storage!r}: expected one of {', '.join(bnb.STORAGE)}")
    if spec.compute_dtype not in bnb.COMPUTE_DTYPES:
        raise ConvertError(f"--compute-dtype {spec.compute_dtype!r}: expected auto, bfloat16, float16 or float32")


def should_quantize(
    name: str, shape: tuple[int, ...], dtype: str, skip: list[str], linear: Mapping[str, str] | None = None
) -> bool:
    """Whether transformers would hold this tensor quantized: the weight of a Linear not skipped.

    ``linear`` maps the checkpoint weights whose modules transformers' bitsandbytes integration replaces,
    from the model's real module types, to those modules' in-memory paths, which the skip rule is matched
    against as transformers matches it (``convert.plan.architecture.quantized_weights``). Without it
    (callers that only have headers) Linear layers are told from embeddings by name: 2-D float
    ``*.weight`` not named like an embedding. The skip rule is transformers' ``should_convert_module``.
    """
    if not name.endswith(".weight") or len(shape) != 2 or dtype not in bnb.TORCH_NAMES:
        return False
    module = name.removesuffix(".weight") if linear is None else linear.get(name)
    if module is None:
        return False
    if linear is None and re.search(r"(^|\.)(embed\w*|wte|wpe|word_embeddings|position_embeddings)$", module):
        return False
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", module) or module.endswith(key) for key in skip)


def linear_weights(plan: Plan) -> dict[str, str] | None:
    """Checkpoint weight -> in-memory module of what transformers would quantize, from the base's real module
    types (None for a plan made without a base checkpoint: then names decide)."""
    return architecture.quantized_weights(plan.base) if plan.base is not None else None


def skip_list(spec: bnb.QuantSpec, config: dict) -> list[str]:
    """Modules kept 16-bit: lm_head (as transformers), the user's, and those the base already skipped."""
    qconfig = config.get("quantization_config") or {}
    base_skip = qconfig.get("llm_int8_skip_modules") or qconfig.get("modules_to_not_convert") or []
    return list(dict.fromkeys(["lm_head", *spec.skip_modules, *base_skip]))


def quantize_plan(plan: Plan, spec: bnb.QuantSpec, config: dict) -> Plan:
    """Write every Linear weight bitsandbytes-quantized, and record ``quantization_config``.

    ``spec.method`` ``fp8`` and ``same`` go to ``format_plan`` (block-scaled FP8, the base's own format)."""
    if spec.method in FORMAT_METHODS:
        return format_plan(plan, spec, config)
    check_spec(spec)
    bnb.check_not_conv1d(config, "--quantize")
    skip = skip_list(spec, config)
    spec = replace(spec, skip_modules=tuple(skip))
    linear = linear_weights(plan)
    tensors = [
        replace(t, quant=spec) if should_quantize(t.name, t.shape, t.dtype, skip, linear) else t
        for t in plan.tensors
    ]
    updates = {**plan.config_updates, "quantization_config": bnb.quantization_config(spec, plan.dtype)}
    return Plan(tensors, plan.dtype, updates, plan.base)


def format_plan(plan: Plan, spec: bnb.QuantSpec, config: dict) -> Plan:
    """``--quantize fp8``: every Linear weight (``should_quantize``, with ``skip_list``) written as block-scaled
    FP8 (128x128 blocks, fp32 ``weight_scale_inv``) with the ``quantization_config`` DeepSeek-V3 ships.
    ``--quantize same``: the output in the base's own format and settings: its FP8 weights written FP8 again
    (same block size, scale dtype, static activation scales copied), under the base's own ``quantization_config``;
    a bitsandbytes base is written with the settings its quant states record (``bnb.spec_of``); compressed-tensors
    and MXFP4 bases go to ``requantize_plan``."""
    sources = {t.name: t.source for t in plan.tensors}
    if spec.method == "same":
        method = (config.get("quantization_config") or {}).get("quant_method")
        if method in REQUANTIZED:
            return requantize_plan(plan, config, *REQUANTIZED[method])
        if method not in (None, "fp8", "bitsandbytes"):
            raise ConvertError(
                f"--quantize same: writing {method} checkpoints is not supported "
                f"(fp8, bitsandbytes, {', '.join(REQUANTIZED)} are)"
            )
        fp8_spec = fp8.spec_of(sources)
        if fp8_spec is None:
            bnb_spec = bnb.spec_of(sources, config)
            if bnb_spec is None:
                raise ConvertError("--quantize same: the base model is not quantized (no FP8 or bitsandbytes weights)")
            return quantize_plan(plan, bnb_spec, config)
        targets = {t.name for t in plan.tensors if isinstance(t.source.layout, fp8.BlockFP8)}
        qconfig = config["quantization_config"]
    else:
        fp8_spec, skip = fp8.FP8Spec(), skip_list(spec, config)
        linear = linear_weights(plan)
        targets = {t.name for t in plan.tensors if should_quantize(t.name, t.shape, t.dtype, skip, linear)}
        qconfig = fp8.quantization_config(fp8_spec, skip)
    tensors = []
    for t in plan.tensors:
        tensors.append(replace(t, quant=fp8_spec) if t.name in targets else t)
        scale = t.source.layout.activation_scale if isinstance(t.source.layout, fp8.BlockFP8) else None
        if t.name in targets and scale is not None:
            tensors.append(OutputTensor(scale.name, scale.dtype, scale))
    return Plan(tensors, plan.dtype, {**plan.config_updates, "quantization_config": qconfig}, plan.base)


def requantize_plan(plan: Plan, config: dict, layout: type, module) -> Plan:
    """``--quantize same`` from a compressed-tensors or MXFP4 base: every weight the merge changes is quantized
    again with its base weight's own scheme (``module.spec_of``: same tensors, dtypes, packing), its other stored
    parts (a static ``input_scale``) copied; every weight it leaves alone is its stored parts copied byte for byte
    (quantizing its dequantized values again need not give its bytes back: a bf16 scale, an MXFP4 group whose
    largest value is not 6). The base's ``quantization_config`` is kept unchanged, so transformers and vLLM load
    the output as they loaded the base."""
    tensors = []
    for t in plan.tensors:
        stored = module.stored_parts(t.source.layout) if isinstance(t.source.layout, layout) else None
        if stored is None:
            tensors.append(t)
            continue
        written = set()
        if t.delta is not None:
            t = replace(t, quant=module.spec_of(t.source, config))
            written = {p.name for p in t.serialized}
            tensors.append(t)
        tensors += [OutputTensor(p.name, p.dtype, p) for p in stored if p.name not in written]
    updates = {**plan.config_updates, "quantization_config": config["quantization_config"]}
    return Plan(tensors, plan.dtype, updates, plan.base)


def merge_into_dequantized(plan: Plan, spec: bnb.QuantSpec, config: dict, device: torch.device) -> Plan:
    """Read each Linear weight of a 16-bit base through ``spec``'s quantize -> dequantize round trip.

    All of them, not only the adapter's targets: during QLoRA training every Linear layer
    was quantized, and the point of this mode is the model the adapter was trained in.
    Weights of a base that is already quantized are read dequantized anyway. The round trip
    runs on ``device``: bitsandbytes rounds ties differently on CUDA, where QLoRA trains.
    """
    check_spec(spec)
    bnb.check_not_conv1d(config, "--merge-into dequantized")
    skip = skip_list(spec, config)
    linear = linear_weights(plan)
    tensors = []
    for t in plan.tensors:
        source = t.source
        if source.layout is None and should_quantize(t.name, source.shape, source.dtype, skip, linear):
            source = bnb.logical(source.name, source.dtype, source.shape, source, RoundTrip(source, spec, device))
        tensors.append(replace(t, source=source))
    return Plan(tensors, plan.dtype, plan.config_updates, plan.base)


def training_spec(spec: bnb.QuantSpec, train_quant: str | None, adapter_dir: Path | None) -> bnb.QuantSpec:
    """The quantization a QLoRA adapter was trained through: ``train_quant`` (with ``spec``'s blocksize and
    double quant) when given, else what PEFT recorded in the adapter's README.md, else NF4."""
    readme = adapter_dir / "README.md" if adapter_dir is not None else None
    if train_quant is not None or readme is None or not readme.is_file():
        return replace(spec, method=train_quant or "nf4")
    lines = [line.strip() for line in readme.read_text(errors="replace").splitlines()]
    if RECORD_PREFIX not in lines:
        return replace(spec, method="nf4")
    recorded = {}
    for line in lines[lines.index(RECORD_PREFIX) + 1 :]:
        field_match = re.fullmatch(r"- (\w+): (.*)", line)
        if field_match is None and recorded:
            break
        if field_match is not None:
            recorded[field_match[1]] = field_match[2]
    if recorded.get("load_in_8bit") == "True":
        return replace(spec, method="int8")
    if recorded.get("load_in_4bit") != "True" or recorded.get("bnb_4bit_quant_type") not in ("nf4", "fp4"):
        raise ConvertError(f"{readme}: the recorded training quantization is neither 4-bit nor 8-bit: {recorded}")
    double = recorded.get("bnb_4bit_use_double_quant") == "True"
    return replace(spec, method=recorded["bnb_4bit_quant_type"], double_quant=double, blocksize=64)  # transformers'


def check_merge_into(merge_into: str) -> None:
    if merge_into not in MERGE_INTO:
        raise ConvertError(f"--merge-into {merge_into!r}: expected original or dequantized")
