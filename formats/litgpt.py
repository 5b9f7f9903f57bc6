"""LitGPT checkpoints (``lit_model.pth`` + ``model_config.yaml``), read lazily, under Hugging Face names.

The names, and the split of LitGPT's fused ``attn.qkv`` into ``q_proj``/``k_proj``/``v_proj``,
come from LitGPT's own converter (``litgpt.scripts.convert_lit_checkpoint``): its
``copy_weights_*`` function for the architecture is run once on *row-index* tensors (each
LitGPT tensor replaced by a zero-memory expanded ``arange`` of its rows), so every Hugging
Face tensor it produces says which stored rows it is made of. Those rows are then preads
from ``lit_model.pth`` (an uncompressed ``torch.save`` zip, ``formats.torch_save``): no
mapping table is guessed here, and no weight is loaded to build the plan.

LitGPT keeps the model's Hugging Face ``config.json`` beside ``lit_model.pth``
(``litgpt.utils.copy_config_files``); it is the output's config.

A LoRA run (``litgpt finetune lora``) leaves ``lit_model.pth.lora`` (the LoRA factors only)
and ``hyperparameters.yaml`` (its LoRA settings and the base checkpoint directory). It is
opened as the PEFT model PEFT would make of the same modules: the base under
``base_model.model.<name>``, the factors as ``<module>.lora_A.default.weight`` (what
``formats.peft_names`` splits). LitGPT's fused ``qkv`` LoRA holds ``lora_A`` as the enabled
parts' ``r``-row blocks stacked and ``lora_B`` as their output rows stacked
(``litgpt.lora.LoRAQKVLinear``): each part's block is that part's own LoRA, the same
``B @ A * alpha / r`` PEFT computes for ``q_proj``, ``k_proj``, ``v_proj``.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch

from formats.checkpoint import Checkpoint, read_json
from formats.errors import ConvertError
from formats.pieces import Piece, Pieces
from formats.safetensors_file import TensorInfo, itemsize
from formats.torch_save import Stored, load_meta, stored

WEIGHTS = "lit_model.pth"
LORA_WEIGHTS = "lit_model.pth.lora"
CONFIG = "model_config.yaml"
PEFT_PREFIX = "base_model.model."


def copy_function(config: object):
    """LitGPT's converter for this architecture, chosen exactly as ``convert_lit_checkpoint`` chooses it."""
    from litgpt.scripts import convert_lit_checkpoint as lit

    name = config.name
    if "falcon" in name:
        return partial(lit.copy_weights_falcon, config)
    if name.startswith("Gemma-2"):
        return partial(lit.copy_weights_gemma_2, config)
    if name.startswith("Gemma-3"):
        return partial(lit.copy_weights_gemma_3, config)
    if name.lower().startswith("phi"):
        return partial(lit.copy_weights_phi, config)
    if name.lower().startswith(("qwen2.5", "qwq")):
        return partial(lit.copy_weights_qwen_2_5, config)
    if name.lower().startswith("olmo-2-"):
        return partial(lit.copy_weights_olmo2, config)
    if name.lower().startswith("qwen3"):
        return partial(lit.copy_weights_qwen_3, config)
    if config.mlp_class_name in ("LLaMAMLP", "GemmaMLP", "LLaMAMoE"):
        return partial(lit.copy_weights_llama, config, untie_weights="Gemma" in name)
    return partial(lit.copy_weights_gpt_neox, config)


def lit_config(directory: Path, lora: bool = False, **overrides: object) -> object:
    """LitGPT's own ``Config`` of the checkpoint (``litgpt.lora.Config``, with the LoRA settings, for a LoRA run)."""
    try:
        from litgpt import Config
        from litgpt.lora import Config as LoRAConfig
    except ImportError:
        raise ConvertError(
            "--from litgpt: needs the litgpt package (pip install --no-deps litgpt lightning lightning-utilities "
            "torchmetrics: its own pins would downgrade huggingface-hub below what transformers 5 needs)"
        ) from None
    path = directory / CONFIG
    if not path.is_file():
        raise ConvertError(f"{path}: missing (not a LitGPT checkpoint directory)")
    try:
        return (LoRAConfig if lora else Config).from_file(path, **overrides)
    except Exception as e:  # yaml and dataclass errors
        raise ConvertError(f"{path}: not a LitGPT model config: {e}") from None


