"""``consolidate``: a training run's partitioned checkpoint -> one Hugging Face checkpoint, streamed.

A source in ``formats`` (``dcp``, ``zero3``, ``litgpt``) opens the run's rank files as
a ``Checkpoint`` whose tensors are lazy (each one's ``reader`` preads just the rows
asked for from the files that hold them). That checkpoint then goes through the merge
path as its base, with no adapter: the same plan, workers, shard writer, crash-safe
partial directory, ``--resume`` and Hub push as ``convert merge``, and host memory
at a few row chunks, never the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from convert.merge import MergeResult, merge
from convert.pipeline import DEFAULT_CHUNK_BYTES
from convert.push import HubTarget
from formats.checkpoint import Checkpoint
from formats.dcp import open_dcp
from formats.errors import ConvertError
from formats.litgpt import open_litgpt
from formats.zero3 import open_zero3

SOURCES: dict[str, Callable[[Path], Checkpoint]] = {"dcp": open_dcp, "deepspeed": open_zero3, "litgpt": open_litgpt}


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
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    chunk_size: int | str = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = True,
    token: str | None = None,
    push_to_hub: HubTarget | None = None,
) -> MergeResult:
    """Write the model of the training checkpoint at ``checkpoint_dir`` to ``out`` as Hugging Face safetensors
    shards; the CLI's ``convert consolidate --from SOURCE``. Raises ``ConvertError`` for bad input, ``out``
    then untouched; ``resume`` keeps the shards an interrupted run of the same command finished."""
    ckpt = open_source(source, checkpoint_dir)
    return merge(
        ckpt,
        None,
        out,
        dtype=dtype,
        device="cpu",  # nothing to compute: reads, casts and writes
        max_shard_size=max_shard_size,
        chunk_size=chunk_size,
        overwrite=overwrite,
        resume=resume,
        quiet=quiet,
        token=token,
        push_to_hub=push_to_hub,
    )
