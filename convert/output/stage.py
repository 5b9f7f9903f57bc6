"""Crash-safe output directories: a locked partial sibling, a journal of finished shards, an atomic publish.

Every command that writes a model (``merge``, and the quantize / LoftQ commands)
writes into ``.OUT.partial/model`` next to ``OUT`` and renames it to ``OUT`` only
once every file is written and fsynced, so a crash, a kill or a full disk never
leaves anything at ``OUT`` that looks like a finished model. The partial
directory has a stable name, so a later run can find it:

* ``.OUT.partial/journal.jsonl`` holds, first, a fingerprint of the command (its
  options and the size, mtime and header of every input file), then one line per
  finished shard (name, size, digest: a sha256 tree hash), each appended only after
  the shard was fsynced. ``--resume`` keeps the shards the journal lists (after checking
  their size and digest) and rewrites the rest, so the output is byte-identical to an
  uninterrupted run.
* A run that finds a partial directory without ``--resume`` refuses (the work in
  it may be hours of compute); ``--overwrite`` discards it and starts over. A
  resume with a different fingerprint is refused, naming what changed.
* ``.OUT.partial`` itself is locked with ``flock`` for the whole run: a second run
  on the same output is refused while the first is alive, and the lock dies
  with its process, so a SIGKILLed run's leftovers can be resumed at once.

Adopting it in a command (as ``convert.commands.merge`` does)::

    fp = fingerprint("quantize", {"bits": 4, ...}, input_files)
    stage = open_stage(out, fp, resume=resume, overwrite=overwrite, needed_bytes=total)
    try:
        writer = ShardWriter(stage.dir, planned, shard_size, stage.shard_done, done=stage.done)
        ...  # write the tensors not in writer.kept_tensors, writer.finish(), side files into stage.dir
        stage.publish()
    except BaseException as e:
        stage.abort(e)  # raises the one-line error for an OSError
        raise

``CONVERT_FAULT`` (tests only) kills the process with SIGKILL at a named point,
``point`` or ``point:N`` for its N-th passage: ``job`` (after a pipeline job, i.e.
inside a shard), ``after-shard`` (a shard journaled), ``before-rename``,
``after-rename``. The fault-injection suite uses it to crash at exact places;
``CONVERT_FAULT_RANK=k`` limits it to rank k of a torchrun run.

Under torchrun (``convert.output.ranks``) rank 0 holds the lock and the journal; every other
rank journals the shards it writes into ``journal.rank<k>.jsonl`` beside it (one writer per
file, so nothing depends on ``O_APPEND`` or locks across machines). ``read_journal`` reads
them all, and a resumed run folds them back into ``journal.jsonl``, so a resume keeps every
finished shard whatever the number of ranks before and now.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import struct
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from formats.errors import ConvertError, TransientError

JOURNAL = "journal.jsonl"
MODEL = "model"
# Side files, config and model card are small; this much beyond the tensor bytes is asked for.
FREE_SPACE_MARGIN = 16 << 20
HASH_BLOCK = 4 << 20
HASH_PIECE = 256 << 20  # the unit of the parallel tree hash of finished shards (file_digest)


def partial_path(out: Path) -> Path:
    """The stable partial directory of ``out`` (a sibling, hence on the same filesystem for the rename)."""
    return out.parent / f".{out.name}.partial"


# ---------------------------------------------------------------- fingerprints


def file_fingerprint(path: Path) -> dict:
    """Size, mtime and a hash of the head (a safetensors file's whole header) of one input file.

    Cheap on any model size, and enough to notice a replaced, re-downloaded or edited input.
    """
    st = path.stat()
    with open(path, "rb") as f:
        head_len = 1 << 20
        if path.suffix == ".safetensors" and st.st_size >= 8:
            head_len = 8 + struct.unpack("<Q", f.read(8))[0]
            f.seek(0)
        head = f.read(min(head_len, st.st_size, 256 << 20))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": hashlib.sha256(head).hexdigest()}


def fingerprint(command: str, options: dict, inputs: list[Path]) -> dict:
    """What makes two runs produce the same bytes: the command, its options and its input files."""
    files = {str(p.resolve()): file_fingerprint(p) for p in sorted(set(inputs))}
    # As the journal will give it back (tuples become lists), so that a resume compares like with like.
    return {"command": command, "options": json.loads(json.dumps(options)), "inputs": files}


def describe_difference(old: dict, new: dict) -> str:
    """The first difference between two fingerprints, in words."""
    if old.get("command") != new.get("command"):
        return f"it was made by `convert {old.get('command')}`, this is `convert {new.get('command')}`"
    old_opts, new_opts = old.get("options", {}), new.get("options", {})
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            return f"option {key} was {old_opts.get(key)!r}, now {new_opts.get(key)!r}"
    old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
    for name in sorted(set(old_in) | set(new_in)):
        if name not in new_in:
            return f"input {name} is no longer used"
        if name not in old_in:
            return f"input {name} was not used"
        if old_in[name] != new_in[name]:
            return f"input {name} changed since (size, modification time or header)"
    return "its fingerprint differs"


# ---------------------------------------------------------------- faults (tests only)

_fault_counts: dict[str, int] = {}
_fault_lock = threading.Lock()


def fault_point(name: str) -> None:
    """SIGKILL this process at the N-th passage of point ``name`` when ``CONVERT_FAULT=name[:N]`` (tests only)."""
    spec = os.environ.get("CONVERT_FAULT")
    if not spec:
        return
    point, _, count = spec.partition(":")
    rank = os.environ.get("RANK", "0")
    if point != name or os.environ.get("CONVERT_FAULT_RANK", rank) != rank:
        return
    with _fault_lock:
        _fault_counts[name] = _fault_counts.get(name, 0) + 1
        if _fault_counts[name] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- durability helpers


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path) -> str:
    """A sha256 tree hash: the sha256 of the sha256 digests of the file's ``HASH_PIECE``-byte pieces.

    The pieces are hashed by a pool of threads (hashlib and pread release the GIL), so a 16 GB model is hashed
    in about a second on 16 cores instead of 18 s on one; each thread reads ``HASH_BLOCK`` bytes at a time, so
    memory stays at a few blocks."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        pieces = _hash_pool().map(lambda start: _piece_digest(fd, start, min(start + HASH_PIECE, size)),
                                  range(0, size, HASH_PIECE))  # fmt: skip
        return "sha256-tree:" + hashlib.sha256(b"".join(pieces)).hexdigest()
    finally:
        os.close(fd)


