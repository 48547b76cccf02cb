"""A small local Hugging Face Hub for offline tests.

The real ``huggingface_hub`` client (and everything built on it: ``transformers``' ``push_to_hub``,
``PeftModel.from_pretrained``, ``ModelCard.load``) talks to an HTTP server started on ``127.0.0.1`` in the
test process. Repositories live in a temporary directory and vanish when the server stops.

Usage::

    from huggingface_hub import HfApi, hf_hub_download
    from tests.hub_emulator import running_hub

    with running_hub() as hub:                      # server up, client pointed at it
        api = HfApi()                                # create clients *inside* the block
        api.create_repo("user/tiny", exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id="user/tiny")
        path = hf_hub_download("user/tiny", "config.json")   # lands in hub.cache_dir
        assert hub.read("user/tiny", "config.json") == open(path, "rb").read()
        assert [c.title for c in hub.commits("user/tiny")] == ["initial commit", "Upload folder using huggingface_hub"]
    # server stopped, client settings restored

What is served (enough for create/upload/download round trips):

- ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``GET /api/whoami-v2``, ``POST /api/validate-yaml``;
- ``POST /api/{type}s/{id}/preupload/{rev}``: every file is answered ``"regular"``, so contents travel base64 inside
  the NDJSON commit (no LFS, no Xet); ``POST /api/{type}s/{id}/commit/{rev}`` (``file``, ``deletedFile``,
  ``deletedFolder`` lines; ``lfsFile`` lines and pull requests are refused with a 400);
- ``GET /api/{type}s/{id}[/revision/{rev}]`` (``model_info``, ``repo_info``, ``repo_exists``, with ``siblings``,
  ``sha``, ``cardData`` and ``tags`` read from the README front matter);
- ``GET /api/{type}s/{id}/tree/{rev}[/{path}]`` (``list_repo_files``, ``list_repo_tree``);
- ``HEAD``/``GET`` on ``/{prefix}{id}/resolve/{rev}/{path}`` with the headers ``hf_hub_download`` checks (``ETag`` = git
  blob sha1, ``X-Repo-Commit``, ``Content-Length``, ``Accept-Ranges``; ``Range`` is honoured). No ``X-Xet-*`` header is
  ever sent, so the client downloads over plain HTTP.

Errors carry the ``X-Error-Code`` header the client maps to its exceptions: ``RepoNotFound`` ->
``RepositoryNotFoundError``, ``EntryNotFound`` -> ``RemoteEntryNotFoundError``, ``RevisionNotFound`` ->
``RevisionNotFoundError``. Revisions are ``main`` and full commit ids. Write requests need ``Authorization: Bearer
<hub.token>`` (the token put in ``HF_TOKEN``); reads of public repos do not.

How the client is pointed at the server, and why it is done this way: ``huggingface_hub.constants`` reads
``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``... once, at import, and some values are copied further at import
(``huggingface_hub.hf_api.api``, the ``HfApi`` behind the module-level ``file_exists``/``model_info``/...;
``transformers.utils.hub._hf_api``, the ``HfApi`` behind ``push_to_hub``). Setting environment variables inside an
already-running test process therefore does nothing by itself. ``running_hub`` does both, and undoes both on exit:

1. it sets the environment (``hub.env``: ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``, ``HF_HUB_CACHE``,
   ``HF_HUB_OFFLINE=0``, ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_DISABLE_TELEMETRY=1``, ``NO_PROXY`` += ``127.0.0.1``, and
   removes ``HUGGING_FACE_HUB_TOKEN``/``HF_OIDC_RESOURCE``), so a *subprocess* started inside the block imports a
   client already pointed at the server; the token read at call time (``HF_TOKEN``) also takes effect in-process;
2. it patches the import-time copies in this process: the ``huggingface_hub.constants`` values above (including
   ``HUGGINGFACE_CO_URL_TEMPLATE``, the URL ``hf_hub_url`` formats, and the token/agent files under ``HF_HOME``), the
   endpoint of the module-level ``HfApi``, and resets ``transformers``' shared ``HfApi`` when ``transformers`` is
   loaded; it closes the client's shared HTTP session on entry and exit so no pooled connection or proxy setting
   outlives the block.

Limits: an ``HfApi`` created *before* the block keeps its old endpoint (create clients inside the block, or pass
``endpoint=hub.endpoint``); a module that copied an endpoint at import with ``from huggingface_hub.constants import
ENDPOINT`` is not patched (``transformers`` and ``peft`` read ``constants`` at call time). The test suite sets
``HF_HUB_OFFLINE=1``; the block turns it off and restores it. The client settings are process-global, so one
``running_hub`` at a time per process (a second one raises).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

HOST = "127.0.0.1"
DEFAULT_TOKEN = "hf_emulator_write_token"
DEFAULT_USER = "emulator-user"
REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}
# What a fresh repository on the Hub starts with: one commit holding a `.gitattributes`.
_GITATTRIBUTES = b"".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n".encode() for ext in ("bin", "pt", "pth", "safetensors", "gguf")
)


def git_blob_sha1(content: bytes) -> str:
    """The id git gives a blob: what the Hub sends as ETag for a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _front_matter(readme: bytes) -> dict | None:
    """YAML metadata at the top of a README, None when there is none; raises yaml.YAMLError when it is malformed."""
    text = readme.decode("utf-8", errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if match is None:
        return None
    data = yaml.safe_load(match.group(1))
    if data is not None and not isinstance(data, dict):
        raise yaml.YAMLError("metadata must be a mapping")
    return data


@dataclass(frozen=True)
class Commit:
    """One commit of an emulated repository: `files` maps every path in the tree after it to its blob sha1."""

    oid: str
    title: str
    description: str
    parent: str | None
    files: dict[str, str]
    added: tuple[str, ...]
    deleted: tuple[str, ...]
    created_at: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    status: int
    authorization: str | None


class HubError(Exception):
    """An error answered as the Hub does: status, X-Error-Code / X-Error-Message headers, JSON body."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubStore:
    """Repositories, their commits and blobs. Blobs live on disk under `root`, keyed by their git sha1."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()

    # -- blobs -------------------------------------------------------------------------------------------------------
    def put_blob(self, content: bytes) -> str:
        oid = git_blob_sha1(content)
        path = self.root / "blobs" / oid
        if not path.exists():
            path.write_bytes(content)
        return oid

    def blob(self, oid: str) -> bytes:
        return (self.root / "blobs" / oid).read_bytes()

    # -- repositories ------------------------------------------------------------------------------------------------
    def get(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_type}/{repo_id} not found", "RepoNotFound")
        return repo

    def create(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}")
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
            self.repos[(repo_type, repo_id)] = repo
            self.commit(repo, "initial commit", "", {".gitattributes": _GITATTRIBUTES}, [])
            return repo

    def delete(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            self.get(repo_type, repo_id)
            del self.repos[(repo_type, repo_id)]

    def resolve(self, repo: Repo, revision: str) -> Commit:
        if revision == "main":
            return repo.head
        if re.fullmatch(r"[0-9a-f]{40}", revision):
            for commit in repo.commits:
                if commit.oid == revision:
                    return commit
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit(
        self,
        repo: Repo,
        title: str,
        description: str,
        additions: dict[str, bytes],
        deletions: list[tuple[str, bool]],
        parent_commit: str | None = None,
    ) -> Commit:
        """Apply deletions (path, is_folder) then additions on top of `main`; returns the new commit."""
        with self.lock:
            parent = repo.commits[-1] if repo.commits else None
            if parent_commit is not None and (parent is None or not parent.oid.startswith(parent_commit)):
                raise HubError(412, f"Parent commit {parent_commit} is not the head of main")
            files = dict(parent.files) if parent else {}
            deleted = []
            for path, is_folder in deletions:
                prefix = path.rstrip("/") + "/"
                matched = [p for p in files if p.startswith(prefix)] if is_folder else [p for p in files if p == path]
                if not matched:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in matched:
                    del files[p]
                deleted.extend(matched)
            for path, content in additions.items():
                files[path] = self.put_blob(content)
            # Deterministic id: same parent, message and tree give the same commit.
            digest = hashlib.sha1(
                json.dumps([parent.oid if parent else None, title, description, sorted(files.items())]).encode()
            )
            commit = Commit(
                oid=digest.hexdigest(),
                title=title,
                description=description,
                parent=parent.oid if parent else None,
                files=files,
                added=tuple(additions),
                deleted=tuple(deleted),
                created_at=_now(),
            )
            repo.commits.append(commit)
            return commit


class HubEmulator:
    """The server and what tests inspect: `endpoint`, `token`, `user`, `cache_dir`, `env`, `requests`, `commits()`."""

    def __init__(self, root: Path, token: str = DEFAULT_TOKEN, user: str = DEFAULT_USER):
        self.root = root
        self.token = token
        self.user = user
        self.store = HubStore(root / "server")
        self.cache_dir = root / "client" / "hub"
        self.home_dir = root / "client"
        self.requests: list[RecordedRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def start(self) -> HubEmulator:
        handler = type("BoundHandler", (_Handler,), {"hub": self})
        server = ThreadingHTTPServer((HOST, 0), handler)
        # Join every request thread on close, so nothing outlives `stop()`.
        server.daemon_threads = False
        server.block_on_close = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("The hub emulator is not running: use `with running_hub() as hub:`.")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point a freshly started client process at this server."""
        no_proxy = [h for h in os.environ.get("NO_PROXY", os.environ.get("no_proxy", "")).split(",") if h]
        no_proxy = ",".join(dict.fromkeys([*no_proxy, HOST, "localhost"]))
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_TOKEN": self.token,
            "HF_HOME": str(self.home_dir),
            "HF_HUB_CACHE": str(self.cache_dir),
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }

    # -- inspection --------------------------------------------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self.store.lock:
            return self.store.get(repo_type, repo_id)

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """Every commit of `main`, oldest first (the first one is the repository's creation)."""
        return list(self.repo(repo_id, repo_type).commits)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        with self.store.lock:
            return sorted(self.store.resolve(self.repo(repo_id, repo_type), revision).files)

    def read(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        with self.store.lock:
            commit = self.store.resolve(self.repo(repo_id, repo_type), revision)
            return self.store.blob(commit.files[path])

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"


# ---------------------------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------------------------
_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_API_REPO = rf"/api/(?P<api_type>models|datasets|spaces)/{_REPO}"
_ROUTES: list[tuple[str, re.Pattern, str]] = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("DELETE", re.compile(r"/api/repos/delete"), "delete_repo"),
    ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"{_API_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"{_API_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("GET", re.compile(rf"{_API_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"), "tree"),
    ("GET", re.compile(rf"{_API_REPO}(?:/revision/(?P<rev>[^/]+))?"), "repo_info"),
    ("HEAD", re.compile(rf"/(?:(?P<prefix>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
    ("GET", re.compile(rf"/(?:(?P<prefix>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
    # Ids without a namespace (e.g. "gpt2") are never created here: answer them as missing repos, as the Hub does.
    ("*", re.compile(r"/api/(?:models|datasets|spaces)/[^/]+(?:/.*)?"), "missing_repo"),
    ("*", re.compile(r"/(?:(?:datasets|spaces)/)?[^/]+/resolve/.+"), "missing_repo"),
]


class _Handler(BaseHTTPRequestHandler):
    hub: HubEmulator  # set on the subclass built by `HubEmulator.start`
    protocol_version = "HTTP/1.1"
    timeout = 30  # a silent client cannot hold a request thread (and `stop()`) forever
    server_version = "HubEmulator"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is `hub.requests`

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing ----------------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            body = self._read_body()
            for route_method, pattern, name in _ROUTES:
                match = pattern.fullmatch(url.path)
                if route_method in (method, "*") and match:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    getattr(self, f"_{name}")(body=body, **params)
                    break
            else:
                # e.g. the client's optional `/api/agent-harnesses` lookup: a plain 404 makes it fall back quietly.
                raise HubError(404, f"{method} {url.path} is not served by the hub emulator")
        except HubError as error:
            self._send_json(error.status, {"error": error.message}, error.code, error.message, error.headers)
        except Exception as error:  # a bug here must reach the test as a 500, not hang the client
            self._send_json(500, {"error": f"{type(error).__name__}: {error}"})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        # Logged before answering, so a test sees the request as soon as the client has its response.
        self.hub.requests.append(
            RecordedRequest(self.command, unquote(urlsplit(self.path).path), status, self.headers.get("Authorization"))
        )
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")  # one request per connection: no thread waits on an idle socket
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(
        self,
        status: int,
        payload: Any,
        error_code: str | None = None,
        error_message: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        headers = {"Content-Type": "application/json; charset=utf-8", **(extra or {})}
        if error_code:
            headers["X-Error-Code"] = error_code
        if error_message:
            headers["X-Error-Message"] = error_message.encode("ascii", "replace").decode()
        self._send(status, json.dumps(payload).encode(), headers)

    def _json(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from error

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _require_write_token(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, api_type: str, repo_id: str) -> Repo:
        repo = self.hub.store.get(_API_TYPE[api_type], repo_id)
        if repo.private and not self._authorized():
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    # -- routes ------------------------------------------------------------------------------------------------------
    def _missing_repo(self, body: bytes) -> None:
        raise HubError(404, f"Repository not found: {self.path}", "RepoNotFound")

    def _create_repo(self, body: bytes) -> None:
        self._require_write_token()
        payload = self._json(body)
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        private = payload.get("private", payload.get("visibility") == "private") or False
        url = self.hub.repo_url(repo_type, repo_id)
        try:
            self.hub.store.create(repo_type, repo_id, bool(private))
        except HubError as error:
            self._send_json(error.status, {"error": error.message, "url": url}, error_message=error.message)
            return
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, body: bytes) -> None:
        self._require_write_token()
        payload = self._json(body)
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        self.hub.store.delete(payload.get("type") or "model", repo_id)
        self._send_json(200, {})

    def _whoami(self, body: bytes) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")
        user = self.hub.user
        self._send_json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "emulator", "role": "write"}},
            },
        )

    def _validate_yaml(self, body: bytes) -> None:
        content = self._json(body).get("content", "")
        try:
            _front_matter(content.encode())
        except yaml.YAMLError as error:
            self._send_json(400, {"errors": [{"message": f"Invalid YAML metadata: {error}"}], "warnings": []})
            return
        self._send_json(200, {"errors": [], "warnings": []})

    def _preupload(self, body: bytes, api_type: str, repo_id: str, rev: str) -> None:
        self._require_write_token()
        if self.query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by the hub emulator")
        with self.hub.store.lock:
            head = self.hub.store.resolve(self._repo(api_type, repo_id), rev)
        files = [
            # "regular": contents come inline with the commit. `oid` lets the client skip files that did not change.
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": head.files.get(f["path"])}
            for f in self._json(body).get("files", [])
        ]
        self._send_json(200, {"files": files, "commitOid": head.oid})

    def _commit(self, body: bytes, api_type: str, repo_id: str, rev: str) -> None:
        self._require_write_token()
        if self.query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by the hub emulator")
        if rev != "main":
            raise HubError(404, f"Only the main branch is served by the hub emulator, not {rev}", "RevisionNotFound")
        header: dict = {}
        additions: dict[str, bytes] = {}
        deletions: list[tuple[str, bool]] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = self._json(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding: {value.get('encoding')}")
                additions[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append((value["path"], key == "deletedFolder"))
            elif key == "lfsFile":
                raise HubError(400, "LFS uploads are not supported by the hub emulator (preupload answers 'regular')")
            else:
                raise HubError(400, f"Unknown commit operation: {key}")
        if not header.get("summary"):
            raise HubError(400, "Commit summary is required")
        with self.hub.store.lock:
            repo = self._repo(api_type, repo_id)
            commit = self.hub.store.commit(
                repo, header["summary"], header.get("description", ""), additions, deletions, header.get("parentCommit")
            )
        url = f"{self.hub.repo_url(repo.repo_type, repo_id)}/commit/{commit.oid}"
        self._send_json(200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    def _repo_info(self, body: bytes, api_type: str, repo_id: str, rev: str = "main") -> None:
        with self.hub.store.lock:
            repo = self._repo(api_type, repo_id)
            commit = self.hub.store.resolve(repo, rev)
            files = {path: self.hub.store.blob(oid) for path, oid in commit.files.items()}
        try:
            card = _front_matter(files["README.md"]) if "README.md" in files else None
        except yaml.YAMLError:
            card = None
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = [
            {"rfilename": path, **({"size": len(files[path]), "blobId": commit.files[path]} if with_blobs else {})}
            for path in sorted(files)
        ]
        info = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.created_at,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": list((card or {}).get("tags") or []),
            "siblings": siblings,
        }
        if card is not None:
            info["cardData"] = card
        if repo.repo_type == "model" and card and card.get("library_name"):
            info["library_name"] = card["library_name"]
        if repo.repo_type == "space":
            info["sdk"] = (card or {}).get("sdk")
        self._send_json(200, info)

    def _tree(self, body: bytes, api_type: str, repo_id: str, rev: str, path: str = "") -> None:
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        with self.hub.store.lock:
            commit = self.hub.store.resolve(self._repo(api_type, repo_id), rev)
            sizes = {p: len(self.hub.store.blob(oid)) for p, oid in commit.files.items()}
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        entries: dict[str, dict] = {}
        for file_path, oid in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            # Folders on the way to the file (all of them when recursive, the first level otherwise).
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "oid": git_blob_sha1(folder.encode()), "path": folder})
            if recursive or len(parts) == 1:
                entries[file_path] = {"type": "file", "oid": oid, "size": sizes[file_path], "path": file_path}
        self._send_json(200, [entries[key] for key in sorted(entries)])

    def _resolve(self, body: bytes, repo_id: str, rev: str, path: str, prefix: str = "") -> None:
        api_type = {"": "models", "datasets": "datasets", "spaces": "spaces"}[prefix]
        with self.hub.store.lock:
            commit = self.hub.store.resolve(self._repo(api_type, repo_id), rev)
            oid = commit.files.get(path)
            if oid is None:
                raise HubError(
                    404, f"{path} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": commit.oid}
                )
            content = self.hub.store.blob(oid)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{oid}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        status = 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and int(match.group(1)) < len(content):
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else len(content) - 1, len(content) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], 206
        self._send(status, content, headers)


# ---------------------------------------------------------------------------------------------------------------------
# Pointing the client at the server
# ---------------------------------------------------------------------------------------------------------------------
_UNSET = object()


@contextlib.contextmanager
def _patched(target: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(target, name, _UNSET)
    setattr(target, name, value)
    try:
        yield
    finally:
        if old is _UNSET:
            delattr(target, name)
        else:
            setattr(target, name, old)


@contextlib.contextmanager
def _patched_environ(values: dict[str, str], removed: tuple[str, ...]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in (*values, *removed)}
    os.environ.update(values)
    for key in removed:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def client_pointed_at(hub: HubEmulator) -> Iterator[None]:
    """Point the `huggingface_hub` client of this process (and of subprocesses started meanwhile) at `hub`."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _cache_manager

    endpoint = hub.endpoint
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched_environ(hub.env, ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_TOKEN_PATH")))
        for name, value in {
            "ENDPOINT": endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_URL_HOSTS": constants.HF_URL_HOSTS | {HOST},
            "HF_HOME": str(hub.home_dir),
            "HF_HUB_CACHE": str(hub.cache_dir),
            "HUGGINGFACE_HUB_CACHE": str(hub.cache_dir),
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_DISABLE_TELEMETRY": True,
            # No token file of the user is read (HF_TOKEN wins anyway) and nothing is written to the user's home.
            "HF_TOKEN_PATH": str(hub.home_dir / "token"),
            "HF_STORED_TOKENS_PATH": str(hub.home_dir / "stored_tokens"),
            "AGENT_HARNESSES_PATH": str(hub.home_dir / ".agent_harnesses.json"),
        }.items():
            stack.enter_context(_patched(constants, name, value))
        stack.enter_context(_patched(_cache_manager, "HF_HUB_CACHE", str(hub.cache_dir)))
        # The HfApi behind `huggingface_hub.file_exists`, `model_info`, ... (built at import with the old endpoint).
        stack.enter_context(_patched(huggingface_hub.hf_api.api, "endpoint", endpoint))
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            stack.enter_context(_patched(transformers_hub, "_hf_api", None))  # rebuilt lazily with the new endpoint
        # A fresh HTTP session now (built under NO_PROXY) and again on exit (no pooled connection to a dead port).
        huggingface_hub.close_session()
        stack.callback(huggingface_hub.close_session)
        yield


_ACTIVE = threading.Lock()


@contextlib.contextmanager
def running_hub(token: str = DEFAULT_TOKEN, user: str = DEFAULT_USER) -> Iterator[HubEmulator]:
    """Start a hub emulator on 127.0.0.1 (free port), point the client at it, and undo both on exit."""
    if not _ACTIVE.acquire(blocking=False):
        raise RuntimeError("A hub emulator is already running in this process: the client can point at only one.")
    root = Path(tempfile.mkdtemp(prefix="hub-emulator-"))
    hub = HubEmulator(root, token=token, user=user)
    try:
        hub.start()
        with client_pointed_at(hub):
            yield hub
    finally:
        hub.stop()
        shutil.rmtree(root, ignore_errors=True)
        _ACTIVE.release()
