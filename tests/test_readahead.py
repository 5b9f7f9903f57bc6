"""The early read-ahead: which command lines start it, that it stays within its budget and never writes."""

from __future__ import annotations

import hashlib
import importlib
import os
import sys

import pytest

import convert
from convert import readahead


@pytest.mark.parametrize(
    ("argv", "orig_argv", "expected"),
    [
        (["/venv/bin/convert", "merge", "--base", "b", "--adapter", "a"], [], "b"),
        (["/venv/bin/convert", "quantize", "--out", "o", "--base=b2"], [], "b2"),
        (["-m", "merge", "--adapter", "a", "--base", "b"], ["python3", "-m", "convert.cli", "merge"], "b"),
        (["/venv/bin/convert", "inspect", "--base", "b"], [], None),  # not a merge
        (["/venv/bin/convert", "merge", "--base"], [], None),  # no value: click reports it
        (["/venv/bin/pytest", "merge", "--base", "b"], ["python3", "/venv/bin/pytest"], None),  # not the CLI
        (["-m", "merge", "--base", "b"], ["python3", "-m", "pytest", "merge"], None),
        ([], [], None),
    ],
)
def test_base_of_command_line(argv, orig_argv, expected):
    assert readahead.base_of_command_line(argv, orig_argv) == expected


def shard_files(tmp_path, sizes):
    paths = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"model-{i + 1:05d}-of-{len(sizes):05d}.safetensors"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    return paths


def test_read_ahead_stays_within_budget_in_order_and_never_writes(tmp_path, monkeypatch):
    paths = shard_files(tmp_path, [3 * readahead.STEP + 5, 2 * readahead.STEP])
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    reads: list[tuple[int, int, int]] = []
    real = os.preadv

    def counting(fd, buffers, offset):
        n = real(fd, buffers, offset)
        reads.append((os.fstat(fd).st_size, offset, n))
        return n

    monkeypatch.setattr(os, "preadv", counting)
    budget = 3 * readahead.STEP + 5 + readahead.STEP // 2  # the first shard, then half a step of the second
    readahead.read_ahead(paths, budget)
    assert sum(n for _, _, n in reads) == budget
    first = [r for r in reads if r[0] == paths[0].stat().st_size]
    assert [offset for _, offset, _ in first] == [0, readahead.STEP, 2 * readahead.STEP, 3 * readahead.STEP]
    assert reads[-1][1:] == (0, readahead.STEP // 2)  # the second shard, from its start
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths] == digests


def test_start_reads_shards_of_a_local_directory_only(tmp_path):
    assert readahead.start("some-org/some-model") is None  # a Hub repo id: nothing local to read
    assert readahead.start(str(tmp_path)) is None  # no shards
    shard_files(tmp_path, [1000])
    assert readahead.start(str(tmp_path), budget=0) is None
    thread = readahead.start(str(tmp_path), budget=1 << 20)
    assert thread is not None and thread.daemon
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_missing_shard_ends_the_read_ahead_quietly(tmp_path):
    readahead.read_ahead([tmp_path / "gone.safetensors"], 1 << 20)


@pytest.fixture
def recorded_starts(monkeypatch):
    started: list[str] = []
    monkeypatch.setattr(readahead, "start", lambda base, budget=None, files=(): started.append(base))
    return started


def test_the_command_line_starts_it_before_the_command_runs(tmp_path, monkeypatch, recorded_starts):
    from click.testing import CliRunner

    from convert.cli import main

    (tmp_path / "base").mkdir()
    args = ["merge", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/convert", *args])
    monkeypatch.delenv("CONVERT_READAHEAD", raising=False)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "no model.safetensors" in result.output  # an empty base: refused, after the start
    assert recorded_starts == [str(tmp_path / "base")]
    monkeypatch.setenv("CONVERT_READAHEAD", "0")
    CliRunner().invoke(main, args)
    assert recorded_starts == [str(tmp_path / "base")]  # turned off


def test_importing_the_package_or_the_cli_starts_nothing_and_imports_no_torch(monkeypatch, recorded_starts):
    """The command line starts reading before torch is imported: importing ``convert`` and ``convert.cli``
    must not import it (nor start anything, as a library)."""
    import subprocess

    code = "import sys, convert, convert.cli; print('torch' in sys.modules)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0 and found.stdout.split() == ["False"], found.stderr
    importlib.reload(convert)  # under pytest: argv is pytest's
    assert recorded_starts == []
    assert convert.merge.__name__ == "merge"  # the public API is still the function


CHILD = """
import os, sys, time
from convert import readahead
marker = sys.argv[1]

def work():
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)  # the parent leaves long before: the child must not outlive it

readahead.in_background(work)
for _ in range(500):
    if os.path.exists(marker) and open(marker).read():
        break
    time.sleep(0.01)
print(os.getpid())
"""


def test_early_reads_run_in_a_child_process_that_dies_with_its_parent(tmp_path):
    """The early reads run in a forked child (a thread would wait for the interpreter's lock between reads while
    the main thread imports), and that child never outlives the command."""
    import subprocess
    import time

    marker = tmp_path / "child-pid"
    done = subprocess.run([sys.executable, "-c", CHILD, str(marker)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    child = int(marker.read_text())
    assert child != int(done.stdout.strip())  # another process did the work
    for _ in range(200):  # killed by the parent-death signal once the parent exited (gone, or a zombie)
        try:
            state = open(f"/proc/{child}/stat").read().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        raise AssertionError(f"the early reader {child} outlived its parent")


def test_start_warms_the_files_then_reads_the_base(tmp_path, monkeypatch):
    order = []
    monkeypatch.setattr(readahead, "warm", lambda files: order.append(("warm", list(files))))
    monkeypatch.setattr(readahead, "read_ahead", lambda shards, budget: order.append(("read", shards, budget)))
    monkeypatch.setattr(readahead, "in_background", lambda work: work() or "started")
    assert readahead.start(None, files=["a.so"]) == "started"  # no base: the start-up's files alone
    shard_files(tmp_path, [10])
    assert readahead.start(str(tmp_path), budget=5, files=["a.so"]) == "started"
    assert order[0] == ("warm", ["a.so"]) and order[1][:2] == ("read", [])
    assert order[2:] == [("warm", ["a.so"]), ("read", sorted(tmp_path.glob("*.safetensors")), 5)]
    assert readahead.start(None) is None  # nothing to read