def _piece_digest(fd: int, start: int, stop: int) -> bytes:
    h = hashlib.sha256()
    while start < stop:
        block = os.pread(fd, min(HASH_BLOCK, stop - start), start)
        if not block:
            raise OSError(errno.EIO, "file shrank while being hashed")
        h.update(block)
        start += len(block)
    return h.digest()


_POOL: list[ThreadPoolExecutor] = []


def _hash_pool() -> ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(min(16, os.cpu_count() or 1), "convert-hash"))
    return _POOL[0]


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Refuse, with the numbers, when ``needed`` bytes (plus a margin) do not fit in ``directory``'s filesystem."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if needed + FREE_SPACE_MARGIN > free:
        raise ConvertError(
            f"{directory}: not enough free disk space for {what}: needs {needed / 1e6:,.1f} MB "
            f"(+{FREE_SPACE_MARGIN >> 20} MiB margin), {free / 1e6:,.1f} MB free"
        )


_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


# ---------------------------------------------------------------- the staging area


@dataclass
class Stage:
    """An open partial directory: write into ``dir``, report each finished shard, then ``publish``."""

    out: Path
    partial: Path
    fingerprint: dict
    done: dict[str, dict] = field(default_factory=dict)  # shard name -> journal record, kept from an earlier run
    published: bool = False
    # One thread fsyncs, hashes and journals finished shards, so that the workers never wait for the disk.
    _journaler: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "convert-journal"))
    _pending: list[Future] = field(default_factory=list)
    _lock_fd: int = -1  # the flock on ``partial``, held from open_stage to publish or abort
    journal: str = JOURNAL  # where this process journals its shards (``rank_journal`` for torchrun's other ranks)

    @property
    def dir(self) -> Path:
        return self.partial / MODEL

    def shard_done(self, name: str) -> None:
        """Have a finished shard made durable and journaled (called by the writer, from any worker thread)."""
        self._pending.append(self._journaler.submit(self._journal, name))

    def _journal(self, name: str) -> None:
        path = self.dir / name
        fsync_path(path)
        _append(self.partial / self.journal, {"shard": name, "size": path.stat().st_size, "digest": file_digest(path)})
        fault_point("after-shard")

    def wait(self) -> None:
        """Wait until every finished shard is journaled; raise the first error of doing so."""
        self._journaler.shutdown(wait=True)
        for future in self._pending:
            future.result()

    def publish(self) -> None:
        """fsync everything, then move the model to ``out`` in one rename (swapping out an old output)."""
        self.wait()
        for path in sorted(self.dir.rglob("*"), reverse=True):  # files before the directories naming them
            fsync_path(path)
        fsync_path(self.dir)
        fault_point("before-rename")
        if self.out.exists() and any(self.out.iterdir()):
            if not exchange(self.dir, self.out):  # the old output ends up at self.dir and goes with the partial
                old = self.partial / "old"
                self.out.rename(old)
                self.dir.rename(self.out)
        else:
            self.dir.rename(self.out)  # replaces an empty directory atomically
        fsync_path(self.out.parent)
        self.published = True
        fault_point("after-rename")
        shutil.rmtree(self.partial, ignore_errors=True)
        self._release()

    def abort(self, error: BaseException) -> None:
        """Clean up after ``error`` ended the run; raise what to report instead, if anything.

        Bad input (``ConvertError``: a rerun would fail again) removes the partial
        directory. Anything else (a kill, Ctrl-C, a full disk, an I/O error, the network:
        ``TransientError``) keeps it, journal included, for ``--resume``; an ``OSError``
        or ``TransientError`` becomes a one-line ``ConvertError`` that says so.
        """
        self._journaler.shutdown(wait=True)  # shards already finished are worth journaling
        try:
            if isinstance(error, TransientError):
                raise ConvertError(f"{error}; {kept_for_resume(self.partial)}") from None
            if isinstance(error, ConvertError):
                shutil.rmtree(self.partial, ignore_errors=True)
            elif isinstance(error, OSError):
                raise ConvertError(write_failed(error, self.out, self.partial)) from error
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def each(*callbacks: Callable[[str], None] | None) -> Callable[[str], None]:
    """One shard-done callback calling every given one in order (the journal first, then e.g. a Hub upload)."""
    live = [c for c in callbacks if c is not None]

    def call(name: str) -> None:
        for callback in live:
            callback(name)

    return call


