"""Make the tiny example shipped in examples/tiny-llama: a random Llama base and a PEFT LoRA adapter.

    python tools/make_example.py [OUT_DIR]

Needs transformers and peft (pip install -e '.[test]'). The result is a few
hundred KB, small enough to ship, and is what the README's first command merges.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig


def main(out: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out / "base")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32), lora)
    peft_model.peft_config["default"].base_model_name_or_path = "tiny-llama-base"  # not this machine's path
    peft_model.save_pretrained(out / "adapter")
    (out / "adapter" / "README.md").unlink()  # PEFT's empty model-card template
    print(f"wrote {out}/base and {out}/adapter")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "examples" / "tiny-llama"))
