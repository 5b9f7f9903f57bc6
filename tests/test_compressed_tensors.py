"""compressed-tensors checkpoints in (fp8 float-quantized, int4/int8 pack-quantized, int8 int-quantized), against
compressed-tensors and transformers themselves (all on the CPU).

The bases are tiny Llama models compressed in the test session by compressed-tensors' own code: scales and zero
points from its ``calculate_qparams`` (on per-strategy min/max, what llm-compressor's min-max observer feeds it),
then its registered compressor's ``compress`` (``BaseCompressor.load_from_registry(format)``), saved with the
``QuantizationConfig`` it describes. The oracle of every read is transformers loading that checkpoint decompressed
(``CompressedTensorsConfig(run_compressed=False)``, compressed-tensors' ``decompress``); of every merge, PEFT's
``merge_and_unload`` on that model.

``--quantize same`` is tested against the same compressed-tensors code: the expected output is that compression
(``calculate_qparams`` on the min/max, ``compress``) applied to our 16-bit merge, compared byte for byte.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert import merge
from convert.execute.decode import read_rows
from convert.execute.quantize_sink import CompressedQuantizer
from formats.checkpoint import open_checkpoint
from formats.compressed_tensors import CompressedWeight, spec_of
from tests.helpers import (
    SIZES64,
    assert_converted_like,
    assert_merged_like,
    assert_reads_like,
    assert_same_state,
    fp8_logits,
    load_output,
    make_adapter,
    make_llama,
    peft,
    read_config,
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


@pytest.mark.parametrize("case", list(CASES))
def test_quantize_same_equals_compressed_tensors_compressing_the_merge(case, models, tmp_path) -> None:
    """merge --quantize same: every tensor is, byte for byte, compressed-tensors' own compression (qparams of the
    min/max, its compressor) of our bf16 merge, in row chunks that cut groups of rows (8-row zero-point words, 32-row
    blocks); the base's quantization_config is kept as it is."""
    base = models[case]
    merge(base, models["adapter"], tmp_path / "merged16", device="cpu", dtype="bf16")
    merge(base, models["adapter"], tmp_path / "ours", device="cpu", quantize="same", chunk_size=4 * 64 * 20)
    expected = compressed_checkpoint(tmp_path / "merged16", tmp_path / "expected", case)
    assert_same_state(load_output(tmp_path / "ours"), load_file(expected / "model.safetensors"))
    assert read_config(tmp_path / "ours")["quantization_config"] == read_config(base)["quantization_config"]


def relative_error(model, reference: dict[str, torch.Tensor]) -> float:
    """The largest error of a quantized model's Linear weights against 16-bit ones, relative to each's amax."""
    errors = [
        (w.float() - reference[name].float()).abs().max() / reference[name].float().abs().max()
        for name, w in model.state_dict().items()
        if name.endswith("proj.weight")
    ]
    return float(max(errors))


@pytest.mark.parametrize("case", ["int4-group-asym", "fp8-block"])
def test_quantize_same_loads_in_transformers_as_the_merged_model(case, models, tmp_path) -> None:
    """transformers (compressed-tensors decompressing) loads the output with the logits of compressed-tensors' own
    compression of the merge, and its weights are PEFT's merge within the error the base's own compression made
    (relative to each weight's amax: the random adapter makes the merged weights ~3x the base's, and their
    logits' error with them)."""
    out = tmp_path / "ours"
    merge(models[case], models["adapter"], out, device="cpu", quantize="same")
    merge(models[case], models["adapter"], tmp_path / "merged16", device="cpu", dtype="bf16")
    expected = compressed_checkpoint(tmp_path / "merged16", tmp_path / "expected", case)
    ours = decompressed(out)
    assert torch.equal(fp8_logits(ours), fp8_logits(decompressed(expected)))
    reference = peft.PeftModel.from_pretrained(decompressed(models[case]), models["adapter"]).merge_and_unload()
    base_error = relative_error(decompressed(models[case]), load_output(models["base16"]))
    assert relative_error(ours, reference.state_dict()) <= 1.02 * base_error


@pytest.mark.parametrize("case", ["int4-group-asym", "int8-channel", "fp8-tensor"])
def test_quantize_same_without_adapter_reproduces_the_base(case, models, tmp_path) -> None:
    """Weights the merge leaves alone are copied as stored: a merge without adapter is the base byte for byte."""
    merge(models[case], None, tmp_path / "out", device="cpu", quantize="same")
    assert_same_state(load_output(tmp_path / "out"), load_file(models[case] / "model.safetensors"))


@pytest.mark.parametrize("case", ["fp8-channel", "fp8-tensor", "fp8-block"])
def test_fp8_requantization_of_the_dequantized_base_gives_its_bytes(case, models) -> None:
    """quantize(dequantize(W)) == W for these fp8 bases (the amax comes back as 448 * scale); int min-max scales
    are no fixed point (an amax at +-7.5 scales rounds to -8 or clamps to 7), hence the copies above."""
    ckpt = open_checkpoint(models[case])
    stored = load_file(models[case] / "model.safetensors")
    for name, info in ckpt.tensors.items():
        if isinstance(info.layout, CompressedWeight):
            sink = CompressedQuantizer(None, name, info.shape, info.dtype, spec_of(info, ckpt.config))
            for part, values, offset in sink.pieces(0, read_rows(info)):
                assert offset == 0 and torch.equal(values.view(torch.uint8), stored[part].view(torch.uint8)), part


@pytest.mark.parametrize("args", [{"observer": "mse"}, {"actorder": "group"}])
def test_quantize_same_refuses_schemes_it_cannot_compute_again(args, models, tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(models["int4-group"] / "model.safetensors", bad / "model.safetensors")
    config = json.loads((models["int4-group"] / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(args)
    (bad / "config.json").write_text(json.dumps(config))
    message = run_failing(tmp_path, bad, models["adapter"], None, "--quantize", "same")
    key, value = next(iter(args.items()))
    assert "model.safetensors" in message and ".weight_scale" in message and repr(value) in message, message
    assert key in message, message



@pytest.mark.gpu
@pytest.mark.parametrize("case", ["int4-group-asym", "fp8-block", "fp8-tensor"])
def test_quantize_same_on_cuda_equals_compressed_tensors_compressing_the_cuda_merge(case, models, tmp_path) -> None:
    """On the GPU pipeline, in row chunks that cut groups of rows, every tensor is compressed-tensors' own
    compression of the GPU's bf16 merge. (Not of the CPU's: the fused kernel's bf16 merge may be 1 ulp off the
    CPU's, which moves a scale.)"""
    base = models[case]
    merge(base, models["adapter"], tmp_path / "merged16", device="cuda", dtype="bf16")
    merge(base, models["adapter"], tmp_path / "ours", device="cuda", quantize="same", chunk_size="16KB")
    expected = compressed_checkpoint(tmp_path / "merged16", tmp_path / "expected", case)
    assert_same_state(load_output(tmp_path / "ours"), load_file(expected / "model.safetensors"))
