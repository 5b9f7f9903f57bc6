"""The merge plan: every output tensor, where its bytes come from and what is added.

Built from headers and the adapter config alone, before any output byte is
written, so that every mismatch between adapter and base is reported up front.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from convert.plan import architecture
from convert.plan.lora import BiasDelta, Delta, check_config, low_rank_delta, narrow, parameter_delta, scaling_for
from formats import bnb, compressed_tensors, fp8, mxfp4
from formats.adapter import Adapter
from formats.checkpoint import Checkpoint
from formats.dtypes import OUTPUT_DTYPES
from formats.errors import ConvertError
from formats.safetensors_file import FLOAT_DTYPES, TensorInfo
from formats.writer import PlannedTensor

LM_HEAD = "lm_head.weight"
Spec = bnb.QuantSpec | fp8.FP8Spec | compressed_tensors.CompressedSpec | mxfp4.Mxfp4Spec  # laid out by its module


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    source: TensorInfo
    delta: Delta | None = None
    quant: Spec | None = None  # how it is written quantized (``convert.plan.quantize``)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def planned(self) -> PlannedTensor:
        return PlannedTensor(self.name, self.dtype, self.shape)

    @property
    def serialized(self) -> list[PlannedTensor]:
        """The tensors written to the shards: this one, or the several a quantized weight is saved as."""
        if not self.quant:
            return [self.planned]
        return fp8.layout_module(self.quant).serialized_tensors(self.name, self.shape, self.dtype, self.quant)

    @property
    def byte_copy(self) -> bool:
        """Untouched and same dtype: copied file-to-file without decoding."""
        plain = self.source.stored_as_is and self.quant is None
        return self.delta is None and self.dtype == self.source.dtype and plain


@dataclass
class Plan:
    tensors: list[OutputTensor]
    dtype: str  # the output's main float dtype, recorded in config.json
    config_updates: dict
    base: Checkpoint | None = None  # what it was planned from: its architecture says which weights are Linear


def resolve(name: str, base: dict[str, TensorInfo]) -> str | None:
    """The base tensor a PEFT module path names, allowing for a base saved without (or with
    an extra) ``base_model_prefix``, which transformers itself accepts when loading."""
    if name in base:
        return name
    _, _, tail = name.partition(".")
    if tail in base:
        return tail
    for prefix in dict.fromkeys(k.partition(".")[0] for k in base):
        if f"{prefix}.{name}" in base:
            return f"{prefix}.{name}"
    return None


def tied_embedding(ckpt: Checkpoint) -> str | None:
    """The input embedding that a missing ``lm_head.weight`` is tied to (transformers drops tied copies)."""
    if resolve(LM_HEAD, ckpt.tensors) is not None:
        return None
    vocab, hidden = ckpt.config.get("vocab_size"), ckpt.config.get("hidden_size", ckpt.config.get("n_embd"))
    candidates = [n for n, t in ckpt.tensors.items() if t.shape == (vocab, hidden) and n.endswith(".weight")]
    return candidates[0] if len(candidates) == 1 else None


def build_plan(ckpt: Checkpoint, adapter: Adapter | None, dtype: str = "auto") -> Plan:
    if dtype not in OUTPUT_DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: expected one of {', '.join(OUTPUT_DTYPES)}")
    building = Building(ckpt, adapter, dict(ckpt.tensors))
    if adapter is not None:
        building.add_adapter()
    float_dtypes = Counter(t.dtype for t in ckpt.tensors.values() if t.dtype in FLOAT_DTYPES)
    main_dtype = OUTPUT_DTYPES[dtype] or (float_dtypes.most_common(1)[0][0] if float_dtypes else "F32")
    tensors = []
    for name, source in building.sources.items():
        original = ckpt.tensors.get(name, source)
        out_dtype = original.dtype
        if original.dtype in FLOAT_DTYPES and OUTPUT_DTYPES[dtype]:
            out_dtype = OUTPUT_DTYPES[dtype]
        tensors.append(OutputTensor(name, out_dtype, source, building.deltas.get(name)))
    return Plan(tensors, main_dtype, building.config_updates, ckpt)


@dataclass
class Building:
    """A plan being made: where each output tensor's bytes come from (``sources``) and what is added to it."""

    ckpt: Checkpoint
    adapter: Adapter | None
    sources: dict[str, TensorInfo]
    deltas: dict[str, Delta] = field(default_factory=dict)
    config_updates: dict = field(default_factory=dict)
    _arch: list = field(default_factory=list)  # the base's architecture, or the ConvertError why there is none
    tied: str | None = field(init=False)  # the input embedding a missing lm_head is tied to

    def __post_init__(self) -> None:
        self.tied = tied_embedding(self.ckpt)

    def arch(self) -> architecture.Architecture | ConvertError:
        if not self._arch:
            try:
                self._arch.append(architecture.for_checkpoint(self.ckpt))
            except ConvertError as e:
                self._arch.append(e)
        return self._arch[0]

    def add_adapter(self) -> None:
        adapter, tied = self.adapter, self.tied
        check_config(adapter)
        wrappers = param_wrappers(adapter, self.arch)
        for name, info in adapter.base_layers.items():
            self.replace(self.single(name, name), info)
        tied_source = self.sources[tied] if tied else None  # what a tied lm_head reads in the PEFT model
        for name, info in adapter.replacements.items():
            self.replace(self.single(name, name), info)
        for module, lora in adapter.lora.items():
            if module in wrappers:  # LoRA on an nn.Parameter: the pieces of that parameter
                self.add_parameter_delta(module, wrappers[module])
                continue
            self.add_module_delta(module)
            if "bias" in lora.parts:
                self.add_bias_delta(module, lora.parts["bias"])
        if tied and (tied in self.deltas or LM_HEAD in self.sources or self.sources[tied] is not tied_source):
            # The adapter changes one side of a tied pair: the PEFT model no longer has equal input and
            # output embeddings, so the merged model must store both and stop tying them.
            self.sources.setdefault(LM_HEAD, tied_source)
            self.config_updates["tie_word_embeddings"] = False
        _check_dtypes(adapter, {name: self.sources[name] for name in self.deltas})

    def add_parameter_delta(self, module: str, param: str) -> None:
        a = self.arch()
        shape = a.parameters[param]
        swapped = param.rpartition(".")[0] not in a.transposed
        pieces_of = a.checkpoint_pieces(param)
        stored = self.sources[pieces_of[0].key].dtype if pieces_of else "F32"
        whole = parameter_delta(self.adapter, module, param, shape, swapped, stored)
        for piece in pieces_of:
            self.add_delta(piece.key, narrow_piece(whole, piece, shape, self.sources[piece.key], self.adapter), module)

    def add_module_delta(self, module: str) -> None:
        found = self.pieces(f"{module}.weight", module)
        if len(found) == 1 and not found[0].index:
            self.add_delta(found[0].key, low_rank_delta(self.adapter, module, self.sources[found[0].key]), module)
            return
        # an in-memory Linear joined from several checkpoint tensors: each gets its part
        shape = self.arch().parameters[found[0].param]
        whole = low_rank_delta(self.adapter, module, self.sources[found[0].key], shape)
        for piece in found:
            self.add_delta(piece.key, narrow_piece(whole, piece, shape, self.sources[piece.key], self.adapter), module)

    def add_bias_delta(self, module: str, lora_bias: TensorInfo) -> None:
        bias = resolve(f"{module}.bias", self.ckpt.tensors)
        if bias is None and isinstance(self.arch(), architecture.Architecture):
            param = self.arch().in_memory(f"{module}.bias")
            parts = self.arch().checkpoint_pieces(param) if param else []
            bias = parts[0].key if len(parts) == 1 and not parts[0].index else None
        where = self.adapter.weights_file
        if bias is None:
            raise ConvertError(f"{where}: tensor '{module}': lora_bias is set but the base layer has no bias")
        if lora_bias.shape != self.sources[bias].shape:
            raise ConvertError(
                f"{where}: tensor '{lora_bias.name}': shape mismatch: "
                f"{list(lora_bias.shape)}, base bias '{bias}' is {list(self.sources[bias].shape)}"
            )
        self.deltas[bias] = BiasDelta(lora_bias, scaling_for(self.adapter.config, module)[1])

    def pieces(self, name: str, what: str) -> list[architecture.Piece]:
        """The checkpoint tensors that the in-memory parameter ``name`` (the adapter's naming) is stored as:
        the tensor of that name, else what transformers' conversion mapping loads it from."""
        if name not in self.ckpt.tensors and isinstance(self.arch(), architecture.Architecture):
            param = self.arch().in_memory(name)
            found = self.arch().checkpoint_pieces(param) if param is not None else []
            if found:
                return found
        return [architecture.Piece(self.base_name(name, what), name)]

    def single(self, name: str, what: str) -> str:
        found = self.pieces(name, what)
        if len(found) != 1 or found[0].index:
            raise ConvertError(
                f"{self.adapter.weights_file}: tensor '{what}': '{name}' is stored as {len(found)} part(s) of "
                f"checkpoint tensors ({', '.join(p.key for p in found)}): a saved copy of it is not supported"
            )
        return found[0].key

    def base_name(self, name: str, what: str) -> str:
        found = resolve(name, self.ckpt.tensors)
        tied = self.tied
        if found is None and name.split(".")[-2:] == LM_HEAD.split(".") and tied:
            found = LM_HEAD  # lm_head of a tied model: a new tensor, starting from the embedding
            self.sources.setdefault(LM_HEAD, self.sources[tied])
        if found is None:
            why = f"; {self.arch()}" if isinstance(self.arch(), ConvertError) else ""
            raise ConvertError(
                f"{self.adapter.weights_file}: tensor '{what}': '{name}' does not exist in the base model "
                f"({self.ckpt.directory}){why}"
            )
        return found

    def add_delta(self, key: str, delta: Delta, what: str) -> None:
        if key in self.deltas:
            raise ConvertError(f"{self.adapter.weights_file}: tensor '{what}': base tensor '{key}' is adapted twice")
        self.deltas[key] = delta

    def replace(self, target: str, info: TensorInfo) -> None:
        _check_replacement(self.ckpt, self.adapter, target, self.sources[target], info, self.config_updates)
        self.sources[target] = info


