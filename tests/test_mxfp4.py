"""MXFP4 (gpt-oss) checkpoints in, against transformers' own dequantizing load (on the CPU).

No reference quantizer runs on the CPU (transformers quantizes MXFP4 through the GPU-only triton_kernels hub),
and none is needed to test a reader: the tiny gpt-oss bases here store random FP4 bytes and E8M0 scales (every
byte is a valid MXFP4 payload) beside the 16-bit rest of a model made by transformers, under gpt-oss's own
``quantization_config``. The oracle is ``AutoModelForCausalLM.from_pretrained`` of that checkpoint, which
dequantizes it (``Mxfp4Dequantize``, no GPU here); of merges, PEFT's ``merge_and_unload`` on that model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert import merge
from formats.mxfp4 import Mxfp4Experts
from tests.helpers import (
    assert_converted_like,
    assert_merged_like,
    assert_reads_like,
    make_adapter,
    peft,
    run_failing,
    transformers,
)

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
    return {"base16": base, "mxfp4": mxfp4_checkpoint(base, root / "mxfp4"), "adapter": adapter}


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
