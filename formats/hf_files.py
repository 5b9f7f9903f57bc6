"""The non-tensor files of a Hugging Face model directory: config, tokenizer, model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from formats.dtypes import TORCH_NAMES

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
    if dtype in TORCH_NAMES:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = TORCH_NAMES[dtype]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_model_files(out_dir: Path, config: dict, dtype: str | None, updates: dict, sources: list[Path]) -> list[str]:
    """config.json (with ``updates`` and the output dtype) and the side files of ``sources``; their names."""
    write_config(config, out_dir, dtype, updates)
    return ["config.json", *copy_side_files(sources, out_dir)]


def write_model_card(
    out_dir: Path, base: str, adapter: str | None, settings: dict[str, str], relation: str = "merge"
) -> None:
    """README.md with the Hub's model-card metadata: ``base_model`` + ``base_model_relation`` put the model
    in its base's model tree, and ``library_name`` lets the Hub show how to load it."""
    tags = ["ckpt-convert", *(["merge", "lora"] if adapter else []), *([relation] if relation == "quantized" else [])]
    data = ModelCardData(base_model=base, base_model_relation=relation, library_name="transformers", tags=tags)
    if adapter:
        made = f"the base model {link(base)} with the LoRA adapter {link(adapter)} merged into its weights"
    else:
        made = f"the model {link(base)}, converted"
    body = [
        "# Merged model" if adapter else "# Converted model",
        "",
        f"This checkpoint is {made}, by ckpt-convert (`convert merge`).",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | `{v}` |" for k, v in settings.items()),
        "",
    ]
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)).save(out_dir / "README.md")


def link(name: str) -> str:
    """A Hub link for a repo id, plain code for anything else (a local directory's name)."""
    return f"[{name}](https://huggingface.co/{name})" if "/" in name else f"`{name}`"
