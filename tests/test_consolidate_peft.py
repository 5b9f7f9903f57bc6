"""``consolidate`` of a PEFT LoRA run (DeepSpeed ZeRO-3, 2 gloo ranks): the adapter PEFT loads, and the merge
into the run's own base or a given one, against PEFT on DeepSpeed's own consolidation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convert.commands.consolidate import consolidate
from formats.errors import ConvertError
from tests.helpers import load_output
from tests.training_runs import spawn_run

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
zero_to_fp32 = pytest.importorskip("deepspeed.utils.zero_to_fp32")


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory) -> Path:
    return spawn_run("zero3_peft", tmp_path_factory.mktemp("zero3_peft") / "run", 2)


@pytest.fixture(scope="module")
def oracle(peft_run: Path):
    """The trained PEFT model, its state from DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``."""
    state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(peft_run)
    model = transformers.AutoModelForCausalLM.from_pretrained(peft_run / "base")
    model = peft.get_peft_model(model, peft.LoraConfig.from_pretrained(peft_run)).eval()
    model.load_state_dict({k: v.contiguous() for k, v in state.items()})
    return model


IDS = torch.arange(12).view(2, -1)


def test_adapter_only_loads_in_peft(peft_run: Path, oracle, tmp_path: Path) -> None:
    consolidate("deepspeed", peft_run, tmp_path / "adapter", adapter_only=True)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    expected = peft.get_peft_model_state_dict(oracle)
    assert sorted(saved) == sorted(expected) and any("lm_head" in k for k in saved)
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name
    base = transformers.AutoModelForCausalLM.from_pretrained(peft_run / "base")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, oracle(IDS).logits)


@pytest.mark.parametrize("with_base", [False, True], ids=["run-base", "given-base"])
def test_merged_equals_merge_and_unload(peft_run: Path, oracle, tmp_path: Path, with_base: bool) -> None:
    base = peft_run / "base" if with_base else None
    result = consolidate("deepspeed", peft_run, tmp_path / "out", base=base)
    assert result.merged == 4  # q_proj, v_proj of 2 layers; lm_head replaced by its trained copy
    assert not (tmp_path / ".out.adapter").exists()
    reference = peft.get_peft_model(  # a copy to merge: the fixture is shared
        transformers.AutoModelForCausalLM.from_pretrained(peft_run / "base"),
        peft.LoraConfig.from_pretrained(peft_run),
    )
    reference.load_state_dict(oracle.state_dict())
    merged = reference.merge_and_unload().eval()
    out = load_output(tmp_path / "out")
    expected = merged.state_dict()
    assert sorted(out) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(out[name], tensor), name
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, merged(IDS).logits)


def test_missing_adapter_config(peft_run: Path, tmp_path: Path) -> None:
    shutil.copytree(peft_run, tmp_path / "run")
    (tmp_path / "run" / "adapter_config.json").unlink()
    with pytest.raises(ConvertError, match="holds a PEFT model but no adapter_config.json"):
        consolidate("deepspeed", tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.adapter").exists()
