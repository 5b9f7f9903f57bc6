"""The Triton kernels of convert/kernels/fp8_triton.py through Triton's interpreter (tests/triton_fp8.py, in a
subprocess so that ``TRITON_INTERPRET=1`` is set before triton is imported), against the torch references."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import ROOT


def test_fp8_kernels_through_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider", "tests/triton_fp8.py"]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout and " 0 passed" not in run.stdout, run.stdout[-2000:]
