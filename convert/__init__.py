"""ckpt-convert: stream base model + adapter into one checkpoint in bounded memory.

The Python API mirrors the CLI: ``from convert import merge``.
"""

from convert.merge import MergeResult, merge
from formats.errors import ConvertError

__all__ = ["ConvertError", "MergeResult", "merge"]
__version__ = "0.1.0"
