"""Benchmark the NF4 kernels of convert.kernels against bitsandbytes' CUDA kernels, in the same run (GPU only).

    python tools/bench_quant.py [--results tools/results/bench_quant.md] [--tune]

On the 8B-shaped (Llama-3-8B) projection matrices, bf16, blocksize 64, with and without double quantization:
quantize and dequantize throughput in GB/s of 16-bit input (quantize) or output (dequantize), medians of
``triton.testing.do_bench``, next to a device-to-device copy of the largest matrix (read + write bytes) as the
bandwidth ceiling. Every result of ours is checked bit for bit against bitsandbytes' (packed bytes, absmax, nested
absmax, offset, dequantized values) before it is timed: a fast wrong kernel cannot pass unnoticed.
``--tune`` first sweeps the Triton tile sizes and uses the fastest.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from pathlib import Path

import torch
import triton
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert.kernels import quant as Q  # noqa: E402
from convert.kernels import quant_triton as T  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]


def bench(fn) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


def check(x: torch.Tensor, double_quant: bool, F) -> tuple[Q.Quantized4bit, tuple]:
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    q = Q.quantize_4bit(x, 64, "nf4", double_quant=double_quant)
    problems = []
    if not same_bits(q.packed, packed):
        problems.append(f"packed: {(q.packed != packed).sum().item()} bytes differ")
    if not same_bits(q.absmax, state.absmax):
        problems.append(f"absmax: {(q.absmax != state.absmax).sum().item()} differ")
    same_offset = double_quant and float(q.offset) == state.offset.item()
    if double_quant and not (same_bits(q.nested_absmax, state.state2.absmax) and same_offset):
        problems.append("nested absmax / offset differ")
    if not same_bits(Q.dequantize_4bit(q), F.dequantize_4bit(packed, state)):
        problems.append("dequantized values differ")
    if problems:
        raise SystemExit(
            f"NOT bit-identical to bitsandbytes for {tuple(x.shape)} double_quant={double_quant}: {problems}"
        )
    return q, (packed, state)


def copy_bandwidth(shape) -> float:
    """GB/s (read + write) of a device-to-device copy of a bf16 matrix: the ceiling for a one-pass kernel."""
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    return 2 * x.numel() * 2 / bench(lambda: out.copy_(x)) / 1e6


def tune(F) -> str:
    """Sweep the Triton tile shapes (elements a program, warps) on a small and a large matrix and keep the settings
    fastest in total (results checked each time)."""
    lines, totals = [], {}
    for shape in ((1024, 4096), (14336, 4096)):
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02
        for elements in (2048, 4096):
            for warps in (4, 8, 16):
                T.QUANTIZE_ELEMENTS = T.DEQUANTIZE_ELEMENTS = elements
                T.QUANTIZE_WARPS = T.DEQUANTIZE_WARPS = warps
                q, _ = check(x, False, F)
                quantize_ms = bench(lambda x=x: Q.quantize_4bit(x, 64, "nf4"))
                dequantize_ms = bench(lambda q=q: Q.dequantize_4bit(q))
                cells = f"{elements} | {warps} | {quantize_ms:.3f} | {dequantize_ms:.3f}"
                lines.append(f"| {shape[0]}x{shape[1]} | {cells} |")
                q_total, d_total = totals.get((elements, warps), (0.0, 0.0))
                totals[elements, warps] = (q_total + quantize_ms, d_total + dequantize_ms)
    best_q = min(totals, key=lambda k: totals[k][0])
    best_d = min(totals, key=lambda k: totals[k][1])
    T.QUANTIZE_ELEMENTS, T.QUANTIZE_WARPS = best_q
    T.DEQUANTIZE_ELEMENTS, T.DEQUANTIZE_WARPS = best_d
    header = "| shape | elements/program | warps | quantize ms | dequantize ms |\n|---|---|---|---|---|\n"
    return "Tile sweep, bf16:\n\n" + header + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "tools" / "results" / "bench_quant.md")
    parser.add_argument("--tune", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_quant.py needs a CUDA GPU")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    tuning = tune(F) if args.tune else ""
    copy_gbs = copy_bandwidth(SHAPES[-1])
    rows, ratios_q, ratios_d = [], [], []
    for shape in SHAPES:
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02
        gb = x.numel() * 2 / 1e9
        for double_quant in (False, True):
            q, (packed, state) = check(x, double_quant, F)
            bnb_q = bench(
                lambda x=x, dq=double_quant: F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)
            )
            our_q = bench(lambda x=x, dq=double_quant: Q.quantize_4bit(x, 64, "nf4", double_quant=dq))
            bnb_d = bench(lambda p=packed, s=state: F.dequantize_4bit(p, s))
            our_d = bench(lambda q=q: Q.dequantize_4bit(q))
            ratios_q.append(bnb_q / our_q)
            ratios_d.append(bnb_d / our_d)
            quantize = (
                f"{bnb_q:.3f} | {our_q:.3f} | {gb / bnb_q * 1e3:.0f} | {gb / our_q * 1e3:.0f} | {bnb_q / our_q:.1f}x"
            )
            dequantize = (
                f"{bnb_d:.3f} | {our_d:.3f} | {gb / bnb_d * 1e3:.0f} | {gb / our_d * 1e3:.0f} | {bnb_d / our_d:.2f}x"
            )
            rows.append(f"| {shape[0]}x{shape[1]} | {'yes' if double_quant else 'no'} | {quantize} | {dequantize} |")
            print(rows[-1], flush=True)
        del x
    header = (
        "| shape | double quant | bnb quantize ms | ours ms | bnb GB/s in | ours GB/s in | speed-up "
        "| bnb dequantize ms | ours ms | bnb GB/s out | ours GB/s out | speed-up |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    import bitsandbytes

    text = "\n".join(
        [
            f"## {datetime.date.today()}, {torch.cuda.get_device_name()}: NF4 blocksize 64, bf16, do_bench medians",
            "",
            f"torch {torch.__version__}, triton {triton.__version__}, bitsandbytes {bitsandbytes.__version__}. "
            "Every result checked bit-identical to bitsandbytes (packed, absmax, nested absmax, offset, dequantized)"
            " before timing.",
            f"Device-to-device copy of the 128256x4096 bf16 matrix: {copy_gbs:.0f} GB/s (read + write).",
            "",
            header,
            *rows,
            "",
            f"- quantize: {min(ratios_q):.1f}x to {max(ratios_q):.1f}x faster than bitsandbytes",
            f"- dequantize: {min(ratios_d):.2f}x to {max(ratios_d):.2f}x bitsandbytes' speed",
            f"- Triton tiles: quantize {T.QUANTIZE_ELEMENTS} elements a program, {T.QUANTIZE_WARPS} warps; "
            f"dequantize {T.DEQUANTIZE_ELEMENTS} elements, {T.DEQUANTIZE_WARPS} warps",
            "",
            tuning,
            "",
        ]
    )
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)


if __name__ == "__main__":
    main()
