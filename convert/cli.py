"""The ``convert`` command line."""

from __future__ import annotations

import sys

import click

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
    help="Base model directory: model.safetensors, sharded safetensors + index, or pytorch_model*.bin.",
)
@click.option(
    "--adapter",
    metavar="DIR",
    help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors or .bin). "
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
def merge_command(base, adapter, out, dtype, device, max_shard_size, chunk_size, overwrite, quiet) -> None:
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
        )
    except ConvertError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if not quiet:
        click.echo(result.summary())


if __name__ == "__main__":
    main()
