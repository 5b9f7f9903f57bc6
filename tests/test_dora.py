"""DoRA merges equal PEFT's merge_and_unload bit for bit (16-bit outputs within 1 ulp) and load with PEFT's logits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert import merge
from tests.helpers import (
    DTYPES,
    LORA_CASES,
    assert_equal_or_1ulp,
    load_output,
    make_base,
    make_dora_adapter,
    peft_model,
    transformers,
)

CASES = {  # name: (arch, dtype, LoraConfig kwargs): the LoRA cases' shapes and options, and DoRA's own
    **{
        name: LORA_CASES[name]
        for name in ("llama-fp32", "llama-bf16", "llama-fp16", "rslora", "rank-alpha-pattern", "gpt2-conv1d")
    },
    "rslora-bf16-odd-scale": ("llama", "bf16", dict(r=4, lora_alpha=6, use_rslora=True, target_modules="all-linear")),
    "embedding-and-lm-head": ("llama", "fp32", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"])),
    "embedding-bf16": ("llama", "bf16", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"])),
    "gpt2-conv1d-bf16": ("gpt2", "bf16", dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_proj"])),
}


def logits(model) -> torch.Tensor:
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("case", CASES)
def test_dora_merge_equals_peft(case: str, tmp_path) -> None:
    arch, dtype, lora_kwargs = CASES[case]
    base = make_base(tmp_path / "base", arch, dtype)
    adapter = make_dora_adapter(tmp_path / "adapter", base, **lora_kwargs)
    # small chunks (8 rows of 48): a Linear's rows are split over several chunks, transposed weights stay whole.
    # (Not smaller: a GEMM of 2 rows may round differently from PEFT's whole-matrix GEMM.)
    result = merge(base, adapter, tmp_path / "out", device="cpu", chunk_size=4 * 48 * 8)
    assert result.merged > 0

    reference = peft_model(base, adapter, DTYPES[dtype])
    unmerged_logits = logits(reference)
    merged_model = reference.merge_and_unload()
    merged_ref = merged_model.state_dict()
    ours = load_output(tmp_path / "out")
    changed = 0
    for name, tensor in ours.items():
        assert_equal_or_1ulp(tensor, merged_ref[name], name)
        changed += not torch.equal(tensor, load_output(base).get(name, tensor))
    assert changed >= result.merged

    # In 16 bits the unmerged DoRA forward rounds differently from any merged weight: there the
    # reference is PEFT's merged model (whose weights ours equal within 1 ulp).
    loaded = logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
    expected = unmerged_logits if dtype == "fp32" else logits(merged_model)
    atol = 1e-5 if dtype == "fp32" else 0.02 * float(expected.abs().max())
    torch.testing.assert_close(loaded, expected, atol=atol, rtol=0)


def test_dora_differs_from_plain_lora(tmp_path) -> None:
    """The magnitudes matter: dropping them (a plain LoRA merge of the same A, B) changes the result."""
    base = make_base(tmp_path / "base", "llama")
    adapter = make_dora_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"])
    merge(base, adapter, tmp_path / "dora", device="cpu")
    state = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if "magnitude" not in k}, adapter / "adapter_model.safetensors")
    config = (adapter / "adapter_config.json").read_text().replace('"use_dora": true', '"use_dora": false')
    (adapter / "adapter_config.json").write_text(config)
    merge(base, adapter, tmp_path / "lora", device="cpu")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(load_output(tmp_path / "dora")[name], load_output(tmp_path / "lora")[name])


@pytest.mark.parametrize("kind", ["nf4-dq", "fp4-dq"])
def test_dora_from_4bit_base_equals_peft_on_dequantized_model(kind, tmp_path) -> None:
    """A QLoRA-style DoRA merge: the 4-bit base is dequantized as read, then merged exactly as PEFT
    merges into the dequantized model (fp32 delta and norms, rounded once to bf16)."""
    from tests.helpers import dequantized_merge, make_base64, quantize_with_transformers

    base = make_base64(tmp_path / "base16")
    adapter = make_dora_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules="all-linear")
    quantized = quantize_with_transformers(base, tmp_path / kind, kind)
    merge(quantized, adapter, tmp_path / "out", dtype="bf16", device="cpu")
    expected = dequantized_merge(quantized, adapter).state_dict()
    ours = load_output(tmp_path / "out")
    assert ours.keys() == expected.keys()
    for name, tensor in ours.items():
        assert_equal_or_1ulp(tensor, expected[name], name)
