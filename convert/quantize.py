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
import threading
from dataclasses import dataclass, field, replace

import torch

from convert.kernels import quant
from convert.plan import Plan
from formats.bnb import QuantSpec, logical, quantization_config, should_quantize
from formats.errors import ConvertError
from formats.safetensors_file import TensorInfo, read_tensor

MERGE_INTO = ("original", "dequantized")
ROUND_TRIP_CHUNK_ELEMENTS = 1 << 22  # the absmax pre-pass of double quantization reads this much at a time


def skip_list(spec: QuantSpec, config: dict) -> list[str]:
    """Modules kept 16-bit: lm_head (as transformers), the user's, and those the base already skipped."""
    base_skip = (config.get("quantization_config") or {}).get("llm_int8_skip_modules") or []
    return list(dict.fromkeys(["lm_head", *spec.skip_modules, *base_skip]))


def quantize_plan(plan: Plan, spec: QuantSpec, config: dict) -> Plan:
    """Write every Linear weight bitsandbytes-quantized, and record ``quantization_config``."""
    spec.check()
    skip = skip_list(spec, config)
    spec = replace(spec, skip_modules=tuple(skip))
    tensors = [replace(t, quant=spec) if should_quantize(t.name, t.shape, t.dtype, skip) else t for t in plan.tensors]
    updates = {**plan.config_updates, "quantization_config": quantization_config(spec, plan.dtype)}
    return Plan(tensors, plan.dtype, updates)


def merge_into_dequantized(plan: Plan, spec: QuantSpec, config: dict) -> Plan:
    """Read each Linear weight of a 16-bit base through ``spec``'s quantize -> dequantize round trip.

    All of them, not only the adapter's targets: during QLoRA training every Linear layer
    was quantized, and the point of this mode is the model the adapter was trained in.
    Weights of a base that is already quantized are read dequantized anyway.
    """
    spec.check()
    skip = skip_list(spec, config)
    tensors = []
    for t in plan.tensors:
        source = t.source
        if source.quantized is None and should_quantize(t.name, source.shape, source.dtype, skip):
            source = logical(source.name, source.dtype, source.shape, source, RoundTrip(source, spec))
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
    spec: QuantSpec
    _state: dict = field(default_factory=dict, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False)

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        if self.spec.method == "int8":
            rows = read_tensor(self.source, start, stop)
            return quant.dequantize_int8(*quant.quantize_int8(rows.to(torch.float16)))  # as bnb's Int8Params
        shape, bs = self.source.shape, self.spec.blocksize
        cols, n = math.prod(shape[1:]), math.prod(shape)
        e0, e1 = start * cols, stop * cols
        first, last = e0 // bs * bs, min(-(-e1 // bs) * bs, n)
        r0, r1 = first // cols, -(-last // cols)
        flat = read_tensor(self.source, r0, r1).reshape(-1)[first - r0 * cols : last - r0 * cols]
        packed, absmax = quant.quantize_blocks_4bit(flat, bs, self.spec.method)
        if self.spec.double_quant:
            absmax = self.dequantized_absmax()[first // bs : first // bs + len(absmax)]
        dtype = flat.dtype
        values = quant.dequantize_blocks_4bit(packed, absmax, bs, self.spec.method, (last - first,), dtype)
        with self._lock:
            self._state["rows_read"] = self._state.get("rows_read", 0) + stop - start
            if self._state["rows_read"] >= self.source.rows:
                self._state.clear()
        return values.reshape(-1)[e0 - first : e1 - first].reshape(stop - start, *shape[1:])

    def dequantized_absmax(self) -> torch.Tensor:
        with self._lock:
            if "absmax" not in self._state:
                rows, bs = self.source.rows, self.spec.blocksize
                # a multiple of blocksize rows holds whole blocks whatever the row length
                step = bs * max(1, ROUND_TRIP_CHUNK_ELEMENTS // (math.prod(self.source.shape[1:]) * bs))
                chunks = (read_tensor(self.source, r, min(r + step, rows)).reshape(-1) for r in range(0, rows, step))
                absmax = torch.cat([quant.quantize_blocks_4bit(c, bs, self.spec.method)[1] for c in chunks])
                self._state["absmax"] = quant.undo_double_quant(*quant.double_quantize(absmax))
            return self._state["absmax"]


def check_merge_into(merge_into: str) -> None:
    if merge_into not in MERGE_INTO:
        raise ConvertError(f"--merge-into {merge_into!r}: expected original or dequantized")
