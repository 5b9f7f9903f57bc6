"""Benchmark `convert merge --device cuda` (LoRA and DoRA, on bf16 and on NF4 bases) against the reference stack
and the `cp` floor, and the fused kernels against a device-to-device copy, all in one run on the GPU machine.

    python tools/bench_gpu_merge.py [--shape 8b|1b] [--workdir /tmp/bench-gpu] [--kernels] [--no-merge]
                                    [--runs all|cp,startup,lora,dora,nf4-lora,nf4-dora,lora-no-readahead,
                                            quantize-nf4,quantize-fp4,quantize-int8,lora-quantize-nf4,loftq]
                                    [--no-warmup] [--repeat N]
                                    [--reference both|lora|none|all]
                                    [--results tools/results/bench_gpu_merge.md] [--also-to $OUT/bench.md]

Builds a Llama-shaped bf16 checkpoint (8b: hidden 4096, 32 layers, intermediate 14336,
vocab 128256, ~16 GB in 5 GB shards; 1b: TinyLlama's shape), generated on the GPU and
written with the project's streaming writer, an NF4 copy of the same weights (bitsandbytes'
layout: blocksize 64, double quant, uint8 storage; the projections quantized on the GPU with the
project's kernels, embeddings, norms and lm_head kept bf16, as transformers does), and r=16
all-linear LoRA and DoRA adapters (DoRA magnitudes near the weight norms). Then, with the page
cache dropped before each run (`sync; echo 3 > /proc/sys/vm/drop_caches`; the results say if
that was refused), times each whole process and then a final `sync` (so written data is on disk),
shown apart as well as summed:
  * `cp -r` of the base (the I/O floor), and a process that only imports torch, starts CUDA
    and imports triton (the start-up floor every torch tool pays on a cold cache),
  * `convert merge --device cuda`, for LoRA and DoRA on the bf16 base and on the NF4 base
    (dequantized as it is read; the output is bf16), and LoRA again with the early read-ahead
    off (CONVERT_READAHEAD=0, convert/readahead.py) or in a thread instead of a child process
    (CONVERT_READAHEAD=thread),
  * `disk`: `cat` of the base, `dd` of as many bytes with an fsync, and both at once (whether the disk's
    reads and writes add up, the floor of a merge that overlaps them),
  * the reference (--reference): transformers `from_pretrained(device_map="cuda")` (then, for an
    NF4 base, transformers' `dequantize()`, what a user does to get a 16-bit merged model) + PEFT
    `merge_and_unload` + `save_pretrained`,
and compares each convert output with its reference output (largest bf16 ulp over sampled
tensors). Peak RSS is each process's own: every command runs under a tiny fork wrapper (see
`timed`), since a child started straight from this process (which holds CUDA and GBs) would
inherit its high-water mark. For convert runs the results also split the wall time into merge()'s
own seconds (from its summary line), the sync, and the rest (interpreter start-up and exit).
With --kernels, the fused kernels' achieved bandwidth (bytes they must move / median time of
`triton.testing.do_bench`, which flushes L2 between calls) against `copy_` of the same bytes on
the device, for bf16 and NF4 bases, their extra GPU memory, and a sweep of the tile settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert.execute.quantize_sink import quantize_tensor  # noqa: E402
from convert.plan.quantize import should_quantize  # noqa: E402
from formats import bnb  # noqa: E402
from formats.writer import PlannedTensor, ShardWriter  # noqa: E402

SHAPES = {  # hidden, layers, intermediate, vocab, heads, kv heads
    "8b": (4096, 32, 14336, 128256, 32, 8),
    "1b": (2048, 22, 5632, 32000, 32, 4),
}
# The warm-up models: one layer of the same widths and a small vocabulary, so that every kernel specialization a
# timed run needs is compiled (and the start-up profile written) before the first timed run.
SHAPES |= {f"{k}-warmup": (h, 1, i, 256, heads, kv) for k, (h, _, i, _, heads, kv) in SHAPES.items()}
RANK, ALPHA = 16, 32
PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4 = bnb.QuantSpec("nf4", blocksize=64, double_quant=True, quant_storage="uint8")  # the CLI's --quantize nf4
RUNS = ("cp", "disk", "startup", "lora", "dora", "nf4-lora", "nf4-dora", "lora-no-readahead", "lora-readahead-thread",
        "quantize-nf4", "quantize-fp4", "quantize-int8", "lora-quantize-nf4", "loftq")
REFERENCES = {
    "both": {"lora", "dora"},
    "lora": {"lora"},
    "nf4": {"nf4-lora"},
    "none": set(),
    "all": {"lora", "dora", "nf4-lora"},
}

Report = Callable[[str], None]

STARTUP = "import torch; torch.zeros(1, device='cuda'); import triton"
REFERENCE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="cuda")
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""
REFERENCE_NF4 = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from safetensors.torch import save_file
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="cuda").dequantize()
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
# transformers 5.17's save_pretrained cannot save a dequantized model (NotImplementedError reverting the bnb weight
# conversion); the tensors are what is compared, so they go to one safetensors file
import os; os.makedirs(sys.argv[3], exist_ok=True)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[3] + "/model.safetensors")
"""
# Runs argv[2:] as a grandchild of the benchmark and writes its peak RSS (KiB) to argv[1]. Started
# with `python -S` it stays ~10 MB, so the high-water mark folded into the grandchild at exec is its own.
RUSAGE_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {usage.ru_inblock}")
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""
SUMMARY_SECONDS = re.compile(r" in ([0-9.]+) s, peak RSS")


