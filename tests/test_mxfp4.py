"""MXFP4 (gpt-oss) checkpoints in, against transformers' own dequantizing load (on the CPU).

No reference quantizer runs on the CPU (transformers quantizes MXFP4 through the GPU-only triton_kernels hub),
and none is needed to test a reader: the tiny gpt-oss bases here store random FP4 bytes and E8M0 scales (every
byte is a valid MXFP4 payload) beside the 16-bit rest of a model made by transformers, under gpt-oss's own
``quantization_config``. The oracle is ``AutoModelForCausalLM.from_pretrained`` of that checkpoint, which
dequantizes it (``Mxfp4Dequantize``, no GPU here); of merges, PEFT's ``merge_and_unload`` on that model.

``--quantize same`` writes MXFP4 again with the rule of triton_kernels' ``downcast_to_mxfp_torch`` (not installed
here: it comes from the kernels hub). Its oracle is that rule written independently below (``reference_mxfp4``:
scales by ``frexp``, e2m1 values by nearest distance), bytes compared exactly; the output loads in transformers,
and requantizing a dequantized base gives its values back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert import merge
from convert.kernels import mxfp4 as mxfp4_kernel
from formats.mxfp4 import Mxfp4Experts
from tests.helpers import (
    assert_converted_like,
    assert_merged_like,
    assert_reads_like,
    assert_same_state,
    fp8_logits,
    load_output,
    make_adapter,
    peft,
    read_config,
    run_failing,
    transformers,
)

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
QCONFIG = {  # gpt-oss-20b's
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


def make_oss(path: Path) -> Path:
    config = transformers.GptOssConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    return path


def mxfp4_checkpoint(base: Path, out: Path) -> Path:
    """``base`` with every experts weight (E, in, out) replaced by random MXFP4 blocks (E, out, in / 32, 16)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, tensor in load_file(base / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, cols, rows = tensor.shape
            state[name + "_blocks"] = torch.randint(
                0, 256, (experts, rows, cols // 32, 16), dtype=torch.uint8, generator=g
            )
            state[name + "_scales"] = torch.randint(
                118, 128, (experts, rows, cols // 32), dtype=torch.uint8, generator=g
            )
        else:
            state[name] = tensor
    out.mkdir()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": QCONFIG}))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mxfp4")
    base = make_oss(root / "base16")
    adapter = make_adapter(root / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    experts = make_adapter(
        root / "experts", base, r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS
    )
    return {"base16": base, "mxfp4": mxfp4_checkpoint(base, root / "mxfp4"), "adapter": adapter, "experts": experts}


def test_reader_dequantizes_like_transformers(models) -> None:
    expected = transformers.AutoModelForCausalLM.from_pretrained(models["mxfp4"]).state_dict()
    assert_reads_like(models["mxfp4"], expected, Mxfp4Experts, 4, (1, 3))


def test_merge_to_bf16_equals_peft_on_dequantized_model(models, tmp_path) -> None:
    out = tmp_path / "out"
    merge(models["mxfp4"], models["adapter"], out, device="cpu", dtype="bf16")
    dequantized = transformers.AutoModelForCausalLM.from_pretrained(models["mxfp4"])
    reference = peft.PeftModel.from_pretrained(dequantized, models["adapter"]).merge_and_unload()
    assert_merged_like(out, reference)


def test_merge_without_adapter_is_the_mxfp4_to_bf16_conversion(models, tmp_path) -> None:
    out = tmp_path / "out"
    merge(models["mxfp4"], None, out, device="cpu", chunk_size="64KB")
    assert_converted_like(out, transformers.AutoModelForCausalLM.from_pretrained(models["mxfp4"]))


W = "model.layers.0.mlp.experts.down_proj"
BAD = {
    "scales missing": (lambda s: s.pop(W + "_scales"), [W + "_blocks", "without their"]),
    "blocks missing": (lambda s: s.pop(W + "_blocks"), [W + "_scales", "is missing"]),
    "scales shape": (
        lambda s: s.update({W + "_scales": s[W + "_scales"][:, :5].contiguous()}),
        [W + "_scales", "expected U8"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_mxfp4_checkpoint(case, models, tmp_path) -> None:
    edit, words = BAD[case]
    bad = tmp_path / "bad"
    bad.mkdir()
    state = load_file(models["mxfp4"] / "model.safetensors")
    edit(state)
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text((models["mxfp4"] / "config.json").read_text())
    message = run_failing(tmp_path, bad, None)
    assert "model.safetensors" in message and all(w in message for w in words), message


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def reference_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """downcast_to_mxfp_torch's rule, written apart from ``convert.kernels.mxfp4``: per 32 values along ``in`` of
    the bf16 weights, the scale is the least power of two >= amax / 6 (frexp), each value divided by it goes to
    the nearest e2m1 magnitude (ties to the larger), sign kept; blocks (E, out, in / 32, 16), scales + 127."""
    x = w.to(torch.bfloat16).float().transpose(1, 2).reshape(*w.shape[0:1], w.shape[2], -1, 32)
    target = x.abs().amax(-1, keepdim=True) / 6
    mantissa, exponent = torch.frexp(target)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # an exact power of two is its own scale
    exponent = torch.where(target == 0, torch.full_like(exponent, -127), exponent)
    q = torch.where(target == 0, x * 0, x / torch.pow(2.0, exponent.float()))
    distance = (q.abs().unsqueeze(-1) - E2M1).abs()
    best = distance.shape[-1] - 1 - distance.flip(-1).argmin(-1)  # the last (largest) of equally near values
    codes = best.to(torch.uint8) | (torch.signbit(q).to(torch.uint8) << 3)
    return codes[..., 0::2] | codes[..., 1::2] << 4, (exponent.squeeze(-1) + 127).to(torch.uint8)


def test_mxfp4_quantizer_follows_the_reference_rule() -> None:
    """Random weights at many scales, ties (exact midpoints), zeros and -0.0: the same bytes as the rule."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 128, 16, generator=g) * torch.logspace(-6, 3, 16)
    w[0, :32, 0] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4)  # midpoints at scale 1
    w[1, :32, 1], w[1, :32, 2] = 0.0, -0.0
    blocks, scales = mxfp4_kernel.quantize(w.to(torch.bfloat16))
    expected = reference_mxfp4(w)
    assert torch.equal(scales, expected[1]) and torch.equal(blocks, expected[0])


def test_requantizing_the_dequantized_base_gives_its_values_back(models) -> None:
    stored = load_file(models["mxfp4"] / "model.safetensors")
    for name in (k.removesuffix("_blocks") for k in stored if k.endswith("_blocks")):
        values = mxfp4_kernel.dequantize(stored[name + "_blocks"], stored[name + "_scales"], torch.bfloat16)
        again = mxfp4_kernel.dequantize(*mxfp4_kernel.quantize(values), torch.bfloat16)
        assert torch.equal(again, values), name


def test_quantize_same_writes_mxfp4_again(models, tmp_path) -> None:
    """merge --quantize same with an adapter on the experts: their blocks and scales are the reference rule's of
    our bf16 merge, every other tensor the bf16 merge's, the base's quantization_config kept; transformers loads
    it, its experts those blocks dequantized."""
    merge(models["mxfp4"], models["experts"], tmp_path / "merged16", device="cpu", dtype="bf16")
    merge(models["mxfp4"], models["experts"], tmp_path / "ours", device="cpu", quantize="same", chunk_size="64KB")
    expected = {}
    for name, tensor in load_output(tmp_path / "merged16").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            expected[name + "_blocks"], expected[name + "_scales"] = reference_mxfp4(tensor)
        else:
            expected[name] = tensor
    assert_same_state(load_output(tmp_path / "ours"), expected)
    assert read_config(tmp_path / "ours")["quantization_config"] == QCONFIG
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    state = loaded.state_dict()
    for name in (k for k in expected if k.endswith("_blocks")):
        blocks, scales = expected[name], expected[name.replace("_blocks", "_scales")]
        assert torch.equal(state[name.removesuffix("_blocks")], mxfp4_kernel.dequantize(blocks, scales, torch.bfloat16))
    assert torch.isfinite(fp8_logits(loaded)).all()


def test_quantize_same_without_adapter_reproduces_the_base(models, tmp_path) -> None:
    merge(models["mxfp4"], None, tmp_path / "out", device="cpu", quantize="same")
    assert_same_state(load_output(tmp_path / "out"), load_file(models["mxfp4"] / "model.safetensors"))


@pytest.mark.gpu
def test_quantize_same_on_cuda_equals_the_cpu(models, tmp_path) -> None:
    """The GPU pipeline feeds the same sink (``pieces``): its output is the CPU executor's, byte for byte."""
    for device in ("cpu", "cuda"):
        merge(models["mxfp4"], models["experts"], tmp_path / device, device=device, quantize="same")
    assert_same_state(load_output(tmp_path / "cuda"), load_output(tmp_path / "cpu"))
