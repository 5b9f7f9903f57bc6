"""``consolidate``: a training run's partitioned checkpoint -> one Hugging Face checkpoint, streamed.

A source in ``formats`` (``dcp``, ``zero3``, ``litgpt``) opens the run's rank files as
a ``Checkpoint`` whose tensors are lazy (each one's ``reader`` preads just the rows
asked for from the files that hold them). That checkpoint then goes through the merge
path as its base, with no adapter: the same plan, workers, shard writer, crash-safe
partial directory, ``--resume`` and Hub push as ``convert merge``, and host memory
at a few row chunks, never the model.

A run of a PEFT model (LoRA, DoRA) holds the base and the adapter under PEFT's live
names (``formats.peft_names``): the adapter is written as PEFT saves it
(``adapter_config.json`` from the run + ``adapter_model.safetensors``), alone with
``adapter_only``, else merged by ``convert merge`` into the run's own base weights or
into ``base``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file

from convert.commands.merge import MergeResult, merge
from convert.options import MergeOptions
from convert.output.ranks import current, output_job
from convert.output.stage import fingerprint
from convert.plan.inputs import check_paths
from formats import litgpt
from formats.checkpoint import Checkpoint, read_json
from formats.dcp import open_dcp
from formats.errors import ConvertError
from formats.peft_names import is_peft, split_peft
from formats.safetensors_file import read_tensor
from formats.zero3 import open_zero3

SOURCES: dict[str, Callable[[Path], Checkpoint]] = {
    "dcp": open_dcp,
    "deepspeed": open_zero3,
    "litgpt": litgpt.open_litgpt,
}


def open_source(source: str, checkpoint_dir: str | os.PathLike) -> Checkpoint:
    """The training checkpoint at ``checkpoint_dir``, written by ``source`` (a key of ``SOURCES``)."""
    opener = SOURCES.get(source)
    if opener is None:
        raise ConvertError(f"--from {source!r}: expected one of {', '.join(SOURCES)}")
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise ConvertError(f"{directory}: checkpoint directory does not exist")
    ckpt = opener(directory)
    if not ckpt.config:
        raise ConvertError(
            f"{directory}: no config.json beside the checkpoint or in the directory above it "
            "(put the model's Hugging Face config.json there)"
        )
    return ckpt


def consolidate(
    source: str,
    checkpoint_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    adapter_only: bool = False,
    base: str | os.PathLike | None = None,
    **options,
) -> MergeResult | Path:
    """Write the model of the training checkpoint at ``checkpoint_dir`` to ``out`` as Hugging Face safetensors
    shards; the CLI's ``convert consolidate --from SOURCE``. ``options`` are ``convert.options.MergeOptions``'
    fields (``dtype``, ``max_shard_size``, ``resume``, ``push_to_hub``, ...). A PEFT run's adapter is merged into
    the run's own base weights, or into ``base`` (a model directory or Hub id); ``adapter_only`` writes the adapter
    itself to ``out`` instead (returns ``out``). Raises ``ConvertError`` for bad input, ``out`` then untouched;
    ``resume`` keeps the shards an interrupted run of the same command finished."""
    opts = MergeOptions(**options)
    ckpt = open_source(source, checkpoint_dir)
    if not is_peft(ckpt.tensors):
        if adapter_only or base is not None:
            raise ConvertError(f"{checkpoint_dir}: --adapter-only/--base: this checkpoint holds no LoRA adapter")
        return merge(ckpt, None, out, **options)
    base_tensors, lora = split_peft(ckpt.tensors, str(checkpoint_dir))
    if source == "litgpt":  # LitGPT saves no PEFT config: its LoRA settings, as PEFT's
        targets = {n.partition(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
        config = litgpt.adapter_config(Path(checkpoint_dir), sorted(targets))
    else:
        config = adapter_config(ckpt, Path(checkpoint_dir))
    out = Path(out)
    if adapter_only:
        if opts.push_to_hub is not None:
            raise ConvertError("--push-to-hub: not supported with --adapter-only (push the adapter directory instead)")
        check_paths([ckpt.directory, Path(checkpoint_dir)], out, opts.overwrite)
        with output_job(out, fingerprint("consolidate-adapter", {}, ckpt.files), 0, opts) as job:
            if job.lead:
                write_adapter(job.dir, config, lora)
            job.publish(None, "")
        return out
    adapter_dir = out.parent / f".{out.name}.adapter"  # stable, so that a resumed merge finds the same input

    def stage_adapter() -> None:
        if not (opts.resume and (adapter_dir / "adapter_model.safetensors").is_file()):
            shutil.rmtree(adapter_dir, ignore_errors=True)
            adapter_dir.mkdir(parents=True)
            write_adapter(adapter_dir, config, lora)

    ranks = current(opts.device)
    if ranks is None:
        stage_adapter()
    else:  # torchrun: rank 0 writes the adapter every rank then reads
        ranks.lead_first(stage_adapter, out)
    run_base = dataclasses.replace(ckpt, tensors=base_tensors)
    try:
        result = merge(run_base if base is None else base, adapter_dir, out, **options)
    except ConvertError:  # bad input: nothing to resume (a crash keeps the adapter for --resume)
        shutil.rmtree(adapter_dir, ignore_errors=True)
        raise
    shutil.rmtree(adapter_dir, ignore_errors=True)
    return result


def adapter_config(ckpt: Checkpoint, checkpoint_dir: Path) -> dict:
    """The ``adapter_config.json`` PEFT saved beside the run's checkpoint (Trainer's ``checkpoint-N``)."""
    for d in (checkpoint_dir, ckpt.directory, checkpoint_dir.parent):
        if (d / "adapter_config.json").is_file():
            return read_json(d / "adapter_config.json")
    raise ConvertError(
        f"{checkpoint_dir}: holds a PEFT model but no adapter_config.json beside it "
        "(save it with peft_model.peft_config['default'].save_pretrained(dir))"
    )


def write_adapter(directory: Path, config: dict, tensors: dict) -> None:
    """A PEFT adapter directory. LoRA factors are small (rank x width): they are read whole."""
    save_file(
        {n: read_tensor(t) for n, t in tensors.items()}, directory / "adapter_model.safetensors", {"format": "pt"}
    )
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