@dataclass(frozen=True)
class Run:
    """One `convert merge` configuration of the table: which base, which adapter, which reference script."""

    key: str  # the name --runs and --reference use
    label: str
    base: Path
    adapter: Path | None
    reference: str | None
    env: tuple[tuple[str, str], ...] = ()  # environment variables of the convert process
    args: tuple[str, ...] = ()  # more flags of the command
    command: str = "merge"
    quantized: str | None = None  # the bitsandbytes method of the output, checked against bitsandbytes' CUDA kernels


@dataclass(frozen=True)
class Timing:
    """One timed process: its own wall seconds, the `sync` after it, its peak RSS, the bytes it read
    from the disk (what the page cache did not hold) and its output."""

    process_s: float
    sync_s: float
    rss_bytes: int
    read_bytes: int
    output: str
    disk: list[tuple[float, float]] = ()  # GB read, GB written in each second of the process, from /proc/diskstats

    @property
    def total_s(self) -> float:
        return self.process_s + self.sync_s


def projections(shape: str) -> dict[str, tuple[int, int]]:
    hidden, _, inter, _, heads, kv = SHAPES[shape]
    kv_out = hidden * kv // heads
    sizes = [(hidden, hidden), (kv_out, hidden), (kv_out, hidden), (hidden, hidden)]
    sizes += [(inter, hidden), (inter, hidden), (hidden, inter)]
    return dict(zip([f"self_attn.{p}" for p in PROJS[:4]] + [f"mlp.{p}" for p in PROJS[4:]], sizes, strict=True))


