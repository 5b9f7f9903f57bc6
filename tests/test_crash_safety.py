"""Crash safety of `convert merge`: SIGKILL at named points, `--resume`, concurrent runs, a full disk.

Each kill runs the real CLI in a subprocess (``python -m convert.cli`` from the
repository root) with ``CONVERT_FAULT`` set, so the process dies exactly there;
the output path must then hold no finished model, and ``--resume`` must finish
with every file byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import formats.writer
from convert import merge
from convert.cli import main
from convert.output.stage import JOURNAL, partial_path
from formats.errors import ConvertError
from tests.helpers import ROOT, journaled, make_adapter, make_base

OPTIONS = ["--max-shard-size", "20KB", "--chunk-size", "1KiB", "--device", "cpu", "-q"]


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """A tiny Llama and adapter, and the digest of an uninterrupted merge (6 shards)."""
    tmp = tmp_path_factory.mktemp("inputs")
    base = make_base(tmp / "base", "llama")
    adapter = make_adapter(tmp / "adapter", base, r=4, lora_alpha=8, target_modules="all-linear")
    result = CliRunner().invoke(main, merge_args(base, adapter, tmp / "reference"))
    assert result.exit_code == 0, result.output
    reference = digest(tmp / "reference")
    assert sum(n.endswith(".safetensors") for n in reference) >= 4
    return base, adapter, reference


def merge_args(base: Path, adapter: Path, out: Path, *extra: str) -> list[str]:
    return ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), *OPTIONS, *extra]


def run_killed(base: Path, adapter: Path, out: Path, fault: str, *extra: str) -> None:
    """Run the CLI in a subprocess that SIGKILLs itself at ``fault``; check it died there."""
    killed_at(fault, *merge_args(base, adapter, out, *extra))


def assert_no_finished_model(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), f"{out} looks finished: {list(out.iterdir())}"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))




FAULTS = {
    "first job, inside the first shard": "job:1",
    "inside a later shard": "job:45",
    "between shards": "after-shard:2",
    "after the last shard": "after-shard:5",
    "just before the rename": "before-rename",
}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_kill_then_resume_is_byte_identical(inputs, tmp_path, fault):
    base, adapter, reference = inputs
    out = tmp_path / "out"
    run_killed(base, adapter, out, fault)
    assert_no_finished_model(out)
    assert (partial_path(out) / JOURNAL).exists()
    kept = journaled(out)
    kept_stat = {n: (partial_path(out) / "model" / n).stat() for n in kept}

    # Without --resume the leftovers are refused, not silently thrown away.
    refused = invoke(*merge_args(base, adapter, out))
    assert refused.exit_code == 2 and "--resume" in refused.stderr and "interrupted run" in refused.stderr
    assert_no_finished_model(out)

    resumed = invoke(*merge_args(base, adapter, out, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert digest(out) == reference
    assert not partial_path(out).exists()
    for name, st in kept_stat.items():  # journaled shards were kept, not written again
        assert (out / name).stat().st_ino == st.st_ino and (out / name).stat().st_mtime_ns == st.st_mtime_ns


def test_resume_with_nothing_to_resume_just_runs(inputs, tmp_path):
    base, adapter, reference = inputs
    result = invoke(*merge_args(base, adapter, tmp_path / "out", "--resume"))
    assert result.exit_code == 0, result.output
    assert digest(tmp_path / "out") == reference and not partial_path(tmp_path / "out").exists()


def test_repeated_kills_then_resume(inputs, tmp_path):
    """Killed, resumed and killed again, twice, before a resume that finishes."""
    base, adapter, reference = inputs
    out = tmp_path / "out"
    run_killed(base, adapter, out, "after-shard:1")
    run_killed(base, adapter, out, "after-shard:2", "--resume")
    assert len(journaled(out)) == 3
    run_killed(base, adapter, out, "job:3", "--resume")
    assert_no_finished_model(out)
    assert invoke(*merge_args(base, adapter, out, "--resume")).exit_code == 0
    assert digest(out) == reference


def test_kill_after_rename_leaves_a_finished_model(inputs, tmp_path):
    """Killed between the rename and the clean-up: OUT is complete; the next run clears the leftovers."""
    base, adapter, reference = inputs
    out = tmp_path / "out"
    run_killed(base, adapter, out, "after-rename")
    assert digest(out) == reference and partial_path(out).exists()
    result = invoke(*merge_args(base, adapter, out, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert digest(out) == reference and not partial_path(out).exists()


def test_overwrite_replaces_an_old_output_in_one_step(inputs, tmp_path):
    base, adapter, reference = inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old model")
    run_killed(base, adapter, out, "before-rename", "--overwrite")
    assert (out / "old.txt").read_text() == "old model"  # the old output stays until the new one is complete
    assert invoke(*merge_args(base, adapter, out, "--overwrite", "--resume")).exit_code == 0
    assert digest(out) == reference


def test_resume_with_a_different_command_is_refused(inputs, tmp_path):
    base, adapter, reference = inputs
    out = tmp_path / "out"
    run_killed(base, adapter, out, "after-shard:2")
    before = digest(partial_path(out) / "model")
    result = invoke(*merge_args(base, adapter, out, "--resume", "--dtype", "bf16"))
    assert result.exit_code == 2 and "different command" in result.stderr and "dtype" in result.stderr
    assert digest(partial_path(out) / "model") == before  # the partial output is left alone

    # An input changed since the kill: refused too, naming the file.
    config = adapter / "adapter_config.json"
    text = config.read_text()
    try:
        config.write_text(text + " ")
        result = invoke(*merge_args(base, adapter, out, "--resume"))
        assert result.exit_code == 2 and "adapter_config.json changed" in result.stderr
    finally:
        config.write_text(text)
    # --overwrite (without --resume) discards the partial output and starts over.
    assert invoke(*merge_args(base, adapter, out, "--overwrite")).exit_code == 0
    assert digest(out) == reference


def test_corrupted_journaled_shard_is_written_again(inputs, tmp_path):
    base, adapter, reference = inputs
    out = tmp_path / "out"
    run_killed(base, adapter, out, "after-shard:2")
    shard = partial_path(out) / "model" / journaled(out)[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = invoke(*merge_args(base, adapter, out, "--resume"))
    assert result.exit_code == 0 and "differs from the journal" in result.stderr
    assert digest(out) == reference


def test_a_live_run_is_not_clobbered(inputs, tmp_path):
    """A second run on the same output is refused while the first holds the lock."""
    base, adapter, _ = inputs
    out = tmp_path / "out"
    partial = partial_path(out)
    partial.mkdir()
    fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a live run holds
        for extra in ([], ["--resume"], ["--overwrite"]):
            result = invoke(*merge_args(base, adapter, out, *extra))
            assert result.exit_code == 2 and "another convert run is writing" in result.stderr
        assert partial.is_dir() and not out.exists()
    finally:
        os.close(fd)


def test_free_space_is_checked_before_writing(inputs, tmp_path, monkeypatch):
    base, adapter, _ = inputs
    import convert.execute.cpu
    import convert.output.stage

    class Tiny:
        f_bavail, f_frsize = 1000, 4096

    monkeypatch.setattr(convert.output.stage.os, "statvfs", lambda path: Tiny())
    result = invoke(*merge_args(base, adapter, tmp_path / "out"))
    assert result.exit_code == 2 and "not enough free disk space" in result.stderr
    assert "MB free" in result.stderr and "4.1 MB free" in result.stderr
    assert not list(tmp_path.iterdir())


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int):
    """A real size-limited filesystem (tmpfs), where this machine allows mounting one."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the injected ENOSPC test runs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_disk_full_on_a_real_small_filesystem(inputs, tmp_path, monkeypatch):
    """A tmpfs too small for the output: refused up front with the numbers. One that fills up during
    the merge (ballast written after the check): a clear error, nothing published, resumable."""
    base, adapter, reference = inputs
    needed = sum(os.path.getsize(base / n) for n in os.listdir(base) if n.endswith(".safetensors"))
    with small_tmpfs(tmp_path / "fs", 1 << 20) as fs:
        result = invoke(*merge_args(base, adapter, fs / "out"))
        assert result.exit_code == 2 and "not enough free disk space" in result.stderr, result.output
        assert not list(fs.iterdir())

    import convert.output.stage

    with small_tmpfs(tmp_path / "fs2", (needed + (32 << 20)) // 4096 * 4096) as fs:
        check = convert.output.stage.check_free_space

        def check_then_fill(directory, size, what):
            check(directory, size, what)  # passes; then another process takes the space
            with open(fs / "ballast", "wb", buffering=0) as f:
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 4096)
                f.truncate(f.tell() - 16384)  # room for the journal, not for the shards

        monkeypatch.setattr(convert.output.stage, "check_free_space", check_then_fill)
        result = invoke(*merge_args(base, adapter, fs / "out"))
        assert result.exit_code == 2, result.output
        message = result.stderr.strip()
        assert "No space left on device" in message and "--resume" in message and "\n" not in message
        assert_no_finished_model(fs / "out")

        monkeypatch.setattr(convert.output.stage, "check_free_space", check)
        (fs / "ballast").unlink()  # space freed: the same command resumes
        result = invoke(*merge_args(base, adapter, fs / "out", "--resume"))
        assert result.exit_code == 0, result.output
        assert digest(fs / "out") == reference


