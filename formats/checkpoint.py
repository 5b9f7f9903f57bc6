"""Lazy reader of a Hugging Face model directory: headers now, tensors on demand.

Supported layouts, in the order transformers itself prefers them:
``model.safetensors.index.json`` + shards, ``model.safetensors``,
``pytorch_model.bin.index.json`` + shards, ``pytorch_model.bin``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from formats.bnb import group_quantized
from formats.compressed_tensors import group_compressed, is_compressed
from formats.errors import ConvertError
from formats.fp8 import group_fp8
from formats.mxfp4 import group_mxfp4
from formats.safetensors_file import DTYPE_NAMES, TensorInfo, read_header

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class Checkpoint:
    """A model directory: its config and the location of every tensor, in file order."""

    directory: Path
    config: dict
    tensors: dict[str, TensorInfo]
    files: list[Path]


@dataclass(frozen=True)
class ShardFiles:
    """How a checkpoint's weight files are found and their headers read: on disk by default. The Hub
    source (``formats.hub``) reads headers of shards it has not downloaded yet, with range requests,
    so that a model is planned before its shards are fetched."""

    is_file: Callable[[Path], bool] = Path.is_file
    read_header: Callable[[Path], tuple[dict[str, TensorInfo], dict[str, str]]] = read_header


def open_checkpoint(directory: str | Path, shards: ShardFiles = ShardFiles()) -> Checkpoint:
    directory = Path(directory)
    if not directory.is_dir():
        raise ConvertError(f"{directory}: base model directory does not exist")
    config = read_json(directory / "config.json") if (directory / "config.json").exists() else {}
    for index_name, single_name, loader in (
        ("model.safetensors.index.json", "model.safetensors", partial(_safetensors_tensors, read=shards.read_header)),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", _bin_tensors),
    ):
        if (directory / index_name).exists():
            files = _index_files(directory, index_name, shards.is_file)
        elif shards.is_file(directory / single_name):
            files = [directory / single_name]
            if not inside_model_dir(directory, single_name):
                raise ConvertError(f"{files[0]}: a symbolic link that leaves the model directory")
        else:
            continue
        check_quant_method(config, directory)
        tensors = group_quantized(loader(files, directory, index_name), config)
        tensors = group_compressed(tensors, config) if is_compressed(config) else group_fp8(tensors, config)
        tensors = group_mxfp4(tensors, config)
        return Checkpoint(directory, config, tensors, files)
    raise ConvertError(f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin found")


# quantization_config.quant_method values whose checkpoints are read (dequantized) here.
QUANT_METHODS = ("bitsandbytes", "fp8", "compressed-tensors", "mxfp4")


def check_quant_method(config: dict, directory: Path) -> None:
    """Refuse a quantized checkpoint of a format not read here: its packed integers would merge as garbage."""
    qconfig = config.get("quantization_config")
    if qconfig is None:
        return
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    if method is None and isinstance(qconfig, dict) and {"load_in_4bit", "load_in_8bit"} & qconfig.keys():
        return  # written by transformers before quant_method existed: bitsandbytes
    if method not in QUANT_METHODS:
        raise ConvertError(
            f"{directory / 'config.json'}: quantization_config.quant_method {method!r} is not a format this tool "
            f"reads (expected one of {', '.join(QUANT_METHODS)})"
        )


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise ConvertError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


def _index_files(directory: Path, index_name: str, is_file: Callable[[Path], bool] = Path.is_file) -> list[Path]:
    """Shard files named by an index, refusing any that would leave the directory."""
    index_path = directory / index_name
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConvertError(f"{index_path}: missing or empty 'weight_map'")
    files: dict[str, Path] = {}
    for tensor, name in weight_map.items():
        if name in files:
            continue
        path = directory / str(name)
        if not inside_model_dir(directory, str(name)):
            raise ConvertError(f"{index_path}: tensor '{tensor}': shard '{name}' lies outside the model directory")
        if not is_file(path):
            raise ConvertError(f"{index_path}: tensor '{tensor}': shard file '{name}' is missing")
        files[name] = path
    return [files[n] for n in sorted(files)]


def inside_model_dir(directory: Path, name: str) -> bool:
    """Whether file ``name`` of a model directory stays inside it: no absolute path, no ``..``, no
    symbolic link that leaves it. The one exception is the Hugging Face cache's own layout, where
    ``snapshots/<rev>/<file>`` links to ``../../blobs/<sha>`` of the same repository."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return False
    root = directory.resolve()
    target = (directory / name).resolve()
    if root in target.parents:
        return True
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


def _check_index(directory: Path, index_name: str, tensors: dict[str, TensorInfo]) -> None:
    weight_map = read_json(directory / index_name)["weight_map"]
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None or info.path.name != Path(shard).name:
            raise ConvertError(f"{directory / index_name}: tensor '{name}': not found in shard '{shard}'")


def _safetensors_tensors(
    files: list[Path], directory: Path, index_name: str, read: Callable = read_header
) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in read(path)[0].items():
            if name in tensors:
                raise ConvertError(f"{path}: tensor '{name}': also stored in {tensors[name].path.name}")
            tensors[name] = info
    if (directory / index_name).exists():
        _check_index(directory, index_name, tensors)
    return tensors


def _bin_tensors(files: list[Path], directory: Path, index_name: str) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, t in load_bin(path).items():
            tensors[name] = TensorInfo(name, DTYPE_NAMES[t.dtype], tuple(t.shape), path, 0, t.nbytes, mapped=t)
    if (directory / index_name).exists():
        _check_index(directory, index_name, tensors)
    return tensors


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Load a PyTorch pickle without running code in it (weights_only) and without reading it (mmap)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types here: unpickling, zip, I/O
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{path}: cannot load safely (weights_only): {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{path}: not a state dict of tensors")
    for name, t in state.items():
        if t.dtype not in DTYPE_NAMES:
            raise ConvertError(f"{path}: tensor '{name}': unsupported dtype {t.dtype}")
    return {k: v.contiguous() for k, v in state.items()}
