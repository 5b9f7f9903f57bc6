"""How far each --merge-into mode lands from the QLoRA model the adapter was trained in.

    python tools/measure_merge_into.py [--workdir /tmp/merge-into] [--results tools/results/merge_into.md]

Builds a bf16 Llama-shaped model (hidden 1024, intermediate 2816, 2 layers) and an r=16
all-linear LoRA adapter whose delta is about 1% of the weights, then merges the adapter
into the 16-bit base both ways (`--merge-into original` and `dequantized`, NF4 with double
quantization, blocksize 64: transformers' QLoRA settings). The QLoRA model's effective
weight is computed independently with bitsandbytes: dequantize_4bit(quantize_4bit(W)) + delta
(fp32). Reported for the adapted Linear weights: the error of each merged model's weights
against it, relative to its norm and to the delta's, and the largest logit difference of each
merged model from the QLoRA model itself (transformers + bitsandbytes 4-bit + PEFT, on the CPU).
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
from pathlib import Path

import bitsandbytes.functional as F
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert import merge  # noqa: E402

RANK, ALPHA = 16, 32


def build(workdir: Path) -> tuple[Path, Path]:
    base, adapter = workdir / "base", workdir / "adapter"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))
    with torch.no_grad():  # a trained-looking B: delta about 1% of the weight norm
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.0015)
    model.save_pretrained(adapter)
    return base, adapter


def qlora_effective(base: Path, adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (bnb dequantize(quantize(W)) + delta in fp32, delta), for every adapted weight."""
    weights, lora = load_file(base / "model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, A in lora.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        B = lora[key.replace("lora_A", "lora_B")]
        delta = (B.float() @ A.float()) * (ALPHA / RANK)
        packed, state = F.quantize_4bit(weights[module + ".weight"], quant_type="nf4", compress_statistics=True)
        out[module + ".weight"] = (F.dequantize_4bit(packed, state).float() + delta, delta)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge-into"))
    parser.add_argument("--results", type=Path, default=ROOT / "tools" / "results" / "merge_into.md")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    base, adapter = build(args.workdir)
    effective = qlora_effective(base, adapter)

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    qlora = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, device_map="cpu")
    qlora = PeftModel.from_pretrained(qlora, adapter).eval()
    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        qlora_logits = qlora(input_ids=ids).logits.float()

    rows = []
    for mode in ("original", "dequantized"):
        out = args.workdir / mode
        merge(base, adapter, out, device="cpu", merge_into=mode, double_quant=True, blocksize=64)
        merged = load_file(out / "model.safetensors")
        err = sum(float((merged[n].float() - w).norm() ** 2) for n, (w, _) in effective.items()) ** 0.5
        ref = sum(float(w.norm() ** 2) for w, _ in effective.values()) ** 0.5
        delta = sum(float(d.norm() ** 2) for _, d in effective.values()) ** 0.5
        worst = max(float((merged[n].float() - w).abs().max()) for n, (w, _) in effective.items())
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        with torch.no_grad():
            logit_diff = float((model(input_ids=ids).logits.float() - qlora_logits).abs().max())
        rows.append(f"| {mode} | {err / ref:.2e} | {err / delta:.3f} | {worst:.2e} | {logit_diff:.3f} |")

    lines = [
        f"## {datetime.date.today()}: merge-into, NF4 + double quant, blocksize 64, bf16 Llama-shaped "
        f"(hidden 1024, 2 layers), LoRA r={RANK} all-linear, ||delta|| / ||W|| = {delta / ref:.3f}",
        "",
        "| --merge-into | ‖merged − W_qlora‖ / ‖W_qlora‖ | ‖merged − W_qlora‖ / ‖delta‖ | max abs error | "
        "max logit diff vs QLoRA model |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    print("\n".join(lines))
    with open(args.results, "a") as f:
        f.writelines(line + "\n" for line in lines)


if __name__ == "__main__":
    main()
