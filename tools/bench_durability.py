"""What crash safety costs: `convert merge` of this tree against a baseline revision, on the same model.

    python tools/bench_durability.py [--baseline 7101e6e] [--workdir /tmp/bench-merge] [--repeat 3]

The durable output (every shard fsynced and hashed into the journal, the
directory fsynced before the rename) is timed against the revision before it
(`git archive` of ``--baseline``), interleaved, on the TinyLlama-1.1B-shaped bf16
model and r=16 adapter of ``tools/bench_merge.py``; page cache warm, `sync`
before each run, so each run pays for its own writeback. Prints a markdown table
(median seconds until the process exits, and until its output is on disk, i.e. with a
`sync` after it: the baseline leaves its writeback to the page cache, the durable run waits for it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools import bench_merge  # noqa: E402


def run_merge(tree: Path, base: Path, adapter: Path, out: Path) -> tuple[float, float]:
    """(seconds until the process exits, seconds until its output is on disk: a `sync` after it)."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "convert.cli", "merge", "--base", str(base), "--adapter", str(adapter)]
        + ["--out", str(out), "--device", "cpu", "-q"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        check=True,
    )
    exited = time.perf_counter() - started
    subprocess.run(["sync"], check=True)
    return exited, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="7101e6e", help="git revision without the durable output")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-merge"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    base, adapter = bench_merge.build(args.workdir)
    bench_merge.BASE_FILES[:] = sorted(base.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as old_tree:
        archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", old_tree], input=archive.stdout, check=True)
        trees = {f"baseline {args.baseline}": Path(old_tree), "this tree (durable)": ROOT}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
        for _ in range(args.repeat):
            for name, tree in trees.items():
                bench_merge.warm_cache()
                times[name].append(run_merge(tree, base, adapter, args.workdir / "out-durability"))
    shutil.rmtree(args.workdir / "out-durability", ignore_errors=True)
    print("| run | exit s (median) | on disk s (median) | samples (exit/on disk) |\n|---|---|---|---|")
    medians = {}
    for name, t in times.items():
        medians[name] = [statistics.median(x[i] for x in t) for i in (0, 1)]
        samples = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in t)
        print(f"| {name} | {medians[name][0]:.2f} | {medians[name][1]:.2f} | {samples} |")
    (old_exit, old_disk), (new_exit, new_disk) = medians.values()
    print(f"\ndurable / baseline: {new_exit / old_exit:.2f}x to exit, {new_disk / old_disk:.2f}x until on disk")


if __name__ == "__main__":
    main()