def base_tensors(shape: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Llama checkpoint, in the order transformers saves them."""
    hidden, layers, _, vocab, _, _ = SHAPES[shape]
    proj = projections(shape)
    tensors: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        tensors.update({f"model.layers.{i}.{p}.weight": s for p, s in proj.items()})
        tensors[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
    tensors["model.norm.weight"] = (hidden,)
    tensors["lm_head.weight"] = (vocab, hidden)
    return tensors


def quantized(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the NF4 base holds this weight 4-bit: the project's rule with lm_head skipped, as transformers
    (and `convert merge --quantize`) do; that leaves the 7 projections of each layer."""
    return should_quantize(name, shape, "BF16", skip=["lm_head"])


def nf4_plan(tensors: dict[str, tuple[int, ...]]) -> list[PlannedTensor]:
    """The serialized tensors of the NF4 base: a quantized weight expands into packed data, absmax and state."""
    planned: list[PlannedTensor] = []
    for name, shape in tensors.items():
        if quantized(name, shape):
            planned += bnb.serialized_tensors(name, shape, "BF16", NF4)
        else:
            planned.append(PlannedTensor(name, "BF16", shape))
    return planned


def write_bases(base: Path, base_nf4: Path, shape: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Both bases in one loop, so each tensor is generated on the GPU once (and quantized there);
    returns the row norms of the projections (the DoRA magnitudes are drawn near them)."""
    tensors = base_tensors(shape)
    base.mkdir(parents=True)
    base_nf4.mkdir(parents=True)
    writer = ShardWriter(base, [PlannedTensor(n, "BF16", s) for n, s in tensors.items()], 5 * 10**9)
    writer_nf4 = ShardWriter(base_nf4, nf4_plan(tensors), 5 * 10**9)
    norms: dict[str, torch.Tensor] = {}
    for name, s in tensors.items():
        t = torch.randn(s, generator=gen, device="cuda").mul_(1.0 if "norm" in name else 0.02).to(torch.bfloat16)
        if name.endswith("_proj.weight"):
            norms[name] = torch.linalg.norm(t.float(), dim=1).cpu()
        host = t.cpu()
        writer.write(name, host)
        if quantized(name, s):
            quantize_tensor(writer_nf4, name, t, NF4, chunk_elements=1 << 26)
        else:
            writer_nf4.write(name, host)
    writer.finish()
    writer_nf4.finish()
    return norms


def write_configs(base: Path, base_nf4: Path, shape: str) -> None:
    """The base's LlamaConfig; the NF4 base's is the same plus the quantization_config transformers writes."""
    from transformers import LlamaConfig

    hidden, layers, inter, vocab, heads, kv = SHAPES[shape]
    LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False, dtype="bfloat16",
    ).save_pretrained(base)  # fmt: skip
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = bnb.quantization_config(NF4, "BF16")
    (base_nf4 / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_adapters(lora: Path, dora: Path, shape: str, norms: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """r=16 all-linear LoRA and DoRA adapters with the same A and B; DoRA magnitudes 0-10% above the norms."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    adapter: dict[str, torch.Tensor] = {}
    for i in range(SHAPES[shape][1]):
        for p, (out_f, in_f) in projections(shape).items():
            key = f"base_model.model.model.layers.{i}.{p}"
            adapter[f"{key}.lora_A.weight"] = torch.randn(RANK, in_f, generator=gen, device="cuda").cpu() * 0.01
            adapter[f"{key}.lora_B.weight"] = torch.randn(out_f, RANK, generator=gen, device="cuda").cpu() * 0.01
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


def build(workdir: Path, shape: str) -> tuple[Path, Path, Path, Path]:
    """Base, NF4 base, LoRA and DoRA adapter directories, generated on the GPU (random bf16, not from_config).
    Kept between runs: rebuilt only when one of them is missing."""
    base, base_nf4, lora, dora = workdir / "base", workdir / "base-nf4", workdir / "lora", workdir / "dora"
    if (dora / "adapter_config.json").exists() and (base_nf4 / "config.json").exists():
        return base, base_nf4, lora, dora
    shutil.rmtree(workdir, ignore_errors=True)
    gen = torch.Generator("cuda").manual_seed(0)
    norms = write_bases(base, base_nf4, shape, gen)
    write_configs(base, base_nf4, shape)
    write_adapters(lora, dora, shape, norms, gen)
    return base, base_nf4, lora, dora


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


def disk_sectors() -> tuple[int, int]:
    """Sectors read and written so far by the machine's disks (whole devices, not their partitions)."""
    disks = {p.name for p in Path("/sys/block").iterdir() if not p.name.startswith(("loop", "ram", "dm-"))}
    read = written = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if len(fields) > 9 and fields[2] in disks:
            read, written = read + int(fields[5]), written + int(fields[9])
    return read, written


class DiskClock(threading.Thread):
    """Samples the disks' counters once a second while a process runs: where the disk idles, or reads and
    writes at once."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples = [disk_sectors()]
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.samples.append(disk_sectors())

    def stop(self) -> list[tuple[float, float]]:
        self.done.set()
        self.join()
        self.samples.append(disk_sectors())
        pairs = zip(self.samples, self.samples[1:], strict=False)
        return [((r1 - r0) * 512 / 1e9, (w1 - w0) * 512 / 1e9) for (r0, w0), (r1, w1) in pairs]


def disk_line(t: Timing) -> str:
    """The disk's seconds, as 'GB read/GB written' each; the last one is a part of a second."""
    return "disk per second (GB read/written): " + " ".join(f"{r:.1f}/{w:.1f}" for r, w in t.disk)


def timed(cmd: list[str], out: Path | None, env: tuple[tuple[str, str], ...] = ()) -> Timing:
    """Wall seconds of one whole process, then of a `sync`, and its peak RSS, started on a cold cache.

    The command runs as a grandchild, under RUSAGE_WRAPPER (`python -S`, ~10 MB), which forks,
    execs it, reads its ru_maxrss with wait4 and hands it back through a file. Started straight
    from here it would report at least this process's RSS (CUDA context, GBs of tensors): at exec
    Linux folds the old address space's RSS high-water mark into the process's maxrss, and with
    vfork (subprocess's default) or fork that old address space is, or copies, this one. The
    wrapper's start-up (tens of ms) counts in process_s.
    """
    if out is not None:  # and what an interrupted earlier run left beside it
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(f".{out.name}.partial"), ignore_errors=True)
    drop_caches()
    with tempfile.NamedTemporaryFile("r", prefix="bench-rss-", suffix=".txt") as rss_file:
        wrapper = [sys.executable, "-S", "-c", RUSAGE_WRAPPER, rss_file.name, *cmd]
        clock = DiskClock()
        clock.start()
        start = time.perf_counter()
        proc = subprocess.run(wrapper, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, **dict(env)})  # fmt: skip
        process_s = time.perf_counter() - start
        disk = clock.stop()
        rss_kb, _, blocks = rss_file.read().strip().partition(" ")
    start = time.perf_counter()
    subprocess.run(["sync"], check=True)
    sync_s = time.perf_counter() - start
    output = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    rss, read = int(rss_kb) * 1024 if rss_kb else -1, int(blocks) * 512 if blocks else -1
    return Timing(process_s, sync_s, rss, read, output, disk)


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


