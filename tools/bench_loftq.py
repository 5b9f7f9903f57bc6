"""Benchmark LoftQ initialization against PEFT's ``loftq_init``, per matrix and for a whole 8B-shaped model.

    python tools/bench_loftq.py matrices [--results tools/results/bench_loftq.md]
    python tools/bench_loftq.py model --workdir /tmp/bench-loftq [--results ...]

``matrices`` (needs CUDA, bitsandbytes, peft): for 4096x4096, 14336x4096 and 4096x14336
bf16 weights with an LLM-like spectrum (power-law low-rank part, noise floor, outlier
columns), rank 16, 1 and 5 iterations: seconds per matrix, peak extra GPU memory
(``max_memory_allocated`` over what was allocated before the call, the bf16 input
excluded) and the error ||W - Q - B@A|| / ||W|| of ``convert.kernels.loftq.loftq_matrix`` and
of PEFT's ``loftq_init``, measured in the same process on the same matrices.

``model``: writes a Llama-3-8B-shaped bf16 checkpoint with random weights (16 GB, in a
separate process so that its memory does not count), then times ``convert loftq-init
--device cuda`` on it (rank 16, 5 iterations, all-linear) as a whole process under GNU
time (wall, peak RSS), page cache warm.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert.kernels.loftq import loftq_matrix  # noqa: E402
from convert.kernels.quant import dequantize_4bit  # noqa: E402
from formats.writer import PlannedTensor, ShardWriter  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
RANK = 16
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
    dtype="bfloat16",
)
MATRICES_PER_LAYER = 7  # q, k, v, o, gate, up, down


# ``--smoke``: the same steps with shapes divided by 32 on the CPU, to check the script without a GPU.
DEVICE = "cuda"


def llm_like(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A bf16 weight on the GPU with an LLM-like spectrum: a power-law rank-256 part over a noise floor."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    k = min(256, rows, cols)
    U = torch.randn(rows, k, generator=g, device=DEVICE) / rows**0.5
    V = torch.randn(k, cols, generator=g, device=DEVICE) / cols**0.5
    s = 4 * (1 + torch.arange(k, device=DEVICE)) ** -0.7
    W = (U * s) @ V + torch.randn(rows, cols, generator=g, device=DEVICE) * (0.3 / max(rows, cols) ** 0.5)
    W[:, torch.randperm(cols, generator=g, device=DEVICE)[:4]] *= 5
    return (W * (0.02 / W.std())).to(torch.bfloat16)


def measured(fn, *args, **kwargs):
    """(result, seconds, peak extra GPU bytes) of one call."""
    gpu = DEVICE == "cuda"
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if gpu else 0
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    if gpu:
        torch.cuda.synchronize()
    return result, time.perf_counter() - start, (torch.cuda.max_memory_allocated() - before) if gpu else 0


def error(W: torch.Tensor, Q: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    W = W.float()
    return float((W - Q.float() - B @ A).norm() / W.norm())


def bench_matrices() -> list[str]:
    from peft.utils.loftq_utils import loftq_init

    peft_loftq = inspect.unwrap(loftq_init)
    if DEVICE == "cpu":  # PEFT hard-codes its compute device (see tests/test_loftq.py)
        consts = tuple("cpu" if c == "cuda" else c for c in peft_loftq.__code__.co_consts)
        peft_loftq = type(peft_loftq)(peft_loftq.__code__.replace(co_consts=consts), peft_loftq.__globals__)
    # warm-up: Triton compilation, cuBLAS/cuSOLVER handles, bitsandbytes' library
    small = llm_like(512, 1024, 0)
    loftq_matrix(small, rank=RANK, iters=2)
    peft_loftq(small, num_bits=4, reduced_rank=RANK, num_iter=1)
    lines = [
        "| shape | iters | ours s | PEFT s | speed-up | ours extra GPU (x fp32 matrix) | PEFT extra GPU | "
        "ours error | PEFT error | error ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, (rows, cols) in enumerate(SHAPES, start=1):
        W = llm_like(rows, cols, seed)
        fp32_bytes = W.numel() * 4
        for iters in (1, 5):
            runs = [measured(loftq_matrix, W, rank=RANK, iters=iters) for _ in range(3)]
            ours, _, ours_mem = runs[-1]
            ours_s = sorted(s for _, s, _ in runs)[1]
            (q, A, B), peft_s, peft_mem = measured(peft_loftq, W, num_bits=4, reduced_rank=RANK, num_iter=iters)
            ours_err = error(W, dequantize_4bit(ours.quantized), ours.B, ours.A)
            peft_err = error(W, q, B, A)
            lines.append(
                f"| {rows}x{cols} | {iters} | {ours_s:.3f} | {peft_s:.2f} | {peft_s / ours_s:.0f}x | "
                f"{ours_mem / 1e9:.2f} GB ({ours_mem / fp32_bytes:.2f}x) | {peft_mem / 1e9:.2f} GB "
                f"({peft_mem / fp32_bytes:.2f}x) | {ours_err:.5f} | {peft_err:.5f} | {ours_err / peft_err:.4f} |"
            )
            print(lines[-1], flush=True)
            del ours, q, A, B
    return lines


def make_model(workdir: Path) -> Path:
    """A Llama-3-8B-shaped bf16 checkpoint of random weights, generated on the GPU, written shard by shard.

    The tensor names and shapes are transformers' own, from the model built on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    base = workdir / "base"
    shutil.rmtree(workdir, ignore_errors=True)
    base.mkdir(parents=True)
    config = LlamaConfig(**LLAMA3_8B)
    with torch.device("meta"):
        tensors = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    writer = ShardWriter(base, [PlannedTensor(n, "BF16", s) for n, s in tensors.items()], 5 * 10**9)
    g = torch.Generator(DEVICE).manual_seed(0)
    for name, shape in tensors.items():
        scale = 1.0 if "norm" in name else 0.02
        writer.write(name, (torch.randn(shape, generator=g, device=DEVICE) * scale).to(torch.bfloat16).cpu())
    writer.finish()
    config.save_pretrained(base)
    (workdir / "seconds").write_text(f"{time.perf_counter() - started:.1f}")
    return base


