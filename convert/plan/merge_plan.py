"""The one factory of merge plans, shared by ``convert merge`` / ``convert quantize`` and ``convert verify``.

A plan starts from the base's headers and the adapter (``convert.plan.build``); ``--merge-into dequantized``
makes each Linear weight read through the training quantization, ``--quantize`` marks the weights written
quantized (``convert.plan.quantize``). Verify rebuilds exactly the plan the merge ran, so it can check
every kind of output the merge writes.
"""

from __future__ import annotations

import dataclasses

import torch

from convert.options import MergeOptions
from convert.plan.build import Plan, build_plan
from convert.plan.inputs import Inputs
from convert.plan.quantize import check_merge_into, merge_into_dequantized, quantize_plan, training_spec
from convert.plan.validate import check_finite
from formats import bnb
from formats.errors import ConvertError


def quant_spec(options: MergeOptions) -> bnb.QuantSpec:
    """The bitsandbytes settings the options name (``--quantize``, or nf4 as the training default)."""
    o = options
    return bnb.QuantSpec(
        o.quantize or "nf4", o.blocksize, o.double_quant, o.quant_storage, o.compute_dtype, (*o.skip_modules,)
    )


def merge_plan(inputs: Inputs, options: MergeOptions, device: torch.device) -> tuple[Plan, dict]:
    """The plan of a merge and the settings that decide its bytes (what a resume must find unchanged)."""
    if options.train_quant is not None and options.merge_into != "dequantized":
        raise ConvertError("--train-quant: only used with --merge-into dequantized (it names the quantization to undo)")
    check_merge_into(options.merge_into)
    plan = build_plan(inputs.base, inputs.adapter, options.dtype)
    spec = quant_spec(options)
    trained = None
    if options.merge_into == "dequantized":
        trained = training_spec(spec, options.train_quant, inputs.adapter_dir)
        plan = merge_into_dequantized(plan, trained, inputs.base.config, device)
    if options.quantize is not None:
        plan = quantize_plan(plan, spec, inputs.base.config)
    if inputs.adapter is not None:
        check_finite(inputs.adapter, options.allow_nonfinite)
    settings = {
        "dtype": options.dtype,
        "quantize": dataclasses.asdict(spec) if options.quantize else None,
        "merge_into": options.merge_into,
        "train_quant": dataclasses.asdict(trained) if trained else None,
    }
    return plan, settings
