"""Benchmark `convert merge` under torchrun: throughput per rank against one process, on the same data.

    python tools/bench_distributed.py [--shape small|tinyllama|3b|8b] [--ranks 1,2,4] [--device cpu|cuda]
                                      [--cores-per-rank K] [--repeats 3] [--storage-gbps 10] [--gpus-per-node 8]
                                      [--workdir /tmp/bench-distributed] [--results tools/results/distributed.md]

Builds a synthetic bf16 Llama-shaped base and an r=16 all-linear LoRA adapter (``bench_merge.build``, at the
chosen shape: ``small`` is ~0.24 GB, for a 2-core machine; ``8b`` the Llama-3-8B shape, 16 GB), then times,
with the page cache warm and `sync` before each run, whole processes of
  * `convert merge` in one process,
  * `torchrun --standalone --nproc-per-node N -m convert.cli merge` for each N > 1 of ``--ranks``
    (gloo ranks on the CPU; with ``--device cuda`` the ranks take a GPU each, or share them),
with output shards of 1/16 of the model, so that every rank owns several. Throughput counts the bytes read
(base + adapter) and written (the output) per second, of the whole processes' wall time and of the command's
own time (rank 0's summary: from opening the inputs to the publish, after every rank is done; without the
~2 s of Python, torch and transformers start-up that each process pays, which dominates a small model); per
rank, divided by N. Scaling efficiency is T1 / (N * TN). Every output is checked byte-identical to the
one-process run's.

The model of a 405B merge (810 GB of bf16 read and 810 GB written) on N nodes of G ranks:
time = bytes / min(N * G * per-rank throughput, storage bandwidth), with the one-process throughput measured
here as the per-rank throughput (a rank with its own GPU or cores) and the storage bandwidth given by
``--storage-gbps`` (GB/s, 10**9 bytes).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import re
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_merge  # noqa: E402  (its synthetic model, `timed` and page-cache warming)

SHAPES = {  # hidden, layers, intermediate, vocab, heads, kv heads
    "small": (1024, 8, 2816, 16000, 32, 4),
    "tinyllama": (2048, 22, 5632, 32000, 32, 4),
    "3b": (3072, 28, 8192, 128256, 24, 8),  # Llama-3.2-3B's, untied: 7.2 GB
    "8b": (4096, 32, 14336, 128256, 32, 8),
}
MODEL_405B_BYTES = 2 * 810e9  # read and written once


def use_shape(name: str) -> None:
    """Point ``bench_merge``'s model builder at one of ``SHAPES``."""
    hidden, layers, inter, vocab, heads, kv = SHAPES[name]
    bench_merge.HIDDEN, bench_merge.LAYERS, bench_merge.INTER, bench_merge.VOCAB = hidden, layers, inter, vocab
    bench_merge.HEADS, bench_merge.KV_HEADS = heads, kv
    kv_out = hidden * kv // heads
    bench_merge.PROJ = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv_out, hidden),
        "self_attn.v_proj": (kv_out, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


def merge_command(
    ranks: int, base: Path, adapter: Path, out: Path, device: str, shard: int, cores_per_rank: int = 0
) -> list[str]:
    """The command line of one run; with ``cores_per_rank``, each rank (and the one process) pinned to cores of
    its own (``tools/pin_rank.py``)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    args = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device", device]
    args += ["--max-shard-size", str(shard)]  # rank 0's summary line says how long the command itself took
    module = [str(ROOT / "tools" / "pin_rank.py"), str(cores_per_rank)] if cores_per_rank else ["-m"]
    return [sys.executable, *(launcher if ranks > 1 else []), *module, "convert.cli", *args]


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def placement(cores_per_rank: int) -> str:
    if cores_per_rank:
        return f"each rank (and the one process) pinned to {cores_per_rank} core(s) of its own"
    return "ranks sharing the machine's cores"


def model_rows(per_rank: float, gpus_per_node: int, storage: float) -> list[str]:
    rows = ["| nodes | ranks | ranks' GB/s | storage GB/s | bound by | 405B merge |", "|---|---|---|---|---|---|"]
    for nodes in (1, 2, 4, 8, 16):
        compute = nodes * gpus_per_node * per_rank
        rate = min(compute, storage)
        minutes = MODEL_405B_BYTES / rate / 60
        bound = "ranks" if compute < storage else "storage"
        rows.append(f"| {nodes} | {nodes * gpus_per_node} | {compute / 1e9:.1f} | {storage / 1e9:.1f} | {bound} "
                    f"| {minutes:.1f} min |")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--storage-gbps", type=float, default=10.0, help="storage bandwidth of the model, GB/s")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node in the model")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-distributed"))
    parser.add_argument("--results", type=Path, default=ROOT / "tools" / "results" / "distributed.md")
    parser.add_argument("--cores-per-rank", type=int, default=0,
                        help="pin each rank (and the one process) to this many cores of its own; 0: no pinning")
    args = parser.parse_args()
    counts = sorted({int(n) for n in args.ranks.split(",")} | {1})

    use_shape(args.shape)
    base, adapter = bench_merge.build(args.workdir / args.shape)
    print(f"built {base}", flush=True)
    bench_merge.BASE_FILES[:] = sorted(base.glob("*.safetensors"))
    base_bytes = sum(f.stat().st_size for f in bench_merge.BASE_FILES)
    read = base_bytes + (adapter / "adapter_model.safetensors").stat().st_size
    shard = base_bytes // 16 + 1
    out = args.workdir / "out"
    walls: dict[int, float] = {}
    inside: dict[int, float] = {}
    expected: dict[str, str] | None = None
    moved = 0
    runs: dict[int, list[float]] = {n: [] for n in counts}
    own: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine does not hit one count only
        for n in counts:
            command = merge_command(n, base, adapter, out, args.device, shard, args.cores_per_rank)
            seconds, _, stdout = bench_merge.timed(command, out)
            runs[n].append(seconds)
            own[n].append(float(re.search(r" in ([0-9.]+) s, peak RSS", stdout).group(1)))
            got = digest(out)
            expected = expected or got
            if got != expected:
                raise SystemExit(f"{n} ranks: output differs from the one-process run")
            moved = read + sum((out / f).stat().st_size for f in got)
            print(f"{n} rank(s): {seconds:.2f} s wall, {own[n][-1]:.2f} s in the command", flush=True)  # as it goes
    for n in counts:
        walls[n], inside[n] = statistics.median(runs[n]), statistics.median(own[n])
        print(f"{n} rank(s): {walls[n]:.2f} s wall, {inside[n]:.2f} s in the command (runs {runs[n]}, {own[n]})")

    cores = os.cpu_count()
    lines = [
        f"## {datetime.date.today()}, {platform.node() or 'vm'}: {cores} cores, torch {torch.__version__}, "
        f"--device {args.device}, median of {args.repeats}, page cache warm, {placement(args.cores_per_rank)}.",
        "",
        f"Shape `{args.shape}` (hidden, layers, intermediate, vocab, heads, kv heads = {SHAPES[args.shape]}), bf16, "
        f"r=16 all-linear LoRA; {read / 1e9:.2f} GB read, {(moved - read) / 1e9:.2f} GB written, "
        f"{len(expected)} output files (shards of {shard / 1e6:.0f} MB). Every output byte-identical to the "
        "one-process run's.",
        "",
        "| ranks | wall s | command s | GB/s (read + written), command | GB/s per rank | scaling efficiency, "
        "command (wall) |",
        "|---|---|---|---|---|---|",
    ]
    for n in counts:
        rate = moved / inside[n]
        lines.append(f"| {n} | {walls[n]:.2f} | {inside[n]:.2f} | {rate / 1e9:.3f} | {rate / n / 1e9:.3f} | "
                     f"{inside[1] / (n * inside[n]):.2f} ({walls[1] / (n * walls[n]):.2f}) |")  # fmt: skip
    per_rank = moved / inside[1]  # a rank with a machine (its GPU, its cores) to itself, as in a cluster
    shared = moved / inside[counts[-1]] / counts[-1]
    lines += [
        "",
        f"Model of a 405B merge (810 GB bf16 read + 810 GB written) with {args.gpus_per_node} ranks a node, each at "
        f"the one-process throughput measured here ({per_rank / 1e9:.3f} GB/s: a rank with its own GPU or cores), "
        f"and storage of {args.storage_gbps:g} GB/s: time = bytes / min(nodes * ranks * per-rank, storage). (The "
        f"{counts[-1]}-rank run's per-rank figure is {shared / 1e9:.3f} GB/s, {placement(args.cores_per_rank)}.)",
        "",
        *model_rows(per_rank, args.gpus_per_node, args.storage_gbps * 1e9),
        "",
    ]
    text = "\n".join(lines)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    new = not args.results.exists()
    with open(args.results, "a") as f:  # one section a run, under the file's title
        f.write(("# convert merge under torchrun: throughput per rank\n\n" if new else "\n") + text)
    print(text)


if __name__ == "__main__":
    main()
