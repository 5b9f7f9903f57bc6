"""``consolidate --from deepspeed``: a real ZeRO-3 checkpoint (3 gloo ranks on DeepSpeed's CPU accelerator),
against DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from convert.commands.consolidate import consolidate
from formats.errors import ConvertError
from formats.safetensors_file import read_tensor
from formats.torch_save import load_meta
from formats.zero3 import ALLOWED_GLOBALS, open_zero3
from tests.helpers import load_output
from tests.training_runs import Boom, assert_same_logits, copy_run, spawn_run

transformers = pytest.importorskip("transformers")
zero_to_fp32 = pytest.importorskip("deepspeed.utils.zero_to_fp32")


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    return spawn_run("zero3", tmp_path_factory.mktemp("zero3") / "run", 3)


@pytest.fixture(scope="module")
def reference(zero3_run: Path) -> dict[str, torch.Tensor]:
    state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(zero3_run)
    return {k: v.contiguous() for k, v in state.items()}


def test_zero3_consolidates_bit_exact_and_loads(zero3_run: Path, reference: dict, tmp_path: Path) -> None:
    ckpt = open_zero3(zero3_run)  # the run directory: its ``latest`` names the tag
    frozen = ckpt.tensors["model.embed_tokens.weight"].reader.pieces
    assert frozen[0].path.name.endswith("model_states.pt") and len(frozen) == 3  # frozen fragments, one a rank
    files = {p.path for info in ckpt.tensors.values() for p in info.reader.pieces}
    assert files == set(ckpt.files) and len(files) == 6  # every rank's model and optimizer states
    result = consolidate("deepspeed", zero3_run, tmp_path / "out", max_shard_size="30KB")
    assert "model.safetensors.index.json" in result.files
    out = load_output(tmp_path / "out")
    assert sorted(out) == sorted(reference)
    for name, tensor in reference.items():  # frozen parameters keep their training dtype; zero_to_fp32 upcasts
        dtype = torch.bfloat16 if name == "model.embed_tokens.weight" else torch.float32
        assert out[name].dtype == dtype and torch.equal(out[name].float(), tensor), name

    assert_same_logits(tmp_path / "out", zero3_run, reference)


def test_row_ranges_from_two_groups(zero3_run: Path, reference: dict) -> None:
    """Row ranges of every tensor, from both parameter groups' flat partitions (the tag directory given)."""
    ckpt = open_zero3(zero3_run / "step1")
    optim = load_meta(ckpt.files[-1], allowed=ALLOWED_GLOBALS)["optimizer_state_dict"]
    assert len(optim["fp32_flat_groups"]) == 2
    tensors = ckpt.tensors
    for name, info in tensors.items():
        for start, stop in ((0, 2), (1, info.rows)):
            if stop <= info.rows and start < stop:
                buffer = torch.empty(1 << 16, dtype=torch.uint8)
                assert torch.equal(read_tensor(info, start, stop, buffer), reference[name][start:stop]), name


def test_bf16_output(zero3_run: Path, reference: dict, tmp_path: Path) -> None:
    consolidate("deepspeed", zero3_run, tmp_path / "out", dtype="bf16")
    out = load_output(tmp_path / "out")
    for name, tensor in reference.items():
        assert torch.equal(out[name], tensor.to(torch.bfloat16)), name


def test_missing_rank_file(zero3_run: Path, tmp_path: Path) -> None:
    run = copy_run(zero3_run, tmp_path)
    (run / "step1" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ConvertError, match=r"step1: optim_states file of rank 1 is missing"):
        consolidate("deepspeed", run, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_truncated_rank_file(zero3_run: Path, tmp_path: Path) -> None:
    run = copy_run(zero3_run, tmp_path)
    path = run / "step1" / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"
    os.truncate(path, path.stat().st_size - 2000)
    with pytest.raises(ConvertError, match=r"bf16_zero_pp_rank_2_mp_rank_00_optim_states\.pt: "):
        consolidate("deepspeed", run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickle_cannot_run_code(zero3_run: Path, tmp_path: Path) -> None:
    run = copy_run(zero3_run, tmp_path)
    torch.save({"module": Boom()}, run / "step1" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(ConvertError, match=r"model_states\.pt: cannot load safely \(weights_only\)"):
        consolidate("deepspeed", run, tmp_path / "out")
    assert not (tmp_path / "pwned").exists()
