"""The README's two fresh-machine commands stay true: CI runs the test command, and the example merges."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import ROOT, assert_equal_or_1ulp, load_output, peft_model

EXAMPLE = ROOT / "examples" / "tiny-llama"


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text.split("\n## ", 1)[0], flags=re.S)


def test_ci_runs_the_readme_test_command():
    install_and_merge, install_and_test = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()
    assert "convert merge --base examples/tiny-llama/base" in install_and_merge


def test_readme_example_merge_matches_peft(tmp_path):
    command = readme_commands()[0].split("&& convert merge", 1)[1].split()
    out = tmp_path / "merged"
    command[command.index("--out") + 1] = str(out)
    script = Path(sys.executable).with_name("convert")
    runner = [str(script)] if script.exists() else [sys.executable, "-m", "convert.cli"]
    result = subprocess.run([*runner, "merge", *command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r"merged 14 tensors, copied 7, wrote [0-9.]+ MB to \S+ in [0-9.]+ s, peak RSS [0-9.]+ [MG]B\n", result.stdout
    ), result.stdout
    merged_ref = peft_model(EXAMPLE / "base", EXAMPLE / "adapter", torch.bfloat16).merge_and_unload().state_dict()
    ours = load_output(out)
    assert ours.keys() == merged_ref.keys()
    for name, tensor in ours.items():
        assert_equal_or_1ulp(tensor, merged_ref[name], name)


def test_merge_runs_without_numpy(tmp_path):
    """The README's first command installs no numpy (torch does not require it): the merge must not need it."""
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "from convert import merge\n"
        f"print(merge({str(EXAMPLE / 'base')!r}, {str(EXAMPLE / 'adapter')!r}, {str(tmp_path / 'out')!r}).merged)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "14"
