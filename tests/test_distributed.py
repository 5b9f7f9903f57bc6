"""torchrun: every writing command shard-parallel over gloo ranks on localhost, against one process.

Each run is the real CLI under ``python -m torch.distributed.run --standalone`` (``--tee 3``: every line a rank
prints comes back prefixed ``[defaultK]:``). The oracle is the same command in one process writing the same
``OUT`` path (the LoftQ adapter's config records it): every file must be byte-identical. torchrun gives each
rank ``OMP_NUM_THREADS=1``; the one-process runs get the same, since LoftQ's CPU SVD rounds with the thread
count (merge and quantize do not: their CPU workers run torch single-threaded).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert.execute.cpu import usable_cores
from convert.output.ranks import owners
from convert.output.stage import JOURNAL, partial_path, rank_journal, read_journal
from tests.helpers import ROOT, make_adapter, make_base, subprocess_env, tree_digest
from tests.hub_server import FakeHub

SHARDS = ["--max-shard-size", "20KB", "--device", "cpu", "-q"]  # 5-6 output shards of the tiny Llama
LOFTQ = ["--rank", "4", "--iters", "2", "--double-quant", "--save-dequantized"]
TOKEN = "hf_test_secret_token_0123456789"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("models")
    base = make_base(tmp / "base", "llama", max_shard_size="40KB")
    adapter = make_adapter(tmp / "adapter", base, r=4, lora_alpha=8, target_modules="all-linear")
    return base, adapter


def convert(ranks: int, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`convert ARGS` in one process (``ranks=1``) or under torchrun with ``ranks`` gloo ranks."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "--tee", "3"]
    command = [sys.executable, *(launcher if ranks > 1 else []), "-m", "convert.cli", *args]
    environment = subprocess_env(OMP_NUM_THREADS="1", CONVERT_READAHEAD="0", **env)
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def reference(out: Path, *args: str) -> dict[str, str]:
    """The digest of every file a one-process run writes at ``out`` (then moved aside, so ``out`` is free)."""
    ok(convert(1, *args, "--out", str(out)))
    digest = tree_digest(out)
    shutil.rmtree(out)
    return digest


def rank_lines(result: subprocess.CompletedProcess, text: str) -> set[int]:
    """The ranks that printed a line containing ``text``."""
    lines = (result.stdout + result.stderr).splitlines()
    return {int(line[8 : line.index("]")]) for line in lines if line.startswith("[default") and text in line}


def merge_args(models: tuple[Path, Path]) -> list[str]:
    base, adapter = models
    return ["merge", "--base", str(base), "--adapter", str(adapter), *SHARDS]


@pytest.mark.parametrize("ranks", [2, 4])
def test_merge_is_byte_identical_to_one_process(models, tmp_path, ranks):
    out = tmp_path / "out"
    expected = reference(out, *merge_args(models))
    assert sum(n.endswith(".safetensors") for n in expected) >= 5  # several shards per rank
    result = ok(convert(ranks, *merge_args(models), "--out", str(out)))
    assert tree_digest(out) == expected
    assert not partial_path(out).exists()
    assert rank_lines(result, "error") == set()


def test_quantize_nf4_is_byte_identical(models, tmp_path):
    out = tmp_path / "out"
    args = ["quantize", "--base", str(models[0]), "--quantize", "nf4", "--double-quant", *SHARDS]
    expected = reference(out, *args)
    ok(convert(3, *args, "--out", str(out)))
    assert tree_digest(out) == expected


@pytest.mark.parametrize("ranks", [2, 4])
def test_loftq_init_is_byte_identical(models, tmp_path, ranks):
    """4-bit base, adapter (factors written by several ranks into one planned file) and dequantized base."""
    out = tmp_path / "out"
    args = ["loftq-init", "--base", str(models[0]), *LOFTQ, *SHARDS]
    expected = reference(out, *args)
    assert {"adapter/adapter_model.safetensors", "dequantized/config.json"} <= set(expected)
    ok(convert(ranks, *args, "--out", str(out)))
    assert tree_digest(out) == expected


def test_consolidate_dcp_is_byte_identical(tmp_path):
    from tests.training_runs import spawn_run

    run = spawn_run("fsdp2", tmp_path / "run", 2)
    out = tmp_path / "out"
    args = ["consolidate", str(run / "checkpoint"), "--from", "dcp", "--dtype", "bf16", *SHARDS]
    expected = reference(out, *args)
    ok(convert(2, *args, "--out", str(out)))
    assert tree_digest(out) == expected


def kept_files(partial: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every journaled shard: unchanged when a resume keeps them."""
    _, shards = read_journal(partial)
    return {name: ((partial / "model" / name).stat().st_ino, (partial / "model" / name).stat().st_mtime_ns)
            for name in shards}  # fmt: skip


