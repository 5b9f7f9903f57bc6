"""The start-up warm-up (convert.startup) and the console script's exit: what a process loads is recorded and
asked for next time, and the fast exit keeps every exit status and line of output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from convert import readahead, startup
from tests.helpers import subprocess_env


def test_the_profile_lists_what_was_loaded_and_warm_asks_for_each(tmp_path, monkeypatch) -> None:
    profile = tmp_path / "profile.txt"
    startup.record(profile)
    files = startup.profiled_files(profile)
    torch_libs = [f for f in files if f.startswith(str(Path(torch.__file__).parent / "lib"))]
    assert torch_libs and all(Path(f).is_file() for f in files)
    assert startup.__file__ in files or startup.__cached__ in files  # module files too, each once
    assert len(files) == len(set(files))
    asked = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: asked.append((fd, offset, length)))
    readahead.warm([*files[:5], str(tmp_path / "gone.so")])  # a file removed since is skipped
    assert len(asked) == 5 and all(offset == 0 and length == 0 for _, offset, length in asked)


def test_the_profile_keeps_the_files_of_earlier_commands(tmp_path) -> None:
    """A command that loaded fewer files (a merge, without transformers) keeps the others' in the profile, after
    its own; files removed since are dropped."""
    profile, other, gone = tmp_path / "profile.txt", tmp_path / "other.py", tmp_path / "gone.py"
    other.write_text("")
    profile.write_text(f"{other}\n{gone}\n{startup.__file__}\n")
    startup.record(profile)
    files = startup.profiled_files(profile)
    assert files[-1] == str(other) and str(gone) not in files and len(files) == len(set(files))
    assert files.index(str(other)) > files.index(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))


def test_without_a_profile_torch_libraries_are_warmed(tmp_path) -> None:
    files = startup.profiled_files(tmp_path / "none.txt")
    assert files and all(Path(f).parent == Path(torch.__file__).parent / "lib" for f in files)
    (tmp_path / "bad").mkdir()
    startup.record(tmp_path / "bad" / "profile.txt" / "x")  # an unwritable profile is ignored


def test_the_console_script_exits_with_the_commands_status(tiny_llama, tmp_path) -> None:
    base, adapter = tiny_llama
    profile = tmp_path / "profile.txt"
    env = subprocess_env(CONVERT_STARTUP_PROFILE=str(profile))
    run = [sys.executable, "-m", "convert.cli", "merge", "--base", str(base), "--adapter", str(adapter)]
    ok = subprocess.run([*run, "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and "merged 14 tensors" in ok.stdout, ok.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so") in profile.read_text()  # left for next time
    bad = subprocess.run([*run, "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "not empty" in bad.stderr
    usage = subprocess.run([*run[:3], "merge", "--bogus"], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "No such option" in usage.stderr


def test_the_cache_directory(tmp_path, monkeypatch) -> None:
    """$CONVERT_CACHE_DIR, else $XDG_CACHE_HOME/ckpt-convert, else ~/.cache/ckpt-convert, else (no home
    directory) one of this user's in the temporary directory."""
    monkeypatch.setenv("CONVERT_CACHE_DIR", str(tmp_path / "mine"))
    assert startup.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("CONVERT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert startup.cache_dir() == tmp_path / "xdg" / "ckpt-convert"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert startup.cache_dir() == tmp_path / "home" / ".cache" / "ckpt-convert"

    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", classmethod(no_home))
    assert startup.cache_dir().name == f"ckpt-convert-{os.getuid()}"
