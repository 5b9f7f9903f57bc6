"""Block-scaled FP8 checkpoints in and out, against transformers' own FP8 code and PEFT (all on the CPU).

transformers cannot quantize a model to FP8 on the CPU (``FineGrainedFP8HfQuantizer`` asks for a GPU), but its
quantize op runs anywhere: the FP8 bases here are tiny Llama models whose Linear weights went through
``transformers.integrations.finegrained_fp8.Fp8Quantize`` (the op ``save_pretrained`` of an FP8 model uses), saved
with the ``FineGrainedFP8Config`` it was given. transformers loads them on the CPU dequantized
(``Fp8Dequantize``): that model is the oracle of every read, and PEFT's ``merge_and_unload`` on it the oracle of
every merge. FP8 outputs are checked tensor by tensor against ``Fp8Quantize`` of our 16-bit merge and by loading
them in transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.integrations import finegrained_fp8

from convert import merge
from convert.execute.decode import read_rows
from convert.kernels import fp8 as kernel
from formats.checkpoint import open_checkpoint
from formats.errors import ConvertError
from formats.fp8 import BlockFP8, scale_grid
from tests.helpers import (
    SIZES64,
    assert_converted_like,
    assert_merged_like,
    assert_reads_like,
    assert_same_state,
    fp8_checkpoint,
    fp8_logits,
    load_model,
    load_output,
    make_adapter,
    make_llama,
    peft,
    read_config,
    run_failing,
    transformers_quantizer,
)

SIZES128 = {**SIZES64, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2}  # 128x128 blocks


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8")
    base = make_llama(root / "base16", SIZES64)
    base128 = make_llama(root / "base128", SIZES128)
    return {
        "base16": base,
        "fp8": fp8_checkpoint(base, root / "fp8"),
        "fp8-split": fp8_checkpoint(base, root / "fp8-split", split_scales=True),
        "adapter": make_adapter(root / "adapter", base, r=4, lora_alpha=8, target_modules="all-linear"),
        "base128": base128,
        "adapter128": make_adapter(root / "adapter128", base128, r=4, lora_alpha=8, target_modules="all-linear"),
    }


@pytest.mark.parametrize("kind", ["fp8", "fp8-split"])
def test_reader_dequantizes_like_transformers(kind, models) -> None:
    """Every tensor read lazily (whole, and in row ranges that cut blocks) equals transformers' dequantized one."""
    assert_reads_like(models[kind], load_model(models[kind]).state_dict(), BlockFP8, 14, (5, 50))  # 7 Linear a layer
    if kind == "fp8-split":
        layout = next(t.layout for t in open_checkpoint(models[kind]).tensors.values() if t.layout is not None)
        assert layout.weight.path.name != layout.scale.path.name