def test_kill_one_rank_then_resume_with_the_same_and_other_rank_counts(models, tmp_path):
    out = tmp_path / "out"
    expected = reference(out, *merge_args(models))
    killed = convert(2, *merge_args(models), "--out", str(out), CONVERT_FAULT="after-shard:1", CONVERT_FAULT_RANK="1")
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stdout + killed.stderr
    assert not out.exists()
    partial = partial_path(out)
    rank1 = [json.loads(line)["shard"] for line in (partial / rank_journal(1)).read_text().splitlines()]
    assert len(rank1) == 1  # rank 1 journaled one shard and died; rank 0 journals into JOURNAL
    runs = ((2, out), (4, tmp_path / "other"), (1, tmp_path / "single"))
    for _, target in runs[1:]:
        shutil.copytree(partial, partial_path(target))  # the same leftovers, resumed by other rank counts
    for ranks, target in runs:
        before = kept_files(partial_path(target))
        assert rank1[0] in before and len(before) >= 2
        ok(convert(ranks, *merge_args(models), "--out", str(target), "--resume"))
        assert tree_digest(target) == expected, ranks
        after = {n: ((target / n).stat().st_ino, (target / n).stat().st_mtime_ns) for n in before}
        assert after == before, f"{ranks} rank(s) rewrote kept shards"


def test_bad_input_on_one_rank_stops_every_rank(models, tmp_path):
    """A NaN weight in a shard of the last rank: its SVD fails there; every rank ends with that one line."""
    base = tmp_path / "base"
    shutil.copytree(models[0], base)
    last = [f for f in sorted(base.glob("*.safetensors")) if any(n.endswith("proj.weight") for n in load_file(f))][-1]
    tensors = load_file(last)
    victim = sorted(n for n in tensors if n.endswith("proj.weight"))[-1]
    tensors[victim][0, 0] = float("nan")
    save_file(tensors, last, {"format": "pt"})
    out = tmp_path / "out"
    result = convert(2, "loftq-init", "--base", str(base), *LOFTQ, *SHARDS, "--out", str(out))
    assert result.returncode != 0
    assert rank_lines(result, f"error: {last}: tensor '{victim}': SVD failed") == {0, 1}
    assert rank_lines(result, "(rank 1 of 2)") == {0, 1}
    assert not out.exists() and not partial_path(out).exists()


def test_a_second_run_on_the_same_output_is_refused_by_rank_0_for_all(models, tmp_path):
    out = tmp_path / "out"
    partial = partial_path(out)
    partial.mkdir()
    import fcntl

    fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds the output
    try:
        result = convert(2, *merge_args(models), "--out", str(out))
    finally:
        os.close(fd)
    assert result.returncode != 0
    assert rank_lines(result, "another convert run is writing this output now") == {0, 1}


@pytest.fixture
def hub():
    server = FakeHub(tokens={TOKEN: "alice"}).start()
    yield server
    server.stop()


