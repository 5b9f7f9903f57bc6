"""torch.distributed.checkpoint (FSDP/FSDP2, torchtitan, accelerate) directories, read lazily.

A DCP checkpoint is a ``.metadata`` pickle (every tensor's global shape and chunks, and
where each chunk is stored) plus ``__<rank>_<n>.distcp`` storage files, each a sequence
of ``torch.save`` zips, one per chunk. Here the metadata is unpickled with an
allow-list of DCP's own classes, each chunk's zip directory is parsed where it lies
(``formats.torch_save``), and every model tensor becomes a ``TensorInfo`` whose
``reader`` preads the rows asked for from the chunks that hold them.

The metadata is written with pickle's default protocol (5), whose opcodes (FRAME,
MEMOIZE, STACK_GLOBAL) torch's ``weights_only`` unpickler does not parse ("Unsupported
operand 149"), so the allow-list is enforced by a ``pickle.Unpickler`` whose
``find_class`` refuses every other global: no code in the file can run.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from formats.checkpoint import Checkpoint, inside_model_dir, read_json
from formats.errors import ConvertError
from formats.pieces import Piece, Pieces, check_cover
from formats.safetensors_file import DTYPE_NAMES, TensorInfo, itemsize
from formats.torch_save import load_meta, stored

METADATA = ".metadata"
_DCP = "torch.distributed.checkpoint.metadata"
ALLOWED_GLOBALS = {
    *(
        (_DCP, n)
        for n in (
            "Metadata",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "MetadataIndex",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}
# Module wrappers that add a segment to parameter names without being part of the model.
WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
MODEL_KEYS = ("model", "module")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in ALLOWED_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not one of DCP's metadata classes")


def read_metadata(path: Path) -> object:
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror or e}") from None
    except Exception as e:  # a corrupt or hostile pickle: many exception types
        raise ConvertError(f"{path}: not a DCP metadata file: {e}") from None
    if not isinstance(metadata, Metadata):
        raise ConvertError(f"{path}: not a DCP metadata file (holds a {type(metadata).__name__})")
    return metadata


def model_names(metadata: object) -> dict[str, str]:
    """DCP key -> model tensor name. ``dcp.save({"model": sd, "optim": ...})`` flattens nested dicts into
    dotted keys; ``planner_data`` keeps each key's path, so the model's entries are told apart exactly."""
    paths = {k: tuple(v) for k, v in (metadata.planner_data or {}).items() if isinstance(v, (tuple, list))}
    keys = [k for k, v in metadata.state_dict_metadata.items() if type(v).__name__ == "TensorStorageMetadata"]
    nested = any(len(paths.get(k, (k,))) > 1 and paths[k][0] in MODEL_KEYS for k in keys)
    names = {}
    for key in keys:
        path = paths.get(key, (key,))
        if nested:
            if len(path) < 2 or path[0] not in MODEL_KEYS:
                continue  # optimizer state, scheduler, ...
            path = path[1:]
        elif len(path) != 1:
            continue
        name = ".".join(str(p) for p in path)
        for segment in WRAPPER_SEGMENTS:
            name = name.replace(segment, "")
        names[key] = name
    return names


def find_config(directory: Path) -> Path | None:
    """``config.json`` beside the checkpoint, or in the run directory above it (accelerate/Trainer layout)."""
    return next((d for d in (directory, directory.parent) if (d / "config.json").is_file()), None)


def open_dcp(directory: str | Path) -> Checkpoint:
    directory = Path(directory)
    meta_path = directory / METADATA
    if not meta_path.is_file():
        raise ConvertError(f"{meta_path}: missing (not a torch.distributed.checkpoint directory)")
    metadata = read_metadata(meta_path)
    storage = {(index.fqn, tuple(index.offset or ())): info for index, info in (metadata.storage_data or {}).items()}
    config_dir = find_config(directory)
    tensors: dict[str, TensorInfo] = {}
    files: set[Path] = set()
    for key, name in model_names(metadata).items():
        entry = metadata.state_dict_metadata[key]
        dtype = DTYPE_NAMES.get(entry.properties.dtype)
        if dtype is None:
            raise ConvertError(f"{meta_path}: tensor '{key}': unsupported dtype {entry.properties.dtype}")
        shape = tuple(entry.size)
        pieces = []
        for chunk in entry.chunks:
            info = storage.get((key, tuple(chunk.offsets)))
            if info is None:
                raise ConvertError(f"{meta_path}: tensor '{key}': no storage for its chunk at {list(chunk.offsets)}")
            piece = _chunk(directory, key, info, dtype, tuple(chunk.offsets), tuple(chunk.sizes))
            pieces.append(piece if shape else Piece((0,), (1,), piece.path, piece.offset))  # a scalar: one element
            files.add(piece.path)
        reader = Pieces(name, dtype, shape, tuple(pieces), flat=not shape)
        check_cover(meta_path, key, reader.grid, pieces)
        if name in tensors:
            raise ConvertError(f"{meta_path}: tensor '{key}': name '{name}' given twice")
        nbytes = itemsize(dtype) * (entry.size.numel() if shape else 1)
        tensors[name] = TensorInfo(name, dtype, shape, pieces[0].path, 0, nbytes, reader=reader)
    if not tensors:
        raise ConvertError(f"{meta_path}: holds no model tensors")
    config = read_json(config_dir / "config.json") if config_dir else {}
    return Checkpoint(config_dir or directory, config, tensors, [meta_path, *sorted(files)])


def _chunk(directory: Path, key: str, info: object, dtype: str, offsets: tuple, sizes: tuple) -> Piece:
    """Where one chunk's bytes lie: the record of its ``torch.save`` zip inside a storage file."""
    name = str(info.relative_path)
    path = directory / name
    if not inside_model_dir(directory, name):
        raise ConvertError(f"{directory / METADATA}: tensor '{key}': storage file '{name}' lies outside the checkpoint")
    if getattr(info, "transform_descriptors", None):
        raise ConvertError(
            f"{path}: tensor '{key}': stored with transforms {list(info.transform_descriptors)} "
            "(compressed DCP checkpoints are not supported)"
        )
    if not path.is_file():
        raise ConvertError(f"{path}: tensor '{key}': storage file is missing")
    size = path.stat().st_size
    if info.offset + info.length > size:
        raise ConvertError(
            f"{path}: tensor '{key}': its chunk ends at byte {info.offset + info.length} but the file "
            f"holds {size} (truncated file)"
        )
    tensor = load_meta(path, info.offset, info.length)
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != sizes or DTYPE_NAMES.get(tensor.dtype) != dtype:
        raise ConvertError(
            f"{path}: tensor '{key}': chunk at {list(offsets)} does not hold a {dtype} tensor of shape {list(sizes)}"
        )
    return Piece(offsets, sizes, path, stored(path, tensor, key, info.offset, info.length).offset)
