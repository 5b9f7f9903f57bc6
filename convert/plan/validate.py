"""Checks on the values of input tensors, made before any output byte is written.

Header-level checks (names, shapes, dtypes, which module exists where) live in
``convert.plan.build``; these ones must read the tensors, so they are kept to the
adapter, which is small next to the base.
"""

from __future__ import annotations

import math
import sys

import torch

from formats.adapter import Adapter
from formats.errors import ConvertError
from formats.safetensors_file import FLOAT_DTYPES, TensorInfo, read_tensor

CHECK_ELEMENTS = 1 << 22  # rows read per step: memory stays bounded on large modules_to_save copies


def all_tensors(adapter: Adapter) -> list[TensorInfo]:
    parts = [info for lora in adapter.lora.values() for info in lora.parts.values()]
    return [*parts, *adapter.replacements.values(), *adapter.base_layers.values()]


def count_nonfinite(info: TensorInfo) -> int:
    """NaN and +-Inf values in a float tensor, read a few million elements at a time."""
    if info.dtype not in FLOAT_DTYPES or info.nbytes == 0:
        return 0
    per = max(1, CHECK_ELEMENTS // max(1, math.prod(info.shape[1:])))
    bad = 0
    for start in range(0, info.rows, per):
        rows = read_tensor(info, start, min(info.rows, start + per))
        bad += int((~torch.isfinite(rows)).sum())
    return bad


def check_finite(adapter: Adapter, allow_nonfinite: bool = False) -> None:
    """Refuse an adapter holding NaN or Inf (a diverged training run); only warn with ``allow_nonfinite``."""
    for info in all_tensors(adapter):
        bad = count_nonfinite(info)
        if not bad:
            continue
        message = f"{adapter.weights_file}: tensor '{info.name}': {bad} NaN/Inf value(s)"
        if not allow_nonfinite:
            raise ConvertError(f"{message} (a diverged training run?); pass --allow-nonfinite to merge anyway")
        print(f"warning: {message}; merged anyway (--allow-nonfinite)", file=sys.stderr)
