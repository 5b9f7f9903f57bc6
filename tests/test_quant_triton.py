"""The Triton kernels of convert/kernels/quant_triton.py.

On any machine: through Triton's interpreter (tests/triton_interpreted.py, in a subprocess so that
``TRITON_INTERPRET=1`` is set before triton is imported) against the torch oracle. With CUDA: against bitsandbytes'
CUDA kernels, byte for byte (tests/test_quant_gpu.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_through_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider"]
    run = subprocess.run(
        [*command, "tests/triton_interpreted.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
