"""compressed-tensors checkpoints in (fp8 float-quantized, int4/int8 pack-quantized, int8 int-quantized), against
compressed-tensors and transformers themselves (all on the CPU).

The bases are tiny Llama models compressed in the test session by compressed-tensors' own code: scales and zero
points from its ``calculate_qparams`` (on per-strategy min/max, what llm-compressor's min-max observer feeds it),
then its registered compressor's ``compress`` (``BaseCompressor.load_from_registry(format)``), saved with the
``QuantizationConfig`` it describes. The oracle of every read is transformers loading that checkpoint decompressed
(``CompressedTensorsConfig(run_compressed=False)``, compressed-tensors' ``decompress``); of every merge, PEFT's
``merge_and_unload`` on that model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert import merge
from formats.compressed_tensors import CompressedWeight
from tests.helpers import (
    SIZES64,
    assert_converted_like,
    assert_merged_like,
    assert_reads_like,
    make_adapter,
    make_llama,
    peft,
    run_failing,
    transformers,
)

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

CASES = {
    # name: (format, weights args, scale dtype)
    "int4-group": ("pack-quantized", dict(num_bits=4, type="int", strategy="group", group_size=32), torch.bfloat16),
    "int4-group-asym": (
        "pack-quantized",
        dict(num_bits=4, type="int", strategy="group", group_size=16, symmetric=False),
        torch.bfloat16,
    ),
    "int8-channel-packed": ("pack-quantized", dict(num_bits=8, type="int", strategy="channel"), torch.float32),
    "int8-channel": ("int-quantized", dict(num_bits=8, type="int", strategy="channel"), torch.bfloat16),
    "fp8-channel": ("float-quantized", dict(num_bits=8, type="float", strategy="channel"), torch.bfloat16),
    "fp8-tensor": ("float-quantized", dict(num_bits=8, type="float", strategy="tensor"), torch.float32),
    "fp8-block": (
        "float-quantized",
        dict(num_bits=8, type="float", strategy="block", block_structure=[32, 32]),
        torch.bfloat16,
    ),
}


def min_max(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-strategy minima and maxima, the observer statistics ``calculate_qparams`` turns into qparams."""
    x = w.float()
    if args.strategy == "tensor":
        return x.amin().reshape(1), x.amax().reshape(1)
    if args.strategy == "channel":
        return x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    if args.strategy == "group":
        g = x.reshape(x.shape[0], -1, args.group_size)
        return g.amin(-1), g.amax(-1)
    bm, bn = args.block_structure
    b = x.reshape(x.shape[0] // bm, bm, x.shape[1] // bn, bn)
    return b.amin((1, 3)), b.amax((1, 3))


def compressed_checkpoint(base: Path, out: Path, case: str) -> Path:
    fmt, weights, scale_dtype = CASES[case]
    args = QuantizationArgs(**weights)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format=fmt)
    compressor = BaseCompressor.load_from_registry(fmt)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(base / "model.safetensors").items():
        if not name.endswith("proj.weight"):
            state[name] = tensor
            continue
        scale, zero_point = calculate_qparams(*min_max(tensor, args), args)
        local = {"weight": tensor, "weight_scale": scale.to(scale_dtype), "weight_zero_point": zero_point}
        module = name.removesuffix(".weight")
        state.update({f"{module}.{k}": v.contiguous() for k, v in compressor.compress(local, scheme).items()})
    out.mkdir()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, format=fmt, ignore=["lm_head"], quantization_status="compressed"
    )
    config_json = json.loads((base / "config.json").read_text())
    config_json["quantization_config"] = json.loads(config.model_dump_json())
    (out / "config.json").write_text(json.dumps(config_json))
    return out


def decompressed(path: Path):
    """transformers' model of a compressed-tensors checkpoint, decompressed by compressed-tensors."""
    config = transformers.CompressedTensorsConfig(run_compressed=False, dequantize=True)  # also with a GPU
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ct")
    base = make_llama(root / "base16", SIZES64)
    paths = {
        "base16": base,
        "adapter": make_adapter(root / "adapter", base, r=4, lora_alpha=8, target_modules="all-linear"),
    }
    for case in CASES:
        paths[case] = compressed_checkpoint(base, root / case, case)
    return paths


@pytest.mark.parametrize("case", list(CASES))
def test_reader_dequantizes_like_compressed_tensors(case, models) -> None:
    """Every tensor, whole and in row ranges that cut packed zero-point words and blocks, equals transformers'
    decompressed model."""
    assert_reads_like(models[case], decompressed(models[case]).state_dict(), CompressedWeight, 14, (3, 45))


@pytest.mark.parametrize("case", ["int4-group-asym", "fp8-block"])
def test_merge_equals_peft_on_decompressed_model(case, models, tmp_path) -> None:
    out = tmp_path / "out"
    merge(models[case], models["adapter"], out, dtype="bf16", device="cpu", chunk_size=4 * 64 * 20)
    reference = peft.PeftModel.from_pretrained(decompressed(models[case]), models["adapter"]).merge_and_unload()
    assert_merged_like(out, reference)


def test_merge_without_adapter_decompresses(models, tmp_path) -> None:
    out = tmp_path / "out"
    merge(models["int4-group"], None, out, device="cpu")
    assert_converted_like(out, decompressed(models["int4-group"]))


Q = "model.layers.0.self_attn.q_proj"
BAD = {
    "scale missing": ("int4-group", lambda s, c: s.pop(Q + ".weight_scale"), [Q + ".weight_scale' is missing"]),
    "groups do not divide": (
        "int4-group",
        lambda s, c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(group_size=48),
        [".weight_scale", "columns do not divide into groups of 48"],
    ),
    "zero point missing": (
        "int4-group-asym",
        lambda s, c: s.pop(Q + ".weight_zero_point"),
        [Q + ".weight_scale", "without its"],
    ),
    "unknown format": (
        "fp8-channel",
        lambda s, c: c["quantization_config"]["config_groups"]["group_0"].update(format="nvfp4-pack-quantized"),
        [".weight_scale", "'nvfp4-pack-quantized'"],
    ),
    "scale shape": (
        "fp8-channel",
        lambda s, c: s.update({Q + ".weight_scale": s[Q + ".weight_scale"][:10]}),
        [Q + ".weight_scale", "do not fit weight [64, 64]"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_compressed_checkpoint(case, models, tmp_path) -> None:
    source, edit, words = BAD[case]
    bad = tmp_path / "bad"
    bad.mkdir()
    state = load_file(models[source] / "model.safetensors")
    config = json.loads((models[source] / "config.json").read_text())
    edit(state, config)
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text(json.dumps(config))
    message = run_failing(tmp_path, bad, models["adapter"])
    assert "model.safetensors" in message and all(w in message for w in words), message


def test_quantize_same_is_refused_for_compressed_tensors(models, tmp_path) -> None:
    from convert import ConvertError

    with pytest.raises(ConvertError, match=r"^--quantize same: writing compressed-tensors checkpoints is not supp"):
        merge(models["fp8-channel"], None, tmp_path / "out", device="cpu", quantize="same")
    assert not (tmp_path / "out").exists()
