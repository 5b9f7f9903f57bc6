"""Several processes writing one output under torchrun: the process group, the agreements, shard ownership.

``torchrun --nnodes N --nproc-per-node G -m convert.cli merge ...`` starts N*G copies of a command over a
shared filesystem. Each one plans the run from the headers itself (cheap and deterministic; a plan holds
open readers, which do not travel between processes), and then the ranks go through the same steps
together, each step ending in ``Ranks.exchange`` (an all-gather of small objects):

1. every rank's fingerprint (command, options, inputs) is compared with rank 0's: the ranks must see the
   same files at the same paths, or the run is refused;
2. rank 0 opens the staging area (``convert.output.stage``: lock, journal, ``--resume``, free space) and
   hands its state to the others;
3. each rank writes the output shards it owns (``owners``: contiguous runs of shards balanced by the bytes
   to read and write) into the shared partial directory and journals them in its own journal;
4. once every rank is done, rank 0 writes the index, config and card, commits a push and publishes with
   the same atomic rename as a one-process run; the others wait for its outcome.

The output is byte-identical to a one-process run: the layout is planned from headers, each shard is
written whole by one rank, and no value depends on which rank computed it.

An error on one rank is first flagged in torchrun's key-value store, so that the other ranks stop at their
next write instead of finishing their shards, then agreed at the next exchange: every rank leaves with the
first failing rank's one-line error and exit status 2, rank 0 removes the partial directory for bad input
and keeps it (every rank's finished shards journaled) otherwise. A rank killed outright is torchrun's to
notice: it stops the other ranks, and ``--resume`` keeps what was journaled.

Control messages only cross the process group; tensors never do (each rank reads its own inputs from the
storage). So the group is NCCL when every rank of a machine has a GPU of its own, as usual, with a gloo
group beside it for the exchanges, and gloo alone on CPUs and when ranks share a GPU (NCCL cannot put two
ranks on one device).

One process (no torchrun, or ``WORLD_SIZE=1``): ``current`` returns None and nothing here runs.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from convert.options import OutputOptions
from convert.output.job import OutputJob, start_upload
from convert.output.stage import (
    each,
    follower_stage,
    fsync_path,
    kept_for_resume,
    open_stage,
    partial_path,
    write_failed,
)
from formats.errors import ConvertError, TransientError
from formats.writer import PlannedTensor, ShardWriter, create_shard_files, plan_shards, shard_names

TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")
FAILED_KEY = "convert/failed"
CHECK_EVERY_S = 0.2  # how often a rank asks the store whether another one failed (at its writes)
# A collective waits this long for the slowest rank (a 405B LoftQ on few ranks takes hours); CONVERT_DIST_TIMEOUT.
DEFAULT_TIMEOUT_S = 48 * 3600


def world_size() -> int:
    """The number of ranks torchrun started (1 outside torchrun)."""
    if not all(name in os.environ for name in TORCHRUN_ENV):
        return 1
    return int(os.environ["WORLD_SIZE"])


def is_lead() -> bool:
    """Whether this process speaks for the run (rank 0, or the only process): summaries, progress bars."""
    return world_size() == 1 or os.environ["RANK"] == "0"


@dataclass(frozen=True)
class Failure:
    """What ended a rank's part of the run, as every rank will report it."""

    rank: int
    kind: str  # "input" (bad input: the partial directory goes), "kept" (kept for --resume), "other" (a bug)
    message: str

    def line(self, world: int) -> str:
        return f"{self.message} (rank {self.rank} of {world})"


class PeerFailed(Exception):
    """Another rank failed: this one stops (raised at an exchange, or at a write once the store says so)."""

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure


def failure_of(error: BaseException, rank: int, out: Path) -> Failure | None:
    """The failure ``error`` is, worded as a one-process run would word it; None for another rank's."""
    partial = partial_path(out)
    if isinstance(error, PeerFailed):
        return None
    if isinstance(error, TransientError):
        return Failure(rank, "kept", f"{error}; {kept_for_resume(partial)}")
    if isinstance(error, ConvertError):
        return Failure(rank, "input", str(error))
    if isinstance(error, OSError):
        return Failure(rank, "kept", write_failed(error, out, partial))
    return Failure(rank, "other", f"{type(error).__name__}: {error}")


