"""PEFT LoRA semantics: which base tensor each adapter tensor changes, and by how much.

Everything here mirrors ``peft.tuners.lora`` (``LoraModel._create_and_replace``,
``Linear.get_delta_weight``, ``Embedding.get_delta_weight``) so that a merge
equals ``merge_and_unload``; the tests hold it to that against PEFT itself.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from formats.adapter import Adapter
from formats.errors import ConvertError
from formats.safetensors_file import TensorInfo, read_tensor

# Adapter config fields whose non-default value changes what a merge must do and
# that this tool does not implement: refusing is better than a silently wrong model.
UNSUPPORTED_FIELDS = {
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens), which cannot be merged",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}


@dataclass(frozen=True)
class LowRankDelta:
    """``scaling * B @ A`` (transposed for Conv1D / fan_in_fan_out and for embeddings).

    With ``magnitude`` (DoRA) the merged weight is ``m / ||W + delta|| * (W + delta)``, the
    norm taken per row of ``B @ A`` (per column of the stored weight when ``transposed``).

    A checkpoint tensor that is only part of the parameter the adapter trained (``convert.plan.architecture``:
    one expert of a fused expert stack, the gate half of a fused gate/up) gets that part of the product:
    ``experts`` > 1 is PEFT's ``ParamWrapper`` layout (``A`` holds ``r`` rows per expert, ``B`` one column
    in ``experts`` per expert), ``expert`` the one this tensor is (``None``: the tensor is the whole
    stack, one expert per row of its first dimension); ``rows`` / ``cols`` slice ``B @ A``.
    """

    A: TensorInfo
    B: TensorInfo
    scaling: float
    transposed: bool
    magnitude: TensorInfo | None = None
    experts: int = 1
    expert: int | None = None
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    # PEFT's ParamWrapper rounds its fp32 delta (product times scaling) to the parameter's dtype before
    # adding it: the delta is rounded to this dtype first (a safetensors name; None: the sum is rounded once)
    compute_dtype: str | None = None

    @property
    def whole(self) -> bool:
        """The plain case: the tensor is the product as it is (what the GPU kernels take)."""
        return self.experts == 1 and self.rows is None and self.cols is None and self.compute_dtype is None


@dataclass(frozen=True)
class BiasDelta:
    """``scaling * lora_B.bias``, added to the base layer's bias (``lora_bias=True``)."""

    bias: TensorInfo
    scaling: float


Delta = LowRankDelta | BiasDelta


