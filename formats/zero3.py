"""DeepSpeed ZeRO-3 checkpoints, read lazily: the fp32 master weights straight from the rank files.

``engine.save_checkpoint(dir, tag)`` writes, per data-parallel rank ``r``,
``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` (parameter names and shapes in
``param_shapes``, buffers in ``module``, frozen parameters' flat fragments) and
``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` (``fp32_flat_groups``: this rank's
partition of every trainable parameter, concatenated). In ZeRO-3 each parameter is
flattened, padded to a multiple of the world size and split evenly: rank ``r`` holds
flat elements ``[r * p, (r + 1) * p)``, ``p = ceil(numel / world)``, at the same offset of
its concatenated groups on every rank (``deepspeed.utils.zero_to_fp32``). The 16-bit
``module`` entries of ZeRO-3 model states are empty placeholders, so the fp32 masters
are the weights, as ``zero_to_fp32`` takes them.

Files are parsed with ``torch.load(map_location="meta", weights_only=True)``: DeepSpeed's two
non-tensor classes there (its loss scaler and ZeRO stage enum) are allow-listed as inert
stand-ins, so DeepSpeed need not be installed and no code in the files can run.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import torch

from formats.checkpoint import Checkpoint, read_json
from formats.errors import ConvertError
from formats.pieces import Piece, Pieces
from formats.safetensors_file import TensorInfo, itemsize
from formats.torch_save import Stored, load_meta, stored


class _Inert:
    """Stands in for a DeepSpeed object in the pickle (the loss scaler): its state is kept as plain attributes."""


ALLOWED_GLOBALS = [
    (_Inert, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Inert, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),
]
MODEL_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt")
OPTIM_FILE = re.compile(r"(?:\w+_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")


def rank_files(directory: Path, pattern: re.Pattern, what: str) -> list[Path]:
    """The rank files matching ``pattern``, in rank order, checked to be ranks 0..n-1 of one model-parallel rank."""
    found = {}
    for path in directory.iterdir():
        m = pattern.fullmatch(path.name)
        if m:
            if m.group(2) != "00":
                raise ConvertError(f"{path}: tensor-parallel ZeRO checkpoints (mp_rank > 00) are not supported")
            found[int(m.group(1))] = path
    if not found:
        raise ConvertError(f"{directory}: no {what} files (zero_pp_rank_*_mp_rank_00_{what}.pt): not a ZeRO checkpoint")
    missing = [r for r in range(max(found) + 1) if r not in found]
    if missing:
        raise ConvertError(f"{directory}: {what} file of rank {missing[0]} is missing")
    return [found[r] for r in sorted(found)]


def checkpoint_dir(directory: Path) -> Path:
    """The tag directory: ``directory`` itself, or the one its ``latest`` file names (DeepSpeed's run layout)."""
    latest = directory / "latest"
    if not any(MODEL_FILE.fullmatch(p.name) for p in directory.iterdir()) and latest.is_file():
        tag = latest.read_text().strip()
        if not tag or "/" in tag or tag in (".", ".."):
            raise ConvertError(f"{latest}: names no checkpoint tag in this directory ({tag!r})")
        return directory / tag
    return directory


def _load(path: Path) -> dict:
    state = load_meta(path, allowed=ALLOWED_GLOBALS)
    if not isinstance(state, dict):
        raise ConvertError(f"{path}: not a DeepSpeed checkpoint file (holds a {type(state).__name__})")
    return state


def _get(state: dict, key: str, path: Path, kind: type | tuple = dict) -> object:
    value = state.get(key)
    if not isinstance(value, kind):
        raise ConvertError(f"{path}: no '{key}' entry (not a DeepSpeed ZeRO-3 checkpoint file)")
    return value


def open_zero3(directory: str | Path) -> Checkpoint:
    run = Path(directory)
    directory = checkpoint_dir(run)
    if not directory.is_dir():
        raise ConvertError(f"{directory}: checkpoint directory does not exist")
    model_files = rank_files(directory, MODEL_FILE, "model_states")
    optim_files = rank_files(directory, OPTIM_FILE, "optim_states")
    world = len(optim_files)
    if len(model_files) != world:
        raise ConvertError(f"{directory}: {len(model_files)} model_states files but {world} optim_states files")
    models = [_load(p) for p in model_files]
    tensors: dict[str, TensorInfo] = {}

    # Buffers: whole, in rank 0's module state (every rank holds the same).
    module = _get(models[0], "module", model_files[0])
    for name in _get(models[0], "buffer_names", model_files[0], list):
        if name in module:
            s = stored(model_files[0], module[name], name)
            tensors[name] = TensorInfo(name, s.dtype, s.shape, s.path, s.offset, s.nbytes)

    # Frozen parameters: each rank's flat fragment, concatenated.
    frozen = models[0].get("frozen_param_shapes") or {}
    for name, shape in frozen.items():
        frags = []
        for path, state in zip(model_files, models, strict=True):
            frag = (state.get("frozen_param_fragments") or {}).get(name)
            if not isinstance(frag, torch.Tensor):
                raise ConvertError(f"{path}: tensor '{name}': frozen parameter fragment missing")
            frags.append(stored(path, frag, name))
        tensors[name] = _flat_tensor(name, tuple(shape), frags)

    # Trainable parameters: the fp32 partitions of the optimizer state files.
    shapes = {k: tuple(v) for group in _get(models[0], "param_shapes", model_files[0], list) for k, v in group.items()}
    groups = []
    for path in optim_files:
        opt = _get(_load(path), "optimizer_state_dict", path)
        if opt.get("zero_stage") != 3:
            raise ConvertError(f"{path}: ZeRO stage {opt.get('zero_stage')!r}, not 3 (only ZeRO-3 is supported)")
        if opt.get("partition_count") != world:
            raise ConvertError(
                f"{path}: written by {opt.get('partition_count')} ranks but {world} optim_states files are here "
                "(a rank file missing, or left over from another run?)"
            )
        groups.append(
            [stored(path, t, f"fp32_flat_groups[{i}]") for i, t in enumerate(opt.get("fp32_flat_groups", []))]
        )
    sizes = [[math.prod(g.shape) for g in rank] for rank in groups]
    if any(s != sizes[0] for s in sizes):
        raise ConvertError(f"{directory}: ranks' fp32_flat_groups differ in size: {sizes}")
    bounds = [0, *itertools.accumulate(sizes[0])]
    offset = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        part = -(-numel // world)
        if offset + part > bounds[-1]:
            raise ConvertError(f"{optim_files[0]}: tensor '{name}': its partition runs past the fp32_flat_groups")
        pieces = []
        for r in range(world):
            start, stop = r * part, min((r + 1) * part, numel)
            pieces += _group_pieces(groups[r], bounds, offset, start, stop)
        tensors[name] = _info(name, "F32", shape, pieces)
        offset += part
    if offset != bounds[-1]:
        raise ConvertError(
            f"{optim_files[0]}: the parameters of param_shapes use {offset} of the {bounds[-1]} elements of "
            "fp32_flat_groups (model_states and optim_states files from different runs?)"
        )

    for alias, source in (models[0].get("shared_params") or {}).items():  # tied weights, stored once
        if source in tensors:
            tensors[alias] = tensors[source]
    config_dir = next((d for d in (directory, run, run.parent) if (d / "config.json").is_file()), None)
    config = read_json(config_dir / "config.json") if config_dir else {}
    return Checkpoint(config_dir or directory, config, tensors, [*model_files, *optim_files])


def _group_pieces(groups: list[Stored], bounds: list[int], offset: int, start: int, stop: int) -> list[Piece]:
    """Flat elements [start, stop) of a parameter, held by one rank at [offset, offset + stop - start) of its
    concatenated groups: one piece per group they fall in."""
    pieces, local = [], offset
    while start < stop:
        g = next(i for i in range(len(groups)) if bounds[i] <= local < bounds[i + 1])
        n = min(stop - start, bounds[g + 1] - local)
        item = itemsize(groups[g].dtype)
        pieces.append(Piece((start,), (n,), groups[g].path, groups[g].offset + (local - bounds[g]) * item))
        start, local = start + n, local + n
    return pieces


def _flat_tensor(name: str, shape: tuple[int, ...], frags: list[Stored]) -> TensorInfo:
    """A tensor whose flat elements are the ranks' fragments, concatenated (padding at the end dropped)."""
    numel, start, pieces = math.prod(shape), 0, []
    for frag in frags:
        n = min(math.prod(frag.shape), numel - start)
        if n > 0:
            pieces.append(Piece((start,), (n,), frag.path, frag.offset))
        start += n
    if start < numel:
        raise ConvertError(f"{frags[-1].path}: tensor '{name}': its fragments hold {start} of {numel} elements")
    return _info(name, frags[0].dtype, shape, pieces)


def _info(name: str, dtype: str, shape: tuple[int, ...], pieces: list[Piece]) -> TensorInfo:
    nbytes = math.prod(shape) * itemsize(dtype)
    path = pieces[0].path if pieces else Path()
    return TensorInfo(name, dtype, shape, path, 0, nbytes, reader=Pieces(name, dtype, shape, tuple(pieces), flat=True))
