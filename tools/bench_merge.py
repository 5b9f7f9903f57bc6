"""Benchmark `convert merge` against the reference stack and the `cp` I/O floor, each as a whole process.

    python tools/bench_merge.py [--workdir /tmp/bench-merge] [--results tools/results/bench_merge.md]
                                [--base-quant nf4|fp4|int8]

Builds a synthetic TinyLlama-1.1B-shaped bf16 checkpoint (hidden 2048, 22 layers,
intermediate 5632, vocab 32000, 3 shards) and an r=16 all-linear LoRA adapter,
then times, with the page cache warm and `sync` between runs:
  * `cp -r` of the base (the I/O floor of a same-dtype merge),
  * `convert merge --device cpu`,
  * transformers `from_pretrained` + PEFT `merge_and_unload` + `save_pretrained`.
Peak RSS is each process's own (wait4). The two merged outputs are compared
tensor by tensor at the end, so a fast wrong merge cannot pass unnoticed.
With --base-quant, the base is also quantized by `convert quantize` (bitsandbytes
layout) and `convert merge` from that base to bf16 is timed beside the others:
its peak RSS against the 16-bit merge's is the figure of interest.
Needs the test extras (transformers, peft).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from formats.writer import PlannedTensor, ShardWriter  # noqa: E402

HIDDEN, LAYERS, INTER, VOCAB, HEADS, KV_HEADS, RANK = 2048, 22, 5632, 32000, 32, 4, 16
PROJ = {  # name: (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
    "self_attn.v_proj": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}

REFERENCE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""


def write_checkpoint(path: Path, tensors: dict[str, tuple[int, ...]], max_shard_size: int) -> None:
    """Random bf16 tensors written through the project's own streaming writer."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    writer = ShardWriter(path, [PlannedTensor(n, "BF16", s) for n, s in tensors.items()], max_shard_size)
    for name, shape in tensors.items():
        scale = 1.0 if "norm" in name else 0.02
        writer.write(name, (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16))
    writer.finish()


def build(workdir: Path) -> tuple[Path, Path]:
    from peft import LoraConfig
    from transformers import LlamaConfig

    base, adapter = workdir / "base", workdir / "adapter"
    if (base / "config.json").exists() and (adapter / "adapter_config.json").exists():
        return base, adapter
    shutil.rmtree(workdir, ignore_errors=True)
    tensors: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        for proj, shape in PROJ.items():
            tensors[f"model.layers.{i}.{proj}.weight"] = shape
        tensors[f"model.layers.{i}.input_layernorm.weight"] = (HIDDEN,)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = (HIDDEN,)
    tensors["model.norm.weight"] = (HIDDEN,)
    tensors["lm_head.weight"] = (VOCAB, HIDDEN)
    total = sum(2 * torch.Size(s).numel() for s in tensors.values())
    write_checkpoint(base, tensors, max_shard_size=total // 3 + 1)
    LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ).save_pretrained(base)

    lora: dict[str, tuple[int, ...]] = {}
    for i in range(LAYERS):
        for proj, (out_f, in_f) in PROJ.items():
            lora[f"base_model.model.model.layers.{i}.{proj}.lora_A.weight"] = (RANK, in_f)
            lora[f"base_model.model.model.layers.{i}.{proj}.lora_B.weight"] = (out_f, RANK)
    write_checkpoint(adapter, lora, max_shard_size=1 << 40)
    (adapter / "model.safetensors").rename(adapter / "adapter_model.safetensors")
    LoraConfig(
        r=RANK,
        lora_alpha=32,
        target_modules=[p.split(".")[1] for p in PROJ],
        task_type="CAUSAL_LM",
        base_model_name_or_path="synthetic-tinyllama-1.1b",
    ).save_pretrained(adapter)
    return base, adapter


BASE_FILES: list[Path] = []


def warm_cache() -> None:
    """Read the base into the page cache before every run: this VM reclaims cache between runs."""
    subprocess.run(["cat", *map(str, BASE_FILES)], stdout=subprocess.DEVNULL, check=True)


def timed(cmd: list[str], out: Path | None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and stdout of one whole process, started after removing its last output.

    The process is started by GNU time: a child forked from this (larger) Python
    process would report this process's RSS as its own peak (Linux keeps the
    pre-exec high-water mark)."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    warm_cache()
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.decode()}")
    return seconds, int(proc.stderr.decode().split()[-1]) * 1024, proc.stdout.decode()