def test_injected_enospc_then_resume(inputs, tmp_path, monkeypatch):
    """Disk full injected in the writer after 3 shards (works on any machine)."""
    base, adapter, reference = inputs
    out = tmp_path / "out"
    real = formats.writer._pwrite_all
    state = {"shards": 0}

    def full_disk(fd, view, offset):
        if state["shards"] >= 3:
            raise OSError(28, "No space left on device")
        return real(fd, view, offset)

    import convert.output.stage

    shard_done = convert.output.stage.Stage.shard_done

    def counting(self, name):
        shard_done(self, name)
        state["shards"] += 1

    monkeypatch.setattr(formats.writer, "_pwrite_all", full_disk)
    monkeypatch.setattr(formats.writer.os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(18, "EXDEV")))
    monkeypatch.setattr(convert.output.stage.Stage, "shard_done", counting)
    # One worker: shards then finish in plan order, so writes are left after the third (with many workers on a
    # many-core machine the last shards could be written before the third is journaled).
    monkeypatch.setattr(convert.execute.cpu, "MAX_WORKERS", 1)
    with pytest.raises(ConvertError, match="No space left on device.*kept in .*rerun with --resume"):
        merge(base, adapter, out, max_shard_size="20KB", chunk_size="1KiB", device="cpu")
    assert_no_finished_model(out)
    assert len(journaled(out)) >= 3
    monkeypatch.undo()
    assert invoke(*merge_args(base, adapter, out, "--resume")).exit_code == 0
    assert digest(out) == reference


