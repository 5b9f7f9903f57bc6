"""The ``convert`` command line: flags -> options (``convert.options``) -> one command function each.

Importing this module imports click and nothing heavy: the group's callback starts the base's read-ahead
(``convert.readahead``) and only then does a command import torch and the pipeline, so the disk works while
Python imports. Bad input (``ConvertError``) ends every command the same way: one line, exit status 2.
"""

from __future__ import annotations

import json
import os
import sys

import click

from convert import readahead, startup
from convert.cli_options import defaulted, hub_options, quantization_options, stacked
from convert.options import (
    DEFAULT_CHUNK_BYTES,
    MERGE_INTO,
    SVD_METHODS,
    TRAINING_SOURCES,
    LoftQOptions,
    MergeOptions,
    OutputOptions,
    VerifyOptions,
)
from formats.bnb_names import METHODS, QUANT_TYPES
from formats.dtypes import OUTPUT_DTYPES
from formats.errors import ConvertError

HEAVY_COMMANDS = {"merge", "quantize", "loftq-init", "consolidate"}  # those that import torch and compute


class Commands(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            result = super().invoke(ctx)
        except ConvertError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        if ctx.invoked_subcommand in HEAVY_COMMANDS:
            startup.record()  # what this environment loads, warmed by the next run's start-up
        return result


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckpt-convert")
def main() -> None:
    """Turn base model + adapter into one checkpoint, streamed, in bounded memory."""
    # As `convert merge` / `python -m convert.cli merge`: read what the process will import, and the base, into
    # the page cache while Python is still starting.
    if any(arg in HEAVY_COMMANDS for arg in sys.argv[1:2]):
        readahead.start_for_command_line(sys.argv, getattr(sys, "orig_argv", []), files=startup.profiled_files())


def output_options(command):
    """Where a command computes and how it writes its output: the options of every command that writes a model."""
    return hub_options(
        stacked(
            command,
            [
                defaulted(
                    "--device",
                    OutputOptions,
                    "Where to compute; auto uses CUDA when available. Several GPUs (merge) share the adapted tensors.",
                    metavar="auto|cpu|cuda|cuda:N|cuda:0,cuda:1|cuda:all",
                ),
                defaulted(
                    "--max-shard-size",
                    OutputOptions,
                    "Largest output shard, parsed as transformers does (5GB = 5e9 bytes, 2GiB = 2**31).",
                    metavar="SIZE",
                ),
                click.option("--overwrite", is_flag=True, help="Replace OUT if not empty (once the new one is done)."),
                click.option("--resume", is_flag=True, help="Continue the interrupted run of this command on OUT."),
                click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line."),
            ],
        )
    )


def merge_options(command):
    """The options of merge and quantize beside the output's."""
    options = [
        click.option("--out", required=True, metavar="DIR", help="Output directory, renamed into place when complete."),
        click.option(
            "--chunk-size",
            default=f"{DEFAULT_CHUNK_BYTES >> 20}MiB",
            show_default=True,
            metavar="SIZE",
            help="Memory budget of one row chunk in fp32; larger tensors are processed in row chunks.",
        ),
    ]
    return output_options(quantization_options(stacked(command, options)))


def report(result, quiet: bool) -> None:
    if not quiet and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        click.echo(result.summary())


@main.command("merge")
@click.option(
    "--base",
    required=True,
    metavar="DIR",
    help="Base model directory (model.safetensors, sharded safetensors + index, or pytorch_model*.bin), "
    "or a Hub repo id org/name.",
)
@click.option(
    "--adapter",
    metavar="DIR",
    help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors or .bin) or Hub repo id. "
    "Without it the base is only rewritten (resharded or cast).",
)
@defaulted(
    "--dtype",
    MergeOptions,
    "Dtype of floating-point output tensors; auto keeps the base's dtype.",
    type=click.Choice(list(OUTPUT_DTYPES)),
)
@defaulted(
    "--merge-into",
    MergeOptions,
    "dequantized: add the delta to each Linear weight of a 16-bit base rounded through --train-quant "
    "(what a QLoRA adapter was trained against); original: to the 16-bit weights as they are.",
    type=click.Choice(MERGE_INTO),
)
@click.option(
    "--train-quant",
    type=click.Choice(METHODS),
    help="Quantization the adapter was trained through, for --merge-into dequantized (with --blocksize and "
    "--double-quant). Default: the config PEFT recorded in the adapter's README.md, else nf4.",
)
@click.option(
    "--allow-nonfinite", is_flag=True, help="Merge an adapter holding NaN/Inf values, with a warning, not an error."
)
@merge_options
def merge_command(base, adapter, out, **options) -> None:
    """Merge a LoRA adapter into its base model, as PEFT's merge_and_unload would."""
    from convert.commands.merge import merge

    report(merge(base, adapter, out, **options), options["quiet"])


