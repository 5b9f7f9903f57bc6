"""``consolidate --from litgpt``: a tiny LitGPT Llama (grouped-query attention, so a fused ``qkv`` to split),
against LitGPT's own ``convert_lit_checkpoint``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from convert.consolidate import consolidate
from formats.errors import ConvertError
from tests.conftest import load_output

transformers = pytest.importorskip("transformers")
litgpt = pytest.importorskip(
    "litgpt",
    reason="litgpt pins huggingface-hub<1.4, transformers 5 needs >=1.31: "
    "install it with pip install --no-deps litgpt lightning lightning-utilities torchmetrics",
)


@pytest.fixture(scope="module")
def lit_run(tmp_path_factory) -> Path:
    from litgpt.utils import save_config

    run = tmp_path_factory.mktemp("litgpt") / "final"
    run.mkdir()
    config = litgpt.Config(
        name="Llama-tiny",
        block_size=64,
        vocab_size=96,
        padded_vocab_size=96,
        n_layer=2,
        n_head=4,
        n_query_groups=2,
        n_embd=32,
        intermediate_size=48,
        mlp_class_name="LLaMAMLP",
        norm_class_name="RMSNorm",
        bias=False,
        parallel_residual=False,
        rotary_percentage=1.0,
        norm_eps=1e-5,
        rope_base=10000,
    )
    torch.manual_seed(0)
    model = litgpt.GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save({"model": model.state_dict()}, run / "lit_model.pth")
    save_config(config, run)
    transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
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
