"""``convert loftq-init`` end to end on tiny models: the output loads in transformers (4-bit, bitsandbytes on the CPU)
and PEFT, holds exactly LoftQ's Q, A and B, and its effective weights approximate the 16-bit base."""

from __future__ import annotations

import dataclasses
import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from click.testing import CliRunner

from convert.cli import main
from convert.commands.loftq_init import loftq_init
from convert.kernels.loftq import LoftQMatrix, loftq_matrix
from convert.kernels.quant import dequantize_4bit
from convert.plan.lora import lora_scaling
from formats.errors import ConvertError
from tests.helpers import WIDE_CONFIGS, load_output, make_wide_base, peft, transformers

CASES = {
    # name: (arch, dtype, loftq_init kwargs)
    "llama-bf16-all-linear": ("llama", "bf16", dict(rank=4, alpha=8, iters=3)),
    "qwen2-tied-fp16-some": (
        "qwen2",
        "fp16",
        dict(rank=8, alpha=4, iters=2, target_modules=["q_proj", "down_proj"], double_quant=True, use_rslora=True),
    ),
    "llama-fp32-fp4-exact": ("llama", "fp32", dict(rank=2, alpha=16, iters=1, quant_type="fp4", svd="exact")),
    "llama-bf16-cuda": ("llama", "bf16", dict(rank=4, alpha=8, iters=3, double_quant=True, device="cuda")),
}


def lora_layers(model):
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.Linear4bit):
            yield name.removeprefix("base_model.model."), module


def on_cpu(result: LoftQMatrix) -> LoftQMatrix:
    q = result.quantized
    nested = q.nested_absmax.cpu() if q.nested_absmax is not None else None
    q = dataclasses.replace(q, packed=q.packed.cpu(), absmax=q.absmax.cpu(), nested_absmax=nested)
    return dataclasses.replace(result, quantized=q, A=result.A.cpu(), B=result.B.cpu())


def dequantized_weight(weight) -> torch.Tensor:
    return bnbF.dequantize_4bit(weight.data, weight.quant_state).float()


def dequantized(layer) -> torch.Tensor:
    return dequantized_weight(layer.base_layer.weight)


@pytest.mark.parametrize("case", CASES)
def test_loftq_init_loads_in_transformers_and_peft(case, tmp_path):
    arch, dtype, kwargs = CASES[case]
    device = kwargs.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA (run on the GPU machine)")
    base = make_wide_base(tmp_path / "base", arch, dtype)
    result = loftq_init(base, tmp_path / "out", **{"device": "cpu", **kwargs})
    settings = {"rank": 16, "alpha": 16, "use_rslora": False, "quant_type": "nf4", "double_quant": False} | kwargs
    scaling = lora_scaling(settings["rank"], settings["alpha"], settings["use_rslora"])
    weights = load_output(base)

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    model = peft.PeftModel.from_pretrained(model, tmp_path / "out" / "adapter", is_trainable=True)
    assert model.peft_config["default"].r == settings["rank"]
    layers = dict(lora_layers(model))
    assert len(layers) == result.initialized > 0
    errors = []
    for module, layer in layers.items():
        W = weights[f"{module}.weight"].float()
        expected = loftq_matrix(  # on the device that made the output: CUDA rounds as bitsandbytes' CUDA kernels
            weights[f"{module}.weight"].to(device),
            rank=settings["rank"],
            scaling=scaling,
            iters=kwargs["iters"],
            quant_type=settings["quant_type"],
            double_quant=settings["double_quant"],
            svd=kwargs.get("svd", "randomized"),
        )
        expected = on_cpu(expected)
        assert layer.scaling["default"] == pytest.approx(scaling)
        # exactly the Q, A and B that LoftQ computed
        assert torch.equal(layer.base_layer.weight.data.view(-1), expected.quantized.packed.view(-1)), module
        assert torch.equal(dequantized(layer), dequantize_4bit(expected.quantized).float()), module
        assert torch.equal(layer.lora_A["default"].weight, expected.A), module
        assert torch.equal(layer.lora_B["default"].weight, expected.B), module
        effective = (
            dequantized(layer) + scaling * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
        )
        error = float((W - effective).norm() / W.norm())
        assert error == pytest.approx(expected.error, rel=1e-5)
        assert error < expected.quant_error  # better than the 4-bit weight alone
        errors.append(error)
    assert result.mean_error == pytest.approx(sum(errors) / len(errors), rel=1e-5)

    # Every other linear layer is quantized exactly as BitsAndBytesConfig quantizes the base at load time.
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings["quant_type"],
        bnb_4bit_use_double_quant=settings["double_quant"],
        bnb_4bit_compute_dtype=model.dtype,
    )
    qlora = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, device_map="cpu")
    ours = model.get_base_model()
    for name, module in qlora.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and name not in layers:
            mine = ours.get_submodule(name)
            assert torch.equal(mine.weight.data, module.weight.data), name
            assert torch.equal(dequantized_weight(mine.weight), dequantized_weight(module.weight)), name
    for name, param in qlora.named_parameters():
        if not isinstance(param, bnb.nn.Params4bit):
            assert torch.equal(ours.get_parameter(name), param), name

    if result.quantized:
        return  # only some layers initialized: the logits need not move much
    # With every linear layer initialized, the LoftQ model is closer to the 16-bit model than plain QLoRA is.
    reference = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # train mode: bitsandbytes' CPU eval path repacks weights, and fails below 64 columns
        exact, loftq, plain = (m.train()(input_ids=ids).logits.float() for m in (reference, model, qlora))
    assert (loftq - exact).norm() < (plain - exact).norm()