@main.command("quantize")
@click.option("--base", required=True, metavar="DIR", help="16-bit (or bitsandbytes) model directory or Hub repo id.")
@merge_options
def quantize_command(base, out, quantize, **options) -> None:
    """Write a bitsandbytes-quantized checkpoint of a model (merge --quantize without an adapter)."""
    from convert.commands.merge import merge

    report(merge(base, None, out, quantize=quantize or "nf4", **options), options["quiet"])


@main.command("consolidate")
@click.argument("checkpoint_dir", metavar="CHECKPOINT_DIR")
@click.option(
    "--from",
    "source",
    required=True,
    type=click.Choice(TRAINING_SOURCES),
    help="What wrote the checkpoint: DeepSpeed ZeRO-3, torch.distributed.checkpoint (FSDP), or LitGPT.",
)
@defaulted(
    "--dtype",
    MergeOptions,
    "Dtype of floating-point output tensors; auto keeps the checkpoint's.",
    type=click.Choice(list(OUTPUT_DTYPES)),
)
@click.option("--adapter-only", is_flag=True, help="A LoRA run: write only its PEFT adapter to OUT.")
@click.option("--base", metavar="DIR", help="A LoRA run: merge its adapter into this base instead of the run's own.")
@merge_options
def consolidate_command(checkpoint_dir, source, adapter_only, base, out, quantize, **options) -> None:
    """Turn a training checkpoint (rank files) into a Hugging Face checkpoint, one tensor at a time."""
    from convert.commands.consolidate import consolidate

    result = consolidate(
        source, checkpoint_dir, out, adapter_only=adapter_only, base=base, quantize=quantize, **options
    )
    if not options["quiet"] and os.environ.get("RANK", "0") == "0":
        click.echo(result.summary() if hasattr(result, "summary") else f"wrote the adapter to {result}")


