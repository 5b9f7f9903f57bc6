"""Tiny real models and adapters, made with transformers + PEFT in the test session.

The oracle of every merge test is PEFT itself: ``PeftModel.from_pretrained`` on
the same base and adapter, then ``merge_and_unload``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]

SIZES = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
TINY = {
    "llama": lambda: transformers.LlamaConfig(**SIZES, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**SIZES, tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "phi3": lambda: transformers.Phi3Config(**SIZES, pad_token_id=0, tie_word_embeddings=False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_base(path: Path, arch: str, dtype: str = "fp32", seed: int = 0, **save_kwargs) -> Path:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY[arch]()).to(DTYPES[dtype])
    model.save_pretrained(path, **save_kwargs)
    return path


def make_adapter(path: Path, base: Path, seed: int = 1, safe: bool = True, **lora_kwargs) -> Path:
    """A LoRA adapter with non-zero B (init_lora_weights=False) and perturbed saved copies."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(init_lora_weights=False, **lora_kwargs)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:  # modules_to_save copies, lora_B.bias
                p.add_(torch.randn_like(p) * 0.1)
            elif "lora_B" in name and "bias" in name:
                p.copy_(torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=safe)
    return path


def peft_model(base: Path, adapter: Path, dtype: torch.dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return peft.PeftModel.from_pretrained(model, adapter).eval()


def load_output(out: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two 16-bit float tensors."""

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def assert_equal_or_1ulp(ours: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, (name, ours.dtype, ref.dtype, ours.shape, ref.shape)
    if ours.dtype == torch.float32 or not ours.is_floating_point():
        assert torch.equal(ours, ref), f"{name}: max abs diff {(ours.float() - ref.float()).abs().max()}"
    else:
        assert ulp_distance(ours, ref) <= 1, f"{name}: {ulp_distance(ours, ref)} ulp apart"


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture
def tiny_llama(tmp_path: Path) -> tuple[Path, Path]:
    base = make_base(tmp_path / "base", "llama")
    adapter = make_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules="all-linear")
    return base, adapter
