"""The Hugging Face Hub options of the commands that read models or write them (``@hub_options``).

They reach the command as ``merge``'s keyword arguments: ``revision``, ``token``,
``keep_downloads`` and ``push_to_hub`` (a ``HubTarget`` or None).
"""

from __future__ import annotations

import functools

import click
from huggingface_hub.utils import disable_progress_bars
from huggingface_hub.utils import logging as hf_logging

from convert.output.push import HubTarget

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

    for option in reversed(OPTIONS):
        with_hub = option(with_hub)
    return with_hub
