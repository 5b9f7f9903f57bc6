"""The non-tensor files of a Hugging Face model directory: config, tokenizer, model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Copied as they are, from the base and then from the adapter (which wins: training
# may have added tokens or a chat template).
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def copy_side_files(sources: list[Path], out_dir: Path) -> list[str]:
    copied = []
    for source in sources:
        for name in SIDE_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out_dir / name)
                copied.append(name)
    return sorted(set(copied))


def write_config(config: dict, out_dir: Path, dtype: str | None, updates: dict) -> None:
    """Write config.json with the output dtype recorded under the key(s) transformers reads."""
    config = {**config, **updates}
    if dtype in TORCH_DTYPE_NAMES:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = TORCH_DTYPE_NAMES[dtype]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_model_card(out_dir: Path, base: str, adapter: str, settings: dict[str, str]) -> None:
    lines = [
        "---",
        f"base_model: {json.dumps(base)}",
        "base_model_relation: merge",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- lora",
        "---",
        "",
        "# Merged model",
        "",
        f"This checkpoint is the base model `{base}` with the LoRA adapter `{adapter}` merged into its weights",
        "by ckpt-convert (`convert merge`).",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | `{v}` |" for k, v in settings.items()),
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))
