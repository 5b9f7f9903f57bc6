"""Benchmark the early reads of a `convert merge` (convert/readahead.py) on any machine: in a forked child process
(the default), in a thread (CONVERT_READAHEAD=thread) and off (CONVERT_READAHEAD=0), on a cold page cache.

    python tools/bench_startup.py [--workdir /tmp/bench-merge] [--device cpu|cuda] [--rounds 3]
                                  [--results tools/results/bench_startup.md]

Uses bench_merge's TinyLlama-1.1B-shaped base and adapter (built when missing). Each round runs the three variants
one after the other, each as a whole process plus a `sync` after dropping the page cache (bench_gpu_merge.timed),
with CONVERT_PIPELINE_TIMES=1: the table gives the median wall and the median start-up (the process's start to
merge(), from its phase clock), and the results keep each run's disk seconds (GB read/written in each second),
which show how much of the base the start-up read. Needs root to drop the page cache (the results say if not).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from bench_gpu_merge import disk_line, drop_caches, timed  # noqa: E402
from bench_merge import build  # noqa: E402

VARIANTS = {"child process": (), "thread": (("CONVERT_READAHEAD", "thread"),), "off": (("CONVERT_READAHEAD", "0"),)}


def start_up_seconds(output: str) -> float:
    """The `start-up X s` of the phase clock's line."""
    line = next(line for line in output.splitlines() if "phases: start-up " in line)
    return float(line.split("phases: start-up ")[1].split(" s")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-merge"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=ROOT / "tools" / "results" / "bench_startup.md")
    args = parser.parse_args()

    def report(line: str = "") -> None:
        print(line, flush=True)
        with open(args.results, "a") as f:
            f.write(line + "\n")

    base, adapter = build(args.workdir)
    out = args.workdir / "startup-out"
    cmd = [sys.executable, "-m", "convert.cli", "merge", "--base", str(base), "--adapter", str(adapter),
           "--out", str(out), "--device", args.device]  # fmt: skip
    size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
    dropped = "yes" if drop_caches() else "NO"
    report(f"## {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()}: early reads of `convert merge "
           f"--device {args.device}`, {size:.2f} GB base, page cache dropped: {dropped}")  # fmt: skip
    report()
    walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
    starts: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for number in range(1, args.rounds + 1):
        for variant, env in VARIANTS.items():
            t = timed(cmd, out, (("CONVERT_PIPELINE_TIMES", "1"), *env))
            walls[variant].append(t.total_s)
            starts[variant].append(start_up_seconds(t.output))
            report(f"<!-- round {number}, {variant}: wall {t.total_s:.2f} s, start-up {starts[variant][-1]:.2f} s; "
                   f"{disk_line(t)} -->")  # fmt: skip
    report()
    report(f"| early reads | wall s (median of {args.rounds}) | start-up s (median) |")
    report("|---|---|---|")
    for variant in VARIANTS:
        report(f"| {variant} | {statistics.median(walls[variant]):.2f} | {statistics.median(starts[variant]):.2f} |")
    report()


if __name__ == "__main__":
    main()
