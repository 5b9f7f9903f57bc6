"""`convert inspect` against what transformers, PEFT and bitsandbytes made; `convert verify` against corruption."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from convert import merge
from convert.cli import main
from formats.safetensors_file import read_header
from tests.helpers import make_adapter, make_base, transformers


def invoke_json(*args: str) -> dict:
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_inspect_model(tmp_path):
    base = make_base(tmp_path / "base", "llama", "bf16", max_shard_size="30KB")
    info = invoke_json("inspect", str(base))
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    assert info["kind"] == "model" and info["format"] == "safetensors" and info["model_type"] == "llama"
    assert info["parameters"] == model.num_parameters() and info["dtypes"] == {"BF16": model.num_parameters()}
    assert len(info["shards"]) > 1 and sum(s["tensors"] for s in info["shards"]) == info["tensors"]
    assert info["quantization"] is None
    text = CliRunner().invoke(main, ["inspect", str(base)]).stdout
    assert f"parameters      {model.num_parameters():,}" in text and "model-00001-of-" in text


@pytest.mark.parametrize(
    "quant",
    [
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
        dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
        dict(load_in_8bit=True),
    ],
    ids=["nf4-double-quant", "fp4", "int8"],
)
def test_inspect_bitsandbytes_model(tmp_path, quant):
    """Quantized by transformers + bitsandbytes (on the CPU): the true parameter count and the quantization."""
    base = make_base(tmp_path / "base", "llama")
    config = transformers.BitsAndBytesConfig(**quant)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu")
    model.save_pretrained(tmp_path / "quantized")
    info = invoke_json("inspect", str(tmp_path / "quantized"))
    q = info["quantization"]
    assert q["method"] == "bitsandbytes" and q["quantization_config"]["quant_method"] == "bitsandbytes"
    linear = 2 * 7  # two layers of q, k, v, o, gate, up, down
    if "load_in_8bit" in quant:
        assert q["bnb_8bit_weights"] == linear and q["bnb_4bit_weights"] == {}
    else:
        assert q["bnb_4bit_weights"] == {quant["bnb_4bit_quant_type"]: linear} and q["bnb_8bit_weights"] == 0
    original = transformers.AutoModelForCausalLM.from_pretrained(base).num_parameters()
    assert info["parameters"] == original and info["tensors"] == len(load_file(base / "model.safetensors"))


def test_inspect_adapter(tmp_path):
    base = make_base(tmp_path / "base", "llama")
    adapter = make_adapter(
        tmp_path / "adapter",
        base,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3},
        modules_to_save=["lm_head"],
    )
    info = invoke_json("inspect", str(adapter))
    assert info["kind"] == "adapter" and info["peft_type"] == "LORA" and info["dora"] is False
    assert info["groups"] == {
        "down_proj": {"modules": 2, "r": 4, "lora_alpha": 8},
        "q_proj": {"modules": 2, "r": 2, "lora_alpha": 8},
        "v_proj": {"modules": 2, "r": 4, "lora_alpha": 3},
    }
    assert info["target_modules"] == ["down_proj", "q_proj", "v_proj"] and info["modules_to_save"] == ["lm_head"]
    assert info["saved_tensors"] == ["lm_head.weight"]
    stored = load_file(adapter / "adapter_model.safetensors")
    assert info["parameters"] == sum(t.numel() for t in stored.values())


def test_inspect_dora_adapter(tmp_path):
    base = make_base(tmp_path / "base", "llama")
    adapter = make_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    assert invoke_json("inspect", str(adapter))["dora"] is True


def test_inspect_missing_path_is_an_error(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such directory" in result.stderr


@pytest.fixture
def merged(tmp_path):
    base = make_base(tmp_path / "base", "llama")
    adapter = make_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules="all-linear")
    merge(base, adapter, tmp_path / "out", device="cpu", max_shard_size="30KB")
    return base, adapter, tmp_path / "out"


def verify_args(base, adapter, out, *extra) -> list[str]:
    return ["verify", "--base", str(base), "--adapter", str(adapter), "--merged", str(out), *extra]


def corrupt_one_element(out, name: str) -> None:
    """Add 1e-3 to one fp32 element of tensor ``name`` in the merged model's shards."""
    for shard in sorted(out.glob("*.safetensors")):
        infos = read_header(shard)[0]
        if name in infos:
            data = bytearray(shard.read_bytes())
            at = infos[name].offset + 4 * 7
            (value,) = struct.unpack_from("<f", data, at)
            struct.pack_into("<f", data, at, value + 1e-3)
            shard.write_bytes(bytes(data))
            return
    raise AssertionError(name)