def bench_model(workdir: Path) -> list[str]:
    base, out = workdir / "base", workdir / "out"
    if not (base / "config.json").exists():  # else made beforehand by ``make-model`` (e.g. while tests ran)
        smoke = ["--smoke"] if DEVICE == "cpu" else []
        subprocess.run([sys.executable, __file__, "make-model", "--workdir", str(workdir), *smoke], check=True)
    made = float((workdir / "seconds").read_text())
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    subprocess.run(["cat", *map(str, base.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)
    cmd = [sys.executable, "-m", "convert.cli", "loftq-init", "--base", str(base), "--out", str(out)]
    cmd += ["--device", DEVICE, "--rank", str(RANK), "--iters", "5"]
    timer = ["/usr/bin/time", "-f", "%M"] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    proc = subprocess.run(timer + cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    print(proc.stdout, proc.stderr[-3000:], flush=True)
    if proc.returncode != 0:
        raise SystemExit("convert loftq-init failed")
    rss = f"{int(proc.stderr.split()[-1]) * 1024 / 1e9:.2f} GB (GNU time)" if timer else "see summary"
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return [
        f"- 8B-shaped model (Llama-3-8B shapes, random bf16, {size / 1e9:.1f} GB in {workdir}, generated in "
        f"{made:.0f} s): "
        f"`convert loftq-init --device {DEVICE} --rank {RANK} --iters 5` "
        f"(all-linear, {LLAMA3_8B['num_hidden_layers'] * MATRICES_PER_LAYER} matrices) "
        f"took **{wall:.1f} s** wall as a whole process, peak RSS **{rss}**, wrote {written / 1e9:.2f} GB",
        f"- its summary: `{proc.stdout.strip().splitlines()[-1]}`",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["matrices", "model", "make-model"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-loftq"))
    parser.add_argument("--results", type=Path, default=ROOT / "tools" / "results" / "bench_loftq.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, no figures")
    args = parser.parse_args()
    if args.smoke:
        global DEVICE, SHAPES
        DEVICE = "cpu"
        LLAMA3_8B.update(hidden_size=128, num_hidden_layers=2, intermediate_size=448, vocab_size=4008)
        SHAPES = [(r // 32, c // 32) for r, c in SHAPES]
    if args.what == "make-model":
        make_model(args.workdir)
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    header = f"## {datetime.date.today()}, {device}, torch {torch.__version__}: {args.what}"
    if args.what == "matrices":
        lines = [
            header,
            "",
            f"rank {RANK}, bf16 LLM-like weights, same process and matrices for both",
            "",
            *bench_matrices(),
        ]
    else:
        lines = [header, "", *bench_model(args.workdir)]
        shutil.rmtree(args.workdir, ignore_errors=True)
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
