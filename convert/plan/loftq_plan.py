"""The LoftQ-init plan: what happens to every base tensor, fixed from headers before any byte is written.

Every Linear layer is quantized as transformers' ``BitsAndBytesConfig`` would quantize it at load time
(all ``nn.Linear`` but the output head); the target layers (PEFT's name matching) get LoftQ's ``Q`` and
LoRA factors instead of ``Q = quant(W)``; everything else is copied.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from convert.options import SVD_METHODS
from convert.plan import architecture
from convert.plan.lora import lora_scaling
from convert.plan.quantize import should_quantize
from formats import bnb
from formats.adapter import PREFIX
from formats.checkpoint import Checkpoint
from formats.errors import ConvertError
from formats.safetensors_file import FLOAT_DTYPES, TensorInfo
from formats.writer import PlannedTensor

SKIP = ["lm_head"]  # what transformers keeps 16-bit (get_keys_to_not_convert), as formats.bnb records it


@dataclass(frozen=True)
class Settings:
    rank: int
    alpha: float
    iters: int
    quant_type: str
    double_quant: bool
    svd: str
    use_rslora: bool

    @property
    def scaling(self) -> float:
        return lora_scaling(self.rank, self.alpha, self.use_rslora)

    @property
    def spec(self) -> bnb.QuantSpec:
        """The 4-bit layout: blocks of 64 (bitsandbytes' Params4bit default, which transformers uses), uint8 storage."""
        return bnb.QuantSpec(self.quant_type, double_quant=self.double_quant, skip_modules=tuple(SKIP))


@dataclass
class LoftQPlan:
    """What happens to every base tensor, and the output layouts, fixed from headers before any byte is written."""

    order: list[TensorInfo]  # base tensors in file order (sequential reads)
    roles: dict[str, str]  # name -> "loftq" (target), "quant" (other linear layer) or "copy"
    targets: dict[str, str]  # weight name -> module path, for the LoftQ targets
    base: list[PlannedTensor]  # the 4-bit base's tensors
    adapter: list[PlannedTensor]  # lora_A / lora_B of every target
    dtype: str  # the base's main float dtype: config.json's dtype and the 4-bit compute dtype
    linear: list[str]  # in-memory path of every quantized Linear module (targets or not)
    task_type: str | None  # PEFT's task type for the model class (None: a plain PeftModel)
    parts: dict[str, list[str]]  # base tensor -> the 4-bit base's tensors it is written as (first: the weight)


def build_plan(ckpt: Checkpoint, target_modules: str | list[str], settings: Settings) -> LoftQPlan:
    bnb.check_not_conv1d(ckpt.config, ckpt.directory / "config.json")
    linear_by_module = linear_weights(ckpt)
    targets = select_targets(linear_by_module, target_modules, ckpt)
    linear = set(linear_by_module.values())
    roles = {n: "loftq" if n in targets else "quant" if n in linear else "copy" for n in ckpt.tensors}
    order = sorted(ckpt.tensors.values(), key=lambda t: (str(t.path), t.offset))
    base, adapter, parts = [], [], {}
    for info in order:
        if roles[info.name] == "loftq" and settings.rank > min(info.shape):
            raise ConvertError(
                f"{info.path}: tensor '{info.name}': --rank {settings.rank} exceeds the smaller dimension of its "
                f"shape {list(info.shape)}; choose --rank {min(info.shape)} or less, or other --target-modules"
            )
        if roles[info.name] == "copy":
            written = [PlannedTensor(info.name, info.dtype, info.shape)]
        else:
            written = bnb.serialized_tensors(info.name, info.shape, info.dtype, settings.spec)
        base += written
        parts[info.name] = [t.name for t in written]
        if roles[info.name] == "loftq":
            a, b = adapter_names(targets[info.name])
            adapter += [
                PlannedTensor(a, "F32", (settings.rank, info.shape[1])),
                PlannedTensor(b, "F32", (info.shape[0], settings.rank)),
            ]
    float_dtypes = Counter(t.dtype for t in order if t.dtype in FLOAT_DTYPES)
    dtype = float_dtypes.most_common(1)[0][0] if float_dtypes else "F32"
    task = architecture.peft_task_type(architecture.for_checkpoint(ckpt))
    return LoftQPlan(order, roles, targets, base, adapter, dtype, sorted(linear_by_module), task, parts)


def check_settings(
    bits: int, rank: int, alpha: float, iters: int, quant_type: str, svd: str, use_rslora: bool, double_quant: bool
) -> Settings:
    if bits == 8:
        raise ConvertError(
            "--bits 8: not supported: LLM.int8 layers (transformers' load_in_8bit) keep outliers in 16 bits at run "
            "time, so no stored Q is what the layer computes with; use --bits 4"
        )
    if bits != 4:
        raise ConvertError(f"--bits {bits}: expected 4")
    if rank < 1 or iters < 1 or not alpha > 0:
        raise ConvertError(f"--rank {rank} / --iters {iters} / --alpha {alpha}: rank and iters must be >= 1, alpha > 0")
    if quant_type not in bnb.QUANT_TYPES:
        raise ConvertError(f"--quant-type {quant_type!r}: expected one of {', '.join(bnb.QUANT_TYPES)}")
    if svd not in SVD_METHODS:
        raise ConvertError(f"--svd {svd!r}: expected one of {', '.join(SVD_METHODS)}")
    return Settings(rank, alpha, iters, quant_type, double_quant, svd, use_rslora)


def linear_weights(ckpt: Checkpoint) -> dict[str, str]:
    """In-memory module path (what PEFT names) -> checkpoint weight of every layer transformers'
    bitsandbytes integration quantizes (every ``nn.Linear`` but the output head), from the model's
    real module types (``convert.plan.architecture``)."""
    linear = architecture.quantized_weights(ckpt)
    return {
        linear[name]: name
        for name, info in ckpt.tensors.items()
        if should_quantize(name, info.shape, info.dtype, SKIP, linear)
    }


def select_targets(linear: dict[str, str], spec: str | list[str], ckpt: Checkpoint) -> dict[str, str]:
    """Weight name -> module path of the layers LoftQ initializes, matched by PEFT's rule for a list of
    names (the module path ends with ``.name``); ``all-linear`` is every quantized linear layer."""
    if spec == "all-linear" or spec == ["all-linear"]:
        return {weight: module for module, weight in linear.items()}
    keys = [spec] if isinstance(spec, str) else list(spec)
    chosen = {}
    for key in keys:
        hits = [m for m in linear if m == key or m.endswith("." + key)]
        if not hits:
            others = [n for n in ckpt.tensors if n.removesuffix(".weight").endswith("." + key)]
            what = f"'{others[0]}' is not a quantized linear layer" if others else "matches no module"
            raise ConvertError(f"{ckpt.directory}: --target-modules {key!r}: {what}")
        chosen.update({linear[m]: m for m in hits})
    return chosen


def adapter_names(module: str) -> tuple[str, str]:
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
