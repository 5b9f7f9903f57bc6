"""``consolidate --from litgpt``: a tiny LitGPT Llama (grouped-query attention, so a fused ``qkv`` to split),
against LitGPT's own ``convert_lit_checkpoint``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from convert.commands.consolidate import consolidate
from formats.errors import ConvertError
from tests.helpers import SIZES as HF_SIZES
from tests.helpers import load_output

transformers = pytest.importorskip("transformers")
litgpt = pytest.importorskip(
    "litgpt",
    reason="litgpt pins huggingface-hub<1.4, transformers 5 needs >=1.31: "
    "install it with pip install --no-deps litgpt lightning lightning-utilities torchmetrics",
)


SIZES = dict(
    name="Llama-tiny", block_size=64, vocab_size=96, padded_vocab_size=96, n_layer=2, n_head=4, n_query_groups=2,
    n_embd=32, intermediate_size=48, mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm", bias=False,
    parallel_residual=False, rotary_percentage=1.0, norm_eps=1e-5, rope_base=10000,
)  # fmt: skip
LORA = dict(lora_r=4, lora_alpha=8, lora_query=True, lora_key=False, lora_value=True, lora_projection=True,
            lora_mlp=True, lora_head=True)  # fmt: skip


@pytest.fixture(scope="module")
def lit_run(tmp_path_factory) -> Path:
    from litgpt.utils import save_config

    run = tmp_path_factory.mktemp("litgpt") / "final"
    run.mkdir()
    config = litgpt.Config(**SIZES)
    torch.manual_seed(0)
    model = litgpt.GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save({"model": model.state_dict()}, run / "lit_model.pth")
    save_config(config, run)
    transformers.LlamaConfig(
        **HF_SIZES,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ).save_pretrained(run)
    return run


def test_litgpt_consolidates_bit_exact_and_loads(lit_run: Path, tmp_path: Path) -> None:
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint

    convert_lit_checkpoint(lit_run, tmp_path / "oracle")
    ref = torch.load(tmp_path / "oracle" / "model.pth", weights_only=True)
    consolidate("litgpt", lit_run, tmp_path / "out")
    out = load_output(tmp_path / "out")
    assert sorted(out) == sorted(ref) and "model.layers.1.self_attn.k_proj.weight" in out
    for name, tensor in ref.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor), name

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    oracle = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(lit_run)).eval()
    oracle.load_state_dict(ref)
    lit = litgpt.GPT(litgpt.Config.from_file(lit_run / "model_config.yaml")).eval()
    lit.load_state_dict(torch.load(lit_run / "lit_model.pth", weights_only=True)["model"])
    ids = torch.arange(12).view(2, -1)
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, oracle(ids).logits)
        torch.testing.assert_close(logits, lit(ids), rtol=1e-4, atol=1e-5)  # LitGPT's own forward


def test_truncated_weights(lit_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "final"
    run.mkdir()
    for f in lit_run.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    os.truncate(run / "lit_model.pth", (run / "lit_model.pth").stat().st_size // 2)
    with pytest.raises(ConvertError, match=r"lit_model\.pth: "):
        consolidate("litgpt", run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def lora_run(lit_run: Path, tmp_path_factory) -> Path:
    """What ``litgpt finetune lora`` leaves: ``lit_model.pth.lora`` (LoRA factors only), ``hyperparameters.yaml``
    naming the base checkpoint, ``model_config.yaml``."""
    import yaml
    from litgpt.lora import GPT, Config, lora_filter
    from litgpt.utils import save_config

    run = tmp_path_factory.mktemp("litgpt-lora") / "final"
    run.mkdir()
    config = Config(**SIZES, **LORA)
    model = GPT(config)
    model.load_state_dict(torch.load(lit_run / "lit_model.pth", weights_only=True)["model"], strict=False)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    state = {k: v for k, v in model.state_dict().items() if lora_filter(k, v)}
    torch.save({"model": state}, run / "lit_model.pth.lora")
    save_config(config, run)
    (run / "hyperparameters.yaml").write_text(yaml.safe_dump({"checkpoint_dir": str(lit_run), **LORA}))
    return run


def lit_lora_logits(lora_run: Path, lit_run: Path, ids: torch.Tensor) -> torch.Tensor:
    from litgpt.lora import GPT, Config

    model = GPT(Config(**SIZES, **LORA)).eval()
    model.load_state_dict(torch.load(lit_run / "lit_model.pth", weights_only=True)["model"], strict=False)
    model.load_state_dict(torch.load(lora_run / "lit_model.pth.lora", weights_only=True)["model"], strict=False)
    with torch.no_grad():
        return model(ids)


def test_litgpt_lora_adapter_loads_in_peft(lora_run: Path, lit_run: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    consolidate("litgpt", lora_run, tmp_path / "adapter", adapter_only=True)
    consolidate("litgpt", lit_run, tmp_path / "base")
    config = peft.LoraConfig.from_pretrained(tmp_path / "adapter")
    assert sorted(config.target_modules) == ["down_proj", "gate_proj", "lm_head", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]  # fmt: skip
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.arange(12).view(2, -1)
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, lit_lora_logits(lora_run, lit_run, ids), rtol=1e-4, atol=1e-5)

    # Merged by convert merge's path into the LitGPT base: what PEFT's merge_and_unload gives, bit for bit.
    consolidate("litgpt", lora_run, tmp_path / "merged")
    out = load_output(tmp_path / "merged")
    expected = model.merge_and_unload().state_dict()
    assert sorted(out) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(out[name], tensor), name
