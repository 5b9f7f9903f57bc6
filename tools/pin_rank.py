"""Run a module with this rank's own cores: ``python tools/pin_rank.py K module args...`` pins the process to
cores ``[LOCAL_RANK * K, (LOCAL_RANK + 1) * K)`` (``LOCAL_RANK`` is torchrun's; 0 outside it), then runs
``module`` as ``python -m module args...`` would.

For ``tools/bench_distributed.py --cores-per-rank K``: on one machine, ranks that each own K cores measure
what a rank with a machine of its own does, and the one-process run on K cores is their baseline, so the
scaling per added rank is measured rather than the sharing of the same cores.
"""

from __future__ import annotations

import os
import runpy
import sys


def main() -> None:
    per_rank, module, *args = sys.argv[1:]
    first = int(os.environ.get("LOCAL_RANK", "0")) * int(per_rank)
    os.sched_setaffinity(0, range(first, first + int(per_rank)))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
