"""Lazy reader of a PEFT adapter directory and PEFT's state-dict key layout.

PEFT saves ``get_peft_model_state_dict(model)``: every key starts with
``base_model.model.`` followed by the module path inside the base model, and
then one of

* ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (Linear, Conv1D),
* ``<module>.lora_B.bias`` (``lora_bias=True``),
* ``<module>.lora_embedding_A`` / ``<module>.lora_embedding_B`` (Embedding),
* ``<module>.lora_magnitude_vector`` (DoRA),
* ``<module>.base_layer.<param>`` (embedding layers saved with ``save_embedding_layers``),
* ``<module>.<param>`` (a ``modules_to_save`` copy, or a trained bias).

This module only splits the keys; what they mean for a merge is ``convert.plan.lora``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from formats.checkpoint import load_bin, read_json
from formats.errors import ConvertError
from formats.safetensors_file import DTYPE_NAMES, TensorInfo, read_header

PREFIX = "base_model.model."
LORA_PARTS = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_B.bias": "bias",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude",
}


@dataclass
class LoraWeights:
    """The tensors one adapted module holds (names as PEFT saved them)."""

    module: str
    embedding: bool = False
    parts: dict[str, TensorInfo] = field(default_factory=dict)  # "A", "B", "bias", "magnitude"


@dataclass
class Adapter:
    directory: Path
    config: dict
    weights_file: Path
    lora: dict[str, LoraWeights]  # module path -> its LoRA tensors
    # base tensor name (PEFT naming) -> tensor that replaces it: ``modules_to_save`` copies and trained biases
    replacements: dict[str, TensorInfo]
    # ``<module>.base_layer.<param>`` saved with embedding layers: loaded into the base layer itself
    base_layers: dict[str, TensorInfo]


def open_adapter(directory: str | Path) -> Adapter:
    directory = Path(directory)
    if not directory.is_dir():
        raise ConvertError(f"{directory}: adapter directory does not exist")
    config_path = directory / "adapter_config.json"
    if not config_path.exists():
        raise ConvertError(f"{config_path}: missing (not a PEFT adapter directory)")
    config = read_json(config_path)
    weights_file = directory / "adapter_model.safetensors"
    if weights_file.exists():
        tensors = read_header(weights_file)[0]
    elif (directory / "adapter_model.bin").exists():
        weights_file = directory / "adapter_model.bin"
        tensors = {
            name: TensorInfo(name, DTYPE_NAMES[t.dtype], tuple(t.shape), weights_file, 0, t.nbytes, mapped=t)
            for name, t in load_bin(weights_file).items()
        }
    else:
        raise ConvertError(f"{directory}: no adapter_model.safetensors or adapter_model.bin")
    return Adapter(directory, config, weights_file, *split_keys(weights_file, tensors))


def split_keys(
    path: Path, tensors: dict[str, TensorInfo]
) -> tuple[dict[str, LoraWeights], dict[str, TensorInfo], dict[str, TensorInfo]]:
    """Group PEFT keys by module, exactly as PEFT's ``set_peft_model_state_dict`` reads them."""
    lora: dict[str, LoraWeights] = {}
    replacements: dict[str, TensorInfo] = {}
    base_layers: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        if not key.startswith(PREFIX):
            raise ConvertError(f"{path}: tensor '{key}': key does not start with '{PREFIX}' (not a PEFT adapter?)")
        rest = key[len(PREFIX) :]
        for suffix, part in LORA_PARTS.items():
            if rest.endswith("." + suffix):
                module = rest[: -len(suffix) - 1]
                entry = lora.setdefault(module, LoraWeights(module))
                entry.embedding |= suffix.startswith("lora_embedding")
                entry.parts[part] = info
                break
        else:
            if ".base_layer." in rest:
                base_layers[rest.replace(".base_layer.", ".")] = info
            else:
                replacements[rest] = info
    for module, entry in lora.items():
        for part in ("A", "B"):
            if part not in entry.parts:
                raise ConvertError(f"{path}: module '{module}': has no lora_{part} tensor")
    return lora, replacements, base_layers
