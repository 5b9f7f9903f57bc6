"""A model's real definition: its module types and the map between in-memory names and checkpoint keys.

An adapter names modules as they are in memory (``model.language_model.layers.0.self_attn.q_proj``,
``model.layers.0.mlp.experts`` with ``target_parameters``), while the checkpoint stores what
transformers saves (``language_model.model.layers.0...``, one tensor per expert). transformers turns
one into the other at load time with its checkpoint conversion mapping (``WeightRenaming`` /
``WeightConverter``) and back at save time. Here the model is built by transformers on the meta
device (no memory, no weights) for the class its ``config.json`` names, and that same mapping is
applied, with transformers' own functions, to the checkpoint's keys: every in-memory parameter then
knows the checkpoint tensor(s) it is made of and which part of it each one is. Module kinds come
from the modules' classes, and what transformers' bitsandbytes integration would quantize from
running its own replacement function on that meta model.

Building it means importing transformers and its modeling code: about 3 s warm, and tens of seconds on a cold
page cache while the disk streams a base, most of a ``convert quantize``'s time outside its pipeline. So the answer
is kept on disk (``convert.startup.cache_dir()``, one small JSON file a model) under a key of everything it depends
on: config.json, the checkpoint's keys and shapes, transformers' version and files, and this module's source. A
later command on the same model reads it back without importing transformers; an unreadable or missing entry is
built again. Without transformers, names are taken as they are (``available()`` is false) and whatever needs the
model's definition raises a ``ConvertError`` saying so.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from convert.startup import cache_dir, temporary_name
from formats.errors import ConvertError
from formats.safetensors_file import TensorInfo

LINEAR, CONV1D, EMBEDDING, OTHER = "linear", "conv1d", "embedding", "other"

# A part of an in-memory parameter, one entry per dimension of the parameter: an int selects one index
# (the dimension a MergeModulelist stacked), a (start, stop) pair a range (what a Concatenate joined).
Index = tuple[int | tuple[int, int], ...]


def available() -> bool:
    return importlib.util.find_spec("transformers") is not None


@dataclass(frozen=True)
class Piece:
    """Checkpoint tensor ``key`` holds ``param[index]`` of the in-memory parameter ``param``
    (``index`` empty: the whole parameter)."""

    key: str
    param: str
    index: Index = ()


@dataclass
class Architecture:
    """What transformers makes of one model directory: module kinds, quantized weights, names."""

    directory: Path
    class_name: str
    kinds: dict[str, str]  # in-memory module path -> LINEAR / CONV1D / EMBEDDING / OTHER
    parameters: dict[str, tuple[int, ...]]  # in-memory parameter -> shape
    module_params: dict[str, list[str]]  # module path -> its own parameter names, in definition order
    base_model_prefix: str
    quantized_modules: set[str]  # modules transformers' bitsandbytes integration replaces (skip rules applied)
    transposed: set[str]  # expert modules whose 3-D parameters are (experts, in, out): ``is_transposed``
    pieces: dict[str, list[Piece]] = field(default_factory=dict)  # in-memory parameter -> checkpoint pieces
    unsupported: dict[str, str] = field(default_factory=dict)  # in-memory parameter -> why it cannot be mapped

    @cached_property
    def param_of_key(self) -> dict[str, str]:
        return {p.key: p.param for pieces in self.pieces.values() for p in pieces}

    def in_memory(self, name: str) -> str | None:
        """The in-memory parameter an adapter's name denotes, allowing a missing or extra
        ``base_model_prefix`` (an adapter trained on the bare ``XModel`` or on a ``XForY`` head)."""
        prefix = self.base_model_prefix
        for candidate in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if candidate in self.parameters:
                return candidate
        return None

    def checkpoint_pieces(self, param: str) -> list[Piece]:
        """The checkpoint tensors an in-memory parameter is made of, or a clear error."""
        if param in self.unsupported:
            raise ConvertError(f"{self.directory}: parameter '{param}': {self.unsupported[param]}")
        return self.pieces.get(param, [])


_LOADED: dict[int, tuple[object, Architecture]] = {}


def for_checkpoint(ckpt) -> Architecture:
    """``load`` for a ``formats.checkpoint.Checkpoint``, once per checkpoint object in this process."""
    found = _LOADED.get(id(ckpt))
    if found is None or found[0] is not ckpt:
        found = _LOADED[id(ckpt)] = (ckpt, load(ckpt.directory, ckpt.config, ckpt.tensors))
    return found[1]


def quantized_weights(ckpt) -> dict[str, str]:
    """Checkpoint weight -> in-memory module, for every module transformers' bitsandbytes integration
    would quantize (before the user's skip list; ``_keep_in_fp32_modules`` applied), whose weight is one
    whole checkpoint tensor."""
    arch = for_checkpoint(ckpt)
    out = {}
    for module in sorted(arch.quantized_modules):
        pieces = arch.pieces.get(f"{module}.weight", [])
        if len(pieces) == 1 and not pieces[0].index:
            out[pieces[0].key] = module
    return out


def peft_task_type(arch: Architecture) -> str | None:
    """The PEFT ``task_type`` an adapter of this model class is saved with: the task of the transformers Auto
    mapping that holds the class (None, a plain ``PeftModel``, for a bare encoder such as ``BertModel``)."""
    from transformers.models.auto import modeling_auto as auto

    tasks = (
        (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "CAUSAL_LM"),
        (auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "CAUSAL_LM"),
        (auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "SEQ_2_SEQ_LM"),
        (auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "SEQ_CLS"),
        (auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES, "TOKEN_CLS"),
        (auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES, "QUESTION_ANS"),
    )
    for mapping, task in tasks:
        classes = {c for v in mapping.values() for c in ((v,) if isinstance(v, str) else v)}
        if arch.class_name in classes:
            return task
    return None


def piece_shape(piece: Piece, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the checkpoint tensor holding ``piece`` of a parameter of ``shape``."""
    if not piece.index:
        return shape
    return tuple(i[1] - i[0] for i in piece.index if not isinstance(i, int))


def load(directory: Path, config: dict, keys: dict[str, TensorInfo]) -> Architecture:
    """The architecture of a model directory: from the cache, else ``build`` (and cached)."""
    if not available():
        raise ConvertError(
            f"{directory}: transformers is not installed: the model's module types and checkpoint names "
            "cannot be told from tensor names alone (pip install transformers)"
        )
    path = cache_dir() / "architectures" / f"{cache_key(config, keys)}.json"
    try:
        return from_json(directory, json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    arch = build(directory, config, keys)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path)
        tmp.write_text(json.dumps(to_json(arch)))
        os.replace(tmp, path)
    except OSError:
        pass
    return arch


def cache_key(config: dict, keys: dict[str, TensorInfo]) -> str:
    """A digest of everything ``build`` depends on (found without importing transformers)."""
    spec = importlib.util.find_spec("transformers")
    origin = Path(spec.origin) if spec and spec.origin else None
    stamp = origin.stat().st_mtime_ns if origin and origin.is_file() else 0
    things = {
        "transformers": [importlib.metadata.version("transformers"), str(origin), stamp],
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "config": config,
        "keys": sorted((k, list(info.shape)) for k, info in keys.items()),
    }
    return hashlib.sha256(json.dumps(things, sort_keys=True, default=str).encode()).hexdigest()[:32]


def to_json(arch: Architecture) -> dict:
    fields = {k: v for k, v in vars(arch).items() if k in Architecture.__dataclass_fields__ and k != "directory"}
    fields["quantized_modules"], fields["transposed"] = sorted(arch.quantized_modules), sorted(arch.transposed)
    fields["pieces"] = {param: [[p.key, list(p.index)] for p in pieces] for param, pieces in arch.pieces.items()}
    return fields


def from_json(directory: Path, fields: dict) -> Architecture:
    pieces = {
        param: [Piece(key, param, tuple(i if isinstance(i, int) else tuple(i) for i in index)) for key, index in items]
        for param, items in fields.pop("pieces").items()
    }
    arch = Architecture(directory=directory, pieces=pieces, **fields)
    arch.parameters = {name: tuple(shape) for name, shape in arch.parameters.items()}
    arch.quantized_modules, arch.transposed = set(arch.quantized_modules), set(arch.transposed)
    return arch


def build(directory: Path, config: dict, keys: dict[str, TensorInfo]) -> Architecture:
    """Build the model of ``config.json`` on the meta device and map ``keys`` (the checkpoint's) onto it."""
    model = meta_model(directory, config)
    arch = Architecture(
        directory=directory,
        class_name=type(model).__name__,
        kinds={name: module_kind(module) for name, module in model.named_modules()},
        parameters={name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)},
        module_params={
            name: [n for n, _ in module.named_parameters(recurse=False)] for name, module in model.named_modules()
        },
        base_model_prefix=model.base_model_prefix,
        quantized_modules=bnb_replaced_modules(model, config, skip=[]),
        transposed={name for name, module in model.named_modules() if getattr(module, "is_transposed", False)},
    )
    map_checkpoint(arch, model, keys)
    return arch


