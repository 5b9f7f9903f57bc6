"""Read a merge's base from disk while Python is still importing torch.

A ``convert merge`` process spends its first seconds importing torch, starting CUDA and importing
Triton: on a cold page cache that is several seconds of small random reads of libraries, while
the disk, which a merge is bound by, sits nearly idle. So when the package is imported by the
``convert`` command line (and only then), the files the start-up will load are asked for
(``warm``, the list is ``convert.startup``'s profile) and the base's safetensors shards are read
into the page cache, in the order the merge reads them, before torch is imported; the merge then
finds its first gigabytes in memory. It reads at most a quarter of the available memory, into one
reused buffer (the pages it brings in are the kernel's cache, reclaimable, not this process's
memory), and it never writes. ``CONVERT_READAHEAD=0`` turns it off.

The early reads run in a forked child process, not a thread: a thread needs the interpreter's lock
between two reads, and while the main thread imports it gets it once per switch interval (5 ms), so on
the GPU machine the disk read 0.3-0.5 GB/s during the start-up against 1.3-1.7 GB/s for ``cp``. The
child is forked before any thread or heavy module exists, makes system calls only, and dies with its
parent (Linux's parent-death signal); where there is no ``fork`` a thread does the same work
(``CONVERT_READAHEAD=thread`` asks for the thread, to measure one against the other).

Standard library only: it runs before anything heavy is imported.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

# Bytes a read. Small, so that the libraries' page faults wait behind at most one read of this: with 16 MiB
# reads the start-up took 17 s instead of 8.7 s on the GPU machine and the run was no faster (1-4 MiB: 9-11 s).
STEP = 1 << 20


def base_of_command_line(argv: list[str], orig_argv: list[str]) -> str | None:
    """The ``--base`` of a ``convert merge`` / ``convert quantize`` command line, else None.

    ``argv`` is ``sys.argv`` and ``orig_argv`` the interpreter's own command line: the command is
    the ``convert`` script, or ``python -m convert.cli``."""
    script = bool(argv) and os.path.basename(argv[0]) == "convert"
    module = any(a == "-m" and b == "convert.cli" for a, b in zip(orig_argv, orig_argv[1:], strict=False))
    if not (script or module) or len(argv) < 2 or argv[1] not in ("merge", "quantize"):
        return None
    for i, arg in enumerate(argv[2:], start=2):
        if arg.startswith("--base="):
            return arg.partition("=")[2]
        if arg == "--base" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def each_file(paths: Iterable[str | Path]) -> Iterator[int]:
    """Each path opened read-only in turn (one that cannot be opened is skipped), closed after its turn."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            yield fd
        finally:
            os.close(fd)


def read_ahead(shards: list[Path], budget: int) -> None:
    """Read the shards in order, ``STEP`` bytes at a time, until ``budget`` bytes; errors end it quietly
    (the merge reports its own)."""
    buffer = bytearray(STEP)
    for fd in each_file(shards):
        try:
            offset, size = 0, os.fstat(fd).st_size
            while budget > 0 and offset < size:
                n = os.preadv(fd, [memoryview(buffer)[: min(STEP, budget)]], offset)
                if n <= 0:
                    break
                offset += n
                budget -= n
        except OSError:
            return


def warm(files: list[str]) -> None:
    """Ask the kernel to read ``files`` into the page cache, in order; returns once every request is queued."""
    if not hasattr(os, "posix_fadvise"):
        return
    for fd in each_file(files):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass


def local_shards(base: str | None) -> list[Path]:
    """A local base directory's safetensors shards, by name (as the merge orders them); none for a Hub repo id
    or a path the merge will reject itself."""
    directory = Path(base) if base else None
    return sorted(directory.glob("*.safetensors")) if directory and directory.is_dir() else []


def start(base: str | None, budget: int | None = None, files: list[str] = ()) -> threading.Thread | None:
    """In the background: ``warm`` ``files``, then read a local base directory's shards, up to ``budget`` bytes
    (a quarter of the available memory). Returns a daemon thread that ends with that work (None: nothing to do)."""
    shards = local_shards(base)
    budget = available_memory() // 4 if budget is None else budget
    if not shards or budget <= 0:
        shards = []
    if not shards and not files:
        return None

    def work() -> None:
        warm(list(files))
        read_ahead(shards, budget)

    return in_background(work)


def in_background(work: Callable[[], None]) -> threading.Thread:
    """Run ``work`` in a forked child (a thread where ``fork`` is missing, or threads already run, which a fork
    would copy mid-step, or ``CONVERT_READAHEAD=thread``); returns the daemon thread that runs it or waits for
    the child."""
    if not hasattr(os, "fork") or threading.active_count() > 1 or os.environ.get("CONVERT_READAHEAD") == "thread":
        thread = threading.Thread(target=work, daemon=True, name="convert-readahead")
        thread.start()
        return thread
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: system calls only, then out without running any of the parent's clean-up
        try:
            die_with(parent)
            let_go_of_standard_streams()
            work()
        finally:
            os._exit(0)
    thread = threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True, name="convert-readahead")
    thread.start()
    return thread


def let_go_of_standard_streams() -> None:
    """Point the child's stdin, stdout and stderr at /dev/null: a caller reading the command's output through a
    pipe sees it end when the command ends, not when the child does."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent exits (Linux); leave at once if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere: the child ends by itself, after at most its budget
    if os.getppid() != parent:
        os._exit(0)


def enabled() -> bool:
    """Whether early reads are on: ``CONVERT_READAHEAD=0`` turns them off (both this module's and
    ``convert.startup``'s)."""
    return os.environ.get("CONVERT_READAHEAD", "1") != "0" and hasattr(os, "preadv")


def start_for_command_line(argv: list[str], orig_argv: list[str], files: list[str] = ()) -> threading.Thread | None:
    """``start`` for a command line: ``files`` (the start-up's), then the base of a ``convert merge`` /
    ``convert quantize``; None when turned off or with nothing to read."""
    if not enabled():
        return None
    return start(base_of_command_line(argv, orig_argv), files=files)
