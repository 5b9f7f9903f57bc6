"""Quantization steps of a merge plan: bitsandbytes output (``--quantize``) and ``--merge-into dequantized``.

Both only annotate the plan built from headers; the bytes move in the pipeline as
for any merge. ``--quantize`` marks the weights transformers would hold quantized,
and the pipeline writes them through ``formats.bnb.StreamingQuantizer``.
``--merge-into dequantized`` makes every such weight of a 16-bit base read as its
round trip through the quantization the adapter was trained against (QLoRA), so
that the delta is added to the weights the adapter actually saw.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from convert.kernels import quant
from convert.plan import OutputTensor, Plan
from formats import bnb, fp8  # the modules, not names: they import convert.kernels, so may be mid-import
from formats.errors import ConvertError
from formats.safetensors_file import TensorInfo, read_tensor

MERGE_INTO = ("original", "dequantized")
# How PEFT's ``PeftModel.create_or_update_model_card`` records the base's quantization in an adapter's README.md.
RECORD_PREFIX = "The following `bitsandbytes` quantization config was used during training:"
ROUND_TRIP_CHUNK_ELEMENTS = 1 << 22  # the absmax pre-pass of double quantization reads this much at a time


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
    spec.check()
    bnb.check_not_conv1d(config, "--quantize")
    skip = skip_list(spec, config)
    spec = replace(spec, skip_modules=tuple(skip))
    tensors = [
        replace(t, quant=spec) if bnb.should_quantize(t.name, t.shape, t.dtype, skip) else t for t in plan.tensors
    ]
    updates = {**plan.config_updates, "quantization_config": bnb.quantization_config(spec, plan.dtype)}
    return Plan(tensors, plan.dtype, updates)


FORMAT_METHODS = ("fp8", "same")


def format_plan(plan: Plan, spec: bnb.QuantSpec, config: dict) -> Plan:
    """``--quantize fp8``: every Linear weight (``bnb.should_quantize``, with ``skip_list``) written as block-scaled
    FP8 (128x128 blocks, fp32 ``weight_scale_inv``) with the ``quantization_config`` DeepSeek-V3 ships.
    ``--quantize same``: the output in the base's own format and settings: its FP8 weights written FP8 again
    (same block size, scale dtype, static activation scales copied), under the base's own ``quantization_config``;
    a bitsandbytes base is written with the settings its quant states record (``bnb.spec_of``)."""
    sources = {t.name: t.source for t in plan.tensors}
    if spec.method == "same":
        method = (config.get("quantization_config") or {}).get("quant_method")
        if method not in (None, "fp8", "bitsandbytes"):
            raise ConvertError(f"--quantize same: writing {method} checkpoints is not supported yet (fp8 is)")
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
        targets = {t.name for t in plan.tensors if bnb.should_quantize(t.name, t.shape, t.dtype, skip)}
        qconfig = fp8.quantization_config(fp8_spec, skip)
    tensors = []
    for t in plan.tensors:
        tensors.append(replace(t, quant=fp8_spec) if t.name in targets else t)
        scale = t.source.layout.activation_scale if isinstance(t.source.layout, fp8.BlockFP8) else None
        if t.name in targets and scale is not None:
            tensors.append(OutputTensor(scale.name, scale.dtype, scale))
    return Plan(tensors, plan.dtype, {**plan.config_updates, "quantization_config": qconfig})


def merge_into_dequantized(plan: Plan, spec: bnb.QuantSpec, config: dict, device: torch.device) -> Plan:
    """Read each Linear weight of a 16-bit base through ``spec``'s quantize -> dequantize round trip.

    All of them, not only the adapter's targets: during QLoRA training every Linear layer
    was quantized, and the point of this mode is the model the adapter was trained in.
    Weights of a base that is already quantized are read dequantized anyway. The round trip
    runs on ``device``: bitsandbytes rounds ties differently on CUDA, where QLoRA trains.
    """
    spec.check()
    bnb.check_not_conv1d(config, "--merge-into dequantized")
    skip = skip_list(spec, config)
    tensors = []
    for t in plan.tensors:
        source = t.source
        if source.layout is None and bnb.should_quantize(t.name, source.shape, source.dtype, skip):
            source = bnb.logical(source.name, source.dtype, source.shape, source, RoundTrip(source, spec, device))
        tensors.append(replace(t, source=source))
    return Plan(tensors, plan.dtype, plan.config_updates)


@dataclass(frozen=True)
class RoundTrip:
    """A 16-bit tensor read as ``dequantize(quantize(W))``, bit for bit as bitsandbytes gives it.

    Row ranges are widened to whole blocks, quantized and dequantized. With double
    quantization the dequantizing absmax depends on the mean of the whole tensor's
    absmax, so a first read of the tensor computes it; it is dropped after the last row.
    """

    source: TensorInfo
    spec: bnb.QuantSpec
    device: torch.device
    _state: dict = field(default_factory=dict, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False)

    def read_rows(self, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        if self.spec.method == "int8":
            rows = read_tensor(self.source, start, stop).to(self.device, torch.float16)  # as bnb's Int8Params
            return quant.dequantize_int8(*quant.quantize_int8(rows)).cpu()
        shape, bs = self.source.shape, self.spec.blocksize
        cols, n = math.prod(shape[1:]), math.prod(shape)
        e0, e1 = start * cols, stop * cols
        first, last = e0 // bs * bs, min(-(-e1 // bs) * bs, n)
        r0, r1 = first // cols, -(-last // cols)
        flat = read_tensor(self.source, r0, r1).reshape(-1)[first - r0 * cols : last - r0 * cols].to(self.device)
        packed, absmax = quant.quantize_blocks_4bit(flat, bs, self.spec.method)
        if self.spec.double_quant:
            absmax = self.dequantized_absmax()[first // bs : first // bs + len(absmax)]
        dtype = flat.dtype
        values = quant.dequantize_blocks_4bit(packed, absmax, bs, self.spec.method, (last - first,), dtype)
        with self._lock:
            self._state["rows_read"] = self._state.get("rows_read", 0) + stop - start
            if self._state["rows_read"] >= self.source.rows:
                self._state.clear()
        return values.reshape(-1)[e0 - first : e1 - first].reshape(stop - start, *shape[1:]).cpu()

    def dequantized_absmax(self) -> torch.Tensor:
        with self._lock:
            if "absmax" not in self._state:
                rows, bs = self.source.rows, self.spec.blocksize
                # a multiple of blocksize rows holds whole blocks whatever the row length
                step = bs * max(1, ROUND_TRIP_CHUNK_ELEMENTS // (math.prod(self.source.shape[1:]) * bs))
                chunks = (
                    read_tensor(self.source, r, min(r + step, rows)).to(self.device) for r in range(0, rows, step)
                )
                absmax = torch.cat([quant.quantize_blocks_4bit(c, bs, self.spec.method)[1] for c in chunks])
                self._state["absmax"] = quant.undo_double_quant(*quant.double_quantize(absmax))
            return self._state["absmax"]


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