def test_verify_accepts_a_correct_merge(merged):
    report = invoke_json(*verify_args(*merged))
    assert report["ok"] and report["checked"] == report["total"] == 21
    assert all(t["max_abs_error"] == 0 for t in report["tensors"])
    assert sum(t["merged"] for t in report["tensors"]) == 14


@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"], ids=["merged", "copied"])
def test_verify_finds_one_corrupted_element(merged, name):
    corrupt_one_element(merged[2], name)
    result = CliRunner().invoke(main, verify_args(*merged))
    assert result.exit_code == 1
    bad = [line for line in result.stdout.splitlines() if line.startswith("MISMATCH")]
    assert len(bad) == 1 and name in bad[0] and "1 element(s) off" in bad[0], result.stdout
    report = json.loads(CliRunner().invoke(main, [*verify_args(*merged), "--json"]).stdout)
    entry = next(t for t in report["tensors"] if t["name"] == name)
    assert entry["mismatched"] == 1 and 5e-4 < entry["max_abs_error"] < 2e-3


def test_verify_sample_and_dtype(tmp_path, merged):
    base, adapter, _ = merged
    merge(base, adapter, tmp_path / "bf16", dtype="bf16", device="cpu")
    report = invoke_json(*verify_args(base, adapter, tmp_path / "bf16", "--sample", "5", "--seed", "3"))
    assert report["ok"] and report["checked"] == 5 and report["total"] == 21
    assert {t["dtype"] for t in report["tensors"]} == {"BF16"}
    again = invoke_json(*verify_args(base, adapter, tmp_path / "bf16", "--sample", "5", "--seed", "3"))
    assert [t["name"] for t in again["tensors"]] == [t["name"] for t in report["tensors"]]


def test_verify_against_the_wrong_adapter(tmp_path, merged):
    base, _, out = merged
    other = make_adapter(tmp_path / "other", base, seed=5, r=4, lora_alpha=8, target_modules="all-linear")
    result = CliRunner().invoke(main, verify_args(base, other, out))
    assert result.exit_code == 1 and result.stdout.count("MISMATCH") == 14


def test_verify_reports_a_missing_tensor(tmp_path, merged):
    base, adapter, _ = merged
    merge(base, None, tmp_path / "plain", device="cpu")  # no adapter: lm_head etc. present, deltas absent
    state = load_file(tmp_path / "plain" / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, tmp_path / "plain" / "model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(main, verify_args(base, adapter, tmp_path / "plain", "--json"))
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and report["missing"] == ["model.norm.weight"]
    assert sum(not t["ok"] for t in report["tensors"]) == 14  # the un-merged weights differ too


def test_inspect_hostile_quant_state(tmp_path):
    """A 4-bit quant-state record that is not what bitsandbytes writes: one line naming file and tensor."""
    state = {
        "model.norm.weight": torch.ones(4),
        "model.x.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b'{"shape": "huge"}'), dtype=torch.uint8),
    }
    (tmp_path / "model").mkdir()
    save_file(state, tmp_path / "model" / "model.safetensors")
    (tmp_path / "model" / "config.json").write_text("{}")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "model")])
    assert result.exit_code == 2 and "model.x.weight" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "quant",
    [
        dict(quantize="nf4"),
        dict(quantize="fp4", double_quant=False, blocksize=128, quant_storage="bfloat16"),
        dict(quantize="int8"),
    ],
    ids=["nf4-double-quant", "fp4-bf16-storage", "int8"],
)
def test_verify_a_quantized_merge_byte_for_byte(tmp_path, merged, quant):
    """A `--quantize` output is recomputed, quantized with the settings its quant states record, and compared
    part by part; one flipped byte of packed data (or of an int8 weight) is found in the right tensor."""
    base, adapter, _ = merged
    out = tmp_path / "quantized"
    merge(base, adapter, out, device="cpu", dtype="bf16", max_shard_size="30KB", **quant)
    report = invoke_json(*verify_args(base, adapter, out))
    assert report["ok"] and report["checked"] == report["total"] == 21, report
    name = "model.layers.1.mlp.up_proj.weight"
    for shard in sorted(out.glob("*.safetensors")):
        infos = read_header(shard)[0]
        if name in infos:
            data = bytearray(shard.read_bytes())
            data[infos[name].offset + 5] ^= 0x11
            shard.write_bytes(bytes(data))
    result = CliRunner().invoke(main, verify_args(base, adapter, out))
    bad = [line for line in result.stdout.splitlines() if line.startswith("MISMATCH")]
    assert result.exit_code == 1 and len(bad) == 1 and name in bad[0], result.stdout
