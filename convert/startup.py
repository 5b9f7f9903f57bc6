"""Warm the page cache with the files the process is about to import: its start-up, read sequentially.

On a cold page cache a ``convert`` process spends seconds importing torch, starting CUDA and importing
Triton, and nearly all of it is waiting for the disk: the loader faults in pages of a few large shared
libraries and reads thousands of small ``.pyc`` files, one small random read at a time (about 0.7 GB in
6.5 s on the GPU machine, where the disk streams 1.7 GB/s). Asking the kernel for those files up front
(``convert.readahead.warm``, ``posix_fadvise(WILLNEED)``: asynchronous, large reads, from the early reader's
child process) turns the random reads into sequential ones that run while the interpreter is still starting.

Which files: a *start-up profile* that every finished ``convert`` command leaves behind (the shared
libraries mapped and the module files loaded, in load order, then the earlier profile's other files; one per
Python environment, under ``cache_dir()``), so the next run asks for exactly what this environment loads. Without a
profile yet, torch's own libraries. The profile holds paths only, is written atomically and is ignored when
unreadable; nothing here ever fails a command.

Standard library only: it runs before anything heavy is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import sys
import tempfile
from pathlib import Path

MAX_FILES = 20000


def cache_dir() -> Path:
    """Where convert keeps what it learnt on earlier runs (start-up profiles, models' definitions):
    ``$CONVERT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ckpt-convert``."""
    if os.environ.get("CONVERT_CACHE_DIR"):
        return Path(os.environ["CONVERT_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "ckpt-convert"
    try:
        return Path.home() / ".cache" / "ckpt-convert"
    except RuntimeError:  # no home directory (a container's user without one)
        return Path(tempfile.gettempdir()) / f"ckpt-convert-{os.getuid()}"


def temporary_name(path: Path) -> Path:
    """A sibling to write ``path`` into before renaming it over: unique to this process on this host (a home
    directory may be shared by the nodes of a torchrun job)."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def profile_path() -> Path:
    """This environment's profile: one per interpreter and ``sys.prefix`` (a venv's files are its own);
    ``CONVERT_STARTUP_PROFILE`` names another file."""
    if os.environ.get("CONVERT_STARTUP_PROFILE"):
        return Path(os.environ["CONVERT_STARTUP_PROFILE"])
    key = hashlib.sha1(f"{sys.executable}\0{sys.prefix}\0{sys.version}".encode()).hexdigest()[:16]
    return cache_dir() / f"startup-{key}.txt"


def loaded_files() -> list[str]:
    """The shared libraries this process maps (in mapping order), then its modules' files (in import order)."""
    files: dict[str, None] = {}
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)  # address, perms, offset, device, inode[, path]
                path = fields[5].strip() if len(fields) == 6 else ""
                if path.startswith("/") and ".so" in path and not path.endswith("(deleted)"):
                    files[path] = None
    except OSError:
        pass
    for module in list(sys.modules.values()):
        for attr in ("__cached__", "__file__"):
            path = getattr(module, attr, None)
            if isinstance(path, str) and os.path.isfile(path):
                files[path] = None
                break
    return list(files)[:MAX_FILES]


def record(path: Path | None = None) -> None:
    """Leave this process's start-up profile for the next run (atomically; errors are ignored): its files, then
    those of the earlier profile it did not load (another command's: ``quantize`` imports transformers, a plain
    ``merge`` does not), so that whichever command runs next finds its files asked for."""
    path = path or profile_path()
    try:
        earlier = path.read_text().splitlines() if path.is_file() else []
    except OSError:
        earlier = []
    files = list(dict.fromkeys([*loaded_files(), *(f for f in earlier if f and os.path.isfile(f))]))[:MAX_FILES]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path)
        tmp.write_text("\n".join(files) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def profiled_files(path: Path | None = None) -> list[str]:
    """The files of the last profile, else torch's shared libraries (found without importing torch)."""
    try:
        return [line for line in (path or profile_path()).read_text().splitlines() if line][:MAX_FILES]
    except OSError:
        pass
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return [str(p) for p in sorted(lib.glob("*.so*"))]
