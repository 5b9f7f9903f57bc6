"""Every command's options with their defaults, written once: the CLI's flags and the Python API both read them.

Plain frozen dataclasses, importable without torch (the command line builds them before the heavy
imports start). ``convert.cli`` takes each flag's default from here (``default(MergeOptions, "dtype")``);
``merge(base, adapter, out, **options)`` builds ``MergeOptions(**options)``, so an unknown keyword is
a ``TypeError`` as for any Python function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from formats.bnb_names import METHODS

DEFAULT_CHUNK_BYTES = 8 << 20  # a row chunk's memory budget in fp32: cache-sized tiles, a few MB per worker
DEFAULT_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
MERGE_INTO = ("original", "dequantized")  # add a QLoRA delta to the 16-bit weights, or to their quantization round trip
FORMAT_METHODS = ("fp8", "same")  # --quantize beyond bitsandbytes': block-scaled FP8, or the base's own format
QUANTIZE_CHOICES = (*METHODS, *FORMAT_METHODS)
SVD_METHODS = ("randomized", "exact")  # LoftQ's truncated SVD: randomized (fast) or a full SVD as PEFT
TRAINING_SOURCES = ("deepspeed", "dcp", "litgpt")  # what ``convert consolidate --from`` reads


@dataclass(frozen=True)
class HubTarget:
    """Where to push: ``--push-to-hub REPO [--private] [--push-revision BRANCH] [--commit-message ...]``."""

    repo_id: str
    private: bool = False
    revision: str | None = None  # a branch, created from the default branch if missing
    commit_message: str | None = None


@dataclass(frozen=True)
class OutputOptions:
    """What every command that writes a model takes: where it computes, how it writes, the Hub."""

    device: str = "auto"
    max_shard_size: int | str = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    resume: bool = False
    quiet: bool = True
    revision: str | None = None  # of Hub inputs
    token: str | None = None
    keep_downloads: bool = True
    push_to_hub: HubTarget | None = None


@dataclass(frozen=True)
class MergeOptions(OutputOptions):
    """``convert merge`` and ``convert quantize`` (a merge without adapter)."""

    dtype: str = "auto"
    chunk_size: int | str = DEFAULT_CHUNK_BYTES
    quantize: str | None = None  # nf4 | fp4 | int8: bitsandbytes output
    double_quant: bool = True
    blocksize: int = 64
    quant_storage: str = "uint8"
    compute_dtype: str = "auto"
    skip_modules: tuple[str, ...] = ()
    merge_into: str = "original"
    train_quant: str | None = None
    allow_nonfinite: bool = False


@dataclass(frozen=True)
class LoftQOptions(OutputOptions):
    """``convert loftq-init``."""

    bits: int = 4
    rank: int = 16
    alpha: float = 16
    iters: int = 5
    target_modules: str | list[str] = "all-linear"
    quant_type: str = "nf4"
    double_quant: bool = False
    svd: str = "randomized"
    use_rslora: bool = False
    save_dequantized: bool = False


@dataclass(frozen=True)
class VerifyOptions:
    """``convert verify``."""

    sample: int | None = None
    seed: int = 0
    atol: float = 0.0
    device: str = "cpu"
    chunk_size: int | str = DEFAULT_CHUNK_BYTES
    merge_into: str = "original"  # how the merge was made: a QLoRA merge into the round-tripped weights
    train_quant: str | None = None
    blocksize: int = 64
    double_quant: bool = True


def default(options: type, name: str):
    """The default of one option, for the CLI's flags."""
    return next(f.default for f in dataclasses.fields(options) if f.name == name)
