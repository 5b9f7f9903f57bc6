"""Fixtures shared by the test modules; the helpers they use live in ``tests/helpers.py``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers import make_adapter, make_base


def pytest_configure(config: pytest.Config) -> None:
    # Commands run by the tests leave their start-up profile (convert.startup) here, not in the user's cache.
    os.environ.setdefault("CONVERT_STARTUP_PROFILE", str(Path(tempfile.mkdtemp(prefix="convert-startup-")) / "p"))
    os.environ.setdefault("CONVERT_CACHE_DIR", tempfile.mkdtemp(prefix="convert-cache-"))  # models' definitions
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it, run for real on the GPU machine")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_llama(tmp_path: Path) -> tuple[Path, Path]:
    base = make_base(tmp_path / "base", "llama")
    adapter = make_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules="all-linear")
    return base, adapter
