"""The CUDA path (torch ops on the GPU for now): same results as the CPU path and PEFT.

Skipped without CUDA; run for real on the GPU machine."""

from __future__ import annotations

import pytest
import torch

from convert import ConvertError, merge
from tests.helpers import DTYPES, load_output, make_adapter, make_base, peft_model, ulp_distance


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_cuda_merge_matches_peft(dtype, tmp_path):
    base = make_base(tmp_path / "base", "llama", dtype)
    adapter = make_adapter(tmp_path / "adapter", base, r=8, lora_alpha=16, target_modules="all-linear")
    merge(base, adapter, tmp_path / "out", device="cuda")
    merged_ref = peft_model(base, adapter, DTYPES[dtype]).merge_and_unload().state_dict()
    for name, tensor in load_output(tmp_path / "out").items():
        ref = merged_ref[name]
        assert tensor.dtype == ref.dtype and tensor.shape == ref.shape, name
        if dtype == "fp32":  # a GPU GEMM sums in another order than the CPU's
            torch.testing.assert_close(tensor, ref, rtol=1e-6, atol=1e-7)
        else:
            assert ulp_distance(tensor, ref) <= 1, name


@pytest.mark.gpu
def test_cuda_chunked_equals_whole_and_conv1d(tmp_path):
    base = make_base(tmp_path / "base", "gpt2", "bf16")
    adapter = make_adapter(
        tmp_path / "adapter", base, r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_fc", "c_proj"]
    )
    merge(base, adapter, tmp_path / "whole", device="cuda:0")
    merge(base, adapter, tmp_path / "chunked", device="cuda", chunk_size=4 * 32 * 3)
    whole, chunked = load_output(tmp_path / "whole"), load_output(tmp_path / "chunked")
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)
    cpu = merge(base, adapter, tmp_path / "cpu", device="cpu")
    assert cpu.merged > 0
    for name, tensor in load_output(tmp_path / "cpu").items():
        assert ulp_distance(tensor, whole[name]) <= 1, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda(tiny_llama, tmp_path):
    base, adapter = tiny_llama
    with pytest.raises(ConvertError, match="CUDA is not available"):
        merge(base, adapter, tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists()
