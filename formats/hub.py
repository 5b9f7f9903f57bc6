"""Hugging Face Hub repos as inputs: a repo id becomes a local snapshot whose shards arrive as they are needed.

The small files (config, index, tokenizer, adapter) are downloaded at once into
the Hub cache, as ``huggingface_hub`` always does. Shard headers are read with
range requests, so the whole merge is planned before any shard is downloaded.
Then ``HubModel.stages`` hands the plan out shard by shard: it waits for shard k,
has shard k+1 downloaded in the background while k is processed, and with
``keep_downloads=False`` deletes each shard it downloaded once the plan is done
with it, so that a merge needs disk for its output plus two input shards.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from formats.checkpoint import Checkpoint, ShardFiles, open_checkpoint, read_json
from formats.errors import ConvertError, TransientError
from formats.hf_files import SIDE_FILES
from formats.safetensors_file import TensorInfo, read_header

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]")
HEADER_PROBE = 100_000  # first bytes fetched: most headers fit (as in huggingface_hub's get_safetensors_metadata)
# Weight layouts in the order transformers prefers them (as formats.checkpoint reads them).
WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def parse_repo_id(spec: str | Path) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` for ``org/name`` or ``org/name@revision`` that is not a local path, else None."""
    text = str(spec)
    if Path(text).exists():
        return None
    repo, _, revision = text.partition("@")
    if not REPO_ID.fullmatch(repo) or ".." in repo:
        return None
    return repo, revision or None