def stored_weights(path: Path) -> dict[str, Stored]:
    """Where each tensor of a LitGPT ``.pth`` file lies (``{"model": state_dict}`` as LitGPT's fabric saves it,
    or a bare state dict)."""
    if not path.is_file():
        raise ConvertError(f"{path}: missing")
    state = load_meta(path)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{path}: not a state dict of tensors")
    return {name: stored(path, t, name) for name, t in state.items()}


def hf_rows(config: object, weights: dict[str, Stored]) -> dict[str, tuple[str, list[int]]]:
    """Hugging Face name -> (LitGPT name, its stored rows in order), from LitGPT's own converter."""
    index = {}
    for name, s in weights.items():
        rows = s.shape[0] if s.shape else 1
        ids = torch.arange(rows, dtype=torch.int64).view(rows, *([1] * max(0, len(s.shape) - 1)))
        index[name] = ids.expand(s.shape) if s.shape else ids.view(())
    source = {t.untyped_storage().data_ptr(): n for n, t in index.items()}  # views share their source's storage
    converted: dict[str, torch.Tensor] = {}
    try:
        with torch.inference_mode():
            copy_function(config)(converted, index)
    except Exception as e:  # LitGPT's own errors for unsupported layouts
        raise ConvertError(f"{CONFIG}: LitGPT cannot convert this checkpoint to Hugging Face names: {e}") from None
    out = {}
    for hf_name, t in converted.items():
        lit_name = source.get(t.untyped_storage().data_ptr())
        if lit_name is None or tuple(t.shape[1:]) != weights[lit_name].shape[1:]:
            raise ConvertError(f"tensor '{hf_name}': LitGPT's converter computes it (not a copy of stored rows)")
        rows = t.reshape(t.shape[0], -1)[:, 0].tolist() if t.dim() else [0]
        out[hf_name] = (lit_name, rows)
    return out


def open_litgpt(directory: str | Path) -> Checkpoint:
    directory = Path(directory)
    if (directory / LORA_WEIGHTS).is_file() and not (directory / WEIGHTS).is_file():
        return open_lora(directory)
    config = lit_config(directory)
    path = directory / WEIGHTS
    weights = stored_weights(path)
    if any("lora_" in n for n in weights):
        raise ConvertError(f"{path}: holds LoRA weights merged into the model's modules (merge them with LitGPT first)")
    tensors = {}
    for hf_name, (lit_name, rows) in hf_rows(config, weights).items():
        tensors[hf_name] = row_tensor(hf_name, weights[lit_name], rows)
    hf_config = read_json(directory / "config.json") if (directory / "config.json").is_file() else {}
    return Checkpoint(directory, hf_config, tensors, [path, directory / CONFIG])


def row_tensor(name: str, source: Stored, rows: list[int] | None) -> TensorInfo:
    """The tensor made of ``rows`` of ``source``: the stored tensor itself when they are all of them, in order
    (or None)."""
    rows = list(range(source.shape[0] if source.shape else 1)) if rows is None else rows
    shape = (len(rows), *source.shape[1:]) if source.shape else ()
    if rows == list(range(source.shape[0] if source.shape else 1)):
        return TensorInfo(name, source.dtype, source.shape, source.path, source.offset, source.nbytes)
    row_bytes = math.prod(source.shape[1:]) * itemsize(source.dtype)
    pieces, start = [], 0
    while start < len(rows):  # runs of consecutive stored rows
        stop = start + 1
        while stop < len(rows) and rows[stop] == rows[stop - 1] + 1:
            stop += 1
        offsets = (start, *([0] * (len(shape) - 1)))
        pieces.append(Piece(offsets, (stop - start, *shape[1:]), source.path, source.offset + rows[start] * row_bytes))
        start = stop
    nbytes = len(rows) * row_bytes
    return TensorInfo(
        name, source.dtype, shape, source.path, 0, nbytes, reader=Pieces(name, source.dtype, shape, tuple(pieces))
    )


