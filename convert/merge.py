"""``merge``: base model + PEFT LoRA adapter -> one Hugging Face checkpoint, streamed.

source (lazy readers) -> plan (from headers) -> transform (row chunks) -> sink
(shards written as computed), inside a temporary sibling directory that is
renamed to the output only once everything is written.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from convert.gpu_pipeline import cuda_devices, run_plan_gpu
from convert.output_dir import each, fault_point, fingerprint, open_stage
from convert.pipeline import DEFAULT_CHUNK_BYTES, run_plan
from convert.plan import build_plan
from convert.push import HubTarget, Upload
from convert.quantize import check_merge_into, merge_into_dequantized, quantize_plan, training_spec
from convert.validate import check_finite
from formats import bnb  # the module, not names: it imports convert.kernels, so may be mid-import
from formats.adapter import Adapter, open_adapter
from formats.checkpoint import INDEX_NAMES, Checkpoint, open_checkpoint
from formats.errors import ConvertError
from formats.hf_files import copy_side_files, write_config, write_model_card
from formats.hub import HubModel, fetch_adapter, open_hub_model, parse_repo_id
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
    commit_url: str | None = None  # the Hub commit, with push_to_hub

    def summary(self) -> str:
        quantized = f", quantized {self.quantized}" if self.quantized else ""
        pushed = f", pushed {self.commit_url}" if self.commit_url else ""
        return (
            f"merged {self.merged} tensors, copied {self.copied}{quantized}, wrote {human_bytes(self.bytes_written)} "
            f"to {self.out} in {self.seconds:.1f} s, peak RSS {human_bytes(self.peak_rss_bytes)}{pushed}"
        )


def human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def merge(
    base: str | os.PathLike | Checkpoint,
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
    revision: str | None = None,
    token: str | None = None,
    keep_downloads: bool = True,
    push_to_hub: HubTarget | None = None,
    resume: bool = False,
    allow_nonfinite: bool = False,
) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write the result to ``out``; the CLI's ``convert merge``.

    With ``adapter=None`` the base is rewritten (resharded, or cast with ``dtype``). ``base`` may be an
    opened ``Checkpoint`` (a training checkpoint's lazy tensors, ``convert.consolidate``).
    A bitsandbytes-quantized base is dequantized as it is read; ``quantize`` (nf4, fp4, int8)
    writes the output quantized, with the bitsandbytes settings that follow it. ``merge_into=
    "dequantized"`` adds the delta to a 16-bit base's weights rounded through the quantization a
    QLoRA adapter was trained against: ``train_quant`` (blocksize and double_quant as above) or,
    when None, what PEFT recorded in the adapter's README.md, else NF4.
    ``base`` and ``adapter`` may be Hub repo ids (``org/name``, ``org/name@revision``;
    ``revision`` applies to both otherwise): see ``formats.hub``. With ``push_to_hub``
    the output is also uploaded as it is written and committed when complete: see ``convert.push``.
    Raises ``ConvertError`` for bad input, before or while writing; ``out`` is then left untouched.
    The work happens in a locked partial sibling of ``out`` (``convert.output_dir``): after a
    crash, ``resume=True`` keeps the shards already finished. ``allow_nonfinite`` turns the
    error on NaN/Inf adapter values into a warning.
    """
    started = time.perf_counter()
    opened, base = (base, base.directory) if isinstance(base, Checkpoint) else (None, base)  # already opened source
    base_repo, adapter_repo = parse_repo_id(base), parse_repo_id(adapter) if adapter is not None else None
    out = Path(out)
    local = [Path(p) for p, repo in ((base, base_repo), (adapter, adapter_repo)) if p is not None and not repo]
    check_paths(local, out, overwrite)
    try:
        shard_bytes, chunk_bytes = parse_size(max_shard_size), parse_size(chunk_size)
    except ValueError as e:
        raise ConvertError(f"--max-shard-size/--chunk-size: {e}") from None
    if shard_bytes <= 0 or chunk_bytes <= 0:
        raise ConvertError(f"--max-shard-size {max_shard_size} / --chunk-size {chunk_size}: both must be positive")
    if train_quant is not None and merge_into != "dequantized":
        raise ConvertError("--train-quant: only used with --merge-into dequantized (it names the quantization to undo)")
    devices = cuda_devices(device) if device.startswith("cuda") else [pick_device(device)]
    torch_device = devices[0]
    hub = open_hub_model(str(base), revision, token, keep_downloads) if base_repo else None
    base = hub.directory if hub else Path(base)
    adapter_dir = Path(adapter) if adapter is not None and not adapter_repo else None
    if adapter_repo:
        adapter_dir = fetch_adapter(str(adapter), revision, token)

    ckpt = opened or (hub.checkpoint if hub else open_checkpoint(base))
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

    if peft is not None:
        check_finite(peft, allow_nonfinite)
    planned = [p for t in plan.tensors for p in t.serialized]
    options = {
        "dtype": dtype,
        "device": torch_device.type,
        "max_shard_size": shard_bytes,
        "chunk_size": chunk_bytes,
        "quantize": dataclasses.asdict(spec) if quantize else None,
        "merge_into": merge_into,
        "train_quant": dataclasses.asdict(trained) if merge_into == "dequantized" else None,
        "hub_base": hub_identity(hub),
    }
    fp = fingerprint("merge", options, input_files(ckpt, peft, hub))
    needed = sum(t.nbytes for t in planned)
    stage = open_stage(out, fp, resume=resume, overwrite=overwrite, needed_bytes=needed)
    tmp = stage.dir
    writer = upload = None
    try:
        upload = Upload(push_to_hub, tmp, token) if push_to_hub else None
        on_shard = each(stage.shard_done, upload and upload.file_done)
        writer = ShardWriter(tmp, planned, shard_bytes, on_shard, done=stage.done)
        # Resumed: tensors whose every serialized part lies in a finished shard stay as they are.
        todo = [t for t in plan.tensors if not all(p.name in writer.kept_tensors for p in t.serialized)]
        total = sum(t.planned.nbytes for t in todo)
        show = not quiet and sys.stderr.isatty()
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not show, desc="merge") as bar:

            def progress(n: int) -> None:
                bar.update(n)
                fault_point("job")

            for part in hub.stages(todo) if hub else [todo]:  # Hub: one base shard at a time
                if torch_device.type == "cuda":
                    run_plan_gpu(part, writer, devices, chunk_bytes, progress)
                else:
                    run_plan(part, writer, torch_device, chunk_bytes, progress)
        files = writer.finish()
        config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}  # plan's, if quantized
        write_config(config, tmp, plan.dtype, plan.config_updates)
        files += ["config.json", *copy_side_files([base, *([adapter_dir] if adapter_dir else [])], tmp)]
        if peft is not None or quantize is not None:
            base_name = (peft.config.get("base_model_name_or_path") or "") if peft is not None else ""
            if hub:
                base_name = hub.repo_id
            elif not base_name or Path(base_name).is_absolute() or base_name.startswith("."):
                base_name = base.resolve().name  # a local path says nothing to readers of the card
            settings = {"dtype": dtype}
            if peft is not None:
                settings |= {"adapter r": str(peft.config.get("r")), "lora_alpha": str(peft.config.get("lora_alpha"))}
            if quantize:
                settings["quantize"] = f"{quantize} (blocksize {blocksize}, double quant {double_quant})"
            if merge_into != "original":
                settings["merge into"] = merge_into
            if hub:
                settings["base revision"] = hub.commit
            settings["ckpt-convert"] = version()
            adapter_name = adapter_repo[0] if adapter_repo else adapter_dir.resolve().name if adapter_dir else None
            relation = "merge" if peft is not None else "quantized"
            write_model_card(tmp, base_name, adapter_name, settings, relation)
            files.append("README.md")
        commit_url = upload.commit(files, "Upload model written by ckpt-convert") if upload else None
        stage.publish()
    except BaseException as e:
        if writer is not None:
            writer.close()
        if upload is not None:
            upload.abort()
        stage.abort(e)
        raise
    finally:
        if hub is not None:
            hub.close()
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
        commit_url=commit_url,
    )


def check_paths(inputs: list[Path], out: Path, overwrite: bool) -> None:
    """Refuse outputs that would clobber inputs or an existing model."""
    if out.name in ("", ".", ".."):  # the partial sibling and the final rename need a named directory
        raise ConvertError(f"--out {out}: name the output directory (e.g. {Path.cwd().name}/merged), not . or ..")
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


def input_files(ckpt: Checkpoint, adapter: Adapter | None, hub: HubModel | None = None) -> list[Path]:
    """Every local input file whose bytes reach the output: what a resumed run must find unchanged.

    A Hub base is identified by its repo and commit instead (``hub_identity``): its shards come and go
    from the cache as they are downloaded and, with ``--no-keep-downloads``, deleted."""
    files = [] if hub is not None else [*ckpt.files, *(ckpt.directory / n for n in (INDEX_NAMES + ("config.json",)))]
    if adapter is not None:
        files += [adapter.weights_file, adapter.directory / "adapter_config.json", adapter.directory / "README.md"]
    return [f for f in files if f.is_file()]


def hub_identity(hub: HubModel | None) -> dict | None:
    """What a Hub base is, for the resume fingerprint: a commit is immutable."""
    return None if hub is None else {"repo": hub.repo_id, "commit": hub.commit}


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
