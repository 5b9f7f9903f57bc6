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
from convert.push import HubTarget, Upload
from formats.adapter import open_adapter
from formats.checkpoint import open_checkpoint
from formats.errors import ConvertError
from formats.hf_files import copy_side_files, write_config, write_model_card
from formats.hub import fetch_adapter, open_hub_model, parse_repo_id
from formats.writer import ShardWriter, parse_size


@dataclass
class MergeResult:
    out: Path
    files: list[str]
    merged: int  # tensors changed by the adapter
    copied: int  # tensors written unchanged (byte copies and casts)
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    commit_url: str | None = None  # the Hub commit, with push_to_hub

    def summary(self) -> str:
        pushed = f", pushed {self.commit_url}" if self.commit_url else ""
        return (
            f"merged {self.merged} tensors, copied {self.copied}, wrote {human_bytes(self.bytes_written)} "
            f"to {self.out} in {self.seconds:.1f} s, peak RSS {human_bytes(self.peak_rss_bytes)}{pushed}"
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
    revision: str | None = None,
    token: str | None = None,
    keep_downloads: bool = True,
    push_to_hub: HubTarget | None = None,
) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write the result to ``out``; the CLI's ``convert merge``.

    With ``adapter=None`` the base is rewritten (resharded, or cast with ``dtype``).
    ``base`` and ``adapter`` may be Hub repo ids (``org/name``, ``org/name@revision``;
    ``revision`` applies to both otherwise): see ``formats.hub``. With ``push_to_hub``
    the output is also uploaded as it is written and committed when complete: see ``convert.push``.
    Raises ``ConvertError`` for bad input, before or while writing; ``out`` is then left untouched.
    """
    started = time.perf_counter()
    base_repo, adapter_repo = parse_repo_id(base), parse_repo_id(adapter) if adapter is not None else None
    out = Path(out)
    local = [Path(p) for p, repo in ((base, base_repo), (adapter, adapter_repo)) if p is not None and not repo]
    check_paths(local, out, overwrite)
    try:
        shard_bytes, chunk_bytes = parse_size(max_shard_size), parse_size(chunk_size)
    except ValueError as e:
        raise ConvertError(f"--max-shard-size/--chunk-size: {e}") from None
    torch_device = pick_device(device)
    hub = open_hub_model(str(base), revision, token, keep_downloads) if base_repo else None
    base = hub.directory if hub else Path(base)
    adapter_dir = Path(adapter) if adapter is not None and not adapter_repo else None
    if adapter_repo:
        adapter_dir = fetch_adapter(str(adapter), revision, token)

    ckpt = hub.checkpoint if hub else open_checkpoint(base)
    if not ckpt.config:
        raise ConvertError(f"{base / 'config.json'}: missing (not a Hugging Face model directory)")
    peft = open_adapter(adapter_dir) if adapter_dir is not None else None
    plan = build_plan(ckpt, peft, dtype)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = upload = None
    try:
        upload = Upload(push_to_hub, tmp, token) if push_to_hub else None
        on_shard = upload.file_done if upload else None
        writer = ShardWriter(tmp, [t.planned for t in plan.tensors], shard_bytes, on_shard_done=on_shard)
        total = sum(t.planned.nbytes for t in plan.tensors)
        show = not quiet and sys.stderr.isatty()
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not show, desc="merge") as bar:
            for stage in hub.stages(plan.tensors) if hub else [plan.tensors]:  # Hub: one base shard at a time
                run_plan(stage, writer, torch_device, chunk_bytes, bar.update)
        files = writer.finish()
        write_config(ckpt.config, tmp, plan.dtype, plan.config_updates)
        files += ["config.json", *copy_side_files([base, *([adapter_dir] if adapter_dir else [])], tmp)]
        if peft is not None:
            base_name = peft.config.get("base_model_name_or_path") or ""
            if hub:
                base_name = hub.repo_id
            elif not base_name or Path(base_name).is_absolute() or base_name.startswith("."):
                base_name = base.resolve().name  # a local path says nothing to readers of the card
            settings = {
                "dtype": dtype,
                "adapter r": str(peft.config.get("r")),
                "lora_alpha": str(peft.config.get("lora_alpha")),
                **({"base revision": hub.commit} if hub else {}),
                "ckpt-convert": version(),
            }
            write_model_card(tmp, base_name, adapter_repo[0] if adapter_repo else adapter_dir.resolve().name, settings)
            files.append("README.md")
        commit_url = upload.commit(files, "Upload model written by ckpt-convert") if upload else None
        publish(tmp, out)
    except BaseException:
        if writer is not None:
            writer.close()
        if upload is not None:
            upload.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if hub is not None:
            hub.close()
    merged = sum(t.delta is not None for t in plan.tensors)
    return MergeResult(
        out=out,
        files=sorted(files),
        merged=merged,
        copied=len(plan.tensors) - merged,
        bytes_written=sum((out / f).stat().st_size for f in files),
        seconds=time.perf_counter() - started,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        commit_url=commit_url,
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
