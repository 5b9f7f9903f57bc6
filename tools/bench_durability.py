"""What crash safety costs: `convert merge` of this tree against a baseline revision, on the same model.

    python tools/bench_durability.py [--baseline 7101e6e] [--workdir /tmp/bench-merge] [--repeat 3]

The durable output (every shard fsynced and hashed into the journal, the
directory fsynced before the rename) is timed against the revision before it
(`git archive` of ``--baseline``), interleaved, on the TinyLlama-1.1B-shaped bf16
model and r=16 adapter of ``tools/bench_merge.py``; page cache warm, `sync`
before each run, so each run pays for its own writeback. Prints a markdown table
(medians: seconds until the process exits; until its output is on disk, i.e. with a `sync`
after it, since the baseline leaves its writeback to the page cache while the durable run waits
for it; and the process's CPU seconds, the steadier figure on a shared machine).
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


def run_merge(tree: Path, base: Path, adapter: Path, out: Path) -> tuple[float, float, float]:
    """Seconds until the process exits, until its output is on disk (a `sync` after it), and its CPU seconds.

    CPU seconds (user + system) are the steadier figure on a shared machine, where wall time is noise."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "convert.cli", "merge", "--base", str(base), "--adapter", str(adapter)]
        + ["--out", str(out), "--device", "cpu", "-q"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"convert merge failed in {tree}")
    exited = time.perf_counter() - started
    subprocess.run(["sync"], check=True)
    return exited, time.perf_counter() - started, usage.ru_utime + usage.ru_stime


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
        times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
        for _ in range(args.repeat):
            for name, tree in trees.items():
                bench_merge.warm_cache()
                times[name].append(run_merge(tree, base, adapter, args.workdir / "out-durability"))
    shutil.rmtree(args.workdir / "out-durability", ignore_errors=True)
    print("| run | exit s | on disk s | CPU s | samples (exit/on disk/CPU) |\n|---|---|---|---|---|")
    medians = {}
    for name, t in times.items():
        medians[name] = [statistics.median(x[i] for x in t) for i in range(3)]
        samples = ", ".join("/".join(f"{v:.2f}" for v in x) for x in t)
        print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in medians[name]) + f" | {samples} |")
    old, new = medians.values()
    print(
        f"\ndurable / baseline (medians): {new[0] / old[0]:.2f}x to exit, {new[1] / old[1]:.2f}x until on disk, "
        f"{new[2] / old[2]:.2f}x CPU seconds"
    )


if __name__ == "__main__":
    main()