def max_ulp(ours: Path, reference: Path) -> int:
    from safetensors import safe_open

    def tensors(path: Path):
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    yield k, st.get_tensor(k)

    ref = dict(tensors(reference))
    worst = 0
    for name, t in tensors(ours):
        a, b = t.view(torch.int16).int(), ref.pop(name).view(torch.int16).int()
        a, b = torch.where(a < 0, -(a & 0x7FFF), a), torch.where(b < 0, -(b & 0x7FFF), b)
        worst = max(worst, int((a - b).abs().max()))
    if ref:
        raise SystemExit(f"reference has tensors the merge lacks: {sorted(ref)[:3]}")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-merge"))
    parser.add_argument("--results", type=Path, default=ROOT / "tools" / "results" / "bench_merge.md")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved; the median is reported")
    parser.add_argument("--device", default="cpu", help="--device for convert merge")
    parser.add_argument("--base-quant", choices=["nf4", "fp4", "int8"], help="also merge from a quantized base")
    args = parser.parse_args()
    base, adapter = build(args.workdir)
    BASE_FILES.extend(sorted(base.iterdir()))
    quant_base = args.workdir / f"base-{args.base_quant}"
    if args.base_quant and not (quant_base / "config.json").exists():
        cmd = [sys.executable, "-m", "convert.cli", "quantize", "--base", str(base), "--out", str(quant_base), "-q"]
        subprocess.run([*cmd, "--quantize", args.base_quant], check=True, cwd=ROOT)
    if args.base_quant:
        BASE_FILES.extend(sorted(quant_base.iterdir()))
    outs = {k: args.workdir / k for k in ("cp", "convert", "reference")}
    convert = [sys.executable, "-m", "convert.cli", "merge", "--base", str(base), "--adapter", str(adapter)]
    conv_name = f"convert merge ({args.device})"
    ref_name = "reference (transformers + PEFT merge_and_unload)"
    runs = {
        "cp -r (I/O floor)": ["cp", "-r", str(base), str(outs["cp"])],
        "python -c 'import torch' (start-up floor)": [sys.executable, "-c", "import torch"],
        conv_name: [*convert, "--out", str(outs["convert"]), "--device", args.device],
        ref_name: [sys.executable, "-c", REFERENCE, str(base), str(adapter), str(outs["reference"])],
    }
    run_outs = {"cp -r (I/O floor)": outs["cp"], conv_name: outs["convert"], ref_name: outs["reference"]}
    quant_name = f"convert merge ({args.device}) from the {args.base_quant} base, bf16 out"
    if args.base_quant:
        outs["quant"] = args.workdir / "convert-quant"
        runs[quant_name] = [*convert[:5], str(quant_base), *convert[6:], "--out", str(outs["quant"])]
        runs[quant_name] += ["--device", args.device, "--dtype", "bf16"]
        run_outs[quant_name] = outs["quant"]
    samples: dict[str, list[tuple[float, int, str]]] = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, cmd in runs.items():
            samples[name].append(timed(cmd, run_outs.get(name)))
    results = {name: (statistics.median(s for s, _, _ in v), max(r for _, r, _ in v)) for name, v in samples.items()}
    # The merge's own time, from its summary line: the wall time less interpreter and torch start-up.
    inner = [float(re.search(r" in ([0-9.]+) s,", out).group(1)) for _, _, out in samples[conv_name]]
    ulp = max_ulp(outs["convert"], outs["reference"])
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)

    cp_s = results["cp -r (I/O floor)"][0]
    conv_s, conv_rss = results[conv_name]
    ref_s, ref_rss = results[ref_name]
    size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    lines = [
        f"## {datetime.date.today()}, {platform.node() or 'cpu'}: {os.cpu_count()} cores, TinyLlama-1.1B-shaped bf16 "
        f"({size_gb:.2f} GB, 3 shards), LoRA r={RANK} all-linear, page cache warm, median of {args.repeat}",
        "",
        "| run | wall s (median) | peak RSS GB (max) |",
        "|---|---|---|",
        *(f"| {name} | {s:.2f} | {rss / 1e9:.2f} |" for name, (s, rss) in results.items()),
        "",
        f"- convert vs reference: {ref_s / conv_s:.1f}x faster, peak RSS {100 * conv_rss / ref_rss:.0f}% of reference",
        f"- convert vs cp floor: {conv_s / cp_s:.2f}x the cp time; the merge itself (its summary line, without "
        f"start-up) took {statistics.median(inner):.2f} s = {statistics.median(inner) / cp_s:.2f}x the cp time",
        f"- largest difference between the two merged outputs: {ulp} bf16 ulp",
        *(
            [
                f"- merge from the {args.base_quant} base: peak RSS {results[quant_name][1] / conv_rss:.2f}x, wall "
                f"{results[quant_name][0] / conv_s:.2f}x the 16-bit merge's"
            ]
            if args.base_quant
            else []
        ),
        "- all samples (s): "
        + "; ".join(f"{n.split(' (')[0]}: {', '.join(f'{s:.2f}' for s, _, _ in v)}" for n, v in samples.items()),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(args.results, "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
