"""ckpt-convert: stream base model + adapter into one checkpoint in bounded memory.

The Python API mirrors the CLI: ``from convert import merge, loftq_init``. Names are imported on first use,
so that importing the package (as the command line does, before it starts reading the base) costs nothing.
"""

import warnings

# torch warns on import when numpy is missing; the tool does not use numpy, so the warning is noise.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

__all__ = ["ConvertError", "MergeResult", "loftq_init", "merge"]
__version__ = "0.1.0"

_LAZY = {
    "merge": "convert.commands.merge",
    "MergeResult": "convert.commands.merge",
    "loftq_init": "convert.commands.loftq_init",
    "ConvertError": "formats.errors",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'convert' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