class Ranks:
    """This process's place among the ranks, and the collectives they go through together."""

    def __init__(self, rank: int, world: int, group: Any, store: Any):
        self.rank, self.world, self.group, self.store = rank, world, group, store
        self.lead = rank == 0
        self.failure: Failure | None = None  # once agreed by an exchange: no collective follows but barriers
        self._checked = 0.0
        self._lock = threading.Lock()

    def exchange(self, failure: Failure | None = None, payload: Any = None) -> list[Any]:
        """Every rank's ``payload``, once every rank got here; raise ``PeerFailed`` on every rank if any
        reported a failure (the first failing rank's is the one agreed on)."""
        import torch.distributed as dist

        if self.failure is not None:
            raise PeerFailed(self.failure)
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, (failure, payload), group=self.group)
        failures = [f for f, _ in gathered if f is not None]
        if failures:
            self.failure = failures[0]
            raise PeerFailed(self.failure)
        return [p for _, p in gathered]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def flag(self, failure: Failure) -> None:
        """Tell the other ranks at once, so that they stop at their next write rather than at the next exchange."""
        self.store.set(FAILED_KEY, json.dumps(asdict(failure)))

    def check(self) -> None:
        """Raise ``PeerFailed`` if another rank flagged a failure (asks the store at most every CHECK_EVERY_S)."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < CHECK_EVERY_S:
                return
            self._checked = now
            if self.store.check([FAILED_KEY]):
                raise PeerFailed(Failure(**json.loads(self.store.get(FAILED_KEY))))

    def lead_first(self, work: Callable[[], None], out: Path) -> None:
        """Rank 0 does ``work`` (writes every rank then reads) while the others wait; its error stops them all."""
        failure = None
        if self.lead:
            try:
                work()
            except BaseException as e:
                failure = failure_of(e, self.rank, out)
                if failure is None or failure.kind == "other":
                    raise
        try:
            self.exchange(failure)
        except PeerFailed:
            raise ConvertError(self.failure.line(self.world)) from None


_CURRENT: list[Ranks] = []


def current(device: str) -> Ranks | None:
    """This process's ``Ranks`` under torchrun (the process group started on first use), else None."""
    if world_size() == 1:
        return None
    if not _CURRENT:
        _CURRENT.append(_join(device))
    return _CURRENT[0]


