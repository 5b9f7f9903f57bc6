"""A small Hugging Face Hub look-alike on 127.0.0.1, for tests with the real ``huggingface_hub`` client.

It serves only what the client calls to read a model repo (model info, HEAD/GET
``/resolve`` with ranges) and to push one (create repo and branch, ``preupload``,
the LFS batch API and its PUTs, ``commit``, ``validate-yaml``), with the request
and response shapes of huggingface_hub's own code (``file_download.py``,
``hf_api.py``, ``_commit_api.py``, ``lfs.py``). Errors carry the ``X-Error-Code``
/ ``X-Error-Message`` headers that its ``hf_raise_for_status`` reads. It never
advertises Xet, and tests turn the client's Xet uploads off (HF_HUB_DISABLE_XET),
so the client uses plain HTTP downloads and LFS uploads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
INVALID_TOKEN = "Invalid credentials in Authorization header"


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit id
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit id -> files
    messages: dict[str, str] = field(default_factory=dict)  # commit id -> summary


class HubError(Exception):
    def __init__(self, status: int, code: str | None = None, message: str = "", commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class FakeHub:
    """The Hub's state (repos, LFS objects, valid tokens) plus a request log and an injectable outage."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.tokens = tokens or {}  # token -> user name
        self.log: list[tuple[str, str, str]] = []  # (method, path, range header) of every request
        self.uploads_before_outage: int | None = None  # LFS PUTs that succeed before every later one is cut
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- state -----------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], gated: bool = False, private: bool = False) -> str:
        """Create a repo holding ``files`` at one commit on ``main``; return the commit id."""
        with self.lock:
            self.repos[repo_id] = Repo(private=private, gated=gated)
            return self._commit(repo_id, "main", {".gitattributes": b"*.safetensors filter=lfs\n", **files})

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.branches[revision]])

    def requests(self, method: str, pattern: str, ranged: bool | None = None) -> list[str]:
        """Paths of the logged requests of ``method`` matching ``pattern`` (only ranged or unranged ones if set)."""
        return [
            path
            for m, path, range_ in list(self.log)
            if m == method and re.search(pattern, path) and (ranged is None or ranged == bool(range_))
        ]

    def _commit(self, repo_id: str, branch: str, files: dict[str, bytes], message: str = "initial commit") -> str:
        repo = self.repos[repo_id]
        parent = repo.branches.get(branch, "")
        digest = hashlib.sha1(parent.encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        commit = digest.hexdigest()
        repo.commits[commit], repo.branches[branch], repo.messages[commit] = files, commit, message
        return commit

    def _resolve(self, repo_id: str, revision: str, user: str | None, reading: bool = True) -> tuple[Repo, str]:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise HubError(404, "RepoNotFound", "Repository not found")
        commit = repo.branches.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, commit


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    routes = [
        ("GET", rf"/api/models/{REPO}(/revision/(?P<rev>[^/]+))?", "model_info"),
        ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", "resolve"),
        ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", "resolve"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
    ]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            self.dispatch("GET")

        def do_HEAD(self) -> None:
            self.dispatch("HEAD")

        def do_POST(self) -> None:
            self.dispatch("POST")

        def do_PUT(self) -> None:
            self.dispatch("PUT")

        def dispatch(self, method: str) -> None:
            path = urlparse(self.path).path
            hub.log.append((method, path, self.headers.get("range", "")))
            for m, pattern, name in routes:
                match = re.fullmatch(pattern, path)
                if m == method and match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    try:
                        user = self.user()
                        with hub.lock:
                            getattr(self, name)(user=user, **args)
                    except HubError as e:
                        self.error(e)
                    return
            self.error(HubError(404, None, f"no route for {method} {path}"))

        # --- plumbing ------------------------------------------------------------------------------
        def user(self) -> str | None:
            header = self.headers.get("authorization")
            if not header:
                return None
            token = header.removeprefix("Bearer ").strip()
            if token not in hub.tokens:
                raise HubError(401, None, INVALID_TOKEN)
            return hub.tokens[token]

        def body(self) -> bytes:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                data = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    data += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return data
            return self.rfile.read(int(self.headers.get("content-length", 0)))

        def send(self, status: int, data: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def json(self, obj: object, status: int = 200) -> None:
            self.send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def error(self, e: HubError) -> None:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self.send(e.status, json.dumps({"error": e.message}).encode(), headers)

        def need_writer(self, user: str | None) -> None:
            if user is None:
                raise HubError(401, None, "You must be authenticated to write")

        # --- reading ---------------------------------------------------------------------------------
        def model_info(self, repo: str, user: str | None, rev: str = "main") -> None:
            info, commit = hub._resolve(repo, rev, user)
            files = info.commits[commit]
            siblings = [
                {"rfilename": n, "size": len(d), "blobId": hashlib.sha1(d).hexdigest()} for n, d in files.items()
            ]
            self.json(
                {
                    "id": repo,
                    "sha": commit,
                    "private": info.private,
                    "gated": "auto" if info.gated else False,
                    "siblings": siblings,
                }
            )

        def resolve(self, repo: str, rev: str, file: str, user: str | None) -> None:
            info, commit = hub._resolve(repo, rev, user)
            if info.gated and user is None:
                raise HubError(401, "GatedRepo", f"Access to model {repo} is restricted.")
            data = info.commits[commit].get(file)
            if data is None:
                raise HubError(404, "EntryNotFound", f"{file} does not exist", commit)
            headers = {
                "X-Repo-Commit": commit,
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "Accept-Ranges": "bytes",
            }
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("range", ""))
            if ranged and self.command == "GET":
                first = int(ranged[1])
                last = min(int(ranged[2]) if ranged[2] else len(data) - 1, len(data) - 1)
                headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
                self.send(206, data[first : last + 1], headers)
            else:
                self.send(200, data, headers)

        # --- writing ---------------------------------------------------------------------------------
        def create_repo(self, user: str | None) -> None:
            self.need_writer(user)
            payload = json.loads(self.body())
            repo_id = f"{payload.get('organization') or user}/{payload['name']}"
            if repo_id in hub.repos:  # huggingface_hub reads the url from this answer too
                self.send(
                    409,
                    json.dumps(
                        {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                    ).encode(),
                )
                return
            private = payload.get("private") or payload.get("visibility") == "private"
            hub.repos[repo_id] = Repo(private=bool(private))
            hub._commit(repo_id, "main", {".gitattributes": b"*.safetensors filter=lfs\n"})
            self.json({"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def create_branch(self, repo: str, branch: str, user: str | None) -> None:
            self.need_writer(user)
            self.body()
            info, commit = hub._resolve(repo, "main", user)
            if branch in info.branches:
                raise HubError(409, None, "Reference already exists")
            info.branches[branch] = commit
            self.json({})

        def preupload(self, repo: str, rev: str, user: str | None) -> None:
            self.need_writer(user)
            hub._resolve(repo, rev, user)
            files = json.loads(self.body())["files"]
            self.json(
                {
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                            "shouldIgnore": False,
                        }
                        for f in files
                    ]
                }
            )

        def lfs_batch(self, repo: str, user: str | None) -> None:
            self.need_writer(user)
            payload = json.loads(self.body())
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in hub.lfs:  # content the Hub holds already needs no upload
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            self.send(
                200,
                json.dumps({"transfer": "basic", "objects": objects}).encode(),
                {"Content-Type": "application/vnd.git-lfs+json"},
            )

        def lfs_put(self, oid: str, user: str | None) -> None:
            done = len(hub.requests("PUT", "/lfs-upload/")) - 1
            if hub.uploads_before_outage is not None and done >= hub.uploads_before_outage:
                # The network goes down in the middle of this upload: half the body arrives, then nothing.
                self.rfile.read(max(1, int(self.headers.get("content-length", 2)) // 2))
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            data = self.body()
            if hashlib.sha256(data).hexdigest() != oid:
                raise HubError(400, None, "sha256 mismatch")
            hub.lfs[oid] = data
            self.send(200)

        def commit(self, repo: str, rev: str, user: str | None) -> None:
            self.need_writer(user)
            info, commit = hub._resolve(repo, rev, user)
            files, summary = dict(info.commits[commit]), ""
            for line in self.body().splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    summary = value["summary"]
                elif item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        raise HubError(422, None, f"LFS pointer {value['path']} points to a missing object")
                    files[value["path"]] = hub.lfs[value["oid"]]
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
            new = hub._commit(repo, rev, files, summary)
            self.json({"commitUrl": f"{hub.url}/{repo}/commit/{new}", "commitOid": new, "success": True})

        def validate_yaml(self, user: str | None) -> None:
            self.body()
            self.json({"errors": [], "warnings": []})

    return Handler
