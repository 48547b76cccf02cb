"""The smallest Hugging Face Hub that tests/test_hub.py needs, served on 127.0.0.1.

tests/test_hub.py pushes an adapter with ``push_to_hub`` and loads it back with ``PeftModel.from_pretrained``
through the real ``huggingface_hub`` client, over HTTP. This server answers the requests those round trips make
(found by logging them), and nothing else:

- ``POST /api/repos/create``, and ``POST /api/validate-yaml`` (the model card's metadata check: always valid);
- ``POST /api/models/{repo}/preupload/{rev}``: every file is "regular", so its content comes base64 in the commit
  (no LFS, no Xet); ``POST /api/models/{repo}/commit/{rev}``: the NDJSON ``file`` lines of that commit;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with the headers ``hf_hub_download`` reads (``ETag``,
  ``X-Repo-Commit``, ``Content-Length``); every revision is the latest upload.

Anything else is a 404 naming this file (the client's optional ``/api/agent-harnesses`` lookup takes it quietly).
Every POST needs the token `running_hub` gives the client.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "hf_test_token"
_REPO = r"(?P<repo>[^/]+/[^/]+)"


class Hub(ThreadingHTTPServer):
    """`repos` maps a repository id to its files (path -> content) at its latest upload."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.endpoint = f"http://127.0.0.1:{self.server_port}"
        self.repos: dict[str, dict[str, bytes]] = {}

    def commit_id(self, repo: str) -> str:
        files = self.repos[repo]
        return hashlib.sha1(json.dumps([repo, *sorted((p, _sha1(c)) for p, c in files.items())]).encode()).hexdigest()


def _sha1(content: bytes) -> str:
    return hashlib.sha1(content).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: Hub

    def log_message(self, format, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(401, {"error": "write without the token"})
        if self.path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if self.path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request['organization']}/{request['name']}"
            self.server.repos.setdefault(repo, {})
            return self._send(200, {"url": f"{self.server.endpoint}/{repo}"})
        if re.fullmatch(rf"/api/models/{_REPO}/preupload/[^/]+", self.path):
            files = json.loads(body)["files"]
            return self._send(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if match := re.fullmatch(rf"/api/models/{_REPO}/commit/[^/]+", self.path):
            repo = match["repo"]
            for line in map(json.loads, body.splitlines()):
                if line["key"] == "file":
                    self.server.repos[repo][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            commit = self.server.commit_id(repo)
            url = f"{self.server.endpoint}/{repo}/commit/{commit}"
            return self._send(200, {"commitOid": commit, "commitUrl": url, "pullRequestUrl": None})
        self._not_served()

    def do_GET(self):
        match = re.fullmatch(rf"/{_REPO}/resolve/[^/]+/(?P<path>.+)", self.path)
        content = self.server.repos.get(match["repo"], {}).get(match["path"]) if match else None
        if content is None:
            return self._not_served()
        self._send(200, content, {"ETag": f'"{_sha1(content)}"', "X-Repo-Commit": self.server.commit_id(match["repo"])})

    do_HEAD = do_GET

    def _not_served(self):
        self._send(404, {"error": f"{self.command} {self.path} is not served by tests/hub_server.py"})

    def _send(self, status: int, body, headers: dict | None = None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


@contextlib.contextmanager
def running_hub(monkeypatch, cache_dir):
    """Serve a `Hub` and point this process's `huggingface_hub` client at it (undone by `monkeypatch`).

    ``huggingface_hub.constants`` reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``... once, at import,
    and the module-level ``HfApi`` (behind ``huggingface_hub.file_exists``, which PEFT calls) copies the endpoint
    when it is built: setting those variables now would do nothing, so the constants and that copy are patched.
    ``transformers`` and ``peft`` read ``constants`` at call time. The token is read from the environment at each
    request, so it is set there; the HTTP session is rebuilt so that it bypasses any proxy for 127.0.0.1.
    """
    import huggingface_hub
    from huggingface_hub import constants

    hub = Hub()
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    for name, value in {
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,  # the test suite runs offline
        "HF_HUB_CACHE": str(cache_dir),
        "HF_HUB_DISABLE_XET": True,  # nothing to gain from Xet here, and it would log under the user's HF_HOME
    }.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)  # it would take precedence over HF_TOKEN
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # the lowercase name wins over NO_PROXY
    huggingface_hub.close_session()
    try:
        yield hub
    finally:
        huggingface_hub.close_session()  # no pooled connection to a closed port
        hub.shutdown()
        hub.server_close()
        thread.join()