def kernel_seconds(fn: Callable[[], object]) -> float:
    """Median seconds of ``fn`` on the GPU. do_bench flushes L2 before each call, so a kernel whose
    operands would still be cached from the previous call cannot beat memory bandwidth."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") / 1e3


def extra_memory(fn: Callable[[], object]) -> int:
    """GPU bytes ``fn`` allocates beyond what exists before it (one call, apart from the timing:
    do_bench's own L2-flush buffer would count otherwise). The first call also compiles."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def bench_kernels(report: Report) -> None:
    """GB/s of the fused kernels (bytes they must move: read the base once, write the output once) vs copy_."""
    report("| kernel | shape | GB/s | % of copy | extra GPU memory / output size |")
    report("|---|---|---|---|---|")
    for M, N in ((14336, 4096), (4096, 14336), (4096, 4096)):
        bench_shape(M, N, report)
        torch.cuda.empty_cache()
    sweep_blocks(report)


def sweep_blocks(report: Report) -> None:
    """Tile settings (stripe height, column tile, warps) and programs a launch, for the LoRA, DoRA
    and NF4 LoRA merges of the largest Llama-8B weight: the defaults in convert/kernels/merge_triton.py
    should be the fastest."""
    from convert.kernels import merge_triton as mt
    from convert.kernels import quant_triton

    M, N = 14336, 4096
    w = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    L, R = torch.randn(M, RANK, device="cuda") * 0.01, torch.randn(RANK, N, device="cuda") * 0.01
    m = torch.rand(M, device="cuda") + 0.5
    packed, absmax = quant_triton.quantize_4bit(w, 64, "nf4")
    q = mt.Packed4bit(packed, absmax, 64, quant_triton.code_table("nf4", w.device), (M, N), w.dtype)
    dst = torch.empty_like(w)
    defaults = (mt.BLOCK_M, mt.BLOCK_N, mt.NUM_WARPS, mt.PROGRAMS)
    found = []
    try:
        for bm, bn, warps, programs in ((32, 128, 4, 1024), (64, 128, 4, 1024), (32, 256, 8, 1024),
                                        (16, 128, 4, 1024), (32, 128, 4, 2048)):  # fmt: skip
            mt.BLOCK_M, mt.BLOCK_N, mt.NUM_WARPS, mt.PROGRAMS = bm, bn, warps, programs
            lora = 4 * M * N / kernel_seconds(lambda: mt.merge_triton(w, L, R, 2.0, w.dtype, out=w)) / 1e9
            dora = 4 * M * N / kernel_seconds(lambda: mt.merge_triton(w, L, R, 2.0, w.dtype, m, out=w)) / 1e9
            nf4 = (2.5 * M * N + absmax.numel() * 4) / kernel_seconds(
                lambda: mt.merge_triton(q, L, R, 2.0, w.dtype, out=dst)
            )
            found.append(f"{bm}x{bn}/{warps}w/{programs}p: LoRA {lora:.0f}, DoRA {dora:.0f}, NF4 LoRA {nf4 / 1e9:.0f}")
    finally:
        mt.BLOCK_M, mt.BLOCK_N, mt.NUM_WARPS, mt.PROGRAMS = defaults
    report("- tile sweep (14336x4096 bf16, GB/s; stripe x column tile / warps / programs): " + "; ".join(found))


def bench_shape(M: int, N: int, report: Report) -> None:
    """One weight shape: copy_ (the ceiling), the bf16 merges in place and to a new buffer, and the NF4 merges."""
    import bitsandbytes.functional as bnbf

    from convert.kernels import merge_triton as mt

    w = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    L, R = torch.randn(M, RANK, device="cuda") * 0.01, torch.randn(RANK, N, device="cuda") * 0.01
    m, mc = torch.rand(M, device="cuda") + 0.5, torch.rand(N, device="cuda") + 0.5
    size = w.numel() * 2
    dst = torch.empty_like(w)
    copy_bw = 2 * size / kernel_seconds(lambda: dst.copy_(w)) / 1e9
    report(f"| copy_ (device to device) | {M}x{N} bf16 | {copy_bw:.0f} | 100% | - |")
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")  # on the GPU: w is there
    q = mt.Packed4bit(packed, state.absmax.float(), 64, state.code.float(), (M, N), w.dtype)
    nf4_bytes = q.packed.numel() * q.packed.element_size() + q.absmax.numel() * 4 + size
    cases = {
        "LoRA merge, in place": (lambda: mt.merge_triton(w, L, R, 2.0, w.dtype, out=w), 2 * size),
        "DoRA merge (row norms), in place": (lambda: mt.merge_triton(w, L, R, 2.0, w.dtype, m, out=w), 2 * size),
        "DoRA merge (column norms), in place": (
            lambda: mt.merge_triton(w, L, R, 2.0, w.dtype, mc, axis=0, out=w),
            2 * size,
        ),
        "LoRA merge, new output": (lambda: mt.merge_triton(w, L, R, 2.0, w.dtype, out=dst), 2 * size),
        "NF4 dequant + LoRA merge": (lambda: mt.merge_triton(q, L, R, 2.0, w.dtype, out=dst), nf4_bytes),
        "NF4 dequant + DoRA merge": (lambda: mt.merge_triton(q, L, R, 2.0, w.dtype, m, out=dst), nf4_bytes),
        "NF4 dequant pass, then LoRA merge in place": (
            unfused(lambda: mt.merge_triton(q, L, R, 2.0, w.dtype, out=dst)),
            nf4_bytes,
        ),
    }
    for name, (fn, nbytes) in cases.items():
        extra = extra_memory(fn)
        bw = nbytes / kernel_seconds(fn) / 1e9
        report(f"| {name} | {M}x{N} bf16 | {bw:.0f} | {100 * bw / copy_bw:.0f}% | {extra / size:.3f} |")


def unfused(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` with the 4-bit base dequantized by a pass of its own (``FUSE_4BIT`` off), for comparison."""
    from convert.kernels import merge_triton as mt

    def run() -> None:
        mt.FUSE_4BIT = False
        try:
            fn()
        finally:
            mt.FUSE_4BIT = True

    return run


def parse_runs(text: str) -> list[str]:
    """--runs: 'all' or a comma-separated subset of RUNS (kept in RUNS' order)."""
    if text == "all":
        return list(RUNS)
    wanted = {r.strip() for r in text.split(",") if r.strip()}
    unknown = wanted - set(RUNS)
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"expected 'all' or some of {','.join(RUNS)}; got {text!r}")
    return [r for r in RUNS if r in wanted]


def merge_seconds(output: str) -> float | None:
    """merge()'s own seconds, from the summary line `merged ... to OUT in X s, peak RSS ...`."""
    found = SUMMARY_SECONDS.findall(output)
    return float(found[-1]) if found else None


def ratio(seconds: float, cp_s: float | None) -> str:
    return f"{seconds / cp_s:.2f}" if cp_s else "-"


def row(name: str, t: Timing, cp_s: float | None, vs_ref: str = "-") -> str:
    """A table row: total wall, the sync part of it, peak RSS, disk reads, the wall in units of cp's."""
    rss_gb = f"{t.rss_bytes / 1e9:.2f}" if t.rss_bytes >= 0 else "-"
    read_gb = f"{t.read_bytes / 1e9:.2f}" if t.read_bytes >= 0 else "-"
    return (f"| {name} | {t.total_s:.2f} | {t.sync_s:.2f} | {rss_gb} | {read_gb} | {ratio(t.total_s, cp_s)} "
            f"| {vs_ref} | - |")  # fmt: skip


def summary_comment(label: str, t: Timing) -> str:
    """The convert run's own summary line, and where its wall time went: merge(), sync, the rest."""
    lines = t.output.strip().splitlines()
    inside = merge_seconds(t.output)
    split = "merge()'s seconds not found in its output"
    if inside is not None:
        outside = t.total_s - inside - t.sync_s
        split = f"in merge() {inside:.1f} s, sync {t.sync_s:.1f} s, outside merge() {outside:.1f} s (start-up + exit)"
    stages = "".join(f"\n<!-- {label} {line} -->" for line in [*stage_lines(t.output), disk_line(t)])
    return f"<!-- {label} summary: {lines[-1] if lines else ''}; {split} -->{stages}"


def stage_lines(output: str) -> list[str]:
    """The phase and pipeline-stage clocks a run printed (with CONVERT_PIPELINE_TIMES=1, see convert.clock)."""
    marks = (" pipeline: ", "convert: cpu workers", "convert: phases: ")
    return [line for line in output.splitlines() if any(m in line for m in marks)]


def merge_runs(base: Path, base_nf4: Path, lora: Path, dora: Path) -> list[Run]:
    return [
        Run("lora", "LoRA", base, lora, REFERENCE),
        Run("dora", "DoRA", base, dora, REFERENCE),
        Run("nf4-lora", "NF4 LoRA", base_nf4, lora, REFERENCE_NF4),
        Run("nf4-dora", "NF4 DoRA", base_nf4, dora, REFERENCE_NF4),
        Run("lora-no-readahead", "LoRA no read-ahead", base, lora, REFERENCE, (("CONVERT_READAHEAD", "0"),)),
        Run("lora-readahead-thread", "LoRA read-ahead in a thread", base, lora, REFERENCE,
            (("CONVERT_READAHEAD", "thread"),)),  # fmt: skip
        *[Run(f"quantize-{m}", f"quantize {m}", base, None, None, args=("--quantize", m), command="quantize",
              quantized=m) for m in ("nf4", "fp4", "int8")],  # fmt: skip
        Run("lora-quantize-nf4", "LoRA --quantize nf4", base, lora, None, args=("--quantize", "nf4"), quantized="nf4"),
        Run("loftq", "loftq-init (r 16, 1 iteration)", base, None, None, args=("--iters", "1"), command="loftq-init"),
    ]


def run_merge(run: Run, args: argparse.Namespace, cp_s: float | None, sample: list[str], report: Report) -> dict:
    """`convert merge --device cuda` for one configuration, then its reference when --reference selects it;
    returns the wall seconds for the summary json."""
    out, ref_out = args.workdir / "out", args.workdir / "ref"
    t = timed(command_line(run, out), out, run.env)
    walls = {f"convert_{run.label.replace(' ', '_')}_s": t.total_s}
    report(row(f"convert {run.command} --device cuda, {run.label}", t, cp_s))
    report(summary_comment(run.label, t))
    if run.quantized:
        report(f"<!-- {run.label}: {bitsandbytes_cuda_check(out, run, sample)} -->")
    if run.key in REFERENCES[args.reference]:
        ref = timed([sys.executable, "-c", run.reference, str(run.base), str(run.adapter), str(ref_out)], ref_out)
        walls[f"reference_{run.label.replace(' ', '_')}_s"] = ref.total_s
        stack = "transformers dequantize() + PEFT" if run.reference == REFERENCE_NF4 else "transformers + PEFT"
        report(row(f"reference {run.label} ({stack}, cuda)", ref, cp_s, vs_ref="1.00"))
        ulp = max_ulp(out, ref_out, sample)
        report(f"| convert {run.label} vs reference | | | | | | {ref.total_s / t.total_s:.1f}x faster | {ulp} |")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(ref_out, ignore_errors=True)
    return walls


def bitsandbytes_cuda_check(out: Path, run: Run, sample: list[str]) -> str:
    """Whether the sampled quantized tensors are the bytes bitsandbytes' CUDA kernels make of the 16-bit weights
    (of the base, or of the LoRA merge of the first sampled tensor's layer, recomputed here on the GPU)."""
    try:
        import bitsandbytes.functional as F
    except ImportError:
        return "bitsandbytes not installed: bytes not checked"
    from safetensors import safe_open

    def tensors(directory: Path) -> dict[str, Path]:
        index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
        return {k: directory / v for k, v in index.items()}

    ours, base = tensors(out), tensors(run.base)
    differ = total = 0
    for name in [n for n in sample if n.endswith("proj.weight")][:4]:
        with safe_open(base[name], "pt", device="cuda") as f:
            w = f.get_tensor(name)
        if run.adapter is not None:
            with safe_open(run.adapter / "adapter_model.safetensors", "pt", device="cuda") as f:
                key = "base_model.model." + name.removesuffix(".weight")
                A, B = f.get_tensor(key + ".lora_A.weight").float(), f.get_tensor(key + ".lora_B.weight").float()
            w = (w.float() + (B @ A) * (ALPHA / RANK)).to(w.dtype)
        with safe_open(ours[name], "pt", device="cpu") as f:
            packed = f.get_tensor(name)
        if run.quantized == "int8":
            expected = F.int8_vectorwise_quant(w.half())[0]
        else:
            expected = F.quantize_4bit(w, blocksize=64, quant_type=run.quantized, compress_statistics=True)[0]
        differ += int((packed.view(-1) != expected.cpu().view(-1)).sum())
        total += packed.numel()
    # A merge recomputed here may round a few values 1 ulp apart from the fused kernel's (another summation
    # order), and those may take the next code; the unit tests check merged outputs exactly.
    return f"{differ} of {total} sampled quantized bytes differ from bitsandbytes' CUDA quantization"


def floors(runs: list[str], base: Path, workdir: Path, report: Report) -> float | None:
    """The cp, disk and start-up rows; the cp seconds (None when not run) are the table's unit."""
    cp_s = None
    if "cp" in runs:
        out = workdir / "out"
        t = timed(["cp", "-r", str(base), str(out)], out)
        cp_s = t.total_s
        report(row("cp -r + sync (I/O floor)", t, cp_s))
        report(f"<!-- cp {disk_line(t)} -->")
        shutil.rmtree(out)
    if "disk" in runs:  # whether the disk reads and writes at once, or shares one rate between them
        shards = " ".join(str(p) for p in sorted(base.glob("*.safetensors")))
        megabytes = sum(p.stat().st_size for p in base.glob("*.safetensors")) >> 20
        zeros = workdir / "zeros"
        read = f"cat {shards} > /dev/null"
        write = f"dd if=/dev/zero of={zeros} bs=1M count={megabytes} conv=fsync status=none"
        for name, script in (("read the base", read), ("write as many bytes", write),
                             ("both at once", f"{read} & {write}; wait")):  # fmt: skip
            t = timed(["sh", "-c", script], None)
            report(row(f"disk: {name}", t, cp_s))
            report(f"<!-- {disk_line(t)} -->")
            zeros.unlink(missing_ok=True)
    if "startup" in runs:
        t = timed([sys.executable, "-c", STARTUP], None)
        report(row("start-up floor: import torch, start CUDA, import triton", t, cp_s))
    return cp_s


def summary(rounds: list[dict[str, float]], report: Report) -> None:
    """The summary lines, of each wall's median over the rounds; with several rounds, each run's ratio to the cp
    of its own round, round by round (the disk's speed drifts between rounds more than between neighbours)."""
    keys = list(dict.fromkeys(k for r in rounds for k in r))
    walls = {k: statistics.median(r[k] for r in rounds if r.get(k)) for k in keys if any(r.get(k) for r in rounds)}
    cp_s = walls.pop("cp_s", None)
    if len(rounds) > 1:
        report(f"- medians of {len(rounds)} rounds; each run's wall / its round's cp:")
        for key in walls:
            ratios = [r[key] / r["cp_s"] for r in rounds if r.get(key) and r.get("cp_s")]
            if ratios:
                listed = ", ".join(f"{x:.2f}" for x in ratios)
                report(f"  - {key.removesuffix('_s')}: {listed} (median {statistics.median(ratios):.2f})")
    for prefix in ("", "NF4_"):
        lora, dora = walls.get(f"convert_{prefix}LoRA_s"), walls.get(f"convert_{prefix}DoRA_s")
        if lora and dora:
            on = "the NF4 base" if prefix else "the bf16 base"
            report(f"- DoRA adds {100 * (dora / lora - 1):+.0f}% to the LoRA merge's wall time on {on}")
    lora = walls.get("convert_LoRA_s")
    variants = {"without": "convert_LoRA_no_read-ahead_s", "in a thread": "convert_LoRA_read-ahead_in_a_thread_s"}
    for how, key in variants.items():
        if lora and walls.get(key):
            change = f"{100 * (lora / walls[key] - 1):+.0f}%"
            report(f"- early read-ahead: LoRA {lora:.1f} s in a child process, {walls[key]:.1f} s {how} ({change})")
    sixteen = walls.get("convert_LoRA_s")
    for label in ("quantize_nf4", "quantize_fp4", "quantize_int8", "LoRA_--quantize_nf4"):
        if sixteen and walls.get(f"convert_{label}_s"):
            report(f"- {label.replace('_', ' ')}: {walls[f'convert_{label}_s'] / sixteen:.2f}x the 16-bit LoRA merge")
    cp_target = f"merges <= 1.10x cp ({1.10 * cp_s:.1f} s)" if cp_s else "merges <= 1.10x cp (cp not run)"
    report(f"- targets: {cp_target}, quantize <= 1.10x the 16-bit merge, loftq-init <= 2x cp, RSS < 2 GB")
    report("- " + json.dumps(rounds if len(rounds) > 1 else {"cp_s": cp_s, **walls}))


def command_line(run: Run, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "convert.cli", run.command, "--base", str(run.base), *run.args]
    return [*cmd, *(["--adapter", str(run.adapter)] if run.adapter else []), "--out", str(out), "--device", "cuda"]


def warm_up(args: argparse.Namespace, report: Report) -> None:
    """Run every selected command once, untimed, on a one-layer model of the same widths: what a user's second run
    finds (Triton's kernel cache filled, convert's start-up profile written), so that no timed run pays a compile."""
    started = time.perf_counter()
    dirs = build(args.workdir / "warmup", f"{args.shape}-warmup")
    for run in merge_runs(*dirs):
        if run.key in args.runs:
            out = args.workdir / "warmup-out"
            subprocess.run([*command_line(run, out), "-q"], check=True, env={**os.environ, **dict(run.env)})
            shutil.rmtree(out)
    shutil.rmtree(args.workdir / "warmup")
    report(f"<!-- warm-up: each command ran once on a one-layer model of the same widths, untimed "
           f"({time.perf_counter() - started:.0f} s) -->")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[k for k in SHAPES if not k.endswith("-warmup")], default="8b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-gpu"))
    parser.add_argument("--results", type=Path, default=ROOT / "tools" / "results" / "bench_gpu_merge.md")
    parser.add_argument("--also-to", type=Path, help="a second copy of the results, appended line by line")
    parser.add_argument("--kernels", action="store_true", help="also benchmark the kernels alone")
    parser.add_argument("--no-merge", action="store_true", help="only the kernels")
    parser.add_argument("--no-warmup", action="store_true", help="time the first runs with cold kernel caches")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of cp and the runs, one after the other; the summary takes medians")  # fmt: skip
    parser.add_argument("--runs", type=parse_runs, default=list(RUNS),
                        help=f"'all' (default) or a comma-separated subset of {','.join(RUNS)}")  # fmt: skip
    parser.add_argument("--reference", choices=list(REFERENCES), default="both",
                        help="which runs the (slow) transformers + PEFT reference also merges: both (lora, dora), "
                             "lora, none, all (lora, dora, nf4-lora)")  # fmt: skip
    return parser.parse_args()


def main() -> None:
    args = parse_args()

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
    base, base_nf4, lora, dora = build(args.workdir, args.shape)
    size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    nf4_gb = sum(f.stat().st_size for f in base_nf4.glob("*.safetensors")) / 1e9
    report(f"Llama-{args.shape}-shaped bf16 base ({size_gb:.1f} GB) and its NF4 copy ({nf4_gb:.1f} GB), "
           f"LoRA/DoRA r={RANK} all-linear; built in {time.perf_counter() - started:.0f} s")  # fmt: skip
    before = cached_bytes()  # the bases were just written: their pages are cached
    dropped = drop_caches()
    report(
        f"page cache dropped before each run: {'yes' if dropped else 'NO (not permitted)'} "
        f"(Cached after writing the bases {before / 1e9:.1f} GB, after dropping {cached_bytes() / 1e9:.1f} GB)"
    )
    report()
    report("| run | wall s (process + sync) | of which sync s | peak RSS GB | read from disk GB | vs cp "
           "| vs reference | max ulp vs reference |")  # fmt: skip
    report("|---|---|---|---|---|---|---|---|")
    if not args.no_warmup:
        warm_up(args, report)
    layers = SHAPES[args.shape][1]
    sample = [f"model.layers.{i}.{p}.weight" for i in (0, layers - 1) for p in projections(args.shape)]
    sample += ["model.embed_tokens.weight", "model.norm.weight"]
    rounds: list[dict[str, float]] = []
    for number in range(1, args.repeat + 1):
        if args.repeat > 1:
            report(f"<!-- round {number} of {args.repeat} -->")
        cp_s = floors(args.runs, base, args.workdir, report)
        walls: dict[str, float] = {"cp_s": cp_s} if cp_s else {}
        for run in merge_runs(base, base_nf4, lora, dora):
            if run.key in args.runs:
                walls |= run_merge(run, args, cp_s, sample, report)
        rounds.append(walls)
    report()
    summary(rounds, report)
    report()


if __name__ == "__main__":
    main()