def write_failed(error: OSError, out: Path, partial: Path) -> str:
    return f"{error.filename or out}: {error.strerror or error} while writing {out}; {kept_for_resume(partial)}"


def kept_for_resume(partial: Path) -> str:
    count = len(read_journal(partial)[1])
    return f"nothing was published and the {count} finished shard(s) are kept in {partial}: rerun with --resume"


def _append(journal: Path, record: dict) -> None:
    with open(journal, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rank_journal(rank: int) -> str:
    """The journal file of torchrun rank ``rank`` > 0 (rank 0 journals into ``JOURNAL``)."""
    return f"journal.rank{rank}.jsonl"


def rank_journals(partial: Path) -> list[Path]:
    return sorted(partial.glob("journal.rank*.jsonl"))


def read_journal(partial: Path) -> tuple[dict | None, dict[str, dict]]:
    """(fingerprint record, {shard: record}) of a partial directory, the other ranks' journals included; a torn
    last line (a kill mid-append) is ignored."""
    records = _records(partial / JOURNAL)
    if not records or "fingerprint" not in records[0]:
        return None, {}
    shards = [r for path in [partial / JOURNAL, *rank_journals(partial)] for r in _records(path) if "shard" in r]
    return records[0], {r["shard"]: r for r in shards}


def _records(journal: Path) -> list[dict]:
    try:
        lines = journal.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def _fold_rank_journals(partial: Path, fingerprint: dict, kept: dict[str, dict]) -> None:
    """Rewrite ``journal.jsonl`` as the fingerprint and the kept shards, then drop the ranks' journals: the
    ranks of this run journal afresh (a kill in between leaves duplicates of kept records, which are harmless)."""
    temporary = partial / (JOURNAL + ".tmp")
    temporary.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in [fingerprint, *kept.values()]))
    fsync_path(temporary)
    temporary.rename(partial / JOURNAL)
    for path in rank_journals(partial):
        path.unlink()
    fsync_path(partial)


def _lock(partial: Path) -> int:
    """flock the partial directory itself; the lock dies with the process, so a SIGKILL never leaves it stale."""
    while True:
        try:
            partial.mkdir(parents=True, exist_ok=True)
            fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise ConvertError(f"{partial}: cannot create the partial output directory: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConvertError(
                f"{partial}: another convert run is writing this output now (the directory is locked); "
                "wait for it to finish or stop it first"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(partial))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed it as we opened it: lock the new one