@pytest.mark.parametrize("shape,block", [((72, 100), (32, 32)), ((128, 64), (128, 128)), ((40, 48), None)])
def test_kernels_against_transformers_on_partial_blocks(shape, block) -> None:
    """Quantize and dequantize equal transformers' ops; where blocks are partial (transformers only takes shapes that
    divide) they equal transformers' ops on the zero-padded weight, cut back (zeros change no block's amax)."""
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[1])).to(torch.bfloat16)
    w[:8] = 0  # an all-zero block row: scale 1
    q, inv = kernel.quantize_torch(w, block)
    op, _ = transformers_quantizer(block)
    bm, bn = block or shape
    padded = torch.nn.functional.pad(w, (0, -shape[1] % bn, 0, -shape[0] % bm))
    ref = op.convert({"x.weight": padded})
    ref_q, ref_inv = ref["x.weight"][: shape[0], : shape[1]], ref["x.weight_scale_inv"]
    assert q.dtype == torch.float8_e4m3fn and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    assert inv.shape == scale_grid(shape, block)  # transformers' per-tensor grid is (1, 1), FP8Linear's ()
    assert torch.equal(inv.reshape(ref_inv.shape), ref_inv)
    dequantizer = finegrained_fp8.Fp8Dequantize(None)
    expected = dequantizer._dequantize_one(ref["x.weight"], ref_inv, torch.bfloat16)[: shape[0], : shape[1]]
    inv = inv if block else inv.reshape(())
    assert torch.equal(kernel.dequantize_torch(q, inv, block, 0, torch.bfloat16), expected)
    if block is not None:  # rows from inside a block on: the scale rows from that block's on
        s = inv[40 // bm :]
        assert torch.equal(kernel.dequantize_torch(q[40:], s, block, 40, torch.bfloat16), expected[40:])


@pytest.mark.parametrize("kind", ["fp8", "fp8-split"])
def test_merge_from_fp8_base_equals_peft_on_dequantized_model(kind, models, tmp_path) -> None:
    """merge(fp8 base, adapter, dtype=bf16) == PEFT merge_and_unload on transformers' dequantized (bf16) model."""
    out = tmp_path / "out"
    merge(models[kind], models["adapter"], out, dtype="bf16", device="cpu", chunk_size=4 * 64 * 20)
    reference = peft.PeftModel.from_pretrained(load_model(models[kind]), models["adapter"]).merge_and_unload()
    assert_merged_like(out, reference)


def test_merge_without_adapter_is_the_fp8_to_bf16_conversion(models, tmp_path) -> None:
    """No adapter: the streamed fp8 -> bf16 conversion, bit for bit transformers' dequantized model."""
    out = tmp_path / "out"
    result = merge(models["fp8-split"], None, out, device="cpu", max_shard_size="40KB")
    assert len(list(out.glob("*.safetensors"))) > 1 and result.merged == 0
    assert_converted_like(out, load_model(models["fp8-split"]))


def transformers_fp8(merged16: Path, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """transformers' ``Fp8Quantize`` of every Linear weight of a 16-bit checkpoint (not lm_head)."""
    op, _ = transformers_quantizer(block)
    state = {}
    for name, tensor in load_output(merged16).items():
        state.update(op.convert({name: tensor}) if name.endswith("proj.weight") else {name: tensor})
    return state


def test_quantize_fp8_equals_transformers_quantizing_the_merge(models, tmp_path) -> None:
    """merge --quantize fp8 (128x128 blocks): every tensor equals transformers' Fp8Quantize of our 16-bit merge; the
    output loads in transformers (dequantized on the CPU) and our reader reads it back as transformers does."""
    base, adapter = models["base128"], models["adapter128"]
    merge(base, adapter, tmp_path / "merged16", device="cpu")
    merge(base, adapter, tmp_path / "ours", device="cpu", quantize="fp8", chunk_size=4 * 128 * 130)
    ours = load_output(tmp_path / "ours")
    assert_same_state(ours, transformers_fp8(tmp_path / "merged16", (128, 128)))
    assert sum(k.endswith("weight_scale_inv") for k in ours) == 14
    qconfig = read_config(tmp_path / "ours")["quantization_config"]
    assert qconfig == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "modules_to_not_convert": ["lm_head"],
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    loaded = load_model(tmp_path / "ours")
    assert loaded.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    expected = loaded.state_dict()
    for name, info in open_checkpoint(tmp_path / "ours").tensors.items():
        assert torch.equal(read_rows(info), expected[name]), name
    merged = load_model(tmp_path / "merged16")
    expected = fp8_logits(merged)
    torch.testing.assert_close(fp8_logits(loaded), expected, atol=0.1 * float(expected.abs().max()), rtol=0)


def test_quantize_same_writes_the_base_format_again(models, tmp_path) -> None:
    """merge --quantize same from an FP8 base (32x32 blocks): Fp8Quantize of our bf16 merge at the base's block size,
    under the base's own quantization_config; transformers loads it like the base."""
    base, adapter = models["fp8-split"], models["adapter"]
    merge(base, adapter, tmp_path / "merged16", device="cpu", dtype="bf16")
    merge(base, adapter, tmp_path / "ours", device="cpu", quantize="same", max_shard_size="30KB")
    assert_same_state(load_output(tmp_path / "ours"), transformers_fp8(tmp_path / "merged16", (32, 32)))
    assert read_config(tmp_path / "ours")["quantization_config"] == read_config(base)["quantization_config"]
    for name, tensor in load_model(tmp_path / "ours").state_dict().items():
        assert tensor.dtype == torch.bfloat16, name


def test_quantize_same_needs_a_quantized_base(models, tmp_path) -> None:
    with pytest.raises(ConvertError, match=r"^--quantize same: the base model is not quantized"):
        merge(models["base16"], None, tmp_path / "out", device="cpu", quantize="same")
    assert not list(tmp_path.iterdir())


def bad_copy(tmp_path: Path, source: Path, edit, config_edit=None) -> Path:
    bad = tmp_path / "bad"
    bad.mkdir()
    state = load_file(source / "model.safetensors")
    edit(state)
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (bad / "config.json").write_text(json.dumps(config))
    return bad


Q = "model.layers.0.self_attn.q_proj.weight"
BAD = {
    "scales missing": (lambda s: s.pop(Q + "_scale_inv"), None, [Q, "without its", "scales"]),
    "weight missing": (lambda s: s.pop(Q), None, [Q + "_scale_inv", "is missing"]),
    "grid does not fit": (
        lambda s: s.update({Q + "_scale_inv": s[Q + "_scale_inv"][:1]}),
        None,
        [Q + "_scale_inv", "does not fit weight [64, 64] in blocks of [32, 32]", "expected [2, 2]"],
    ),
    "blocks do not divide": (
        lambda s: None,
        lambda c: c["quantization_config"].update(weight_block_size=[48, 32]),
        ["_scale_inv", "does not fit weight", "in blocks of [48, 32]"],
    ),
    "not e4m3": (lambda s: s.update({Q: s[Q].to(torch.float8_e5m2)}), None, [Q, "must be F8_E4M3"]),
    "unknown format": (
        lambda s: None,
        lambda c: c["quantization_config"].update(quant_method="gptq"),
        ["config.json", "'gptq'", "not a format"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_fp8_checkpoint(case, models, tmp_path) -> None:
    """One line naming the file and tensor, exit 2, nothing at the output path, inputs untouched."""
    edit, config_edit, words = BAD[case]
    bad = bad_copy(tmp_path, models["fp8"], edit, config_edit)
    message = run_failing(tmp_path, bad, models["adapter"])
    assert all(w in message for w in words), message
    if case != "unknown format":
        assert "model.safetensors" in message, message
