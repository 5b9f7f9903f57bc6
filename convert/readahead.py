"""Read a merge's base from disk while Python is still importing torch.

A ``convert merge`` process spends its first seconds importing torch, starting CUDA and importing
Triton: on a cold page cache that is several seconds of small random reads of libraries, while
the disk, which a merge is bound by, sits nearly idle. So when the package is imported by the
``convert`` command line (and only then), a thread starts reading the base's safetensors shards
into the page cache, in the order the merge reads them, before torch is imported; the merge then
finds its first gigabytes in memory. It reads at most a quarter of the available memory, into one
reused buffer (the pages it brings in are the kernel's cache, reclaimable, not this process's
memory), and it never writes. ``CONVERT_READAHEAD=0`` turns it off.

Standard library only: it runs before anything heavy is imported.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
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


def start(base: str, budget: int | None = None) -> threading.Thread | None:
    """Start reading a local base directory's shards (by name, as the merge orders them) in a daemon thread."""
    directory = Path(base)
    if not directory.is_dir():
        return None  # a Hub repo id, or a path the merge will reject itself
    shards = sorted(directory.glob("*.safetensors"))
    budget = available_memory() // 4 if budget is None else budget
    if not shards or budget <= 0:
        return None
    thread = threading.Thread(target=read_ahead, args=(shards, budget), daemon=True, name="convert-readahead")
    thread.start()
    return thread


def enabled() -> bool:
    """Whether early reads are on: ``CONVERT_READAHEAD=0`` turns them off (both this module's and
    ``convert.startup``'s)."""
    return os.environ.get("CONVERT_READAHEAD", "1") != "0" and hasattr(os, "preadv")


def start_for_command_line(argv: list[str], orig_argv: list[str]) -> threading.Thread | None:
    """``start`` for a ``convert merge`` command line; None for anything else (library use, tests)."""
    if not enabled():
        return None
    base = base_of_command_line(argv, orig_argv)
    return start(base) if base else None
