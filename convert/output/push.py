"""Push an output directory to a Hugging Face Hub repo while it is being written.

Each file is pre-uploaded (``preupload_lfs_files``: LFS content only, no commit)
as soon as its writer reports it complete, on a background thread, so uploads
overlap the computation of the next shard. Nothing is visible on the Hub until
one ``create_commit`` adds every file at once, so a crash never leaves half a
model there. A rerun uploads only what is missing: the Hub answers that content
it already holds needs no upload (identical output bytes, identical hashes).

Any command that writes files can push: ``Upload`` for writers that report files
one by one, ``push_files`` for a plain stream of completed names.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

from convert.options import HubTarget
from formats.errors import ConvertError
from formats.hub import hub_errors

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
RETRY_HINT = "; run the same command again to resume (files already uploaded are not sent again)"


class Upload:
    """Files of ``directory`` on their way to ``target``: uploaded as reported, committed together by ``commit``.

    Creating it creates the repo (and branch), so that a bad token or repo id
    fails before any work is done.
    """

    def __init__(self, target: HubTarget, directory: Path, token: str | None = None):
        self.target, self.directory, self.token = target, directory, token
        self.api = HfApi()
        self.operations: dict[str, CommitOperationAdd] = {}
        self.reported: set[str] = set()
        self.error: BaseException | None = None
        with hub_errors(target.repo_id, "", token):
            self.api.create_repo(target.repo_id, private=target.private, exist_ok=True, token=token)
            if target.revision:
                self.api.create_branch(target.repo_id, branch=target.revision, exist_ok=True, token=token)
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="convert-hub-upload", daemon=True)
        self.thread.start()

    def file_done(self, name: str) -> None:
        """Queue ``name`` (relative to the directory) for upload; raises a previous upload's error, which
        stops the writer that calls this rather than computing shards that cannot be pushed."""
        if self.error is not None:
            raise self.error
        self.reported.add(name)
        self.queue.put(name)

    def _run(self) -> None:
        while (name := self.queue.get()) is not None:
            if self.error is not None:
                continue
            operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(self.directory / name))
            try:
                with hub_errors(self.target.repo_id, f" (uploading {name})", self.token):
                    self.api.preupload_lfs_files(
                        self.target.repo_id, [operation], revision=self.target.revision, token=self.token
                    )
            except ConvertError as e:  # raised to the writer (file_done) or the committer (commit)
                self.error = ConvertError(f"{e}{RETRY_HINT}")
                continue
            except BaseException as e:
                self.error = e
                continue
            self.operations[name] = operation

    def commit(self, names: Iterable[str], message: str) -> str:
        """Upload what was not reported yet, then add ``names`` in one commit; return the commit's URL."""
        names = sorted(set(names))
        for name in names:
            if name not in self.reported:
                self.file_done(name)
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        try:
            with hub_errors(self.target.repo_id, " (commit)", self.token):
                stale = [CommitOperationDelete(n) for n in self._stale_weights(names)]
                info = self.api.create_commit(
                    self.target.repo_id,
                    [*(self.operations[n] for n in names), *stale],
                    commit_message=self.target.commit_message or message,
                    revision=self.target.revision,
                    token=self.token,
                )
        except ConvertError as e:
            raise ConvertError(f"{e}{RETRY_HINT}") from None
        return info.commit_url

    def _stale_weights(self, names: list[str]) -> list[str]:
        """Weight files of an earlier push that this one does not replace: left there, transformers could
        load them instead (it prefers ``model.safetensors`` to an index, for one)."""
        info = self.api.model_info(self.target.repo_id, revision=self.target.revision, token=self.token)
        existing = [s.rfilename for s in info.siblings or []]
        return [n for n in existing if n not in names and n.endswith(WEIGHT_SUFFIXES)]

    def abort(self) -> None:
        """Stop after the upload in progress (its daemon thread ends with the process); nothing is committed."""
        self.error = self.error or RuntimeError("aborted")
        self.queue.put(None)


def push_files(
    target: HubTarget, directory: Path, completed: Iterable[str], message: str, token: str | None = None
) -> str:
    """Push the files named by ``completed`` (relative to ``directory``) as they come; one commit at the end."""
    upload = Upload(target, directory, token)
    try:
        return upload.commit([*_reported(upload, completed)], message)
    except BaseException:
        upload.abort()
        raise


def _reported(upload: Upload, completed: Iterable[str]) -> Iterable[str]:
    for name in completed:
        upload.file_done(name)
        yield name