def test_adapter_config_and_dequantized_base(tmp_path):
    base = make_wide_base(tmp_path / "base", "llama", "bf16")
    loftq_init(base, tmp_path / "out", rank=4, alpha=8, iters=2, device="cpu", save_dequantized=True)
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["init_lora_weights"] is True  # "loftq" would make PEFT re-run LoftQ on the 4-bit base
    assert "loftq" in (tmp_path / "out" / "adapter" / "README.md").read_text()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["load_in_4bit"]

    # out/dequantized: the 16-bit Q, what a user quantizing at load time starts from
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    deq = load_output(tmp_path / "out" / "dequantized")
    base_weights = load_output(base)
    assert set(deq) == set(base_weights)
    for name, module in model.named_modules():
        if hasattr(module, "weight") and getattr(module.weight, "quant_state", None) is not None:
            state = module.weight.quant_state
            assert torch.equal(deq[f"{name}.weight"], bnbF.dequantize_4bit(module.weight.data, state)), name
    assert torch.equal(deq["lm_head.weight"], base_weights["lm_head.weight"])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "dequantized")
    assert loaded.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "8"], "--bits 8: not supported"),
        (["--target-modules", "nope_proj"], "'nope_proj': matches no module"),
        (["--target-modules", "embed_tokens"], "is not a quantized linear layer"),
        (["--rank", "0"], "rank and iters must be >= 1"),
        (["--rank", "65"], "--rank 65 exceeds the smaller dimension"),
    ],
)
def test_bad_input_is_a_clear_error(args, message, tmp_path):
    base = make_wide_base(tmp_path / "base", "llama")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in base.iterdir())
    run = CliRunner().invoke(main, ["loftq-init", "--base", str(base), "--out", str(tmp_path / "out"), *args])
    assert run.exit_code == 2, run.output
    assert message in run.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in base.iterdir()) == before


def test_cli_summary_and_refuses_conv1d(tmp_path):
    base = make_wide_base(tmp_path / "base", "llama")
    out = tmp_path / "out"
    run = CliRunner().invoke(
        main, ["loftq-init", "--base", str(base), "--out", str(out), "--rank", "2", "--iters", "1"]
    )
    assert run.exit_code == 0, run.output
    assert "LoftQ-initialized 14 matrices" in run.output
    with pytest.raises(ConvertError, match="exists and is not empty"):
        loftq_init(base, out)
    gpt2 = make_wide_base(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ConvertError, match="Conv1D"):
        loftq_init(gpt2, tmp_path / "out2")


@pytest.mark.parametrize("save", [dict(safe_serialization=False), dict(max_shard_size="100KB")])
def test_bin_and_sharded_bases_give_the_same_output(save, tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(WIDE_CONFIGS["llama"]()).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "other", **save)
    for name in ("single", "other"):
        loftq_init(tmp_path / name, tmp_path / f"out-{name}", rank=4, iters=2, device="cpu", max_shard_size="50KB")
    single, other = load_output(tmp_path / "out-single"), load_output(tmp_path / "out-other")
    assert single.keys() == other.keys() and all(torch.equal(single[k], other[k]) for k in single)
    adapters = [load_output(tmp_path / f"out-{n}" / "adapter") for n in ("single", "other")]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert len(list((tmp_path / "out-other").glob("model-*.safetensors"))) > 1


def test_llm_int8_base_keeps_its_dtype(tmp_path):
    """An LLM.int8 base (saved by transformers) reads as fp32 rows: Q is still quantized from, and recorded as,
    the model's 16-bit dtype, and the output loads in transformers + PEFT."""
    base = make_wide_base(tmp_path / "base", "llama", "fp16")
    config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu")
    model.save_pretrained(tmp_path / "int8")
    loftq_init(tmp_path / "int8", tmp_path / "out", rank=2, iters=1, device="cpu")
    state = load_output(tmp_path / "out")
    blob = state["model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"]
    assert json.loads(bytes(blob.tolist()))["dtype"] == "float16"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    assert peft.PeftModel.from_pretrained(model, tmp_path / "out" / "adapter") is not None
