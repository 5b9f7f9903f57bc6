"""``consolidate --from dcp``: a real FSDP2 checkpoint (2 gloo ranks), against ``dcp_to_torch_save``."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convert.commands.consolidate import consolidate
from formats.dcp import open_dcp
from formats.errors import ConvertError
from formats.safetensors_file import read_tensor
from tests.helpers import ROOT, load_output, subprocess_env
from tests.training_runs import Boom, assert_same_logits, copy_run, spawn_run

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    return spawn_run("fsdp2", tmp_path_factory.mktemp("fsdp2") / "run", 2)


def reference(checkpoint: Path, tmp: Path, key: str | None = "model") -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, tmp / "ref.pt")
    state = torch.load(tmp / "ref.pt", weights_only=True)
    return state[key] if key else state


def test_fsdp2_consolidates_bit_exact_and_loads(fsdp_run: Path, tmp_path: Path) -> None:
    ref = reference(fsdp_run / "checkpoint", tmp_path)
    result = consolidate("dcp", fsdp_run / "checkpoint", tmp_path / "out", max_shard_size="20KB")
    out = load_output(tmp_path / "out")
    assert len(result.files) > 3 and "model.safetensors.index.json" in result.files  # several shards
    assert sorted(out) == sorted(ref)
    for name, tensor in ref.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor), name

    assert_same_logits(tmp_path / "out", fsdp_run, ref)


def test_fsdp2_bf16_output(fsdp_run: Path, tmp_path: Path) -> None:
    ref = reference(fsdp_run / "checkpoint", tmp_path)
    consolidate("dcp", fsdp_run / "checkpoint", tmp_path / "out", dtype="bf16")
    out = load_output(tmp_path / "out")
    for name, tensor in ref.items():
        assert torch.equal(out[name], tensor.to(torch.bfloat16)), name
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").dtype == torch.bfloat16


def test_column_sharded_tensor_rows(fsdp_run: Path, tmp_path: Path) -> None:
    """Chunks that split the second dimension (tensor parallel): every row range is assembled right."""
    ref = reference(fsdp_run / "columns", tmp_path, key=None)["w"]
    info = open_dcp(fsdp_run / "columns").tensors["w"]
    assert len(info.reader.pieces) == 2 and info.reader.pieces[0].sizes[1] < ref.shape[1]
    assert torch.equal(read_tensor(info), ref)
    for start, stop in ((0, 1), (1, 4), (5, 6)):
        buffer = torch.empty(1 << 12, dtype=torch.uint8)
        assert torch.equal(read_tensor(info, start, stop, buffer), ref[start:stop])


def test_missing_rank_file(fsdp_run: Path, tmp_path: Path) -> None:
    run = copy_run(fsdp_run, tmp_path)
    (run / "checkpoint" / "__1_0.distcp").unlink()
    with pytest.raises(ConvertError, match=r"__1_0\.distcp: tensor '[\w.]+': storage file is missing"):
        consolidate("dcp", run / "checkpoint", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_truncated_storage_file(fsdp_run: Path, tmp_path: Path) -> None:
    run = copy_run(fsdp_run, tmp_path)
    path = run / "checkpoint" / "__0_0.distcp"
    os.truncate(path, path.stat().st_size // 5)  # model tensors lie first, optimizer state after
    with pytest.raises(ConvertError, match=r"__0_0\.distcp: tensor '[\w.]+': .*truncated file"):
        consolidate("dcp", run / "checkpoint", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_metadata_pickle_cannot_run_code(fsdp_run: Path, tmp_path: Path) -> None:
    run = copy_run(fsdp_run, tmp_path)
    (run / "checkpoint" / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ConvertError, match=r"\.metadata: not a DCP metadata file: .*posix\.system' is not one of"):
        consolidate("dcp", run / "checkpoint", tmp_path / "out")
    assert not (tmp_path / "pwned").exists() and not (ROOT / "pwned").exists()


def test_no_config(fsdp_run: Path, tmp_path: Path) -> None:
    run = copy_run(fsdp_run, tmp_path)
    (run / "config.json").unlink()
    with pytest.raises(ConvertError, match="no config.json beside the checkpoint"):
        consolidate("dcp", run / "checkpoint", tmp_path / "out")


def test_kill_then_resume(fsdp_run: Path, tmp_path: Path) -> None:
    """Killed after its second shard, nothing is at OUT; a rerun without --resume is refused and ``resume=True``
    finishes with the bytes of an uninterrupted run (the merge path's journal, reused)."""
    call = "from convert.commands.consolidate import consolidate; "
    call += f"consolidate('dcp', {str(fsdp_run / 'checkpoint')!r}, "
    env = subprocess_env(CONVERT_FAULT="after-shard:2")
    out, whole = tmp_path / "out", tmp_path / "whole"
    proc = subprocess.run([sys.executable, "-c", call + f"{str(out)!r}, max_shard_size='20KB')"], env=env, timeout=120)
    assert proc.returncode == -9 and not out.exists()
    with pytest.raises(ConvertError, match="--resume"):
        consolidate("dcp", fsdp_run / "checkpoint", out, max_shard_size="20KB")
    consolidate("dcp", fsdp_run / "checkpoint", out, max_shard_size="20KB", resume=True)
    consolidate("dcp", fsdp_run / "checkpoint", whole, max_shard_size="20KB")
    names = sorted(p.name for p in whole.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name


def test_fsdp2_peft_run_merges_like_peft(fsdp_run: Path, tmp_path: Path) -> None:
    """An FSDP2 run of a PEFT model: the adapter PEFT loads, and the merge into the run's base weights equals
    PEFT's ``merge_and_unload`` of the model ``dcp_to_torch_save`` rebuilds."""
    peft = pytest.importorskip("peft")
    run = fsdp_run / "peft"
    model = transformers.AutoModelForCausalLM.from_pretrained(run / "base")
    model = peft.get_peft_model(model, peft.LoraConfig.from_pretrained(run)).eval()
    model.load_state_dict(reference(run / "checkpoint", tmp_path))
    consolidate("dcp", run / "checkpoint", tmp_path / "adapter", adapter_only=True)
    loaded = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(run / "base"), tmp_path / "adapter"
    ).eval()
    ids = torch.arange(12).view(2, -1)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    consolidate("dcp", run / "checkpoint", tmp_path / "out")
    out, expected = load_output(tmp_path / "out"), model.merge_and_unload().state_dict()
    assert sorted(out) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(out[name], tensor), name


def test_the_command_line(fsdp_run, tmp_path) -> None:
    """``convert consolidate --from dcp`` writes what the API writes; bad input is one line and exit 2."""
    from click.testing import CliRunner

    from convert.cli import main

    ran = CliRunner().invoke(main, ["consolidate", "--from", "dcp", str(fsdp_run / "checkpoint"), "--out",
                                    str(tmp_path / "cli"), "--max-shard-size", "20KB", "-q"])  # fmt: skip
    assert ran.exit_code == 0, ran.output
    consolidate("dcp", fsdp_run / "checkpoint", tmp_path / "api", max_shard_size="20KB")
    assert load_output(tmp_path / "cli").keys() == load_output(tmp_path / "api").keys()
    assert all(torch.equal(a, load_output(tmp_path / "api")[k]) for k, a in load_output(tmp_path / "cli").items())
    args = ["consolidate", "--from", "dcp", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]
    bad = CliRunner().invoke(main, args)
    assert bad.exit_code == 2 and "does not exist" in bad.output and not (tmp_path / "x").exists()
