"""``convert merge`` (and ``convert quantize``): base model + PEFT LoRA adapter -> one Hugging Face checkpoint.

source (``convert.plan.inputs``: lazy readers) -> plan (``convert.plan.merge_plan``: from headers) ->
transform (``convert.execute``: row chunks, on the CPU workers or the GPUs) -> sink (shards written as
computed) inside an ``OutputJob``, which renames the output into place only once everything is written.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from convert.clock import Phases
from convert.devices import parse_devices
from convert.execute.cpu import run_plan
from convert.execute.gpu import run_plan_gpu
from convert.options import FORMAT_METHODS, MergeOptions
from convert.output.job import human_bytes, option_sizes, peak_rss_bytes, version
from convert.output.ranks import output_job
from convert.output.stage import fingerprint
from convert.plan.build import Plan
from convert.plan.inputs import Inputs, open_inputs
from convert.plan.merge_plan import merge_plan
from formats.hf_files import write_model_card, write_model_files


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


def merge(
    base: str | os.PathLike, adapter: str | os.PathLike | None, out: str | os.PathLike, **options
) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write the result to ``out``; the CLI's ``convert merge``.

    ``options`` are ``convert.options.MergeOptions``' fields, named like the CLI's flags. With ``adapter=None``
    the base is rewritten (resharded, or cast with ``dtype``). A bitsandbytes-quantized base is dequantized
    as it is read; ``quantize`` (nf4, fp4, int8) writes the output quantized. ``merge_into="dequantized"``
    adds the delta to a 16-bit base's weights rounded through the quantization a QLoRA adapter was trained
    against (``train_quant``, else what PEFT recorded in the adapter's README.md, else NF4). ``base`` and
    ``adapter`` may be Hub repo ids (``org/name``, ``org/name@revision``); ``push_to_hub`` (a ``HubTarget``)
    uploads the output as it is written and commits it when complete. Raises ``ConvertError`` for bad input,
    before or while writing; ``out`` is then left untouched. After a crash, ``resume=True`` keeps the shards
    already finished.
    """
    started = time.perf_counter()
    phases = Phases()
    opts = MergeOptions(**options)
    out = Path(out)
    inputs = open_inputs(
        base, adapter, out, overwrite=opts.overwrite, revision=opts.revision, token=opts.token,
        keep_downloads=opts.keep_downloads,
    )  # fmt: skip
    phases.mark("inputs")
    try:
        sizes = option_sizes(max_shard_size=opts.max_shard_size, chunk_size=opts.chunk_size)
        devices = parse_devices(opts.device)
        plan, settings = merge_plan(inputs, opts, devices[0])
        settings |= {"device": devices[0].type, **sizes, "hub_base": inputs.identity()}
        planned = [p for t in plan.tensors for p in t.serialized]
        phases.mark("plan")
        fp = fingerprint("merge", settings, inputs.files())
        with output_job(out, fp, sum(t.nbytes for t in planned), opts) as job:
            writer = job.shards(planned, sizes["max_shard_size"], read_bytes=read_bytes(plan))
            # Resumed: tensors whose every serialized part lies in a finished shard stay as they are (so do
            # those in the shards of other torchrun ranks).
            todo = [t for t in plan.tensors if not all(p.name in writer.kept_tensors for p in t.serialized)]
            phases.mark("output shards")
            with job.progress(sum(t.planned.nbytes for t in todo), "B", "merge") as step:
                for part in inputs.stages(todo):  # Hub: one base shard at a time
                    if devices[0].type == "cuda":
                        run_plan_gpu(part, writer, devices, sizes["chunk_size"], step)
                    else:
                        run_plan(part, writer, devices[0], sizes["chunk_size"], step)
            phases.mark("tensors")
            files = writer.finish()
            phases.mark("finish shards")
            if job.lead:
                files += write_side_files(job.dir, inputs, opts, plan)
            commit_url = job.publish(files, "Upload model written by ckpt-convert")
        phases.mark("side files, publish")
    finally:
        inputs.close()
    phases.report()
    return result(out, sorted(files), plan, started, commit_url)


def write_side_files(directory: Path, inputs: Inputs, opts: MergeOptions, plan: Plan) -> list[str]:
    """config.json (the plan's quantization_config, if any), generation and tokenizer files, the model card."""
    config = {k: v for k, v in inputs.base.config.items() if k != "quantization_config"}
    files = write_model_files(directory, config, plan.dtype, plan.config_updates, inputs.side_sources())
    if inputs.adapter is not None or opts.quantize is not None:
        write_model_card(directory, *card(inputs, opts))
        files.append("README.md")
    return files


def read_bytes(plan: Plan) -> dict[str, int]:
    """What computing each output tensor reads, by its first serialized tensor: how torchrun ranks share the work."""
    return {t.serialized[0].name: t.source.nbytes for t in plan.tensors}


def card(inputs: Inputs, opts: MergeOptions) -> tuple[str, str | None, dict[str, str], str]:
    """What the model card says: base, adapter, the settings that made the output, and the relation."""
    settings = {"dtype": opts.dtype}
    if inputs.adapter is not None:
        config = inputs.adapter.config
        settings |= {"adapter r": str(config.get("r")), "lora_alpha": str(config.get("lora_alpha"))}
    if opts.quantize in FORMAT_METHODS:
        settings["quantize"] = opts.quantize
    elif opts.quantize:
        settings["quantize"] = f"{opts.quantize} (blocksize {opts.blocksize}, double quant {opts.double_quant})"
    if opts.merge_into != "original":
        settings["merge into"] = opts.merge_into
    if inputs.hub:
        settings["base revision"] = inputs.hub.commit
    settings["ckpt-convert"] = version()
    relation = "merge" if inputs.adapter is not None else "quantized"
    return inputs.base_name(), inputs.adapter_name(), settings, relation


def result(out: Path, files: list[str], plan: Plan, started: float, commit_url: str | None) -> MergeResult:
    return MergeResult(
        out=out,
        files=files,
        merged=sum(t.delta is not None for t in plan.tensors),
        copied=sum(t.delta is None and t.quant is None for t in plan.tensors),
        bytes_written=sum((out / f).stat().st_size for f in files),
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        quantized=sum(t.quant is not None for t in plan.tensors),
        commit_url=commit_url,
    )
