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
CONFIG = "model_config.yaml"


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


def lit_config(directory: Path) -> object:
    try:
        from litgpt import Config
    except ImportError:
        raise ConvertError("--from litgpt: needs the litgpt package (pip install litgpt)") from None
    path = directory / CONFIG
    if not path.is_file():
        raise ConvertError(f"{path}: missing (not a LitGPT checkpoint directory)")
    try:
        return Config.from_file(path)
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


def row_tensor(name: str, source: Stored, rows: list[int]) -> TensorInfo:
    """The tensor made of ``rows`` of ``source``: the stored tensor itself when they are all of them, in order."""
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