def killed_at(fault: str, *args: str) -> None:
    """Run ``convert ARGS`` in a subprocess that SIGKILLs itself at ``fault``; check it died there."""
    env = {**os.environ, "CONVERT_FAULT": fault}
    proc = subprocess.run(
        [sys.executable, "-m", "convert.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -9, (fault, proc.returncode, proc.stderr)


def kill_then_resume(args: list[str], out: Path, fault: str) -> None:
    """Run ``convert ARGS --out OUT`` in a subprocess killed at ``fault``; check that nothing finished-looking is
    at OUT, that a plain rerun is refused, and that ``--resume`` finishes."""
    killed_at(fault, *args, "--out", str(out))
    assert_no_finished_model(out)
    refused = invoke(*args, "--out", str(out))
    assert refused.exit_code == 2 and "--resume" in refused.stderr
    resumed = invoke(*args, "--out", str(out), "--resume")
    assert resumed.exit_code == 0, resumed.output


@pytest.mark.parametrize("fault", ["job:3", "after-shard:1"])
def test_quantize_kill_then_resume_is_byte_identical(inputs, tmp_path, fault):
    """A quantized output (its options, a dataclass with tuples, go through the JSON journal) resumes too."""
    base, adapter, _ = inputs
    args = ["merge", "--base", str(base), "--adapter", str(adapter), *OPTIONS, "--quantize", "nf4"]
    args += ["--skip-modules", "o_proj"]
    assert invoke(*args, "--out", str(tmp_path / "reference")).exit_code == 0
    kill_then_resume(args, tmp_path / "out", fault)
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "reference")


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("fault", ["job:5", "after-shard:2", "before-rename"])
def test_loftq_init_kill_then_resume_is_byte_identical(fault, tmp_path):
    """loftq-init stages its output like merge: a kill leaves no finished model; --resume gives the same bytes."""
    from tests.helpers import make_wide_base  # 64-wide rows: whole 4-bit blocks

    base = make_wide_base(tmp_path / "base", "llama", "bf16")
    args = ["loftq-init", "--base", str(base), "--rank", "2", "--iters", "2", "--max-shard-size", "12KB"]
    args += ["--device", "cpu", "--save-dequantized", "-q"]
    assert invoke(*args, "--out", str(tmp_path / "reference")).exit_code == 0
    reference = tree_digest(tmp_path / "reference")
    assert sum(n.endswith(".safetensors") and "/" not in n for n in reference) >= 3
    out = tmp_path / "out"
    kill_then_resume(args, out, fault)
    assert not partial_path(out).exists()
    config = "adapter/adapter_config.json"  # names the output directory itself (base_model_name_or_path)
    assert {k: v for k, v in tree_digest(out).items() if k != config} == {
        k: v for k, v in reference.items() if k != config
    }
    configs = [json.loads((d / config).read_text()) for d in (out, tmp_path / "reference")]
    assert [{**c, "base_model_name_or_path": None} for c in configs] == [
        {**configs[1], "base_model_name_or_path": None}
    ] * 2


def test_resume_with_other_training_quantization_is_refused(inputs, tmp_path):
    """--merge-into dequantized: the quantization undone (--train-quant, --blocksize) is part of the fingerprint."""
    base, adapter, _ = inputs
    args = ["merge", "--base", str(base), "--adapter", str(adapter), *OPTIONS, "--merge-into", "dequantized"]
    args += ["--train-quant", "nf4"]
    killed_at("after-shard:1", *args, "--blocksize", "64", "--out", str(tmp_path / "out"))
    refused = invoke(*args, "--blocksize", "128", "--out", str(tmp_path / "out"), "--resume")
    assert refused.exit_code == 2 and "option train_quant" in refused.stderr, refused.stderr


def test_file_digest_is_a_tree_of_piece_hashes(tmp_path, monkeypatch):
    """Finished shards are hashed in parallel pieces: the digest is the sha256 of the pieces' sha256 digests, any
    changed byte changes it, and a file of one piece or none hashes too."""
    from convert.output import stage as output_dir

    monkeypatch.setattr(output_dir, "HASH_PIECE", 1000)
    monkeypatch.setattr(output_dir, "HASH_BLOCK", 300)
    data = os.urandom(2500)
    path = tmp_path / "shard"
    path.write_bytes(data)
    pieces = b"".join(hashlib.sha256(data[i : i + 1000]).digest() for i in range(0, 2500, 1000))
    assert output_dir.file_digest(path) == "sha256-tree:" + hashlib.sha256(pieces).hexdigest()
    path.write_bytes(data[:1234] + bytes([data[1234] ^ 1]) + data[1235:])
    assert output_dir.file_digest(path) != "sha256-tree:" + hashlib.sha256(pieces).hexdigest()
    path.write_bytes(b"")
    assert output_dir.file_digest(path) == "sha256-tree:" + hashlib.sha256(b"").hexdigest()
