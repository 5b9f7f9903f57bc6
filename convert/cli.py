"""The ``convert`` command line."""

from __future__ import annotations

import sys

import click
from huggingface_hub.utils import disable_progress_bars
from huggingface_hub.utils import logging as hf_logging

from convert.merge import merge
from convert.pipeline import DEFAULT_CHUNK_BYTES
from convert.push import HubTarget
from formats.errors import ConvertError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckpt-convert")
def main() -> None:
    """Turn base model + adapter into one checkpoint, streamed, in bounded memory."""
    # huggingface_hub's per-file bars and retry warnings would break up the tool's one bar and one-line errors.
    hf_logging.set_verbosity_error()
    disable_progress_bars()


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
    "--revision",
    metavar="REV",
    help="Branch, tag or commit of --base/--adapter given as Hub repo ids (org/name@REV sets one input's).",
)
@click.option("--token", metavar="TOKEN", help="Hub token; default: HF_TOKEN or the saved login; never printed.")
@click.option(
    "--no-keep-downloads",
    "keep_downloads",
    flag_value=False,
    default=True,
    help="Delete each base shard downloaded from the Hub once it has been merged.",
)
@click.option("--push-to-hub", metavar="REPO", help="Also upload the output to this Hub repo (created if missing).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option("--push-revision", metavar="BRANCH", help="With --push-to-hub: commit to this branch (made if missing).")
@click.option("--commit-message", metavar="TEXT", help="With --push-to-hub: the commit's message.")
def merge_command(
    base, adapter, out, dtype, device, max_shard_size, chunk_size, overwrite, quiet, **hub_options
) -> None:
    """Merge a LoRA adapter into its base model, as PEFT's merge_and_unload would.

    BASE and ADAPTER are local directories or Hugging Face Hub repo ids (org/name)."""
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
            **hub_arguments(**hub_options),
        )
    except ConvertError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if not quiet:
        click.echo(result.summary())


def hub_arguments(revision, token, keep_downloads, push_to_hub, private, push_revision, commit_message) -> dict:
    """The Hub options of a command as keyword arguments of ``merge`` (and of other commands that push)."""
    if not push_to_hub and (private or push_revision or commit_message):
        raise click.UsageError("--private, --push-revision and --commit-message need --push-to-hub")
    target = HubTarget(push_to_hub, private, push_revision, commit_message) if push_to_hub else None
    return dict(revision=revision, token=token, keep_downloads=keep_downloads, push_to_hub=target)


if __name__ == "__main__":
    main()
