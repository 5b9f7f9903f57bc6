"""``convert inspect``: what a model or adapter directory holds, from headers and configs alone.

Nothing here reads tensor data except bitsandbytes' small packed quant-state
records (a few hundred bytes each), which hold the true shape of 4-bit weights.
The description is a plain JSON-able dict (``--json``); ``render`` turns it into
the lines a person reads.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

from convert.lora import get_pattern_key
from formats.adapter import open_adapter
from formats.checkpoint import open_checkpoint
from formats.errors import ConvertError
from formats.safetensors_file import TensorInfo, read_tensor

# Suffixes of the tensors bitsandbytes stores beside a quantized weight (transformers' serialization).
BNB_4BIT_STATE = re.compile(r"\.quant_state\.bitsandbytes__(nf4|fp4)$")
BNB_AUX = re.compile(
    r"\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__(nf4|fp4)|SCB|weight_format)$"
)


def local_path(spec: str) -> Path:
    """The local directory a command line names.

    The one place where a Hub id (``org/name``) will be resolved to a downloaded
    directory once the Hub helper lands; until then only local paths are accepted.
    """
    path = Path(spec)
    if not path.exists():
        raise ConvertError(f"{spec}: no such directory (Hugging Face Hub ids are not supported here yet)")
    if not path.is_dir():
        raise ConvertError(f"{spec}: not a directory")
    return path


def describe(spec: str) -> dict:
    """Describe a model directory or, when it holds ``adapter_config.json``, a PEFT adapter."""
    path = local_path(spec)
    if (path / "adapter_config.json").exists():
        return describe_adapter(path)
    return describe_model(path)


def count_by_dtype(tensors: list[TensorInfo], numel: dict[str, int]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for t in tensors:
        counts[t.dtype] += numel[t.name]
    return dict(counts.most_common())


def describe_model(path: Path) -> dict:
    ckpt = open_checkpoint(path)
    infos = list(ckpt.tensors.values())
    numel = {t.name: math.prod(t.shape) for t in infos}
    four_bit: dict[str, str] = {}  # weight name -> nf4|fp4
    for t in infos:
        match = BNB_4BIT_STATE.search(t.name)
        if match:
            weight = t.name[: match.start()]
            four_bit[weight] = match.group(1)
            numel[weight] = math.prod(_packed_state(t)["shape"])  # the unpacked weight's elements
    eight_bit = [t.name.removesuffix(".SCB") + ".weight" for t in infos if t.name.endswith(".SCB")]
    params = [t for t in infos if not BNB_AUX.search(t.name)]
    quant_config = ckpt.config.get("quantization_config")
    quantization = None
    if four_bit or eight_bit or quant_config:
        quantization = {
            "method": (quant_config or {}).get("quant_method", "bitsandbytes" if four_bit or eight_bit else None),
            "bnb_4bit_weights": dict(Counter(four_bit.values())),
            "bnb_8bit_weights": len(eight_bit),
            "quantization_config": quant_config,
        }
    safetensors = ckpt.files[0].suffix == ".safetensors"
    per_file = Counter(t.path.name for t in infos)
    return {
        "kind": "model",
        "path": str(path),
        "format": "safetensors" if safetensors else "pytorch pickle (.bin)",
        "architectures": ckpt.config.get("architectures"),
        "model_type": ckpt.config.get("model_type"),
        "parameters": sum(numel[t.name] for t in params),
        "tensors": len(params),
        "dtypes": count_by_dtype(params, numel),
        "quantization": quantization,
        "shards": [{"file": f.name, "bytes": f.stat().st_size, "tensors": per_file[f.name]} for f in ckpt.files],
    }


def _packed_state(info: TensorInfo) -> dict:
    """bitsandbytes' packed quant state: a uint8 tensor holding UTF-8 JSON (``pack_dict_to_tensor``)."""
    if info.nbytes > 1 << 20:
        raise ConvertError(f"{info.path}: tensor '{info.name}': {info.nbytes} bytes is too large for a quant state")
    try:
        state = json.loads(bytes(read_tensor(info).flatten().tolist()).decode())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ConvertError(f"{info.path}: tensor '{info.name}': not a bitsandbytes quant state: {e!r}") from None
    shape = state.get("shape") if isinstance(state, dict) else None
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ConvertError(f"{info.path}: tensor '{info.name}': bitsandbytes quant state without a valid shape")
    return state


def describe_adapter(path: Path) -> dict:
    adapter = open_adapter(path)
    config = adapter.config
    infos = [info for lora in adapter.lora.values() for info in lora.parts.values()]
    infos += [*adapter.replacements.values(), *adapter.base_layers.values()]
    numel = {t.name: math.prod(t.shape) for t in infos}
    groups: dict[str, dict] = defaultdict(lambda: {"modules": 0, "r": set(), "lora_alpha": set()})
    alpha_pattern = config.get("alpha_pattern") or {}
    for module, lora in sorted(adapter.lora.items()):
        group = groups[module.rsplit(".", 1)[-1]]  # q_proj, v_proj, ...: one line per kind of layer
        group["modules"] += 1
        group["r"].add(lora.parts["A"].shape[0])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha"))
        if alpha is not None:
            group["lora_alpha"].add(alpha)
    return {
        "kind": "adapter",
        "path": str(path),
        "format": "safetensors" if adapter.weights_file.suffix == ".safetensors" else "pytorch pickle (.bin)",
        "weights_file": adapter.weights_file.name,
        "peft_type": config.get("peft_type"),
        "task_type": config.get("task_type"),
        "base_model": config.get("base_model_name_or_path"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "use_rslora": bool(config.get("use_rslora")),
        "dora": bool(config.get("use_dora")) or any("magnitude" in lora.parts for lora in adapter.lora.values()),
        "target_modules": _listed(config.get("target_modules")),
        "modules_to_save": _listed(config.get("modules_to_save")),
        "adapted_modules": len(adapter.lora),
        "groups": {
            name: {"modules": g["modules"], "r": _one_or_all(g["r"]), "lora_alpha": _one_or_all(g["lora_alpha"])}
            for name, g in sorted(groups.items())
        },
        "saved_tensors": sorted({*adapter.replacements, *adapter.base_layers}),
        "parameters": sum(numel.values()),
        "dtypes": count_by_dtype(infos, numel),
    }


def _listed(value) -> list | str | None:
    return sorted(value) if isinstance(value, list | set | tuple) else value


def _one_or_all(values: set):
    items = sorted(values)
    return items[0] if len(items) == 1 else items if items else None


def render(info: dict) -> str:
    """The description as aligned ``key: value`` lines."""
    lines = []
    for key, value in info.items():
        if key == "shards":
            lines.append(f"{'shards':<16}{len(value)}")
            lines += [f"  {s['file']}  {s['bytes']:,} bytes, {s['tensors']} tensors" for s in value]
        elif key == "groups":
            lines.append("groups (module: count, r, alpha)")
            lines += [f"  {n}: {g['modules']} modules, r={g['r']}, alpha={g['lora_alpha']}" for n, g in value.items()]
        elif key == "parameters":
            lines.append(f"{key:<16}{value:,}")
        elif isinstance(value, dict | list):
            lines.append(f"{key:<16}{json.dumps(value)}")
        else:
            lines.append(f"{key:<16}{value}")
    return "\n".join(lines)
