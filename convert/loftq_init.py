"""``loftq-init``: a 16-bit base -> a 4-bit bitsandbytes base + a LoftQ-initialized PEFT LoRA adapter, streamed.

source (lazy reader) -> plan (roles from headers) -> transform (one matrix at a
time on the compute device) -> sinks (base shards, adapter, optionally a 16-bit
dequantized base), all inside a temporary sibling directory renamed to the output
only once complete. Host memory holds the matrix being computed and the one being
read ahead, whatever the model size.

Every linear layer is quantized as transformers' ``BitsAndBytesConfig`` would quantize
it at load time (all ``nn.Linear`` but the output head); the target layers get
``Q`` and ``A``, ``B`` from LoftQ instead of ``Q = quant(W)``, and ``Q`` is stored
bit for bit as LoftQ used it, so ``Q + scaling * B @ A`` is the approximation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from convert import architecture
from convert.kernels import quant
from convert.kernels.quant import Quantized4bit, dequantize_4bit, quantize_4bit
from convert.loftq import SVD_METHODS, loftq_matrix, lora_scaling
from convert.merge import check_paths, hub_identity, human_bytes, input_files, pick_device, version
from convert.output_dir import each, fault_point, fingerprint, open_stage
from convert.push import HubTarget, Upload
from formats import bnb
from formats.checkpoint import Checkpoint, open_checkpoint
from formats.errors import ConvertError
from formats.hf_files import copy_side_files, write_config, write_model_card
from formats.hub import open_hub_model, parse_repo_id
from formats.safetensors_file import DTYPE_NAMES, DTYPES, FLOAT_DTYPES, TensorInfo, read_tensor
from formats.writer import PlannedTensor, ShardWriter, parse_size

QUANT_TYPES = ("nf4", "fp4")
SKIP = ["lm_head"]  # what transformers keeps 16-bit (get_keys_to_not_convert), as formats.bnb records it
PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Models whose linear layers are GPT-2 ``Conv1D`` (weights stored transposed): not supported yet.
CONV1D_MODELS = {"gpt2"}


@dataclass
class LoftQInitResult:
    out: Path
    initialized: int  # target matrices given LoftQ factors
    quantized: int  # other linear weights, quantized as they are
    copied: int  # everything else, unchanged
    mean_error: float  # mean over targets of ||W - Q - s*B@A|| / ||W||
    mean_quant_error: float  # the same without the adapter (plain 4-bit)
    bytes_written: int
    seconds: float
    peak_rss_bytes: int

    def summary(self) -> str:
        return (
            f"LoftQ-initialized {self.initialized} matrices (mean relative error {self.mean_error:.4f}, "
            f"plain 4-bit {self.mean_quant_error:.4f}), quantized {self.quantized}, copied {self.copied}, "
            f"wrote {human_bytes(self.bytes_written)} to {self.out} in {self.seconds:.1f} s, "
            f"peak RSS {human_bytes(self.peak_rss_bytes)}"
        )


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


def loftq_init(
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    bits: int = 4,
    rank: int = 16,
    alpha: float = 16,
    iters: int = 5,
    target_modules: str | list[str] = "all-linear",
    quant_type: str = "nf4",
    double_quant: bool = False,
    device: str = "auto",
    svd: str = "randomized",
    use_rslora: bool = False,
    save_dequantized: bool = False,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    quiet: bool = True,
    resume: bool = False,
    revision: str | None = None,
    token: str | None = None,
    keep_downloads: bool = True,
    push_to_hub: HubTarget | None = None,
) -> LoftQInitResult:
    """Write ``out/`` (4-bit base) and ``out/adapter/`` (LoRA adapter); the CLI's ``convert loftq-init``.

    With ``save_dequantized`` also ``out/dequantized/``: the base with every quantized
    weight replaced by its dequantized 16-bit ``Q``, for users who quantize at load time
    (as the LoftQ authors publish their models). Raises ``ConvertError`` for bad input;
    ``out`` is then left untouched. The output is staged as ``merge``'s is (``convert.output_dir``):
    locked, journaled, fsynced and renamed when complete; ``resume`` keeps the finished base shards of
    an interrupted run (LoftQ is deterministic, so the factors are recomputed to the same bits).
    ``base`` may be a Hub repo id (``revision``, ``token``, ``keep_downloads`` as for ``merge``). With
    ``push_to_hub`` the base shards are uploaded as they are finished and everything (base at the
    repo's root, the adapter in ``adapter/``) is committed at once at the end.
    """
    started = time.perf_counter()
    out = Path(out)
    settings = check_settings(bits, rank, alpha, iters, quant_type, svd, use_rslora, double_quant)
    base_repo = parse_repo_id(base)
    check_paths([] if base_repo else [Path(base)], out, overwrite)
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise ConvertError(f"--max-shard-size: {e}") from None
    torch_device = pick_device(device)
    hub = open_hub_model(str(base), revision, token, keep_downloads) if base_repo else None
    base = hub.directory if hub else Path(base)
    try:
        ckpt = hub.checkpoint if hub else open_checkpoint(base)
        if not ckpt.config:
            raise ConvertError(f"{base / 'config.json'}: missing (not a Hugging Face model directory)")
        if ckpt.config.get("model_type") in CONV1D_MODELS:
            raise ConvertError(
                f"{base / 'config.json'}: model_type {ckpt.config['model_type']!r} (Conv1D layers) "
                "is not supported by loftq-init"
            )
        plan = build_plan(ckpt, select_targets(linear_weights(ckpt), target_modules, ckpt), settings)

        options = {**dataclasses.asdict(settings), "target_modules": target_modules, "device": torch_device.type}
        options |= {"save_dequantized": save_dequantized, "max_shard_size": shard_bytes}
        needed = sum(t.nbytes for t in plan.base + plan.adapter)
        if save_dequantized:
            needed += sum(t.nbytes for t in plan.order)
        options["hub_base"] = hub_identity(hub)
        fp = fingerprint("loftq-init", options, input_files(ckpt, None, hub))
        stage = open_stage(out, fp, resume=resume, overwrite=overwrite, needed_bytes=needed)
        tmp = stage.dir
        writers: list[ShardWriter] = []
        upload = None
        try:
            upload = Upload(push_to_hub, tmp, token) if push_to_hub else None

            (tmp / "adapter").mkdir(parents=True, exist_ok=True)
            on_shard = each(stage.shard_done, upload and upload.file_done)
            base_writer = ShardWriter(tmp, plan.base, shard_bytes, on_shard, done=stage.done)
            adapter_writer = ShardWriter(tmp / "adapter", plan.adapter, 1 << 62)
            writers += [base_writer, adapter_writer]
            deq_writer = None
            if save_dequantized:
                (tmp / "dequantized").mkdir(exist_ok=True)
                deq_plan = [PlannedTensor(t.name, t.dtype, t.shape) for t in plan.order]
                deq_writer = ShardWriter(tmp / "dequantized", deq_plan, shard_bytes)
                writers.append(deq_writer)
            show = not quiet and sys.stderr.isatty()
            errors: list[tuple[float, float]] = []
            with tqdm(total=len(plan.order), unit="tensor", disable=not show, desc="loftq-init") as bar:
                parts = hub.stages(plan.order) if hub else [plan.order]  # Hub: one base shard at a time
                for info, weight in (pair for part in parts for pair in stream(part, plan.roles)):
                    role = plan.roles[info.name]
                    if role == "copy":
                        for w in (base_writer, deq_writer):
                            if w is not None:
                                copy_tensor(w, info)
                    else:
                        result = process_linear(info, weight, role, settings, torch_device)
                        q = result["q"]
                        write_4bit(base_writer, info.name, q, settings.spec)
                        if role == "loftq":
                            a, b = adapter_names(plan.targets[info.name])
                            adapter_writer.write(a, result["A"].cpu())
                            adapter_writer.write(b, result["B"].cpu())
                            errors.append((result["error"], result["quant_error"]))
                        if deq_writer is not None:
                            deq_writer.write(info.name, dequantize_4bit(q, DTYPES[info.dtype]).cpu())
                    bar.update(1)
                    fault_point("job")
            base_writer.finish()
            adapter_files = adapter_writer.finish()
            os.rename(tmp / "adapter" / adapter_files[0], tmp / "adapter" / ADAPTER_WEIGHTS)
            quant_config = bnb.quantization_config(settings.spec, plan.dtype)
            write_config(ckpt.config, tmp, plan.dtype, {"quantization_config": quant_config})
            copy_side_files([base], tmp)
            if deq_writer is not None:
                deq_writer.finish()
                write_config(ckpt.config, tmp / "dequantized", plan.dtype, {})
                copy_side_files([base], tmp / "dequantized")
            base_id = push_to_hub.repo_id if push_to_hub else str(out.resolve())  # where the 4-bit base will be
            write_adapter_config(tmp / "adapter", base_id, settings, sorted(plan.targets.values()), target_modules)
            mean_error = sum(e for e, _ in errors) / max(1, len(errors))
            mean_quant = sum(q for _, q in errors) / max(1, len(errors))
            card_base = hub.repo_id if hub else base.resolve().name
            write_adapter_card(tmp / "adapter", card_base, settings, len(errors), mean_error, mean_quant)
            settings_card = {"LoftQ": f"r {rank}, alpha {alpha}, {iters} iterations, {svd} SVD"}
            write_model_card(tmp, card_base, None, {**settings_card, "ckpt-convert": version()}, "quantized")
            if upload is not None:
                names = [str(f.relative_to(tmp)) for f in sorted(tmp.rglob("*")) if f.is_file()]
                upload.commit(names, "Upload LoftQ-initialized 4-bit base and adapter written by ckpt-convert")
            stage.publish()
        except BaseException as e:
            for w in writers:
                w.close()
            if upload is not None:
                upload.abort()
            stage.abort(e)
            raise
        return LoftQInitResult(
            out=out,
            initialized=len(plan.targets),
            quantized=sum(r == "quant" for r in plan.roles.values()),
            copied=sum(r == "copy" for r in plan.roles.values()),
            mean_error=mean_error,
            mean_quant_error=mean_quant,
            bytes_written=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
            seconds=time.perf_counter() - started,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )
    finally:
        if hub is not None:
            hub.close()


@dataclass
class LoftQPlan:
    """What happens to every base tensor, and the output layouts, fixed from headers before any byte is written."""

    order: list[TensorInfo]  # base tensors in file order (sequential reads)
    roles: dict[str, str]  # name -> "loftq" (target), "quant" (other linear layer) or "copy"
    targets: dict[str, str]  # weight name -> module path, for the LoftQ targets
    base: list[PlannedTensor]  # the 4-bit base's tensors
    adapter: list[PlannedTensor]  # lora_A / lora_B of every target
    dtype: str  # the base's main float dtype: config.json's dtype and the 4-bit compute dtype


def build_plan(ckpt: Checkpoint, targets: dict[str, str], settings: Settings) -> LoftQPlan:
    linear = set(linear_weights(ckpt).values())
    roles = {n: "loftq" if n in targets else "quant" if n in linear else "copy" for n in ckpt.tensors}
    order = sorted(ckpt.tensors.values(), key=lambda t: (str(t.path), t.offset))
    base, adapter = [], []
    for info in order:
        if roles[info.name] == "loftq" and settings.rank > min(info.shape):
            raise ConvertError(
                f"{info.path}: tensor '{info.name}': --rank {settings.rank} exceeds the smaller dimension of its "
                f"shape {list(info.shape)}; choose --rank {min(info.shape)} or less, or other --target-modules"
            )
        if roles[info.name] == "copy":
            base.append(PlannedTensor(info.name, info.dtype, info.shape))
        else:
            base += bnb.serialized_tensors(info.name, info.shape, info.dtype, settings.spec)
        if roles[info.name] == "loftq":
            a, b = adapter_names(targets[info.name])
            adapter += [
                PlannedTensor(a, "F32", (settings.rank, info.shape[1])),
                PlannedTensor(b, "F32", (info.shape[0], settings.rank)),
            ]
    float_dtypes = Counter(t.dtype for t in order if t.dtype in FLOAT_DTYPES)
    dtype = float_dtypes.most_common(1)[0][0] if float_dtypes else "F32"
    return LoftQPlan(order, roles, targets, base, adapter, dtype)


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
    if quant_type not in QUANT_TYPES:
        raise ConvertError(f"--quant-type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
    if svd not in SVD_METHODS:
        raise ConvertError(f"--svd {svd!r}: expected one of {', '.join(SVD_METHODS)}")
    return Settings(rank, alpha, iters, quant_type, double_quant, svd, use_rslora)


def linear_weights(ckpt: Checkpoint) -> dict[str, str]:
    """In-memory module path (what PEFT names) -> checkpoint weight of every layer transformers'
    bitsandbytes integration quantizes (every ``nn.Linear`` but the output head), from the model's
    real module types (``convert.architecture``)."""
    linear = architecture.quantized_weights(ckpt)
    return {
        linear[name]: name
        for name, info in ckpt.tensors.items()
        if bnb.should_quantize(name, info.shape, info.dtype, SKIP, linear)
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
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def stream(order: list[TensorInfo], roles: dict[str, str]):
    """Yield (info, tensor) in file order, the next matrix read by a helper thread while this one computes.

    Copied tensors come with ``None``: the writer copies them file-to-file."""
    with ThreadPoolExecutor(1, thread_name_prefix="loftq-read") as pool:
        pending: deque[tuple[TensorInfo, Future | None]] = deque()
        for info in order:
            pending.append((info, pool.submit(read_tensor, info) if roles[info.name] != "copy" else None))
            # Hand out the first tensor once the next matrix's read is under way (copies need no read).
            while pending and (pending[0][1] is None or any(f is not None for _, f in list(pending)[1:])):
                first, future = pending.popleft()
                yield first, future.result() if future is not None else None
        for first, future in pending:
            yield first, future.result() if future is not None else None


def process_linear(info: TensorInfo, weight: torch.Tensor, role: str, settings: Settings, device: torch.device) -> dict:
    """Q (and A, B with their errors for a LoftQ target) of one linear weight, on ``device``."""
    w = weight.to(device, DTYPES[info.dtype])  # an LLM.int8 base reads as fp32: back to the model's dtype
    if role == "quant":
        return {"q": quantize_4bit(w, settings.spec.blocksize, settings.quant_type, settings.double_quant)}
    try:
        result = loftq_matrix(
            w,
            rank=settings.rank,
            scaling=settings.scaling,
            iters=settings.iters,
            quant_type=settings.quant_type,
            blocksize=settings.spec.blocksize,
            double_quant=settings.double_quant,
            svd=settings.svd,
        )
    except torch.linalg.LinAlgError as e:
        raise ConvertError(f"{info.path}: tensor '{info.name}': SVD failed ({e}); is the weight finite?") from None
    return {
        "q": result.quantized,
        "A": result.A,
        "B": result.B,
        "error": result.error,
        "quant_error": result.quant_error,
    }


def copy_tensor(writer: ShardWriter, info: TensorInfo) -> None:
    """An untouched tensor: file to file, or from the mapped ``.bin`` tensor."""
    if info.mapped is None:
        writer.copy(info.name, info)
    else:
        writer.write(info.name, read_tensor(info))


def write_4bit(writer: ShardWriter, name: str, q: Quantized4bit, spec: bnb.QuantSpec) -> None:
    """Write an already quantized weight into the tensors ``bnb.serialized_tensors`` planned for it.

    (``bnb.StreamingQuantizer`` quantizes rows itself; LoftQ's Q comes from its own last
    residual, so it is written as computed.)"""
    writer.write(name, q.packed.cpu())
    writer.write(name + ".absmax", q.absmax.cpu())
    writer.write(name + ".quant_map", bnb.codes(spec.method))
    if q.nested_absmax is not None:
        writer.write(name + ".nested_absmax", q.nested_absmax.cpu())
        writer.write(name + ".nested_quant_map", quant.DYNAMIC_CODE)
    blob = bnb.quant_state_blob(q.shape, DTYPE_NAMES[q.dtype], spec, q.offset)
    writer.write(name + bnb.BLOB + spec.method, torch.frombuffer(bytearray(blob), dtype=torch.uint8))


def write_adapter_config(
    adapter_dir: Path, base_id: str, settings: Settings, modules: list[str], spec: str | list[str]
) -> None:
    """A PEFT LoRA adapter_config.json for the computed factors.

    ``init_lora_weights`` is ``true``, not ``"loftq"``: PEFT would run LoftQ again on the
    already-quantized base when loading (the LoftQ authors' adapters do the same); the
    initialization is recorded in the adapter's README.md.
    """
    if spec == "all-linear" or spec == ["all-linear"]:
        names = sorted({m.rsplit(".", 1)[-1] for m in modules})
    else:
        names = sorted([spec] if isinstance(spec, str) else spec)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_id,
        "r": settings.rank,
        "lora_alpha": int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha,
        "use_rslora": settings.use_rslora,
        "target_modules": names,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "loftq_config": {},
        "modules_to_save": None,
        "inference_mode": True,
    }
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_adapter_card(
    adapter_dir: Path, base: str, settings: Settings, count: int, error: float, quant_error: float
) -> None:
    lines = [
        "---",
        "library_name: peft",
        "tags:",
        "- loftq",
        "- lora",
        "---",
        "",
        "# LoftQ-initialized LoRA adapter",
        "",
        f"LoRA factors initialized with LoftQ by ckpt-convert (`convert loftq-init`) from `{base}`,",
        "for the 4-bit base in the parent directory: for every target weight W, `Q + scaling * B @ A`",
        "approximates W, where Q is the stored 4-bit weight.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| init | `loftq` ({settings.iters} iterations, {settings.svd} SVD) |",
        f"| bits / quant type | `4` / `{settings.quant_type}`{' + double quant' if settings.double_quant else ''} |",
        f"| r / lora_alpha / rslora | `{settings.rank}` / `{settings.alpha}` / `{settings.use_rslora}` |",
        f"| target matrices | {count} |",
        f"| mean relative error ‖W − Q − s·BA‖/‖W‖ | {error:.5f} (plain 4-bit: {quant_error:.5f}) |",
        f"| ckpt-convert | `{version()}` |",
        "",
    ]
    (adapter_dir / "README.md").write_text("\n".join(lines))