@main.command("inspect")
@click.argument("path", metavar="PATH")
@click.option("--base", metavar="DIR", help="With an adapter: list the base's checkpoint tensors each module lands on.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
@click.option("--revision", metavar="REV", help="With a Hub repo id: branch, tag or commit.")
@click.option("--token", metavar="TOKEN", envvar="HF_TOKEN", help="Hub token; default: HF_TOKEN or the saved login.")
def inspect_command(path, base, as_json, revision, token) -> None:
    """Describe a model or adapter (directory or Hub repo id): format, dtypes, parameters, quantization,
    shards, LoRA settings; with --base, where an adapter's modules land in the base's checkpoint."""
    from convert.commands.inspect import adapter_placement, describe, render, render_placement

    if base is not None:
        placement = adapter_placement(path, base)
        click.echo(json.dumps(placement, indent=2) if as_json else render_placement(placement))
        return
    info = describe(path, revision, token)
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@main.command("verify")
@click.option("--base", required=True, metavar="DIR", help="Base model directory the merge read.")
@click.option("--adapter", metavar="DIR", help="Adapter directory the merge read (none: a plain rewrite).")
@click.option("--merged", required=True, metavar="DIR", help="The merged model to check.")
@click.option("--sample", type=click.IntRange(min=1), metavar="N", help="Check N random tensors (default: all).")
@defaulted("--seed", VerifyOptions, "Seed of the --sample choice.", type=int)
@defaulted("--atol", VerifyOptions, "Largest absolute error accepted.", type=float)
@defaulted("--device", VerifyOptions, "Where to recompute.", metavar="cpu|cuda|cuda:N")
@defaulted(
    "--merge-into",
    VerifyOptions,
    "As the merge was given it: dequantized recomputes a QLoRA merge into the round-tripped weights.",
    type=click.Choice(MERGE_INTO),
)
@click.option("--train-quant", type=click.Choice(METHODS), help="As the merge was given it (--merge-into dequantized).")
@defaulted("--blocksize", VerifyOptions, "--train-quant's blocksize.", type=int)
@defaulted("--double-quant/--no-double-quant", VerifyOptions, "--train-quant's double quantization.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
def verify_command(base, adapter, merged, as_json, **options) -> None:
    """Recompute merged tensors from base + adapter and compare them with a merged model (exit 1 on mismatch)."""
    from convert.commands.verify import render, verify

    result = verify(base, adapter, merged, **options)
    click.echo(json.dumps(result, indent=2) if as_json else render(result))
    sys.exit(0 if result["ok"] else 1)


@main.command("loftq-init")
@click.option("--base", required=True, metavar="DIR", help="16-bit base model directory (safetensors or .bin).")
@click.option(
    "--out",
    required=True,
    metavar="DIR",
    help="Output: a 4-bit bitsandbytes base in DIR and the LoRA adapter in DIR/adapter.",
)
@defaulted("--bits", LoftQOptions, "Quantization bits (4; 8 is refused).", type=int)
@defaulted("--rank", LoftQOptions, "LoRA rank r.", type=int)
@defaulted("--alpha", LoftQOptions, "lora_alpha (scaling alpha/r).", type=float)
@click.option("--use-rslora", is_flag=True, help="rsLoRA scaling alpha/sqrt(r), accounted for in A and B.")
@defaulted("--iters", LoftQOptions, "LoftQ alternating iterations.", type=int)
@defaulted(
    "--target-modules",
    LoftQOptions,
    "Linear layers to initialize, by PEFT's name matching; the other linear layers are only quantized.",
    metavar="all-linear|q_proj,v_proj,...",
    callback=lambda ctx, param, value: value if value == "all-linear" else [t for t in value.split(",") if t],
)
@defaulted("--quant-type", LoftQOptions, "4-bit data type.", type=click.Choice(QUANT_TYPES))
@click.option("--double-quant", is_flag=True, help="Quantize the absmax statistics too (bnb_4bit_use_double_quant).")
@defaulted(
    "--svd",
    LoftQOptions,
    "Truncated SVD of each residual: randomized (fast) or a full SVD as PEFT.",
    type=click.Choice(SVD_METHODS),
)
@click.option("--save-dequantized", is_flag=True, help="Also write the 16-bit dequantized Q base to DIR/dequantized.")
@output_options
def loftq_init_command(base, out, **options) -> None:
    """Quantize a base to 4 bits and initialize a LoRA adapter with LoftQ, streamed, on the GPU if present."""
    from convert.commands.loftq_init import loftq_init

    report(loftq_init(base, out, **options), options["quiet"])


def entry() -> None:
    """The ``convert`` script: ``main``, then an immediate exit once its output is flushed. Every command has
    closed, fsynced and renamed its files by then; what is skipped is the interpreter's teardown of torch,
    CUDA and the threads' state, a second or more that no caller needs."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            click.echo(e.code, err=True)
    ranks = sys.modules.get("convert.output.ranks")  # under torchrun: leave the process group cleanly
    if ranks is not None:
        ranks.leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
