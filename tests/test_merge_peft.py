"""Every merged tensor equals PEFT's merge_and_unload; the output loads in transformers with the PEFT model's logits."""

from __future__ import annotations

import pytest
import torch

from convert import merge
from tests.helpers import (
    DTYPES,
    LORA_CASES,
    assert_equal_or_1ulp,
    load_output,
    make_adapter,
    make_base,
    peft_model,
    read_config,
    transformers,
)


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("case", LORA_CASES)
def test_merge_equals_peft(case: str, tmp_path) -> None:
    arch, dtype, lora_kwargs = LORA_CASES[case]
    base = make_base(tmp_path / "base", arch, dtype)
    adapter = make_adapter(tmp_path / "adapter", base, **lora_kwargs)
    result = merge(base, adapter, tmp_path / "out", device="cpu")
    assert result.merged > 0

    reference = peft_model(base, adapter, DTYPES[dtype])
    expected_logits = logits(reference)
    merged_ref = reference.merge_and_unload().state_dict()
    ours = load_output(tmp_path / "out")
    for name, tensor in ours.items():
        assert_equal_or_1ulp(tensor, merged_ref[name], name)
    assert set(merged_ref) - set(ours) <= {"lm_head.weight"}  # tied heads are not stored

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.dtype == DTYPES[dtype]
    atol = 1e-5 if dtype == "fp32" else 0.05 * float(expected_logits.abs().max())
    torch.testing.assert_close(logits(loaded), expected_logits, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "targets,modules_to_save",
    [
        (["embed_tokens"], None),
        (["lm_head"], None),
        (["q_proj"], ["embed_tokens"]),
        (["q_proj"], ["lm_head"]),
    ],
)
def test_tied_embeddings_keep_peft_logits(targets, modules_to_save, tmp_path) -> None:
    """Changing one side of a tied pair unties them: the output gives the PEFT model's logits.

    (PEFT's own merge_and_unload writes the changed weight into both sides of the
    tie, which changes the model; the PEFT model, not that, is the reference.)"""
    base = make_base(tmp_path / "base", "qwen2")
    adapter = make_adapter(
        tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=targets, modules_to_save=modules_to_save
    )
    merge(base, adapter, tmp_path / "out", device="cpu")
    assert read_config(tmp_path / "out")["tie_word_embeddings"] is False
    ours = load_output(tmp_path / "out")
    assert "lm_head.weight" in ours and "model.embed_tokens.weight" in ours

    reference = peft_model(base, adapter, torch.float32)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(loaded), logits(reference), atol=1e-5, rtol=0)


def test_gpt2_base_without_prefix_and_bin_files(tmp_path) -> None:
    """An original-style GPT-2 checkpoint (keys without 'transformer.', pytorch_model.bin) and a .bin adapter."""
    base = make_base(tmp_path / "base", "gpt2")
    adapter = make_adapter(
        tmp_path / "adapter",
        base,
        safe=False,
        r=4,
        lora_alpha=8,
        fan_in_fan_out=True,
        target_modules=["c_attn", "c_fc"],
    )
    assert (adapter / "adapter_model.bin").exists()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    state = {k.removeprefix("transformer."): v for k, v in load_output(base).items()}
    torch.save(state, legacy / "pytorch_model.bin")
    (legacy / "config.json").write_text((base / "config.json").read_text())

    merge(legacy, adapter, tmp_path / "out", device="cpu")
    ours = load_output(tmp_path / "out")
    assert all(not k.startswith("transformer.") for k in ours)
    merged_ref = peft_model(base, adapter, torch.float32).merge_and_unload().state_dict()
    for name, tensor in ours.items():
        assert_equal_or_1ulp(tensor, merged_ref["transformer." + name], name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(loaded), logits(peft_model(base, adapter, torch.float32)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_output_dtype(dtype, tiny_llama, tmp_path) -> None:
    base, adapter = tiny_llama
    merge(base, adapter, tmp_path / "out", dtype=dtype, device="cpu")
    ours = load_output(tmp_path / "out")
    assert {t.dtype for t in ours.values()} == {DTYPES[dtype]}
    config = read_config(tmp_path / "out")
    assert config.get("dtype", config.get("torch_dtype")) == str(DTYPES[dtype]).removeprefix("torch.")
    # fp32 base merged in fp32, then cast once: equals PEFT's fp32 merge cast to the output dtype.
    merged_ref = peft_model(base, adapter, torch.float32).merge_and_unload().state_dict()
    for name, tensor in ours.items():
        assert torch.equal(tensor, merged_ref[name].to(DTYPES[dtype])), name


def test_chunked_rows_and_shards_match_unchunked(tiny_llama, tmp_path) -> None:
    """Tiny chunks and shards give the values of one chunk and one file; transformers loads the index.

    Not the same bytes: the BLAS picks its GEMM kernel by row count, and on some CPUs a 2-row product
    sums the rank terms in another order than the whole matrix's (at most an ulp or two of fp32)."""
    base, adapter = tiny_llama
    merge(base, adapter, tmp_path / "whole", device="cpu")
    result = merge(base, adapter, tmp_path / "chunked", chunk_size=4 * 32 * 3, max_shard_size="20KB", device="cpu")
    shards = sorted(p.name for p in (tmp_path / "chunked").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all(p.stat().st_size <= 20_000 + 2_000 for p in (tmp_path / "chunked").glob("*.safetensors"))
    whole, chunked = load_output(tmp_path / "whole"), load_output(tmp_path / "chunked")
    assert whole.keys() == chunked.keys()
    for name, tensor in whole.items():
        torch.testing.assert_close(chunked[name], tensor, rtol=2.5e-7, atol=1e-7, msg=name)
    assert "model.safetensors.index.json" in result.files
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "chunked")
    torch.testing.assert_close(logits(loaded), logits(peft_model(base, adapter, torch.float32)), atol=1e-5, rtol=0)