def meta_model(directory: Path, config: dict) -> torch.nn.Module:
    """The class transformers picks for ``architectures`` (else ``AutoModel`` for the ``model_type``), on meta."""
    import transformers

    model_type = config.get("model_type")
    try:
        hf_config = transformers.AutoConfig.for_model(**config) if model_type else None
    except (ValueError, KeyError) as e:
        raise ConvertError(
            f"{directory / 'config.json'}: model_type {model_type!r} is not known to transformers "
            f"{transformers.__version__} ({e})"
        ) from None
    if hf_config is None:
        raise ConvertError(f"{directory / 'config.json'}: no 'model_type': transformers cannot tell the architecture")
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else transformers.AutoModel
    if cls is None:
        raise ConvertError(
            f"{directory / 'config.json'}: architecture {names[0]!r} is not a class of transformers "
            f"{transformers.__version__}"
        )
    try:
        with torch.device("meta"):
            return cls._from_config(hf_config) if cls is not transformers.AutoModel else cls.from_config(hf_config)
    except Exception as e:  # a config transformers cannot build a model from: name what it said
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{directory / 'config.json'}: transformers cannot build {cls.__name__}: {first}") from None


def module_kind(module: torch.nn.Module) -> str:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return CONV1D
    if isinstance(module, torch.nn.Linear):
        return LINEAR
    if isinstance(module, torch.nn.Embedding):
        return EMBEDDING
    return OTHER