def _kept_shards(stage: Stage, journaled: dict[str, dict]) -> dict[str, dict]:
    """Journaled shards whose file still has the recorded size and digest."""
    kept = {}
    for name, record in journaled.items():
        path = stage.dir / name
        if path.is_file() and path.stat().st_size == record.get("size") and file_digest(path) == record.get("digest"):
            kept[name] = record
        else:
            print(f"warning: {path}: differs from the journal; it is written again", file=sys.stderr)
    return kept


def open_stage(
    out: Path, fp: dict, *, resume: bool = False, overwrite: bool = False, needed_bytes: int | None = None
) -> Stage:
    """Open (or, with ``resume``, reopen) ``out``'s partial directory, locked, for one run.

    ``needed_bytes``: what the output will take, checked against free space (less
    what kept shards already hold). The run then ends with ``stage.publish()``, or
    with ``stage.abort(error)`` on any error.
    """
    partial = partial_path(out)
    stage = Stage(out, partial, {"fingerprint": fp}, _lock_fd=_lock(partial))
    try:
        _open_stage(stage, resume, overwrite, needed_bytes)
    except BaseException as e:
        stage._journaler.shutdown()
        if not (partial / JOURNAL).exists():  # nothing of an earlier run in it: ours to remove
            shutil.rmtree(partial, ignore_errors=True)
        stage._release()
        if isinstance(e, OSError):
            raise ConvertError(write_failed(e, out, partial)) from e
        raise
    return stage


def _open_stage(stage: Stage, resume: bool, overwrite: bool, needed_bytes: int | None) -> None:
    """Decide what to do with what the partial directory holds: resume it, refuse, or start afresh."""
    partial, out = stage.partial, stage.out
    old, journaled = read_journal(partial)
    if old is not None and out.exists() and os.path.samestat(out.stat(), _model_stat(old)):
        old = None  # the leftovers of a run killed right after its rename: out is that finished model
    if old is not None and not stage.dir.is_dir():
        old = None  # nothing left to resume
    if old is not None and not overwrite and not resume:
        raise ConvertError(
            f"{out}: an interrupted run left {partial} ({len(journaled)} shard(s) finished); rerun the same "
            "command with --resume to continue it, or pass --overwrite to discard it and start over"
        )
    if old is not None and resume:
        if old["fingerprint"] != stage.fingerprint["fingerprint"]:
            raise ConvertError(
                f"{partial}: cannot resume: the interrupted run was a different command "
                f"({describe_difference(old['fingerprint'], stage.fingerprint['fingerprint'])}); rerun it as it "
                "was, or pass --overwrite without --resume to start over"
            )
        done = _kept_shards(stage, journaled)
        if rank_journals(partial):
            _fold_rank_journals(partial, old, done)
        if needed_bytes is not None:
            check_free_space(partial, max(0, needed_bytes - sum(r["size"] for r in done.values())), f"the output {out}")
        for path in stage.dir.iterdir():
            if path.name not in done:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        stage.fingerprint, stage.done = old, done
        return
    for path in partial.iterdir():  # empty, stale, or discarded with --overwrite
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if needed_bytes is not None:
        check_free_space(partial, needed_bytes, f"the output {out}")
    stage.dir.mkdir()
    st = stage.dir.stat()
    stage.fingerprint = {**stage.fingerprint, "model_dev": st.st_dev, "model_ino": st.st_ino}
    _append(partial / JOURNAL, stage.fingerprint)
    fsync_path(partial)
    fsync_path(partial.parent)


def follower_stage(out: Path, record: dict, done: dict[str, dict], rank: int) -> Stage:
    """The staging area rank 0 opened, as another torchrun rank writes into it: no lock (rank 0 holds it), its
    own journal; it never publishes, and cleaning up after an error is rank 0's (``convert.output.job``)."""
    return Stage(out, partial_path(out), record, dict(done), journal=rank_journal(rank))


def _model_stat(record: dict) -> os.stat_result:
    """A stat result carrying only the device and inode the journal recorded for the model directory."""
    return os.stat_result((0, record.get("model_ino", -1), record.get("model_dev", -1), 0, 0, 0, 0, 0, 0, 0))
