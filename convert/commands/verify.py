"""``convert verify``: recompute merged tensors from base + adapter and compare them with a merged model.

The recomputation is the merge itself: the same plan (``convert.plan.build``) run by
the same pipeline (``convert.execute.cpu.run_plan``), with a sink that compares
each tile the pipeline would have written against the merged file's bytes at the
same place, instead of writing it. Memory stays at a few chunks, as in a merge.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
from pathlib import Path

import torch

from convert.devices import parse_devices
from convert.execute.cpu import run_plan
from convert.options import MergeOptions, VerifyOptions
from convert.output.job import option_sizes
from convert.plan.build import OutputTensor, Plan
from convert.plan.inputs import open_inputs
from convert.plan.merge_plan import merge_plan
from formats import bnb
from formats.checkpoint import open_checkpoint
from formats.safetensors_file import DTYPES, FLOAT_DTYPES, TensorInfo, read_header, read_tensor

COMPARE_ELEMENTS = 1 << 22


def flat(info: TensorInfo) -> TensorInfo:
    """The same tensor seen as one row of elements, so that any byte range of it can be read."""
    mapped = None if info.mapped is None else info.mapped.reshape(-1)
    return dataclasses.replace(info, shape=(math.prod(info.shape),), mapped=mapped)


class CompareSink:
    """Takes the place of the ``ShardWriter``: compares what would be written with the merged model."""

    def __init__(self, merged: dict[str, TensorInfo], atol: float):
        self.merged, self.atol = merged, atol
        self.max_error: dict[str, float] = {}
        self.mismatched: dict[str, int] = {}
        self._lock = threading.Lock()

    def write(self, name: str, data: torch.Tensor, offset: int = 0) -> None:
        theirs = self.merged[name]
        if data.dtype != DTYPES[theirs.dtype]:  # packed 4-bit data stored as another dtype (--quant-storage)
            theirs, data = dataclasses.replace(theirs, dtype="U8", shape=(theirs.nbytes,)), data.view(torch.uint8)
        theirs = flat(theirs)
        first = offset // data.element_size()
        self._compare(name, data.reshape(-1), read_tensor(theirs, first, first + data.numel()))

    def copy(self, name: str, source: TensorInfo) -> None:
        ours, theirs = flat(source), flat(self.merged[name])
        for start in range(0, ours.rows, COMPARE_ELEMENTS):
            stop = min(ours.rows, start + COMPARE_ELEMENTS)
            self._compare(name, read_tensor(ours, start, stop), read_tensor(theirs, start, stop))

    def _compare(self, name: str, expected: torch.Tensor, found: torch.Tensor) -> None:
        diff = (expected.double() - found.double()).abs()
        both_nan = expected.double().isnan() & found.double().isnan()
        diff = torch.where(both_nan, 0.0, diff.nan_to_num(nan=math.inf))
        error = float(diff.max()) if diff.numel() else 0.0
        bad = int((diff > self.atol).sum())
        with self._lock:
            self.max_error[name] = max(self.max_error.get(name, 0.0), error)
            self.mismatched[name] = self.mismatched.get(name, 0) + bad


def verify(base: str | Path, adapter: str | Path | None, merged: str | Path, **options) -> dict:
    """Compare ``merged`` with the merge of ``adapter`` into ``base``; return a JSON-able report.

    ``options`` are ``convert.options.VerifyOptions``' fields. ``sample``: check that many tensors, chosen at
    random with ``seed`` (default: all). Tensor names and shapes are always checked in full. A tensor passes
    when no element differs by more than ``atol`` (0: bit-identical, what a CPU merge gives). The plan is the
    merge's own (``convert.plan.merge_plan``): a bitsandbytes-quantized ``merged`` (``--quantize``) is checked
    byte for byte (the merge recomputed, quantized with the settings its quant states record, and every
    serialized part compared), and ``merge_into="dequantized"`` recomputes a QLoRA merge into the round-tripped
    weights (with ``train_quant``, ``blocksize`` and ``double_quant`` as the merge was given them).
    """
    o = VerifyOptions(**options)
    device = parse_devices(o.device, several=False)[0]
    merged_ckpt = open_checkpoint(merged)
    theirs = merged_ckpt.tensors  # a quantized weight as one tensor of its original shape and dtype
    stored = theirs  # what the comparing sink reads: the serialized tensors of a quantized model
    spec = bnb.spec_of(theirs, merged_ckpt.config)
    recipe = MergeOptions(
        merge_into=o.merge_into, train_quant=o.train_quant, blocksize=o.blocksize, double_quant=o.double_quant,
        allow_nonfinite=True,
    )  # fmt: skip
    if spec is not None:  # a `--quantize` output: recompute the merge, quantize it the same way, compare bytes
        recipe = dataclasses.replace(
            recipe, quantize=spec.method, blocksize=spec.blocksize, double_quant=spec.double_quant,
            quant_storage=spec.quant_storage, compute_dtype=spec.compute_dtype, skip_modules=spec.skip_modules,
        )  # fmt: skip
        stored = {name: info for f in merged_ckpt.files for name, info in read_header(f)[0].items()}
    inputs = open_inputs(base, adapter, None)
    try:
        plan, _ = merge_plan(inputs, recipe, device)
        return compare(plan, theirs, stored, o, device)
    finally:
        inputs.close()


def compare(plan: Plan, theirs: dict[str, TensorInfo], stored: dict[str, TensorInfo], o: VerifyOptions, device) -> dict:
    """Recompute ``plan``'s tensors (all or a sample) into a sink that compares them with ``stored``."""
    ours = {t.name: t for t in plan.tensors}
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    candidates = [t for t in plan.tensors if t.name in theirs]
    if o.sample is not None and o.sample < len(candidates):
        chosen = set(random.Random(o.seed).sample([t.name for t in candidates], o.sample))
        candidates = [t for t in candidates if t.name in chosen]

    results: dict[str, dict] = {}
    todo: list[OutputTensor] = []
    for t in candidates:
        found = theirs[t.name]
        if found.shape != t.shape:
            results[t.name] = {"problem": f"shape {list(found.shape)}, expected {list(t.shape)}"}
        elif found.dtype != t.dtype and not (found.dtype in FLOAT_DTYPES and t.dtype in FLOAT_DTYPES):
            results[t.name] = {"problem": f"dtype {found.dtype}, expected {t.dtype}"}
        else:  # a merge with --dtype: recompute in the merged model's dtype
            todo.append(dataclasses.replace(t, dtype=found.dtype))
    sink = CompareSink(stored, o.atol)
    run_plan(todo, sink, device, option_sizes(chunk_size=o.chunk_size)["chunk_size"])

    tensors = []
    for t in candidates:
        entry = {"name": t.name, "dtype": theirs[t.name].dtype, "merged": t.delta is not None}
        if t.name in results:
            entry.update(results[t.name], ok=False)
        else:
            parts = [p.name for p in t.serialized]  # the tensor itself, or its quantized parts
            mismatched = sum(sink.mismatched.get(p, 0) for p in parts)
            error = max(sink.max_error.get(p, 0.0) for p in parts)
            entry.update(max_abs_error=error, mismatched=mismatched, ok=mismatched == 0)
        tensors.append(entry)
    ok = not missing and not extra and all(e["ok"] for e in tensors)
    return {"ok": ok, "checked": len(tensors), "total": len(ours), "missing": missing, "extra": extra} | {
        "tensors": tensors
    }


def render(report: dict) -> str:
    lines = []
    for e in report["tensors"]:
        status = "ok" if e["ok"] else "MISMATCH"
        detail = e.get("problem") or f"max abs error {e['max_abs_error']:.3g}, {e['mismatched']} element(s) off"
        lines.append(f"{status:<9}{e['name']}  {e['dtype']}  {detail}")
    lines += [f"MISSING  {name}: in the plan, not in the merged model" for name in report["missing"]]
    lines += [f"EXTRA    {name}: in the merged model, not in the plan" for name in report["extra"]]
    bad = sum(not e["ok"] for e in report["tensors"]) + len(report["missing"]) + len(report["extra"])
    verdict = "all match" if report["ok"] else f"{bad} problem(s)"
    lines.append(f"checked {report['checked']} of {report['total']} tensors: {verdict}")
    return "\n".join(lines)
