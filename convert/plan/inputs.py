"""A command's inputs, opened and checked before anything is planned: local directories or Hub repos.

Every command that reads a base (merge, quantize, loftq-init, verify) opens it here, so the same
rules hold everywhere: the output may not clobber an input, a Hub repo id becomes a snapshot whose
shards arrive as they are needed, a base without ``config.json`` is refused, and quantized weights'
code tables are checked before a byte is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from convert.execute.decode import check_layouts
from convert.output.ranks import world_size
from formats.adapter import Adapter, open_adapter
from formats.checkpoint import INDEX_NAMES, Checkpoint, open_checkpoint
from formats.errors import ConvertError
from formats.hub import HubModel, delete_cached, fetch_adapter, open_hub_model, parse_repo_id


@dataclass
class Inputs:
    base: Checkpoint
    base_dir: Path
    adapter: Adapter | None = None
    adapter_dir: Path | None = None
    adapter_repo: str | None = None
    hub: HubModel | None = None
    delete_at_close: bool = False  # torchrun + --no-keep-downloads: delete once every rank is done reading

    def files(self) -> list[Path]:
        """Every local input file whose bytes reach the output: what a resumed run must find unchanged.

        A Hub base is identified by its repo and commit instead (``identity``): its shards come and go
        from the cache as they are downloaded and, with ``--no-keep-downloads``, deleted."""
        ckpt, adapter = self.base, self.adapter
        files = [] if self.hub else [*ckpt.files, *(ckpt.directory / n for n in (*INDEX_NAMES, "config.json"))]
        if adapter is not None:
            files += [adapter.weights_file, adapter.directory / "adapter_config.json", adapter.directory / "README.md"]
        return [f for f in files if f.is_file()]

    def identity(self) -> dict | None:
        """What a Hub base is, for the resume fingerprint: a commit is immutable."""
        return None if self.hub is None else {"repo": self.hub.repo_id, "commit": self.hub.commit}

    def stages(self, tensors: list) -> list[list] | object:
        """The plan's tensors in runs that read the same base shards: a Hub base's shards are downloaded one
        run ahead (``formats.hub``); a local base is one run."""
        return self.hub.stages(tensors) if self.hub else [tensors]

    def side_sources(self) -> list[Path]:
        """Where tokenizer and generation files are copied from: the base, then the adapter (which wins)."""
        return [self.base_dir, *([self.adapter_dir] if self.adapter_dir else [])]

    def base_name(self) -> str:
        """The base as a model card names it: its Hub repo, the adapter's record of it, or the directory's name."""
        if self.hub:
            return self.hub.repo_id
        recorded = (self.adapter.config.get("base_model_name_or_path") or "") if self.adapter else ""
        if not recorded or Path(recorded).is_absolute() or recorded.startswith("."):
            return self.base_dir.resolve().name  # a local path says nothing to readers of the card
        return recorded

    def adapter_name(self) -> str | None:
        if self.adapter_repo:
            return self.adapter_repo
        return self.adapter_dir.resolve().name if self.adapter_dir else None

    def close(self) -> None:
        if self.hub is not None:
            self.hub.close()
            if self.delete_at_close:
                for path in sorted(self.hub.downloaded):
                    delete_cached(path)


def open_inputs(
    base: str | os.PathLike | Checkpoint,
    adapter: str | os.PathLike | None,
    out: Path | None,
    *,
    overwrite: bool = False,
    revision: str | None = None,
    token: str | None = None,
    keep_downloads: bool = True,
) -> Inputs:
    """Open ``base`` (and ``adapter``) for a command writing ``out`` (None: a command that writes nothing).

    ``base`` may be a ``Checkpoint`` already opened by another source (a training run's rank files,
    ``convert.commands.consolidate``): it is used as it is, its directory standing for the base's."""
    opened, base = (base, base.directory) if isinstance(base, Checkpoint) else (None, base)
    base_repo = parse_repo_id(base) if opened is None else None
    adapter_repo = parse_repo_id(adapter) if adapter is not None else None
    if out is not None:
        local = [Path(p) for p, repo in ((base, base_repo), (adapter, adapter_repo)) if p is not None and not repo]
        check_paths(local, out, overwrite)
    # Under torchrun, ranks on one machine share the Hub cache and may read the same base shard: one rank
    # deleting it after its last use could pull it from under another, so downloads go at the end instead.
    deferred = not keep_downloads and world_size() > 1
    hub = open_hub_model(str(base), revision, token, keep_downloads or deferred) if base_repo else None
    try:
        base_dir = hub.directory if hub else Path(base)
        adapter_dir = Path(adapter) if adapter is not None and not adapter_repo else None
        if adapter_repo:
            adapter_dir = fetch_adapter(str(adapter), revision, token)
        ckpt = opened or (hub.checkpoint if hub else open_checkpoint(base_dir))
        if not ckpt.config:
            raise ConvertError(f"{base_dir / 'config.json'}: missing (not a Hugging Face model directory)")
        check_layouts(ckpt.tensors)
        peft = open_adapter(adapter_dir) if adapter_dir is not None else None
    except BaseException:
        if hub is not None:
            hub.close()
        raise
    return Inputs(ckpt, base_dir, peft, adapter_dir, adapter_repo[0] if adapter_repo else None, hub, deferred)


def check_paths(inputs: list[Path], out: Path, overwrite: bool) -> None:
    """Refuse outputs that would clobber inputs or an existing model."""
    if out.name in ("", ".", ".."):  # the partial sibling and the final rename need a named directory
        raise ConvertError(f"--out {out}: name the output directory (e.g. {Path.cwd().name}/merged), not . or ..")
    out_r = out.resolve()
    for path in inputs:
        p = path.resolve()
        if out_r == p or p in out_r.parents:
            raise ConvertError(f"{out}: output directory is inside input directory {path}; choose another --out")
        if out_r in p.parents:
            raise ConvertError(f"{out}: output directory contains input directory {path}; choose another --out")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