def lora_metadata(directory: Path) -> tuple[dict, Path]:
    """The run's LoRA settings and its base checkpoint directory, as LitGPT's ``merge_lora`` reads them."""
    from litgpt.scripts.merge_lora import load_lora_metadata

    try:
        params, base_dir, _ = load_lora_metadata(directory)
    except (OSError, KeyError) as e:
        raise ConvertError(f"{directory / 'hyperparameters.yaml'}: not a LitGPT LoRA run's metadata: {e}") from None
    base_dir = base_dir if base_dir.is_absolute() or base_dir.is_dir() else directory / base_dir
    return params, base_dir


def open_lora(directory: Path) -> Checkpoint:
    """A LoRA run as the PEFT model of the same modules (see the module docstring)."""
    params, base_dir = lora_metadata(directory)
    config = lit_config(directory, lora=True, **params)
    if not (base_dir / WEIGHTS).is_file():
        raise ConvertError(f"{directory / 'hyperparameters.yaml'}: its base checkpoint {base_dir / WEIGHTS} is missing")
    base_weights = stored_weights(base_dir / WEIGHTS)
    mapping = hf_rows(config, base_weights)
    base = open_litgpt(base_dir)
    tensors = {PEFT_PREFIX + n: t for n, t in base.tensors.items()}
    lora = stored_weights(directory / LORA_WEIGHTS)
    for key in lora:
        if not key.endswith(".lora_A"):
            continue
        module = key[: -len(".lora_A")]
        if module + ".lora_B" not in lora:
            raise ConvertError(f"{directory / LORA_WEIGHTS}: tensor '{key}': has no lora_B")
        targets = sorted((rows[0], hf) for hf, (lit, rows) in mapping.items() if lit == module + ".weight")
        if not targets:
            raise ConvertError(f"{directory / LORA_WEIGHTS}: tensor '{key}': {module}.weight is not in the base model")
        for hf_name, a_rows, b_rows in _lora_blocks(
            config, module, targets, lora[key].shape[0] // max(1, config.lora_r)
        ):
            head = PEFT_PREFIX + hf_name[: -len(".weight")]
            tensors[f"{head}.lora_A.default.weight"] = row_tensor(f"{head}.lora_A", lora[key], a_rows)
            tensors[f"{head}.lora_B.default.weight"] = row_tensor(f"{head}.lora_B", lora[module + ".lora_B"], b_rows)
    files = [directory / LORA_WEIGHTS, directory / CONFIG, directory / "hyperparameters.yaml", *base.files]
    return Checkpoint(base.directory, base.config, tensors, files)


def _lora_blocks(config: object, module: str, targets: list[tuple[int, str]], parts: int) -> list:
    """(Hugging Face weight, lora_A rows, lora_B rows) of each LoRA in one LitGPT module's factors."""
    r = config.lora_r
    if len(targets) == 1:
        return [(targets[0][1], None, None)]
    # A fused qkv: parts q, k, v start at these output rows; only the enabled ones have LoRA rows.
    q, kv = config.n_head * config.head_size, config.n_query_groups * config.head_size
    sizes = {0: q, q: kv, q + kv: kv}
    enabled = [
        start for start, on in zip(sizes, (config.lora_query, config.lora_key, config.lora_value), strict=True) if on
    ]
    if len(enabled) != parts or any(start not in sizes for start, _ in targets):
        raise ConvertError(f"{module}: LoRA factors do not match the enabled q/k/v parts of the LitGPT config")
    names = dict(targets)
    blocks, b0 = [], 0
    for j, start in enumerate(enabled):
        blocks.append((names[start], list(range(j * r, (j + 1) * r)), list(range(b0, b0 + sizes[start]))))
        b0 += sizes[start]
    return blocks


def adapter_config(directory: Path, target_modules: list[str]) -> dict:
    """The PEFT ``LoraConfig`` of a LitGPT LoRA run (LitGPT's scaling is PEFT's: ``lora_alpha / r``)."""
    params, base_dir = lora_metadata(directory)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_dir.name,
        "r": params.get("lora_r", 8),
        "lora_alpha": params.get("lora_alpha", 16),
        "lora_dropout": params.get("lora_dropout", 0.0),
        "target_modules": sorted(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
