"""One run that writes a model directory: the lifecycle every such command shares, in one object.

    with OutputJob(out, fingerprint, needed_bytes, options) as job:
        writer = job.shards(planned, shard_bytes)           # journaled, uploaded as each shard completes
        with job.progress(total, "B", "merge") as step:      # step(n) after each piece of work
            ...                                              # executors write through ``writer``
        files = [*writer.finish(), *other_files]
        job.publish(files, "Upload model written by ckpt-convert")

Opening stages the output crash-safely (``convert.output.stage``: locked partial sibling, journal,
free-space check, ``--resume``) and, with ``--push-to-hub``, creates the Hub repo before any work
(``convert.output.push``). ``publish`` commits the push, then renames the output into place. Any
exception inside the block closes the writers, aborts the upload (nothing is committed) and hands the
staging area to ``Stage.abort``: bad input removes it, a kill or an I/O error keeps it for ``--resume``.
"""

from __future__ import annotations

import importlib.metadata
import resource
import sys
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from convert.options import OutputOptions
from convert.output.push import Upload
from convert.output.stage import each, fault_point, open_stage
from formats.errors import ConvertError
from formats.writer import PlannedTensor, ShardWriter, parse_size


class OutputJob:
    def __init__(self, out: Path, fingerprint: dict, needed_bytes: int, options: OutputOptions):
        self.out, self.options = out, options
        self.stage = open_stage(
            out, fingerprint, resume=options.resume, overwrite=options.overwrite, needed_bytes=needed_bytes
        )
        self.dir = self.stage.dir
        self.writers: list[ShardWriter] = []
        self.upload: Upload | None = None
        self.commit_url: str | None = None

    def __enter__(self) -> OutputJob:
        try:
            self.upload = start_upload(self.options, self.dir)
        except BaseException as e:
            self._abort(e)
            raise
        return self

    @property
    def lead(self) -> bool:
        """Whether this process writes the side files (index, config, card) and publishes: the only process
        here; rank 0 under torchrun (``convert.output.ranks.RankedJob``)."""
        return True

    def gather(self, value: object) -> list:
        """Every process's ``value``: this one's alone (torchrun ranks: all of theirs, in rank order)."""
        return [value]

    def __exit__(self, kind, error, traceback) -> bool:
        if error is not None:
            self._abort(error)
        return False

    def shards(
        self,
        planned: list[PlannedTensor],
        shard_bytes: int,
        subdir: str = "",
        *,
        read_bytes: dict[str, int] | None = None,
        rework_kept: bool = False,
        elsewhere: Collection[str] = (),
    ) -> ShardWriter:
        """A writer of shards into the output (or its ``subdir``). Shards at the top level are journaled for
        ``--resume`` and uploaded as each completes; a subdirectory's (an adapter, a second model) are written
        again by a resumed run and uploaded at the commit.

        The keywords say how to share the shards between torchrun ranks (``RankedJob``; one process has
        nothing to share): ``read_bytes`` is what computing each tensor reads (keyed by its first serialized
        tensor), ``rework_kept`` that a resume still computes the tensors of kept shards (LoftQ's adapter),
        ``elsewhere`` the subdirectory's tensors other ranks write."""
        directory = self.dir / subdir
        directory.mkdir(parents=True, exist_ok=True)
        if subdir:
            writer = self._shared_writer(directory, planned, shard_bytes, elsewhere)
        else:
            writer = self._shard_writer(planned, shard_bytes, read_bytes or {}, rework_kept)
        self.writers.append(writer)
        return writer

    def _shard_writer(self, planned: list[PlannedTensor], shard_bytes: int, read: dict, rework: bool) -> ShardWriter:
        on_shard = each(self.stage.shard_done, self.upload and self.upload.file_done)
        return ShardWriter(self.dir, planned, shard_bytes, on_shard, done=self.stage.done)

    def _shared_writer(self, where: Path, planned: list[PlannedTensor], size: int, others: Collection) -> ShardWriter:
        return ShardWriter(where, planned, size, elsewhere=others)

    @contextmanager
    def progress(self, total: int, unit: str, desc: str) -> Iterator[Callable[[int], None]]:
        """A progress bar on a terminal (none with ``--quiet``); each step is also a fault-injection point."""
        show = self.lead and not self.options.quiet and sys.stderr.isatty()
        scaled = unit == "B"
        with tqdm(total=total, unit=unit, unit_scale=scaled, unit_divisor=1024, disable=not show, desc=desc) as bar:

            def step(n: int) -> None:
                bar.update(n)
                fault_point("job")

            yield step

    def publish(self, files: list[str] | None, message: str) -> str | None:
        """Commit the push (``files``, relative to the output; None: every file written) and move the output
        into place; return the Hub commit's URL, if pushed."""
        if self.upload is not None:
            if files is None:
                files = [str(f.relative_to(self.dir)) for f in sorted(self.dir.rglob("*")) if f.is_file()]
            self.commit_url = self.upload.commit(files, message)
        self.stage.publish()
        return self.commit_url

    def _abort(self, error: BaseException) -> None:
        for writer in self.writers:
            writer.close()
        if self.upload is not None:
            self.upload.abort()
        self.stage.abort(error)


def start_upload(options: OutputOptions, directory: Path) -> Upload | None:
    """The Hub upload of ``--push-to-hub`` (creating the repo: a bad token or repo id fails before any work)."""
    return Upload(options.push_to_hub, directory, options.token) if options.push_to_hub else None


def option_sizes(**sizes: int | str) -> dict[str, int]:
    """Parse size options (``max_shard_size="5GB"``) as transformers does, refusing bad and non-positive ones."""
    parsed = {}
    for name, value in sizes.items():
        flag = "--" + name.replace("_", "-")
        try:
            parsed[name] = parse_size(value)
        except ValueError as e:
            raise ConvertError(f"{flag}: {e}") from None
        if parsed[name] <= 0:
            raise ConvertError(f"{flag} {value}: must be positive")
    return parsed


def human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def version() -> str:
    """The tool's version, as model cards record it."""
    try:
        return importlib.metadata.version("ckpt-convert")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