def test_hub_base_and_push_under_two_ranks(models, hub, tmp_path):
    """Each base shard is downloaded once (ranks fetch only their inputs' shards) and, with
    --no-keep-downloads, deleted once every rank is done; one commit, by rank 0."""
    base, adapter = models
    for repo, path in (("org/base", base), ("org/adapter", adapter)):
        hub.add_repo(repo, {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()})
    out = tmp_path / "out"
    expected = reference(out, *merge_args(models))
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_DISABLE_XET": "1"}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": TOKEN}
    args = ["merge", "--base", "org/base", "--adapter", "org/adapter", *SHARDS, "--out", str(out)]
    ok(convert(2, *args, "--push-to-hub", "org/merged", "--no-keep-downloads", **env))
    assert (tmp_path / "cache" / "models--org--base" / "snapshots").is_dir()
    assert not list((tmp_path / "cache" / "models--org--base").rglob("model*.safetensors"))
    merged = tree_digest(out)
    assert {k: v for k, v in merged.items() if k != "README.md"} == {
        k: v for k, v in expected.items() if k != "README.md"
    }  # the card names the Hub repos
    shards = [p.name for p in base.glob("*.safetensors")]
    for name in shards:
        assert len(hub.requests("GET", f"/org/base/resolve/.*/{name}$", ranged=False)) == 1, name
    repo = hub.repos["org/merged"]
    assert len(hub.requests("POST", "/commit/")) == 1 and len(repo.commits) == 2
    pushed = repo.commits[repo.branches["main"]]
    assert all(pushed[name] == (out / name).read_bytes() for name in merged)


def test_owners_are_contiguous_balanced_and_deterministic():
    assert owners([10] * 8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert owners([0, 0, 30, 10, 10, 10], 2) == [0, 0, 0, 1, 1, 1]
    assert owners([5], 3) == [1] and owners([], 2) == []
    assert owners([0, 0, 0, 0], 2) == [0, 0, 1, 1]  # all kept: nothing to balance
    costs = [7, 3, 9, 1, 4, 4, 8, 2, 6]
    assert owners(costs, 3) == owners(list(costs), 3) and owners(costs, 3) == sorted(owners(costs, 3))


def test_journal_reads_every_ranks_records(tmp_path):
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / JOURNAL).write_text(json.dumps({"fingerprint": {}}) + "\n" + json.dumps({"shard": "a"}) + "\n")
    (partial / rank_journal(2)).write_text(json.dumps({"shard": "b"}) + "\n" + '{"shard": "c", "si')  # torn
    assert set(read_journal(partial)[1]) == {"a", "b"}


@pytest.mark.gpu
@pytest.mark.parametrize("command", ["merge", "loftq-init"])
@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_sharing_one_gpu(models, tmp_path, ranks, command):
    """Several ranks on one GPU (gloo carries the exchanges: NCCL cannot put two ranks on one device)."""
    assert torch.cuda.is_available()
    out = tmp_path / "out"
    args = merge_args(models) if command == "merge" else ["loftq-init", "--base", str(models[0]), *LOFTQ, *SHARDS]
    args = [a if a != "cpu" else "cuda" for a in args]
    one_gpu = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    ok(convert(1, *args, "--out", str(out), **one_gpu))
    expected = tree_digest(out)
    shutil.rmtree(out)
    ok(convert(ranks, *args, "--out", str(out), **one_gpu))
    assert tree_digest(out) == expected


@pytest.mark.parametrize(
    ("affinity", "local_ranks", "expected"),
    [(range(16), None, 16), (range(16), "8", 2), (range(16), "32", 1), (range(4, 6), "8", 2), (range(3), None, 3)],
)
def test_cpu_workers_use_the_ranks_share_of_the_cores(affinity, local_ranks, expected, monkeypatch) -> None:
    """Ranks not pinned apart share the node's cores; a pinned rank (or a container) uses the cores it has."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(affinity), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    if local_ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    assert usable_cores() == expected
