"""ckpt-convert: stream base model + adapter into one checkpoint in bounded memory.

The Python API mirrors the CLI: ``from convert import merge``.
"""

import sys
import warnings

from convert import readahead

# Run as `convert merge`: start reading the base from disk before torch is imported (a no-op otherwise).
readahead.start_for_command_line(sys.argv, getattr(sys, "orig_argv", []))

# torch warns on import when numpy is missing; the tool does not use numpy, so the warning is noise.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from convert.commands.merge import MergeResult, merge  # noqa: E402
from formats.errors import ConvertError  # noqa: E402

__all__ = ["ConvertError", "MergeResult", "merge"]
__version__ = "0.1.0"
