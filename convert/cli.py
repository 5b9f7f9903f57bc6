"""The ``convert`` command line."""

from __future__ import annotations

import json
import sys

import click

from convert.hub_options import hub_options
from convert.merge import merge
from convert.pipeline import DEFAULT_CHUNK_BYTES
from formats.errors import ConvertError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckpt-convert")
def main() -> None:
    """Turn base model + adapter into one checkpoint, streamed, in bounded memory."""


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
    metavar="auto|cpu|cuda|cuda:N",
    help="Where deltas are computed; auto uses CUDA when available.",
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
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the interrupted run of this same command on OUT, keeping the shards it finished.",
)
@click.option(
    "--allow-nonfinite", is_flag=True, help="Merge an adapter holding NaN/Inf values, with a warning, not an error."
)
@hub_options
def merge_command(
    base, adapter, out, dtype, device, max_shard_size, chunk_size, overwrite, quiet, resume, allow_nonfinite, **hub
) -> None:
    """Merge a LoRA adapter into its base model, as PEFT's merge_and_unload would."""
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
            resume=resume,
            allow_nonfinite=allow_nonfinite,
            **hub,
        )
    except ConvertError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if not quiet:
        click.echo(result.summary())


@main.command("inspect")
@click.argument("path", metavar="PATH")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
def inspect_command(path, as_json) -> None:
    """Describe a model or adapter directory: format, dtypes, parameters, quantization, shards, LoRA settings."""
    from convert.inspection import describe, render

    try:
        info = describe(path)
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
    from convert.verify import render, verify

    try:
        report = verify(base, adapter, merged, sample=sample, seed=seed, atol=atol, device=device)
    except ConvertError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