def _join(device: str) -> Ranks:
    import torch
    import torch.distributed as dist

    from convert.devices import rank_pool

    timeout = timedelta(seconds=float(os.environ.get("CONVERT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    pool = rank_pool(device)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    own_gpus = bool(pool) and pool[0].type == "cuda" and local_world <= len(set(pool))
    backend = "nccl" if own_gpus else "gloo"
    if own_gpus:
        torch.cuda.set_device(pool[int(os.environ["LOCAL_RANK"]) % len(pool)])
    dist.init_process_group(backend, store=dist.PrefixStore("convert-pg", store), rank=rank, world_size=world,
                            timeout=timeout)  # fmt: skip
    group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    atexit.register(leave)
    return Ranks(rank, world, group, store)


def leave() -> None:
    """Destroy the process group, if this process joined one (at exit; the console script calls it itself,
    since its fast exit runs no ``atexit`` handler)."""
    if not _CURRENT:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def owners(costs: list[int], world: int) -> list[int]:
    """The rank that writes each shard: contiguous runs of shards, so that each rank reads one stretch of the
    inputs (on the Hub: downloads only those shards), cut where the running cost crosses each k/world of the
    total (a shard goes to the rank its midpoint falls in), so ranks get equal costs to within one shard."""
    total = sum(costs)
    if total == 0:
        return [min(world - 1, i * world // max(1, len(costs))) for i in range(len(costs))]
    ranks, before = [], 0
    for cost in costs:
        ranks.append(min(world - 1, (2 * before + cost) * world // (2 * total)))
        before += cost
    return ranks


class RankedJob(OutputJob):
    """An ``OutputJob`` as one of several torchrun ranks runs it (see the module's docstring)."""

    def __init__(self, out: Path, fingerprint: dict, needed_bytes: int, options: OutputOptions, ranks: Ranks):
        # Not OutputJob.__init__: rank 0 opens the stage only once every rank agrees on what the run is.
        self.out, self.options, self.ranks = out, options, ranks
        self.writers: list[ShardWriter] = []
        self.upload = None
        self.commit_url: str | None = None
        try:
            check_same_run(ranks.exchange(None, fingerprint))
            state, failure = None, None
            if ranks.lead:
                state, failure = self._open_stage(fingerprint, needed_bytes)
            record, done = ranks.exchange(failure, state)[0]
        except PeerFailed:
            raise ConvertError(ranks.failure.line(ranks.world)) from None
        if not ranks.lead:
            self.stage = follower_stage(out, record, done, ranks.rank)
        self.dir = self.stage.dir

    def _open_stage(self, fingerprint: dict, needed_bytes: int) -> tuple[tuple | None, Failure | None]:
        try:
            self.stage = open_stage(self.out, fingerprint, resume=self.options.resume,
                                    overwrite=self.options.overwrite, needed_bytes=needed_bytes)  # fmt: skip
        except ConvertError as e:
            return None, failure_of(e, 0, self.out)
        try:
            self.upload = start_upload(self.options, self.stage.dir)
        except BaseException as e:
            self._abort(e)  # the stage goes as in one process
            return None, failure_of(e, 0, self.out)
        return (self.stage.fingerprint, self.stage.done), None

    @property
    def lead(self) -> bool:
        return self.ranks.lead

    def __enter__(self) -> RankedJob:
        return self

    def _shard_writer(self, planned: list[PlannedTensor], shard_bytes: int, read: dict, rework: bool) -> ShardWriter:
        """A writer of the shards this rank owns; the other ranks' tensors count as kept."""
        shards = plan_shards(planned, shard_bytes)
        names = shard_names(len(shards))
        costs = [
            0 if name in self.stage.done and not rework else sum(t.nbytes + read.get(t.name, 0) for t in shard)
            for shard, name in zip(shards, names, strict=True)
        ]
        owner = owners(costs, self.ranks.world)
        others = [t.name for shard, rank in zip(shards, owner, strict=True) if rank != self.ranks.rank for t in shard]
        on_shard = each(self.stage.shard_done, self.upload and self.upload.file_done)
        return ShardWriter(self.dir, planned, shard_bytes, on_shard, done=self.stage.done, elsewhere=others,
                           before_write=self.ranks.check, index=self.lead)  # fmt: skip

    def _shared_writer(self, where: Path, planned: list[PlannedTensor], size: int, others: Collection) -> ShardWriter:
        """A subdirectory's shards (an adapter, a second model: not journaled) shared between ranks: rank 0 creates
        the files, then every rank writes its tensors (all but ``others``) into them."""
        if self.lead:
            create_shard_files(where, planned, size)
        self.ranks.exchange()  # the files exist before anyone opens them
        return ShardWriter(where, planned, size, elsewhere=others, attach=True,
                           before_write=self.ranks.check, index=self.lead)  # fmt: skip

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (e.g. the errors of the matrices each rank computed), once
        what every rank wrote so far is durable (so rank 0 may rename or read it)."""
        self._settle()
        return self.ranks.exchange(None, value)

    def _settle(self) -> None:
        """fsync the files this rank wrote into (on a shared filesystem: its writes reach the server)."""
        self.stage.wait()  # this rank's shards fsynced and journaled
        for writer in self.writers:
            writer.close()
            for name in writer.opened:
                fsync_path(writer.out_dir / name)
            writer.opened = []

    def publish(self, files: list[str] | None, message: str) -> str | None:
        """Once every rank's files are durable, rank 0 commits and publishes; every rank returns its outcome."""
        self._settle()
        self.ranks.exchange()
        if self.lead:
            super().publish(files, message)
        self.commit_url = self.ranks.exchange(None, self.commit_url)[0]
        return self.commit_url

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None:
            return False
        for writer in self.writers:
            writer.close()
        try:
            self.stage.wait()  # finished shards are worth journaling, and nothing writes once ranks agree
        except BaseException:
            pass
        own = failure_of(error, self.ranks.rank, self.out)
        if self.ranks.failure is None:
            if own is not None:
                self.ranks.flag(own)
            try:
                self.ranks.exchange(own)
            except PeerFailed:
                pass
        agreed = self.ranks.failure or own or Failure(self.ranks.rank, "other", str(error))
        self.ranks.barrier()  # every rank has stopped writing
        try:
            if self.lead:
                self._abort(error if agreed.rank == self.ranks.rank else agreed_error(agreed))
        except ConvertError:
            pass  # the agreed line is what every rank reports
        finally:
            self.ranks.barrier()  # rank 0 is done cleaning up before any rank exits (torchrun stops the rest then)
        if agreed.rank == self.ranks.rank and agreed.kind == "other":
            return False  # a bug: its traceback, on its rank
        raise ConvertError(agreed.line(self.ranks.world)) from None


def agreed_error(failure: Failure) -> BaseException:
    """Another rank's failure as rank 0's ``Stage.abort`` takes it: bad input removes the partial directory."""
    return ConvertError(failure.message) if failure.kind == "input" else PeerFailed(failure)


def check_same_run(fingerprints: list[dict]) -> None:
    """Refuse ranks that planned different runs (inputs not shared, or at other paths, or other options)."""
    from convert.output.stage import describe_difference

    for rank, fp in enumerate(fingerprints):
        if fp != fingerprints[0]:
            raise ConvertError(
                f"rank {rank} planned another run than rank 0 ({describe_difference(fingerprints[0], fp)}); every "
                "rank must see the same inputs at the same paths (shared storage) and get the same options"
            )


def output_job(out: Path, fingerprint: dict, needed_bytes: int, options: OutputOptions) -> OutputJob:
    """The output job of a command: one process's, or this rank's share of a torchrun run's."""
    ranks = current(options.device)
    if ranks is None:
        return OutputJob(out, fingerprint, needed_bytes, options)
    return RankedJob(out, fingerprint, needed_bytes, options, ranks)
