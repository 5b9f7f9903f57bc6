"""The ``convert`` command line."""

from __future__ import annotations

import json
import sys

import click

from convert.cli_options import hub_options
from convert.commands.merge import merge
from convert.execute.cpu import DEFAULT_CHUNK_BYTES
from formats.errors import ConvertError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckpt-convert")
def main() -> None:
    """Turn base model + adapter into one checkpoint, streamed, in bounded memory."""


def quantization_options(command):
    """The bitsandbytes options of merge and quantize, in BitsAndBytesConfig's terms."""
    options = [
        click.option(
            "--quantize",
            type=click.Choice(["nf4", "fp4", "int8"]),
            help="Write a pre-quantized bitsandbytes checkpoint (lm_head and --skip-modules stay 16-bit).",
        ),
        click.option(
            "--double-quant/--no-double-quant",
            default=True,
            show_default=True,
            help="Quantize the 4-bit absmax again (bnb_4bit_use_double_quant).",
        ),
        click.option(
            "--blocksize",
            type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
            default="64",
            show_default=True,
            callback=lambda ctx, param, value: int(value),
            help="Values per 4-bit quantization block.",
        ),
        click.option(
            "--quant-storage",
            type=click.Choice(["uint8", "int8", "float16", "bfloat16", "float32"]),
            default="uint8",
            show_default=True,
            help="dtype the packed 4-bit data is stored as (bnb_4bit_quant_storage).",
        ),
        click.option(
            "--compute-dtype",
            type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
            default="auto",
            show_default=True,
            help="bnb_4bit_compute_dtype recorded in the config; auto = the output dtype.",
        ),
        click.option(
            "--skip-modules",
            multiple=True,
            metavar="NAMES",
            help="Modules kept 16-bit besides lm_head (repeat or comma-separate), matched as transformers does.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


resume_option = click.option(
    "--resume",
    is_flag=True,
    help="Continue the interrupted run of this same command on OUT, keeping the shards it finished.",
)


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
@click.option(
    "--out",
    required=True,
    metavar="DIR",
    help="Output directory. Written to a temporary sibling and renamed when complete.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
    default="auto",
    show_default=True,
    help="Dtype of floating-point output tensors; auto keeps the base's dtype.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    metavar="auto|cpu|cuda|cuda:N|cuda:0,cuda:1|cuda:all",
    help="Where deltas are computed; auto uses CUDA when available. Several GPUs share the adapted tensors.",
)
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    metavar="SIZE",
    help="Largest output shard, parsed as transformers does (5GB = 5e9 bytes, 2GiB = 2**31).",
)
@click.option(
    "--chunk-size",
    default=f"{DEFAULT_CHUNK_BYTES >> 20}MiB",
    show_default=True,
    metavar="SIZE",
    help="Memory budget of one row chunk in fp32; larger tensors are processed in row chunks.",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty (only once the new one is complete)."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@quantization_options
@click.option(
    "--merge-into",
    type=click.Choice(["original", "dequantized"]),
    default="original",
    show_default=True,
    help="dequantized: add the delta to each Linear weight of a 16-bit base rounded through --train-quant "
    "(what a QLoRA adapter was trained against); original: to the 16-bit weights as they are.",
)
@click.option(
    "--train-quant",
    type=click.Choice(["nf4", "fp4", "int8"]),
    help="Quantization the adapter was trained through, for --merge-into dequantized (with --blocksize and "
    "--double-quant). Default: the config PEFT recorded in the adapter's README.md, else nf4.",
)
@resume_option
@click.option(
    "--allow-nonfinite", is_flag=True, help="Merge an adapter holding NaN/Inf values, with a warning, not an error."
)
@hub_options
def merge_command(base, adapter, out, dtype, device, max_shard_size, chunk_size, overwrite, quiet, **options) -> None:
    """Merge a LoRA adapter into its base model, as PEFT's merge_and_unload would."""
    run_merge(base, adapter, out, dtype, device, max_shard_size, chunk_size, overwrite, quiet, **options)


def run_merge(base, adapter, out, dtype, device, max_shard_size, chunk_size, overwrite, quiet, **options) -> None:
    options["skip_modules"] = tuple(m for arg in options.get("skip_modules", ()) for m in arg.split(",") if m)
    try:
        result = merge(
            base,
            adapter,
            out,
            dtype=dtype,
            device=device,
            max_shard_size=max_shard_size,
            chunk_size=chunk_size,
            overwrite=overwrite,
            quiet=quiet,
            **options,
        )
    except ConvertError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if not quiet:
        click.echo(result.summary())


@main.command("quantize")
@click.option("--base", required=True, metavar="DIR", help="16-bit (or bitsandbytes) model directory.")
@click.option("--out", required=True, metavar="DIR", help="Output directory, written as for merge.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N")
@click.option("--max-shard-size", default="5GB", show_default=True, metavar="SIZE")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@quantization_options
@resume_option
@hub_options
def quantize_command(base, out, device, max_shard_size, overwrite, quiet, quantize, **options) -> None:
    """Write a bitsandbytes-quantized checkpoint of a model (merge --quantize without an adapter)."""
    chunk = f"{DEFAULT_CHUNK_BYTES >> 20}MiB"
    options["quantize"] = quantize or "nf4"
    run_merge(base, None, out, "auto", device, max_shard_size, chunk, overwrite, quiet, **options)


@main.command("inspect")
@click.argument("path", metavar="PATH")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
@click.option("--revision", metavar="REV", help="With a Hub repo id: branch, tag or commit.")
@click.option("--token", metavar="TOKEN", envvar="HF_TOKEN", help="Hub token; default: HF_TOKEN or the saved login.")
def inspect_command(path, as_json, revision, token) -> None:
    """Describe a model or adapter (directory or Hub repo id): format, dtypes, parameters, quantization,
    shards, LoRA settings."""
    from convert.commands.inspect import describe, render

    try:
        info = describe(path, revision, token)
    except ConvertError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@main.command("verify")
@click.option("--base", required=True, metavar="DIR", help="Base model directory the merge read.")
@click.option("--adapter", metavar="DIR", help="Adapter directory the merge read (none: a plain rewrite).")
@click.option("--merged", required=True, metavar="DIR", help="The merged model to check.")
@click.option("--sample", type=click.IntRange(min=1), metavar="N", help="Check N random tensors (default: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --sample choice.")
@click.option("--atol", type=float, default=0.0, show_default=True, help="Largest absolute error accepted.")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda|cuda:N", help="Where to recompute.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
def verify_command(base, adapter, merged, sample, seed, atol, device, as_json) -> None:
    """Recompute merged tensors from base + adapter and compare them with a merged model (exit 1 on mismatch)."""
    from convert.commands.verify import render, verify

    try:
        report = verify(base, adapter, merged, sample=sample, seed=seed, atol=atol, device=device)
    except ConvertError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    sys.exit(0 if report["ok"] else 1)


@main.command("loftq-init")
@click.option("--base", required=True, metavar="DIR", help="16-bit base model directory (safetensors or .bin).")
@click.option(
    "--out",
    required=True,
    metavar="DIR",
    help="Output: a 4-bit bitsandbytes base in DIR and the LoRA adapter in DIR/adapter.",
)
@click.option("--bits", type=int, default=4, show_default=True, help="Quantization bits (4; 8 is refused).")
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank r.")
@click.option("--alpha", type=float, default=16, show_default=True, help="lora_alpha (scaling alpha/r).")
@click.option("--use-rslora", is_flag=True, help="rsLoRA scaling alpha/sqrt(r), accounted for in A and B.")
@click.option("--iters", type=int, default=5, show_default=True, help="LoftQ alternating iterations.")
@click.option(
    "--target-modules",
    default="all-linear",
    show_default=True,
    metavar="all-linear|q_proj,v_proj,...",
    help="Linear layers to initialize, by PEFT's name matching; the other linear layers are only quantized.",
)
@click.option("--quant-type", type=click.Choice(["nf4", "fp4"]), default="nf4", show_default=True)
@click.option("--double-quant", is_flag=True, help="Quantize the absmax statistics too (bnb_4bit_use_double_quant).")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N")
@click.option(
    "--svd",
    type=click.Choice(["randomized", "exact"]),
    default="randomized",
    show_default=True,
    help="Truncated SVD of each residual: randomized (fast) or a full SVD as PEFT.",
)
@click.option("--save-dequantized", is_flag=True, help="Also write the 16-bit dequantized Q base to DIR/dequantized.")
@click.option("--max-shard-size", default="5GB", show_default=True, metavar="SIZE")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@resume_option
@hub_options
def loftq_init_command(base, out, target_modules, quiet, **options) -> None:
    """Quantize a base to 4 bits and initialize a LoRA adapter with LoftQ, streamed, on the GPU if present."""
    from convert.commands.loftq_init import loftq_init

    targets = target_modules if target_modules == "all-linear" else [t for t in target_modules.split(",") if t]
    try:
        result = loftq_init(base, out, target_modules=targets, quiet=quiet, **options)
    except ConvertError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if not quiet:
        click.echo(result.summary())


if __name__ == "__main__":
    main()