@contextmanager
def hub_errors(repo_id: str, where: str = "", token: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub and network exceptions into one-line ``ConvertError``s that never hold the token.

    Messages read ``{repo_id}{where}: what went wrong``."""
    name = f"{repo_id}{where}"
    try:
        yield
    except ConvertError:
        raise
    except GatedRepoError:
        raise ConvertError(
            f"{name}: gated repository: accept its conditions on the Hub, then pass --token or set HF_TOKEN "
            "(or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ConvertError(
            f"{name}: no such local directory, and no such repository on the Hub "
            "(if it is private, pass --token or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ConvertError(f"{name}: revision not found on the Hub") from None
    except EntryNotFoundError:
        raise ConvertError(f"{name}: file not found in the repository") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise ConvertError(f"{name}: the Hub rejected the token (HTTP 401: invalid or expired)") from None
        if status == 403:
            raise ConvertError(f"{name}: the token does not give write access (HTTP 403)") from None
        raise ConvertError(f"{name}: Hub request failed: {first_line(e, token)}") from None
    except Exception as e:
        cause = network_cause(e)
        if cause is None:
            raise
        raise TransientError(f"{name}: cannot reach the Hub: {first_line(cause, token)}") from None


def network_cause(error: BaseException) -> BaseException | None:
    """The innermost network failure behind ``error`` (huggingface_hub wraps them), or None for other errors."""
    found = None
    while error is not None:
        if isinstance(error, NETWORK_ERRORS):
            found = error
        error = error.__cause__
    return found


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport errors of whichever HTTP client this huggingface_hub uses (requests, httpx or httpx2)."""
    found: list[type[BaseException]] = [OSError]  # requests' errors and LocalEntryNotFoundError are OSErrors
    for module, name in (("httpx", "TransportError"), ("httpx2", "TransportError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


NETWORK_ERRORS = _network_errors()


def first_line(error: BaseException, token: str | None = None) -> str:
    """The first line of an exception's message, with the token masked should a library ever include it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0].rstrip('.')}" if lines else type(error).__name__
    for form in (token, repr(token)[1:-1]) if token else ():  # also as a message may quote it escaped
        text = text.replace(form, "***")
    return text


class Prefetch:
    """Downloads files in a fixed order on a background thread, at most ``ahead`` beyond the last one needed."""

    def __init__(self, names: Sequence[str], fetch: Callable[[str], Path], ahead: int = 1):
        self.names, self.fetch, self.ahead = list(names), fetch, ahead
        self.done: dict[str, Path | BaseException] = {}
        self.allowed = 0  # files [0, allowed) may be fetched
        self.closed = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="convert-hub-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for i, name in enumerate(self.names):
            with self.cond:
                while i >= self.allowed and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
            try:
                result: Path | BaseException = self.fetch(name)
            except BaseException as e:  # handed to the consumer, who raises it
                result = e
            with self.cond:
                self.done[name] = result
                self.cond.notify_all()
            if isinstance(result, BaseException):
                return

    def need(self, name: str) -> Path:
        """Wait for ``name`` (allowing the next ``ahead`` files to start) and return its local path."""
        with self.cond:
            self.allowed = max(self.allowed, self.names.index(name) + 1 + self.ahead)
            self.cond.notify_all()
            while name not in self.done:
                if not self.thread.is_alive():
                    failed = [v for v in self.done.values() if isinstance(v, BaseException)]
                    raise failed[0] if failed else RuntimeError(f"download of {name} stopped")
                self.cond.wait(timeout=1.0)
            result = self.done[name]
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        """Stop before the next download; one in progress finishes in its daemon thread (the cache stays valid)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()


@dataclasses.dataclass
class HubModel:
    """A base model repo at one commit: its snapshot directory in the Hub cache and its (lazily fetched) shards."""

    repo_id: str
    commit: str
    directory: Path
    checkpoint: Checkpoint
    token: str | None
    keep_downloads: bool = True
    prefetch: Prefetch | None = None
    downloaded: set[Path] = dataclasses.field(default_factory=set)  # shards this run fetched (only those are deleted)

    def stages(self, tensors: Sequence) -> Iterator[list]:
        """Split plan ``tensors`` into runs that read the same remote shards; yield each once they are local.

        Shards are fetched in the order the plan first reads them, one ahead of
        the run in progress. After the last run that reads a shard, the shard is
        deleted from the cache if this process downloaded it and ``keep_downloads``
        is off.
        """
        remote = {p for p in self.checkpoint.files if p not in self.downloaded and not p.is_file()}
        runs: list[tuple[frozenset[Path], list]] = []
        for t in tensors:
            needs = frozenset(files_read_by(t) & set(self.checkpoint.files))
            if runs and (not needs or needs == runs[-1][0]):
                runs[-1][1].append(t)
            else:
                runs.append((needs, [t]))
        order = list(dict.fromkeys(p for needs, _ in runs for p in sorted(needs) if p in remote))
        last_use = {p: i for i, (needs, _) in enumerate(runs) for p in needs}
        names = [p.relative_to(self.directory).as_posix() for p in order]
        self.prefetch = Prefetch(names, self._download)
        try:
            for i, (needs, run) in enumerate(runs):
                for p in needs & remote:
                    self.prefetch.need(p.relative_to(self.directory).as_posix())
                yield run
                for p in needs:
                    if last_use[p] == i and not self.keep_downloads and p in self.downloaded:
                        delete_cached(p)
        finally:
            self.prefetch.close()

    def _download(self, name: str) -> Path:
        with hub_errors(self.repo_id, f"/{name}", self.token):
            path = Path(hf_hub_download(self.repo_id, name, revision=self.commit, token=self.token))
        self.downloaded.add(self.directory / name)
        return path

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()


def files_read_by(obj: object) -> set[Path]:
    """Every file a plan entry reads: the paths of the ``TensorInfo``s anywhere inside it."""
    if isinstance(obj, TensorInfo):  # a quantized weight also reads its quantization state
        return {obj.path} | files_read_by(obj.layout) | files_read_by(obj.reader)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return set().union(*(files_read_by(getattr(obj, f.name)) for f in dataclasses.fields(obj)))
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return set().union(*(files_read_by(x) for x in obj))
    return set()


def delete_cached(path: Path) -> None:
    """Remove a downloaded file from the Hub cache: the snapshot's symlink, and the blob it points to unless
    another snapshot (another revision with the same file) links to it too."""
    blob = path.resolve() if path.is_symlink() else None
    path.unlink(missing_ok=True)
    snapshots = next((p for p in path.parents if p.name == "snapshots"), None)
    if blob is None or snapshots is None:
        return
    if not any(link.is_symlink() and link.resolve() == blob for link in snapshots.rglob("*")):
        blob.unlink(missing_ok=True)


def repo_files(repo_id: str, revision: str | None, token: str | None) -> tuple[str, dict[str, int | None]]:
    """The commit a revision points to and the repo's files with their sizes."""
    with hub_errors(repo_id, f"@{revision}" if revision else "", token):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, token=token)
    return info.sha, {s.rfilename: s.size for s in info.siblings or []}


def download(repo_id: str, commit: str, names: Sequence[str], token: str | None) -> Path:
    """Download small files into the cache; return the snapshot directory."""
    directory = None
    for name in names:
        with hub_errors(repo_id, f"/{name}", token):
            path = Path(hf_hub_download(repo_id, name, revision=commit, token=token))
        directory = path.parent
    if directory is None:
        raise ConvertError(f"{repo_id}: nothing to download")
    return directory


def open_hub_model(spec: str, revision: str | None, token: str | None, keep_downloads: bool = True) -> HubModel:
    """Resolve ``--base org/name[@rev]``: fetch config, index and side files now, shard headers by range requests."""
    repo_id, pinned = parse_repo_id(spec) or (spec, None)
    commit, files = repo_files(repo_id, pinned or revision, token)
    if "config.json" not in files:
        raise ConvertError(f"{repo_id}: no config.json in the repository (not a transformers model)")
    weights = next((n for n in WEIGHTS if n in files), None)
    if weights is None:
        raise ConvertError(f"{repo_id}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    index = weights if weights.endswith(".index.json") else None
    small = ["config.json", *(n for n in SIDE_FILES if n in files), *([index] if index else [])]
    directory = download(repo_id, commit, small, token)
    if weights.startswith("pytorch_model") or "quantization_config" in read_json(directory / "config.json"):
        # Pickles have no header to read remotely, and planning a quantized base reads its quantization
        # state from the shards: these are downloaded whole before planning.
        download(repo_id, commit, json_weight_files(directory / index) if index else [weights], token)
        return HubModel(repo_id, commit, directory, open_checkpoint(directory), token, keep_downloads)

    def is_file(path: Path) -> bool:
        return path.is_file() or path.parent == directory and path.name in files

    def remote_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        if path.is_file():
            return read_header(path)
        size = files.get(path.name)
        if size is None:
            raise ConvertError(f"{repo_id}/{path.name}: the Hub does not report the file's size")
        return read_header(path, RemoteFile(repo_id, path.name, commit, token, size).read_at, size)

    checkpoint = open_checkpoint(directory, ShardFiles(is_file, remote_header))
    return HubModel(repo_id, commit, directory, checkpoint, token, keep_downloads)


def json_weight_files(index: Path) -> list[str]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConvertError(f"{index}: missing or empty 'weight_map'")
    return sorted({str(v) for v in weight_map.values()})


@dataclasses.dataclass
class RemoteFile:
    """A file of a repo at a commit, read by range requests as huggingface_hub's own safetensors metadata
    reader does: the first ``HEADER_PROBE`` bytes at once (most headers fit), anything further on demand."""

    repo_id: str
    name: str
    commit: str
    token: str | None
    size: int
    probe: bytes | None = None

    def read_at(self, offset: int, n: int) -> bytes:
        if self.probe is None:
            self.probe = self.fetch(0, min(HEADER_PROBE, self.size))
        if offset + n <= len(self.probe):
            return self.probe[offset : offset + n]
        return self.fetch(offset, n)

    def fetch(self, offset: int, n: int) -> bytes:
        url = hf_hub_url(self.repo_id, self.name, revision=self.commit)
        headers = {**build_hf_headers(token=self.token), "range": f"bytes={offset}-{offset + n - 1}"}
        with hub_errors(self.repo_id, f"/{self.name}", self.token):
            response = get_session().get(url, headers=headers)
            hf_raise_for_status(response)
        return response.content


def fetch_adapter(spec: str, revision: str | None, token: str | None) -> Path:
    """Resolve ``--adapter org/name[@rev]``: download its config, weights and tokenizer files; return the snapshot."""
    repo_id, pinned = parse_repo_id(spec) or (spec, None)
    commit, files = repo_files(repo_id, pinned or revision, token)
    if "adapter_config.json" not in files:
        raise ConvertError(f"{repo_id}: no adapter_config.json in the repository (not a PEFT adapter)")
    weights = next((n for n in ADAPTER_FILES[1:] if n in files), None)
    if weights is None:
        raise ConvertError(f"{repo_id}: no adapter_model.safetensors or adapter_model.bin in the repository")
    return download(repo_id, commit, ["adapter_config.json", weights, *(n for n in SIDE_FILES if n in files)], token)
