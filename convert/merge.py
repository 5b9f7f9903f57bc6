"""``merge``: base model + PEFT LoRA adapter -> one Hugging Face checkpoint, streamed.

source (lazy readers) -> plan (from headers) -> transform (row chunks) -> sink
(shards written as computed), inside a temporary sibling directory that is
renamed to the output only once everything is written.
"""

from __future__ import annotations

import importlib.metadata
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from convert.pipeline import DEFAULT_CHUNK_BYTES, run_plan
from convert.plan import build_plan
from convert.quantize import check_merge_into, merge_into_dequantized, quantize_plan, training_spec
from formats import bnb  # the module, not names: it imports convert.kernels, so may be mid-import
from formats.adapter import open_adapter
from formats.checkpoint import open_checkpoint
from formats.errors import ConvertError
from formats.hf_files import copy_side_files, write_config, write_model_card
from formats.writer import ShardWriter, parse_size


@dataclass
class MergeResult:
    out: Path
    files: list[str]
    merged: int  # tensors changed by the adapter
    copied: int  # tensors written unchanged (byte copies and casts), not quantized
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    quantized: int = 0  # tensors written bitsandbytes-quantized (merged or not)

    def summary(self) -> str:
        quantized = f", quantized {self.quantized}" if self.quantized else ""
        return (
            f"merged {self.merged} tensors, copied {self.copied}{quantized}, wrote {human_bytes(self.bytes_written)} "
            f"to {self.out} in {self.seconds:.1f} s, peak RSS {human_bytes(self.peak_rss_bytes)}"
        )


def human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def merge(
    base: str | os.PathLike,
    adapter: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    dtype: str = "auto",
    device: str = "auto",
    max_shard_size: int | str = "5GB",
    chunk_size: int | str = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    quiet: bool = True,
    quantize: str | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    quant_storage: str = "uint8",
    compute_dtype: str = "auto",
    skip_modules: tuple[str, ...] = (),
    merge_into: str = "original",
    train_quant: str | None = None,
) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write the result to ``out``; the CLI's ``convert merge``.

    With ``adapter=None`` the base is rewritten (resharded, or cast with ``dtype``).
    A bitsandbytes-quantized base is dequantized as it is read; ``quantize`` (nf4, fp4, int8)
    writes the output quantized, with the bitsandbytes settings that follow it. ``merge_into=
    "dequantized"`` adds the delta to a 16-bit base's weights rounded through the quantization a
    QLoRA adapter was trained against: ``train_quant`` (blocksize and double_quant as above) or,
    when None, what PEFT recorded in the adapter's README.md, else NF4.
    Raises ``ConvertError`` for bad input, before or while writing; ``out`` is then left untouched.
    """
    started = time.perf_counter()
    base, out = Path(base), Path(out)
    adapter_dir = Path(adapter) if adapter is not None else None
    check_paths([p for p in (base, adapter_dir) if p is not None], out, overwrite)
    try:
        shard_bytes, chunk_bytes = parse_size(max_shard_size), parse_size(chunk_size)
    except ValueError as e:
        raise ConvertError(f"--max-shard-size/--chunk-size: {e}") from None
    torch_device = pick_device(device)

    ckpt = open_checkpoint(base)
    if not ckpt.config:
        raise ConvertError(f"{base / 'config.json'}: missing (not a Hugging Face model directory)")
    peft = open_adapter(adapter_dir) if adapter_dir is not None else None
    plan = build_plan(ckpt, peft, dtype)
    check_merge_into(merge_into)
    spec = bnb.QuantSpec(quantize or "nf4", blocksize, double_quant, quant_storage, compute_dtype, (*skip_modules,))
    if merge_into == "dequantized":
        trained = training_spec(spec, train_quant, adapter_dir)
        plan = merge_into_dequantized(plan, trained, ckpt.config, torch_device)
    if quantize is not None:
        plan = quantize_plan(plan, spec, ckpt.config)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = None
    try:
        writer = ShardWriter(tmp, [p for t in plan.tensors for p in t.serialized], shard_bytes)
        total = sum(t.planned.nbytes for t in plan.tensors)
        show = not quiet and sys.stderr.isatty()
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not show, desc="merge") as bar:
            run_plan(plan.tensors, writer, torch_device, chunk_bytes, bar.update)
        files = writer.finish()
        config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}  # plan's, if quantized
        write_config(config, tmp, plan.dtype, plan.config_updates)
        files += ["config.json", *copy_side_files([base, *([adapter_dir] if adapter_dir else [])], tmp)]
        if peft is not None:
            base_name = peft.config.get("base_model_name_or_path") or ""
            if not base_name or Path(base_name).is_absolute() or base_name.startswith("."):
                base_name = base.resolve().name  # a local path says nothing to readers of the card
            settings = {
                "dtype": dtype,
                "adapter r": str(peft.config.get("r")),
                "lora_alpha": str(peft.config.get("lora_alpha")),
                "ckpt-convert": version(),
            }
            write_model_card(tmp, base_name, adapter_dir.resolve().name, settings)
            files.append("README.md")
        publish(tmp, out)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    merged = sum(t.delta is not None for t in plan.tensors)
    return MergeResult(
        out=out,
        files=sorted(files),
        merged=merged,
        copied=sum(t.delta is None and t.quant is None for t in plan.tensors),
        bytes_written=sum((out / f).stat().st_size for f in files),
        seconds=time.perf_counter() - started,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        quantized=sum(t.quant is not None for t in plan.tensors),
    )


def check_paths(inputs: list[Path], out: Path, overwrite: bool) -> None:
    """Refuse outputs that would clobber inputs or an existing model."""
    out_r = out.resolve()
    for path in inputs:
        p = path.resolve()
        if out_r == p or p in out_r.parents:
            raise ConvertError(f"{out}: output directory is inside input directory {path}; choose another --out")
        if out_r in p.parents:
            raise ConvertError(f"{out}: output directory contains input directory {path}; choose another --out")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"{out}: exists and is not empty (pass --overwrite to replace it)")


def publish(tmp: Path, out: Path) -> None:
    """Move the finished directory into place; an old output is removed only after that succeeded."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def version() -> str:
    try:
        return importlib.metadata.version("ckpt-convert")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConvertError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConvertError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ConvertError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    return dev
