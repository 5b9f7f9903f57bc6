"""Groups of click options that several commands share: the Hub's (``@hub_options``) and bitsandbytes'
(``@quantization_options``). Defaults come from ``convert.options``.

The Hub options reach the command as ``OutputOptions``' fields: ``revision``, ``token``, ``keep_downloads``
and ``push_to_hub`` (a ``HubTarget`` or None).
"""

from __future__ import annotations

import functools

import click
from huggingface_hub.utils import disable_progress_bars
from huggingface_hub.utils import logging as hf_logging

from convert.options import QUANTIZE_CHOICES, HubTarget, MergeOptions, default
from formats.bnb_names import BLOCKSIZES, COMPUTE_DTYPES, STORAGE

OPTIONS = [
    click.option(
        "--revision",
        metavar="REV",
        help="Branch, tag or commit of --base/--adapter given as Hub repo ids (org/name@REV sets one input's).",
    ),
    click.option("--token", metavar="TOKEN", help="Hub token; default: HF_TOKEN or the saved login; never printed."),
    click.option(
        "--no-keep-downloads",
        "keep_downloads",
        flag_value=False,
        default=True,
        help="Delete each base shard downloaded from the Hub once it has been merged.",
    ),
    click.option("--push-to-hub", metavar="REPO", help="Also upload the output to this Hub repo (created if missing)."),
    click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private."),
    click.option("--push-revision", metavar="BRANCH", help="With --push-to-hub: commit to this branch (created)."),
    click.option("--commit-message", metavar="TEXT", help="With --push-to-hub: the commit's message."),
]


def hub_options(command):
    """Add the Hub options to a click command; it gets them as ``merge``'s keyword arguments."""

    @functools.wraps(command)
    def with_hub(*args, push_to_hub, private, push_revision, commit_message, **kwargs):
        token = kwargs.get("token")
        if token is not None:
            token = kwargs["token"] = token.strip()  # a token file saved with CRLF
            if not token.isprintable():
                raise click.UsageError("--token: contains control characters (not printed)")
        if not push_to_hub and (private or push_revision or commit_message):
            raise click.UsageError("--private, --push-revision and --commit-message need --push-to-hub")
        # huggingface_hub's per-file bars and retry warnings would break up the tool's bar and one-line errors.
        hf_logging.set_verbosity_error()
        disable_progress_bars()
        target = HubTarget(push_to_hub, private, push_revision, commit_message) if push_to_hub else None
        return command(*args, push_to_hub=target, **kwargs)

    return stacked(with_hub, OPTIONS)


def defaulted(flag: str, options: type, help: str, **kwargs):
    """A click option whose default is the ``convert.options`` field named like the flag, shown in ``--help``."""
    name = flag.split("/")[0].lstrip("-").replace("-", "_")
    value = default(options, name)
    if isinstance(kwargs.get("type"), click.Choice) and not isinstance(value, str):
        value = str(value)  # a Choice of numbers, as --blocksize
    return click.option(flag, default=value, show_default=True, help=help, **kwargs)


def stacked(command, options: list):
    """``command`` decorated with ``options`` in the order they are listed (so ``--help`` shows them so)."""
    for option in reversed(options):
        command = option(command)
    return command


def quantization_options(command):
    """The bitsandbytes options of merge and quantize, in BitsAndBytesConfig's terms."""
    return stacked(
        command,
        [
            click.option(
                "--quantize",
                type=click.Choice(QUANTIZE_CHOICES),
                help="Write the output quantized: bitsandbytes nf4/fp4/int8, block-scaled fp8 (128x128), or the "
                "base's own format (same); lm_head and --skip-modules stay 16-bit.",
            ),
            defaulted(
                "--double-quant/--no-double-quant",
                MergeOptions,
                "Quantize the 4-bit absmax again (bnb_4bit_use_double_quant).",
            ),
            defaulted(
                "--blocksize",
                MergeOptions,
                "Values per 4-bit quantization block.",
                type=click.Choice([str(b) for b in BLOCKSIZES]),
                callback=lambda ctx, param, value: int(value),
            ),
            defaulted(
                "--quant-storage",
                MergeOptions,
                "dtype the packed 4-bit data is stored as (bnb_4bit_quant_storage).",
                type=click.Choice(list(STORAGE)),
            ),
            defaulted(
                "--compute-dtype",
                MergeOptions,
                "bnb_4bit_compute_dtype recorded in the config; auto = the output dtype.",
                type=click.Choice(COMPUTE_DTYPES),
            ),
            click.option(
                "--skip-modules",
                multiple=True,
                metavar="NAMES",
                callback=lambda ctx, param, value: tuple(m for arg in value for m in arg.split(",") if m),
                help="Modules kept 16-bit besides lm_head (repeat or comma-separate), matched as transformers does.",
            ),
        ],
    )
