"""PEFT LoRA semantics: which base tensor each adapter tensor changes, and by how much.

Everything here mirrors ``peft.tuners.lora`` (``LoraModel._create_and_replace``,
``Linear.get_delta_weight``, ``Embedding.get_delta_weight``) so that a merge
equals ``merge_and_unload``; the tests hold it to that against PEFT itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from formats.adapter import Adapter
from formats.errors import ConvertError
from formats.safetensors_file import TensorInfo

# Adapter config fields whose non-default value changes what a merge must do and
# that this tool does not implement: refusing is better than a silently wrong model.
UNSUPPORTED_FIELDS = {
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
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
    """

    A: TensorInfo
    B: TensorInfo
    scaling: float
    transposed: bool
    magnitude: TensorInfo | None = None


@dataclass(frozen=True)
class BiasDelta:
    """``scaling * lora_B.bias``, added to the base layer's bias (``lora_bias=True``)."""

    bias: TensorInfo
    scaling: float


Delta = LowRankDelta | BiasDelta


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


def low_rank_delta(adapter: Adapter, module: str, weight: TensorInfo) -> LowRankDelta:
    """The delta of one LoRA module on its base weight, with shapes checked against the base."""
    lora = adapter.lora[module]
    A, B = lora.parts["A"], lora.parts["B"]
    where = f"{adapter.weights_file}: tensor '{module}'"
    r, scaling = scaling_for(adapter.config, module)
    if len(A.shape) != 2 or len(B.shape) != 2 or A.shape[0] != r or B.shape[1] != r:
        raise ConvertError(
            f"{where}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not have rank r={r} from adapter_config.json"
        )
    if len(weight.shape) != 2:
        raise ConvertError(
            f"{where}: base tensor '{weight.name}' has shape {list(weight.shape)}; "
            "LoRA on convolution layers is not supported"
        )
    plain, flipped = (B.shape[0], A.shape[1]), (A.shape[1], B.shape[0])
    if lora.embedding:
        transposed = True  # Embedding.get_delta_weight: transpose(B @ A, True)
    elif plain != flipped:
        transposed = weight.shape == flipped  # Conv1D stores (in, out); PEFT forces fan_in_fan_out there
    else:
        transposed = bool(adapter.config.get("fan_in_fan_out"))
    expected = flipped if transposed else plain
    if tuple(weight.shape) != expected:
        raise ConvertError(
            f"{where}: shape mismatch: base tensor '{weight.name}' is {list(weight.shape)} but the adapter's "
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
