"""``convert loftq-init``: a 16-bit base -> a 4-bit bitsandbytes base + a LoftQ-initialized PEFT LoRA adapter.

source (``convert.plan.inputs``) -> plan (``convert.plan.loftq_plan``: roles from headers) -> transform
(``convert.execute.loftq``: one matrix at a time on the compute device) -> sinks (base shards, adapter,
optionally a 16-bit dequantized base), all inside one ``OutputJob``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from convert.devices import parse_devices
from convert.execute.loftq import run_loftq
from convert.options import LoftQOptions
from convert.output.job import OutputJob, human_bytes, option_sizes, peak_rss_bytes, version
from convert.output.ranks import output_job
from convert.output.stage import fingerprint
from convert.plan.inputs import Inputs, open_inputs
from convert.plan.loftq_plan import LoftQPlan, Settings, adapter_names, build_plan, check_settings
from formats import bnb
from formats.hf_files import write_model_card, write_model_files
from formats.writer import PlannedTensor

ADAPTER_WEIGHTS = "adapter_model.safetensors"


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


def loftq_init(base: str | os.PathLike, out: str | os.PathLike, **options) -> LoftQInitResult:
    """Write ``out/`` (4-bit base) and ``out/adapter/`` (LoRA adapter); the CLI's ``convert loftq-init``.

    ``options`` are ``convert.options.LoftQOptions``' fields. With ``save_dequantized`` also
    ``out/dequantized/``: the base with every quantized weight replaced by its dequantized 16-bit ``Q``, for
    users who quantize at load time (as the LoftQ authors publish their models). Raises ``ConvertError`` for
    bad input; ``out`` is then left untouched. The output is staged as ``merge``'s is: ``resume`` keeps the
    finished base shards of an interrupted run (LoftQ is deterministic, so the factors are recomputed to the
    same bits). ``base`` may be a Hub repo id; with ``push_to_hub`` the base shards are uploaded as they are
    finished and everything (base at the repo's root, the adapter in ``adapter/``) is committed at once.
    """
    started = time.perf_counter()
    o = LoftQOptions(**options)
    out = Path(out)
    settings = check_settings(o.bits, o.rank, o.alpha, o.iters, o.quant_type, o.svd, o.use_rslora, o.double_quant)
    inputs = open_inputs(
        base, None, out, overwrite=o.overwrite, revision=o.revision, token=o.token, keep_downloads=o.keep_downloads
    )
    try:
        shard_bytes = option_sizes(max_shard_size=o.max_shard_size)["max_shard_size"]
        device = parse_devices(o.device, several=False)[0]
        plan = build_plan(inputs.base, o.target_modules, settings)
        fields = {**dataclasses.asdict(settings), "target_modules": o.target_modules, "device": device.type}
        fields |= {"save_dequantized": o.save_dequantized, "max_shard_size": shard_bytes}
        fields["hub_base"] = inputs.identity()
        needed = sum(t.nbytes for t in plan.base + plan.adapter)
        if o.save_dequantized:
            needed += sum(t.nbytes for t in plan.order)
        with output_job(out, fingerprint("loftq-init", fields, inputs.files()), needed, o) as job:
            errors = write_tensors(job, inputs, plan, o, settings, device, shard_bytes)
            mean_error = sum(e for e, _ in errors) / max(1, len(errors))
            mean_quant = sum(q for _, q in errors) / max(1, len(errors))
            if job.lead:
                quant_config = bnb.quantization_config(settings.spec, plan.dtype)
                write_model_files(job.dir, inputs.base.config, plan.dtype, {"quantization_config": quant_config},
                                  inputs.side_sources())  # fmt: skip
                if o.save_dequantized:
                    write_model_files(job.dir / "dequantized", inputs.base.config, plan.dtype, {},
                                      inputs.side_sources())  # fmt: skip
                errors_card = (len(errors), mean_error, mean_quant)
                write_cards(job.dir, out, inputs.base_name(), o, settings, plan, errors_card)
            job.publish(None, "Upload LoftQ-initialized 4-bit base and adapter written by ckpt-convert")
    finally:
        inputs.close()
    return LoftQInitResult(
        out=out,
        initialized=len(plan.targets),
        quantized=sum(r == "quant" for r in plan.roles.values()),
        copied=sum(r == "copy" for r in plan.roles.values()),
        mean_error=mean_error,
        mean_quant_error=mean_quant,
        bytes_written=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
    )


def write_tensors(
    job: OutputJob,
    inputs: Inputs,
    plan: LoftQPlan,
    o: LoftQOptions,
    settings: Settings,
    device: torch.device,
    shard_bytes: int,
) -> list[tuple[float, float]]:
    """Write the 4-bit base, the adapter and the optional dequantized base; return each target's errors.

    Under torchrun a rank computes the tensors with a part in its own base shards (those of kept shards too:
    the adapter is written again by a resumed run), and writes the adapter factors and dequantized tensors
    of those whose weight lies in its shards, into files shared with the other ranks; the errors of every
    rank's targets come back to all, in the plan's order, so the cards say what one process would."""
    base_writer = job.shards(plan.base, shard_bytes, read_bytes=work_bytes(plan, settings), rework_kept=True)
    mine = [i for i in plan.order if not all(p in base_writer.elsewhere for p in plan.parts[i.name])]
    leads = {i.name for i in mine if plan.parts[i.name][0] not in base_writer.elsewhere}
    others = [n for weight, module in plan.targets.items() if weight not in leads for n in adapter_names(module)]
    adapter_writer = job.shards(plan.adapter, 1 << 62, "adapter", elsewhere=others)
    deq_writer = None
    if o.save_dequantized:
        deq_plan = [PlannedTensor(t.name, t.dtype, t.shape) for t in plan.order]
        deq_others = [t.name for t in plan.order if t.name not in leads]
        deq_writer = job.shards(deq_plan, shard_bytes, "dequantized", elsewhere=deq_others)
    with job.progress(len(mine), "tensor", "loftq-init") as step:
        writers = (base_writer, adapter_writer, deq_writer)
        errors = run_loftq(plan, inputs.stages(mine), writers, settings, device, step)
    base_writer.finish()
    adapter_file = adapter_writer.finish()[0]
    if deq_writer is not None:
        deq_writer.finish()
    found = {n: e for part in job.gather({n: e for n, e in errors.items() if n in leads}) for n, e in part.items()}
    if job.lead:  # once every rank's factors are in the file
        os.rename(job.dir / "adapter" / adapter_file, job.dir / "adapter" / ADAPTER_WEIGHTS)
    return [found[i.name] for i in plan.order if i.name in found]


def work_bytes(plan: LoftQPlan, settings: Settings) -> dict[str, int]:
    """What computing each base tensor costs, in bytes read, by its first 4-bit tensor: how torchrun ranks share
    the work. A LoftQ target weighs as if read again for each iteration's quantization and truncated SVD (a
    rough weight: it is compute that dominates there)."""
    weight = {"loftq": 1 + 4 * settings.iters, "quant": 2, "copy": 1}
    return {plan.parts[i.name][0]: i.nbytes * weight[plan.roles[i.name]] for i in plan.order}


def write_cards(
    out_dir: Path,
    out: Path,
    base: str,
    o: LoftQOptions,
    settings: Settings,
    plan: LoftQPlan,
    errors: tuple[int, float, float],
) -> None:
    """The adapter's config and card, and the 4-bit base's model card."""
    base_id = o.push_to_hub.repo_id if o.push_to_hub else str(out.resolve())  # where the 4-bit base will be
    write_adapter_config(out_dir / "adapter", base_id, settings, plan)
    write_adapter_card(out_dir / "adapter", base, settings, *errors)
    settings_card = {"LoftQ": f"r {o.rank}, alpha {o.alpha}, {o.iters} iterations, {o.svd} SVD"}
    write_model_card(out_dir, base, None, {**settings_card, "ckpt-convert": version()}, "quantized")


def write_adapter_config(adapter_dir: Path, base_id: str, settings: Settings, plan: LoftQPlan) -> None:
    """A PEFT LoRA adapter_config.json for the computed factors.

    ``init_lora_weights`` is ``true``, not ``"loftq"``: PEFT would run LoftQ again on the
    already-quantized base when loading (the LoftQ authors' adapters do the same); the
    initialization is recorded in the adapter's README.md.
    """
    config = {
        "peft_type": "LORA",
        "task_type": plan.task_type,
        "base_model_name_or_path": base_id,
        "r": settings.rank,
        "lora_alpha": int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha,
        "use_rslora": settings.use_rslora,
        "target_modules": target_names(sorted(plan.targets.values()), plan.linear),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "loftq_config": {},
        "modules_to_save": None,
        "inference_mode": True,
    }
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def target_names(targets: list[str], linear: list[str]) -> list[str]:
    """``target_modules`` that make PEFT wrap exactly ``targets``: their last names (``q_proj``), as people write
    them, where those match no other Linear layer and say what they are; the full module paths otherwise (a
    vision tower's ``mlp.0`` would also match the language model's ``0`` blocks)."""
    last = sorted({t.rsplit(".", 1)[-1] for t in targets})
    others = set(linear) - set(targets)
    if any(n.isdigit() for n in last) or any(m.rsplit(".", 1)[-1] in last for m in others):
        return targets
    return last


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