def bnb_replaced_modules(model: torch.nn.Module, config: dict, skip: list[str] | None = None) -> set[str]:
    """Modules transformers' ``replace_with_bnb_linear`` turns into bitsandbytes layers when this model is
    loaded with ``llm_int8_skip_modules=skip`` (``["lm_head"]``: what this tool writes in its configs),
    ``_keep_in_fp32_modules`` added as transformers' bnb quantizer adds them: the type test (``nn.Linear``
    exactly, or ``Conv1D``) and the skip rule (``should_convert_module``) are transformers' own."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    not_convert = [*(skip if skip is not None else ["lm_head"]), *(getattr(model, "_keep_in_fp32_modules", None) or [])]
    return {
        name
        for name, module in model.named_modules()
        if (isinstance(module, Conv1D) or type(module) is torch.nn.Linear)
        and should_convert_module(name, not_convert)
    }


def map_checkpoint(arch: Architecture, model: torch.nn.Module, keys: dict[str, TensorInfo]) -> None:
    """Rename every checkpoint key exactly as ``convert_and_load_state_dict_in_model`` does (same sort, same
    renamings, at most one converter, same base_model_prefix rule), then work out from the converter's
    operations which part of its parameter each checkpoint tensor is."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = dict.fromkeys(arch.parameters, True) | {n: True for n, _ in model.named_buffers()}
    prefix = model.base_model_prefix
    grouped: dict[str, tuple[object, dict[str, list[str]]]] = {}
    for key in sorted(keys, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        if renamed not in arch.parameters:
            continue  # a buffer, or a key transformers would report as unexpected: copied as it is
        if pattern is None:
            arch.pieces[renamed] = [Piece(key, renamed)]
        else:
            converter, lists = grouped.setdefault(renamed, (by_pattern[pattern], {}))
            lists.setdefault(pattern, []).append(key)
    for param, (converter, lists) in grouped.items():
        try:
            arch.pieces[param] = converted_pieces(param, converter, lists, keys)
        except _Unsupported as e:
            arch.unsupported[param] = str(e)


class _Unsupported(Exception):
    pass


def converted_pieces(param: str, converter, lists: dict[str, list[str]], keys: dict[str, TensorInfo]) -> list[Piece]:
    """Follow a ``WeightConverter``'s operations on shapes alone: ``MergeModulelist(dim)`` stacks each
    list (the position in the list, in transformers' natural key order, is the index), ``Concatenate(dim)``
    joins the patterns in their declared order. Any other operation (a transpose, a split, a permutation)
    is named as not supported rather than guessed."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    # pattern -> list of (shape, [(key, index)]) in the converter's running state
    state: dict[str, list[tuple[tuple[int, ...], list[tuple[str, list]]]]] = {
        pattern: [(keys[k].shape, [(k, [(0, d) for d in keys[k].shape])]) for k in names]
        for pattern, names in lists.items()
    }
    for op in converter.operations:
        if isinstance(op, MergeModulelist):
            for pattern, items in state.items():
                shape = items[0][0]
                if any(s != shape for s, _ in items):
                    raise _Unsupported(f"{type(op).__name__} of tensors of different shapes")
                d = op.dim
                parts = [(k, idx[:d] + [i] + idx[d:]) for i, (_, ps) in enumerate(items) for k, idx in ps]
                state[pattern] = [(shape[:d] + (len(items),) + shape[d:], parts)]
        elif isinstance(op, Concatenate):
            d, offset, parts, shape = op.dim, 0, [], None
            for pattern in converter.source_patterns:
                for item_shape, ps in state.pop(pattern, []):
                    for k, idx in ps:
                        lo, hi = idx[d]
                        parts.append((k, idx[:d] + [(lo + offset, hi + offset)] + idx[d + 1 :]))
                    offset += item_shape[d]
                    shape = item_shape[:d] + (offset,) + item_shape[d + 1 :]
            state = {"": [(shape, parts)]}
        else:
            raise _Unsupported(
                f"transformers builds it with {type(op).__name__}, which this tool cannot map onto the checkpoint yet"
            )
    items = [item for items in state.values() for item in items]
    if len(items) != 1:
        raise _Unsupported(f"{type(converter).__name__} leaves {len(items)} tensors where one parameter was expected")
    return [Piece(k, param, tuple(_plain(i) for i in idx)) for k, idx in items[0][1]]


def _plain(entry: object) -> int | tuple[int, int]:
    return entry if isinstance(entry, int) else tuple(entry)


def peft_param_wrappers(arch: Architecture, target_parameters: list[str]) -> dict[str, str]:
    """PEFT module name -> in-memory parameter, for an adapter with ``target_parameters``.

    PEFT (``BaseTuner._inject_parameters``) wraps each matched parameter of a module in a ``ParamWrapper``,
    in the module's own parameter order, each wrapper around the previous one: the last matched
    parameter's LoRA is saved under the module's path, the one before under ``<path>.base_layer``, and so
    on. A parameter matches a target when its path equals it or ends with ``.<target>``."""
    wrappers = {}
    for module, params in arch.module_params.items():
        hits = [
            p
            for p in params
            if any(f"{module}.{p}" == t or f"{module}.{p}".endswith(f".{t}") for t in target_parameters)
        ]
        for depth, p in enumerate(reversed(hits)):
            wrappers[module + ".base_layer" * depth] = f"{module}.{p}" if module else p
    return wrappers
