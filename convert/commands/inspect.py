"""``convert inspect``: what a model or adapter directory holds, from headers and configs alone.

Nothing here reads tensor data except bitsandbytes' small packed quant-state
records (a few hundred bytes each), which hold the true shape of 4-bit weights.
The description is a plain JSON-able dict (``--json``); ``render`` turns it into
the lines a person reads.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

from convert.plan.lora import get_pattern_key
from formats import bnb
from formats.adapter import open_adapter
from formats.checkpoint import Checkpoint, open_checkpoint
from formats.errors import ConvertError
from formats.hub import fetch_adapter, open_hub_model, parse_repo_id, repo_files
from formats.safetensors_file import TensorInfo


def describe(spec: str, revision: str | None = None, token: str | None = None) -> dict:
    """Describe a model directory or, when it holds ``adapter_config.json``, a PEFT adapter.

    ``spec`` may be a Hub repo id: then only the config, index, adapter files and each shard's
    header (one range request) are fetched, never the weights of a model."""
    repo = parse_repo_id(spec)
    if repo is not None:
        _, files = repo_files(repo[0], repo[1] or revision, token)
        if "adapter_config.json" in files:
            return describe_adapter(fetch_adapter(spec, revision, token))
        hub = open_hub_model(spec, revision, token)
        try:
            return describe_model(hub.checkpoint, spec)
        finally:
            hub.close()
    path = Path(spec)
    if not path.is_dir():
        raise ConvertError(f"{spec}: no such directory, and not a Hugging Face Hub repo id")
    if (path / "adapter_config.json").exists():
        return describe_adapter(path)
    return describe_model(open_checkpoint(path), str(path))


def count_by_dtype(tensors: list[TensorInfo], numel: dict[str, int]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for t in tensors:
        counts[t.dtype] += numel[t.name]
    return dict(counts.most_common())


def describe_model(ckpt: Checkpoint, where: str) -> dict:
    """Parameters are counted on the logical tensors: a bitsandbytes weight counts its unpacked elements
    (``formats.bnb`` folds its packed data and quant state into one tensor of the original shape)."""
    infos = list(ckpt.tensors.values())
    numel = {t.name: math.prod(t.shape) for t in infos}
    four_bit = Counter(t.layout.quant_type for t in infos if isinstance(t.layout, bnb.Packed4bit))
    eight_bit = sum(isinstance(t.layout, bnb.Int8Rows) for t in infos)
    quant_config = ckpt.config.get("quantization_config")
    quantization = None
    if four_bit or eight_bit or quant_config:
        quantization = {
            "method": (quant_config or {}).get("quant_method", "bitsandbytes"),
            "bnb_4bit_weights": dict(four_bit),
            "bnb_8bit_weights": eight_bit,
            "quantization_config": quant_config,
        }
    safetensors = ckpt.files[0].suffix == ".safetensors"
    per_file = Counter(stored_file(t).name for t in infos)
    return {
        "kind": "model",
        "path": where,
        "format": "safetensors" if safetensors else "pytorch pickle (.bin)",
        "architectures": ckpt.config.get("architectures"),
        "model_type": ckpt.config.get("model_type"),
        "parameters": sum(numel.values()),
        "tensors": len(infos),
        "dtypes": count_by_dtype(infos, numel),
        "quantization": quantization,
        "shards": [{"file": f.name, "bytes": file_size(f), "tensors": per_file[f.name]} for f in ckpt.files],
    }


def stored_file(info: TensorInfo) -> Path:
    """The file a (possibly quantized) tensor's data lives in."""
    quantized = info.layout
    return quantized.packed.path if isinstance(quantized, bnb.Packed4bit) else info.path


def file_size(path: Path) -> int | None:
    """Local size; None for a Hub shard that was never downloaded (only its header was read)."""
    return path.stat().st_size if path.is_file() else None


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
            lines += [f"  {s['file']}  {shard_bytes(s['bytes'])}, {s['tensors']} tensors" for s in value]
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


def shard_bytes(size: int | None) -> str:
    return "not downloaded" if size is None else f"{size:,} bytes"


def adapter_placement(adapter_dir: str | Path, base_dir: str | Path) -> dict[str, dict]:
    """For an adapter against a base: adapter module -> the in-memory parameter it trains and the checkpoint
    tensors that parameter is stored as (``part``: which part of the parameter each one is, as
    ``convert.plan.architecture.Piece.index`` with lists for ranges; ``None`` for the whole parameter).
    Names are resolved as ``convert merge`` resolves them; a module that lands nowhere is an error."""
    from convert.plan import architecture  # here: it imports transformers, which plain inspection never needs

    adapter, ckpt = open_adapter(adapter_dir), open_checkpoint(base_dir)
    targets = adapter.config.get("target_parameters") or []
    arch = architecture.for_checkpoint(ckpt) if targets or architecture.available() else None
    wrappers = architecture.peft_param_wrappers(arch, list(targets)) if targets else {}
    placement = {}
    for module in adapter.lora:
        param = wrappers.get(module, f"{module}.weight")
        if param in ckpt.tensors:
            pieces = [architecture.Piece(param, param)]
        else:
            found = arch.in_memory(param) if arch is not None else None
            pieces = arch.checkpoint_pieces(found) if found is not None else []
        if not pieces:
            raise ConvertError(
                f"{adapter.weights_file}: tensor '{module}': '{param}' does not exist in {ckpt.directory}"
            )
        placement[module] = {
            "parameter": pieces[0].param,
            "tensors": [
                {"tensor": p.key, "part": [list(i) if isinstance(i, tuple) else i for i in p.index] or None}
                for p in pieces
            ],
        }
    return placement


def render_placement(placement: dict[str, dict]) -> str:
    """One line per adapter module: the parameter it trains, then each checkpoint tensor it lands on."""
    lines = []
    for module, where in placement.items():
        lines.append(f"{module}  ->  {where['parameter']}")
        for t in where["tensors"]:
            lines.append(f"    {t['tensor']}" + (f"  part {t['part']}" if t["part"] is not None else ""))
    return "\n".join(lines)
