"""A PEFT model's full state dict (what a DeepSpeed or FSDP run of a ``PeftModel`` saves) split in two:
the base model under its own names, and the adapter under the names PEFT saves it with.

In the live model PEFT wraps every adapted module: ``base_model.model.<module>.base_layer.weight`` is
the base weight, ``<module>.lora_A.<adapter>.weight`` a factor, ``<module>.modules_to_save.<adapter>.<p>``
a trained copy beside ``<module>.original_module.<p>``. ``get_peft_model_state_dict`` saves the
adapter's tensors without the adapter name (``lora_A.weight``; ``lora_magnitude_vector`` without
``.weight``), and a trained copy under the module's own name: so are they named here, and
``formats.adapter.split_keys`` reads them back.
"""

from __future__ import annotations

import dataclasses
import re

from formats.errors import ConvertError
from formats.safetensors_file import TensorInfo

PREFIX = "base_model.model."
LORA = re.compile(r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.([^.]+)(\..+)?$")
SAVED = re.compile(r"^(.*)\.modules_to_save\.([^.]+)\.(.+)$")


def is_peft(tensors: dict[str, TensorInfo]) -> bool:
    return any(n.startswith(PREFIX) and LORA.match(n) for n in tensors)


def split_peft(tensors: dict[str, TensorInfo], where: str) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo]]:
    """(base tensors under the base model's names, adapter tensors under PEFT's saved names)."""
    base: dict[str, TensorInfo] = {}
    adapter: dict[str, TensorInfo] = {}
    names: set[str] = set()
    for name, info in tensors.items():
        if not name.startswith(PREFIX):
            raise ConvertError(f"{where}: tensor '{name}': not under '{PREFIX}' like the rest of this PEFT model")
        lora, saved = LORA.match(name), SAVED.match(name)
        if lora:
            module, part, adapter_name, rest = lora.groups()
            names.add(adapter_name)
            rest = "" if part == "lora_magnitude_vector" else rest or ""
            adapter[f"{module}.{part}{rest}"] = info
        elif saved:
            module, adapter_name, param = saved.groups()
            names.add(adapter_name)
            adapter[f"{module}.{param}"] = info
        else:
            plain = name[len(PREFIX) :].replace(".base_layer.", ".").replace(".original_module.", ".")
            base[plain] = dataclasses.replace(info, name=plain)
    if len(names) > 1:
        raise ConvertError(f"{where}: holds several adapters ({', '.join(sorted(names))}): one is supported")
    return base, {k: dataclasses.replace(v, name=k) for k, v in adapter.items()}
