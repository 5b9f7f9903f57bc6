"""Benchmark `convert merge --device cuda` (LoRA and DoRA) against the reference stack and the `cp` floor,
and the fused kernels against a device-to-device copy, all in one run on the GPU machine.

    python tools/bench_gpu_merge.py [--shape 8b|1b] [--workdir /tmp/bench-gpu] [--kernels] [--no-merge]
                                    [--results tools/results/bench_gpu_merge.md] [--also-to $OUT/bench.md]

Builds a Llama-shaped bf16 checkpoint (8b: hidden 4096, 32 layers, intermediate 14336,
vocab 128256, ~16 GB in 5 GB shards; 1b: TinyLlama's shape), generated on the GPU and
written with the project's streaming writer, and r=16 all-linear LoRA and DoRA adapters
(DoRA magnitudes near the weight norms). Then, with the page cache dropped before each
run (`sync; echo 3 > /proc/sys/vm/drop_caches`; the results say if that was refused),
times each whole process plus a final `sync` (so written data is on disk):
  * `cp -r` of the base (the I/O floor), and a process that only imports torch, starts CUDA
    and imports triton (the start-up floor every torch tool pays on a cold cache),
  * the reference: transformers `from_pretrained(device_map="cuda")` + PEFT `merge_and_unload`
    + `save_pretrained`, for LoRA and for DoRA (--reference),
  * `convert merge --device cuda`, for LoRA and for DoRA,
and compares each convert output with its reference output (largest bf16 ulp over sampled
tensors). Peak RSS is each process's own (wait4 of a vfork'ed child). With --kernels, the
fused kernels' achieved bandwidth (bytes they must move / time) against `copy_` of the same
bytes on the device, and their extra GPU memory. NF4 bases are not benchmarked yet: the
pipeline has no 4-bit checkpoint reader on this branch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from formats.writer import PlannedTensor, ShardWriter  # noqa: E402

SHAPES = {  # hidden, layers, intermediate, vocab, heads, kv heads
    "8b": (4096, 32, 14336, 128256, 32, 8),
    "1b": (2048, 22, 5632, 32000, 32, 4),
}
RANK, ALPHA = 16, 32
PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

STARTUP = "import torch; torch.zeros(1, device='cuda'); import triton"
REFERENCE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="cuda")
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""


def projections(shape: str) -> dict[str, tuple[int, int]]:
    hidden, _, inter, _, heads, kv = SHAPES[shape]
    kv_out = hidden * kv // heads
    sizes = [(hidden, hidden), (kv_out, hidden), (kv_out, hidden), (hidden, hidden)]
    sizes += [(inter, hidden), (inter, hidden), (hidden, inter)]
    return dict(zip([f"self_attn.{p}" for p in PROJS[:4]] + [f"mlp.{p}" for p in PROJS[4:]], sizes, strict=True))


def build(workdir: Path, shape: str) -> tuple[Path, Path, Path]:
    """Base, LoRA and DoRA adapter directories, generated on the GPU (random bf16, not from_config)."""
    from peft import LoraConfig
    from transformers import LlamaConfig

    base, lora, dora = workdir / "base", workdir / "lora", workdir / "dora"
    if (dora / "adapter_config.json").exists():
        return base, lora, dora
    shutil.rmtree(workdir, ignore_errors=True)
    hidden, layers, inter, vocab, heads, kv = SHAPES[shape]
    proj = projections(shape)
    tensors: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        tensors.update({f"model.layers.{i}.{p}.weight": s for p, s in proj.items()})
        tensors[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
    tensors["model.norm.weight"] = (hidden,)
    tensors["lm_head.weight"] = (vocab, hidden)
    gen = torch.Generator("cuda").manual_seed(0)
    base.mkdir(parents=True)
    norms: dict[str, torch.Tensor] = {}
    writer = ShardWriter(base, [PlannedTensor(n, "BF16", s) for n, s in tensors.items()], 5 * 10**9)
    for name, s in tensors.items():
        t = torch.randn(s, generator=gen, device="cuda").mul_(1.0 if "norm" in name else 0.02).to(torch.bfloat16)
        if name.endswith("_proj.weight"):
            norms[name] = torch.linalg.norm(t.float(), dim=1).cpu()
        writer.write(name, t.cpu())
    writer.finish()
    LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False, dtype="bfloat16",
    ).save_pretrained(base)  # fmt: skip

    adapter: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for p, (out_f, in_f) in proj.items():
            key = f"base_model.model.model.layers.{i}.{p}"
            adapter[f"{key}.lora_A.weight"] = torch.randn(RANK, in_f, generator=gen, device="cuda").cpu() * 0.01
            adapter[f"{key}.lora_B.weight"] = torch.randn(out_f, RANK, generator=gen, device="cuda").cpu() * 0.01
    from safetensors.torch import save_file

    for path, use_dora in ((lora, False), (dora, True)):
        state = dict(adapter)
        if use_dora:
            for name, n in norms.items():
                key = "base_model.model." + name.removesuffix(".weight")
                state[f"{key}.lora_magnitude_vector"] = n * (1 + 0.1 * torch.rand(n.shape))
        path.mkdir()
        save_file(state, path / "adapter_model.safetensors", metadata={"format": "pt"})
        LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=PROJS, use_dora=use_dora, task_type="CAUSAL_LM",
            base_model_name_or_path=f"synthetic-llama-{shape}",
        ).save_pretrained(path)  # fmt: skip
    return base, lora, dora


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cached_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) * 1024
    return -1


def timed(cmd: list[str], out: Path | None) -> tuple[float, int, str]:
    """Wall seconds (the process, then `sync`) and peak RSS of one whole process, started on a cold cache."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    drop_caches()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)  # vfork: fresh RSS
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{output[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, output


def max_ulp(ours: Path, reference: Path, names: list[str]) -> int:
    from safetensors import safe_open

    def find(path: Path, name: str) -> torch.Tensor:
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                if name in st.keys():
                    return st.get_tensor(name)
        raise SystemExit(f"{path}: no tensor {name}")

    worst = 0
    for name in names:
        a, b = find(ours, name).view(torch.int16).int(), find(reference, name).view(torch.int16).int()
        a, b = torch.where(a < 0, -(a & 0x7FFF), a), torch.where(b < 0, -(b & 0x7FFF), b)
        worst = max(worst, int((a - b).abs().max()))
    return worst


def time_cuda(fn, repeat: int = 20) -> float:
    """Median seconds of ``fn`` on the GPU, after one warm-up call (which also compiles)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def bench_kernels(report) -> None:
    """GB/s of the fused kernels (bytes they must move: read the base once, write the output once) vs copy_."""
    report("| kernel | shape | GB/s | % of copy | extra GPU memory / output size |")
    report("|---|---|---|---|---|")
    for M, N in ((14336, 4096), (4096, 14336), (4096, 4096)):
        bench_shape(M, N, report, nf4=M == N)
        torch.cuda.empty_cache()
    sweep_blocks(report)


def sweep_blocks(report) -> None:
    """Tile shapes and the product's form (tl.dot or rank-1 updates) of the LoRA kernel on the largest
    Llama-8B weight, and the DoRA rows kernel's rows per program: the defaults should be the fastest."""
    from convert.kernels import merge_triton as mt

    M, N = 14336, 4096
    w = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    L, R = torch.randn(M, RANK, device="cuda") * 0.01, torch.randn(RANK, N, device="cuda") * 0.01
    m = torch.rand(M, device="cuda") + 0.5
    defaults = (mt.BLOCK_M, mt.BLOCK_N, mt.NUM_WARPS, mt.USE_DOT, mt.DORA_TILE, mt.DORA_WARPS)
    found = []
    for bm, bn, warps, dot in ((64, 128, 4, True), (64, 128, 4, False), (32, 256, 4, False), (64, 64, 4, True)):
        mt.BLOCK_M, mt.BLOCK_N, mt.NUM_WARPS, mt.USE_DOT = bm, bn, warps, dot
        lora = 4 * M * N / time_cuda(lambda: mt.merge_triton(w, L, R, 2.0, w.dtype, out=w)) / 1e9
        found.append(f"LoRA {bm}x{bn}/{warps}w {'dot' if dot else 'rank-1'}: {lora:.0f} GB/s")
    for tile in (4096, 8192, 16384):  # rows of 4096 run with 4 warps whatever DORA_WARPS says
        mt.DORA_TILE = tile
        dora = 4 * M * N / time_cuda(lambda: mt.merge_triton(w, L, R, 2.0, w.dtype, m, out=w)) / 1e9
        found.append(f"DoRA rows {tile // N}/program: {dora:.0f} GB/s")
    (mt.BLOCK_M, mt.BLOCK_N, mt.NUM_WARPS, mt.USE_DOT, mt.DORA_TILE, mt.DORA_WARPS) = defaults
    report("- tile sweep (14336x4096 bf16): " + "; ".join(found))


def bench_shape(M: int, N: int, report, nf4: bool) -> None:
    import bitsandbytes.functional as bnbf

    from convert.kernels import merge_triton as mt

    w = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    L, R = torch.randn(M, RANK, device="cuda") * 0.01, torch.randn(RANK, N, device="cuda") * 0.01
    m, mc = torch.rand(M, device="cuda") + 0.5, torch.rand(N, device="cuda") + 0.5
    size = w.numel() * 2
    dst = torch.empty_like(w)
    copy_bw = 2 * size / time_cuda(lambda: dst.copy_(w)) / 1e9
    report(f"| copy_ (device to device) | {M}x{N} bf16 | {copy_bw:.0f} | 100% | - |")
    cases = {
        "LoRA merge, in place": (lambda: mt.merge_triton(w, L, R, 2.0, w.dtype, out=w), 2 * size),
        "DoRA merge (row norms), in place": (lambda: mt.merge_triton(w, L, R, 2.0, w.dtype, m, out=w), 2 * size),
        "DoRA merge (column norms), in place": (
            lambda: mt.merge_triton(w, L, R, 2.0, w.dtype, mc, axis=0, out=w),
            2 * size,
        ),
        "LoRA merge, new output": (lambda: mt.merge_triton(w, L, R, 2.0, w.dtype, out=dst), 2 * size),
    }
    if nf4:  # bitsandbytes quantizes on the CPU here: one shape only
        packed, state = bnbf.quantize_4bit(w.cpu(), blocksize=64, quant_type="nf4")
        q = mt.Packed4bit(packed.cuda(), state.absmax.float().cuda(), 64, state.code.float().cuda(), (M, N), w.dtype)
        cases["NF4 dequant + LoRA merge"] = (
            lambda: mt.merge_triton(q, L, R, 2.0, w.dtype, out=dst),
            size + size // 4 + q.absmax.numel() * 4,
        )
    for name, (fn, nbytes) in cases.items():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        bw = nbytes / time_cuda(fn) / 1e9
        extra = torch.cuda.max_memory_allocated() - before
        report(f"| {name} | {M}x{N} bf16 | {bw:.0f} | {100 * bw / copy_bw:.0f}% | {extra / size:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="8b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-gpu"))
    parser.add_argument("--results", type=Path, default=ROOT / "tools" / "results" / "bench_gpu_merge.md")
    parser.add_argument("--also-to", type=Path, help="a second copy of the results, appended line by line")
    parser.add_argument("--kernels", action="store_true", help="also benchmark the kernels alone")
    parser.add_argument("--no-merge", action="store_true", help="only the kernels")
    parser.add_argument("--reference", choices=["both", "lora", "none"], default="both",
                        help="which adapters the (slow) transformers + PEFT reference also merges")  # fmt: skip
    args = parser.parse_args()

    def report(line: str = "") -> None:
        print(line, flush=True)
        for path in filter(None, (args.results, args.also_to)):
            with open(path, "a") as f:
                f.write(line + "\n")

    gpu = torch.cuda.get_device_name()
    report(f"## {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()}: {gpu}, {os.cpu_count()} cores")
    report()
    if args.kernels:
        bench_kernels(report)
        report()
    if args.no_merge:
        return
    started = time.perf_counter()
    base, lora, dora = build(args.workdir, args.shape)
    size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    report(f"Llama-{args.shape}-shaped bf16 base ({size_gb:.1f} GB), LoRA/DoRA r={RANK} all-linear; "
           f"built in {time.perf_counter() - started:.0f} s")  # fmt: skip
    before = cached_bytes()  # the base was just written: its pages are cached
    dropped = drop_caches()
    report(f"page cache dropped before each run: {'yes' if dropped else 'NO (not permitted)'} "
           f"(Cached after writing the base {before / 1e9:.1f} GB, after dropping {cached_bytes() / 1e9:.1f} GB)")
    report()
    report("| run | wall s (process + sync) | peak RSS GB | vs cp | vs reference | max ulp vs reference |")
    report("|---|---|---|---|---|---|")
    out = args.workdir / "out"
    ref_out = args.workdir / "ref"
    cp_s, _, _ = timed(["cp", "-r", str(base), str(out)], out)
    report(f"| cp -r + sync (I/O floor) | {cp_s:.2f} | - | 1.00 | - | - |")
    shutil.rmtree(out)
    start_s, start_rss, _ = timed([sys.executable, "-c", STARTUP], None)
    report(f"| start-up floor: import torch, start CUDA, import triton | {start_s:.2f} | {start_rss / 1e9:.2f} | "
           f"{start_s / cp_s:.2f} | - | - |")  # fmt: skip
    layers = SHAPES[args.shape][1]
    sample = [f"model.layers.{i}.{p}.weight" for i in (0, layers - 1) for p in projections(args.shape)]
    sample += ["model.embed_tokens.weight", "model.norm.weight"]
    walls = {}
    for kind, adapter in (("LoRA", lora), ("DoRA", dora)):
        cmd = [sys.executable, "-m", "convert.cli", "merge", "--base", str(base), "--adapter", str(adapter)]
        s, rss, output = timed([*cmd, "--out", str(out), "--device", "cuda"], out)
        walls[kind] = s
        report(f"| convert merge --device cuda, {kind} | {s:.2f} | {rss / 1e9:.2f} | {s / cp_s:.2f} | - | - |")
        report(f"<!-- {kind} summary: {output.strip().splitlines()[-1] if output.strip() else ''} -->")
        if args.reference == "both" or args.reference == kind.lower():
            ref_s, ref_rss, _ = timed([sys.executable, "-c", REFERENCE, str(base), str(adapter), str(ref_out)], ref_out)
            report(f"| reference {kind} (transformers + PEFT, cuda) | {ref_s:.2f} | {ref_rss / 1e9:.2f} | "
                   f"{ref_s / cp_s:.2f} | 1.00 | - |")  # fmt: skip
            report(f"| convert {kind} vs reference | | | | {ref_s / s:.1f}x faster | {max_ulp(out, ref_out, sample)} |")
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ref_out, ignore_errors=True)
    report()
    report(f"- DoRA adds {100 * (walls['DoRA'] / walls['LoRA'] - 1):+.0f}% to the LoRA merge's wall time")
    report(f"- targets: wall <= 1.25x cp ({1.25 * cp_s:.1f} s), >= 3x faster than the reference, RSS < 2 GB")
    report("- " + json.dumps({"cp_s": cp_s, **{f"convert_{k}_s": v for k, v in walls.items()}}))
    report()


if __name__ == "__main__":
    main()