def param_wrappers(adapter: Adapter, arch) -> dict[str, str]:
    """Adapter module -> in-memory parameter, for an adapter trained with ``target_parameters``."""
    targets = adapter.config.get("target_parameters")
    if not targets:
        return {}
    if isinstance(arch(), ConvertError):
        raise ConvertError(f"{adapter.directory / 'adapter_config.json'}: target_parameters: {arch()}")
    return architecture.peft_param_wrappers(arch(), list(targets))


def narrow_piece(whole, piece: architecture.Piece, shape: tuple[int, ...], source: TensorInfo, adapter: Adapter):
    """The part of a parameter's delta that one checkpoint tensor holds, its shape checked."""
    where = f"{adapter.weights_file}: base tensor '{piece.key}'"
    expected = architecture.piece_shape(piece, shape)
    if tuple(source.shape) != expected:
        raise ConvertError(
            f"{where}: shape {list(source.shape)}, but transformers maps part {list(expected)} of "
            f"'{piece.param}' onto it"
        )
    return narrow(whole, piece.index, shape, where)


def _check_replacement(
    ckpt: Checkpoint, adapter: Adapter, target: str, base: TensorInfo, new: TensorInfo, config_updates: dict
) -> None:
    """A ``modules_to_save`` copy must fit its base tensor, except a resized vocabulary."""
    if (new.dtype in FLOAT_DTYPES) != (base.dtype in FLOAT_DTYPES):
        raise ConvertError(
            f"{adapter.weights_file}: tensor '{new.name}': dtype {new.dtype} cannot replace base tensor "
            f"'{target}' of dtype {base.dtype}"
        )
    if new.shape == base.shape:
        return
    vocab = ckpt.config.get("vocab_size")
    if len(new.shape) == 2 and new.shape[1:] == base.shape[1:] and base.shape[0] == vocab:
        config_updates["vocab_size"] = new.shape[0]
        return
    raise ConvertError(
        f"{adapter.weights_file}: tensor '{new.name}': shape mismatch: adapter has {list(new.shape)}, "
        f"base tensor '{target}' has {list(base.shape)}"
    )


def _check_dtypes(adapter: Adapter, targets: dict[str, TensorInfo]) -> None:
    """LoRA factors and the tensors they change must be floating point: anything else would merge garbage."""
    for lora in adapter.lora.values():
        for info in lora.parts.values():
            if info.dtype not in FLOAT_DTYPES:
                raise ConvertError(
                    f"{adapter.weights_file}: tensor '{info.name}': dtype {info.dtype} is not supported for LoRA "
                    f"weights (expected one of {', '.join(sorted(FLOAT_DTYPES))})"
                )
    for name, info in targets.items():
        if info.dtype not in FLOAT_DTYPES:
            raise ConvertError(
                f"{info.path}: tensor '{name}': the adapter changes it but its dtype {info.dtype} is not a "
                "floating-point type this tool can merge into"
            )