def expert_factors(A: torch.Tensor, B: torch.Tensor, experts: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's ``(A_e, B_e)`` of a ``ParamWrapper`` adapter, as its ``get_delta_weight`` reshapes them:
    ``A.reshape(experts, r, in)[e]`` and ``B.reshape(out, r, experts)[:, :, e]``."""
    r = A.shape[0] // experts
    return A[expert * r : (expert + 1) * r], B[:, expert::experts].contiguous()


def factor_tensors(delta: LowRankDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(A, B)`` of a delta, narrowed to the expert, rows and columns its tensor holds."""
    A, B = read_tensor(delta.A).float(), read_tensor(delta.B).float()
    if delta.expert is not None:
        A, B = expert_factors(A, B, delta.experts, delta.expert)
    if delta.rows is not None:
        B = B[delta.rows[0] : delta.rows[1]].contiguous()
    if delta.cols is not None:
        A = A[:, delta.cols[0] : delta.cols[1]].contiguous()
    return A, B


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """PEFT's ``peft.utils.other.get_pattern_key``: the first pattern that matches the end of the key."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def check_config(adapter: Adapter) -> None:
    config, where = adapter.config, adapter.directory / "adapter_config.json"
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ConvertError(f"{where}: adapter type {peft_type!r} is not supported (only LoRA adapters can be merged)")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), int | float) or config[field] <= 0:
            raise ConvertError(f"{where}: '{field}' must be a positive number, got {config.get(field)!r}")
    for name, what in UNSUPPORTED_FIELDS.items():
        if config.get(name):
            raise ConvertError(f"{where}: {what} is not supported yet")


def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rslora."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def scaling_for(config: dict, module: str) -> tuple[int, float]:
    """(r, scaling) of one module, as ``LoraModel._create_and_replace`` + ``LoraLayer.update_layer``."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    return r, lora_scaling(r, alpha, bool(config.get("use_rslora")))


def low_rank_delta(
    adapter: Adapter, module: str, weight: TensorInfo, shape: tuple[int, ...] | None = None
) -> LowRankDelta:
    """The delta of one LoRA module on its base weight, with shapes checked against the base (or against
    ``shape``, the in-memory weight's, when the checkpoint stores it in several tensors)."""
    shape = tuple(weight.shape) if shape is None else shape
    lora = adapter.lora[module]
    A, B = lora.parts["A"], lora.parts["B"]
    where = f"{adapter.weights_file}: tensor '{module}'"
    r, scaling = scaling_for(adapter.config, module)
    if len(A.shape) != 2 or len(B.shape) != 2 or A.shape[0] != r or B.shape[1] != r:
        raise ConvertError(
            f"{where}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not have rank r={r} from adapter_config.json"
        )
    if len(shape) != 2:
        raise ConvertError(
            f"{where}: base tensor '{weight.name}' has shape {list(shape)}; "
            "LoRA on convolution layers is not supported"
        )
    plain, flipped = (B.shape[0], A.shape[1]), (A.shape[1], B.shape[0])
    if lora.embedding:
        transposed = True  # Embedding.get_delta_weight: transpose(B @ A, True)
    elif plain != flipped:
        transposed = shape == flipped  # Conv1D stores (in, out); PEFT forces fan_in_fan_out there
    else:
        transposed = bool(adapter.config.get("fan_in_fan_out"))
    expected = flipped if transposed else plain
    if shape != expected:
        raise ConvertError(
            f"{where}: shape mismatch: base tensor '{weight.name}' is {list(shape)} but the adapter's "
            f"delta is {list(expected)}"
        )
    magnitude = lora.parts.get("magnitude")
    if magnitude is not None and tuple(magnitude.shape) != (B.shape[0],):
        raise ConvertError(
            f"{where}: lora_magnitude_vector has shape {list(magnitude.shape)}, expected [{B.shape[0]}] "
            "(one DoRA magnitude per output feature)"
        )
    if magnitude is None and adapter.config.get("use_dora"):
        raise ConvertError(f"{where}: DoRA adapter (use_dora=true) without a lora_magnitude_vector tensor")
    return LowRankDelta(A, B, scaling, transposed, magnitude)


def parameter_delta(
    adapter: Adapter, module: str, param: str, shape: tuple[int, ...], swapped: bool, dtype: str
) -> LowRankDelta:
    """The delta of a LoRA on an ``nn.Parameter`` (``target_parameters``: PEFT's ``ParamWrapper``) on the
    whole in-memory parameter ``param`` of ``shape``.

    A 3-D parameter is a stack of experts: ``(experts, out, in)`` when PEFT swaps in and out (``swapped``:
    the experts module has no ``is_transposed``), whose delta per expert is ``B_e @ A_e``, else
    ``(experts, in, out)``, whose delta per expert is its transpose (``get_delta_weight``'s two einsums).
    A 2-D parameter is ``(out, in)``, as a Linear weight. Rank and alpha patterns match the parameter's
    path, as PEFT creates the wrapper with it. ``dtype`` is the parameter's: PEFT rounds the delta to a
    16-bit one before adding it (``get_delta_weight``'s ``delta_weight.to(param.dtype)``)."""
    lora = adapter.lora[module]
    A, B = lora.parts["A"], lora.parts["B"]
    where = f"{adapter.weights_file}: tensor '{module}'"
    r, scaling = scaling_for(adapter.config, param)
    if "magnitude" in lora.parts or "bias" in lora.parts:
        raise ConvertError(f"{where}: DoRA or lora_bias on a target parameter ('{param}'), which PEFT does not create")
    if len(shape) == 3:
        experts, (out, inp) = shape[0], (shape[1:] if swapped else shape[:0:-1])
    elif len(shape) == 2:
        experts, (out, inp) = 1, shape
    else:
        raise ConvertError(f"{where}: parameter '{param}' has shape {list(shape)}; only 2-D and 3-D ones are supported")
    if tuple(A.shape) != (r * experts, inp) or tuple(B.shape) != (out, r * experts):
        raise ConvertError(
            f"{where}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not fit parameter '{param}' of shape "
            f"{list(shape)} with r={r} (expected {[r * experts, inp]} / {[out, r * experts]})"
        )
    compute = dtype if dtype in ("BF16", "F16") else None
    return LowRankDelta(A, B, scaling, len(shape) == 3 and not swapped, experts=experts, compute_dtype=compute)


def narrow(delta: LowRankDelta, index: tuple, shape: tuple[int, ...], where: str) -> LowRankDelta:
    """The delta of the part ``index`` (``convert.plan.architecture.Piece``) of a parameter of ``shape``: for a
    stack of experts, one expert (an int first) or all of them (no index); then a range of the stored rows
    and columns, which are the product's columns and rows when the delta is transposed."""
    if not index:
        return delta
    expert = None
    if delta.experts > 1:
        expert, index, shape = index[0], index[1:], shape[1:]
        if not isinstance(expert, int):
            raise ConvertError(f"{where}: a checkpoint tensor spans several experts of the stack, not supported")
    ranges = [None if r == (0, n) else r for r, n in zip(index, shape, strict=True)]
    if any(isinstance(r, int) for r in ranges):
        raise ConvertError(f"{where}: a checkpoint tensor selects a single row or column of the parameter")
    rows, cols = ranges[::-1] if delta.transposed else ranges
    if delta.magnitude is not None and cols is not None:  # DoRA's norm runs along the product's rows
        raise ConvertError(f"{where}: DoRA on a weight whose checkpoint tensors split its rows is not supported")
    return dataclasses.replace(delta, expert=expert, rows=rows, cols=cols)
