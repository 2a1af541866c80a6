"""A small fake Hugging Face Hub on 127.0.0.1 for the weights tests.

It answers the two requests ``hf_hub_download`` makes for a file, HEAD and GET on
``/{org}/{repo}/resolve/{revision}/{filename}``, with the headers huggingface_hub reads:
``X-Repo-Commit`` (the commit the revision points to), ``ETag`` (a git blob sha1 for small
files, the content's sha256 for ``.safetensors`` files, as the Hub does for LFS files),
``Content-Length``, and ``X-Error-Code`` on 404s so the client can tell a missing repo,
revision or file apart. Range requests are honoured, because huggingface_hub resumes a
broken download with one.

Faults can be switched on per file name to test what the client does with bad data:
``"corrupt"`` serves other bytes (with metadata matching those bytes, like a tampered
mirror), ``"cut"`` announces the full length but closes the connection half way, and
``"short"`` announces the full length in HEAD but sends a complete shorter body on GET.
Setting ``outage`` to a status (503) makes every request fail with it.

The server speaks HTTP/1.0, so every connection closes after its response: once
``stop()`` returns nothing answers on the port any more.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")
FAULTS = ("corrupt", "cut", "short")


def git_blob_sha1(data: bytes) -> str:
    # The Hub's ETag for a file kept in git (not LFS) is its git blob id.
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(filename: str) -> bool:
    return filename.endswith(".safetensors")


@dataclass
class FakeRepo:
    """Commits (id -> {filename: bytes}) and refs (branch or tag -> commit id)."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def commit(self, files: dict[str, bytes], *, branch: str | None = "main") -> str:
        """Record a commit of ``files``; move ``branch`` to it; return its 40-hex id."""
        digest = hashlib.sha1()
        digest.update(str(len(self.commits)).encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name])
        commit_id = digest.hexdigest()
        self.commits[commit_id] = dict(files)
        if branch is not None:
            self.refs[branch] = commit_id
        return commit_id

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


class FakeHub:
    """A threaded HTTP server that serves ``repos`` the way the Hub serves files."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.faults: dict[str, str] = {}
        self.outage: int | None = None  # an HTTP status to answer every request with
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def repo(self, repo_id: str) -> FakeRepo:
        return self.repos.setdefault(repo_id, FakeRepo())

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def requested(self, method: str | None = None) -> list[str]:
        with self._lock:
            return [path for m, path in self.requests if method in (None, m)]

    def _log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                hub._log("HEAD", self.path)
                self._answer(send_body=False)

            def do_GET(self) -> None:
                hub._log("GET", self.path)
                self._answer(send_body=True)

            def log_message(self, format: str, *args) -> None:
                pass  # keep pytest output clean

            def _answer(self, *, send_body: bool) -> None:
                if hub.outage is not None:
                    return self._error(hub.outage, "", commit=None)
                match = RESOLVE.match(self.path)
                if match is None:
                    return self._error(404, "EntryNotFound", commit=None)
                repo = hub.repos.get(match["repo"])
                if repo is None:
                    return self._error(404, "RepoNotFound", commit=None)
                commit = repo.resolve(unquote(match["revision"]))
                if commit is None:
                    return self._error(404, "RevisionNotFound", commit=None)
                filename = unquote(match["filename"])
                files = repo.commits[commit]
                if filename not in files:
                    return self._error(404, "EntryNotFound", commit=commit)
                self._send_file(commit, filename, files[filename], send_body=send_body)

            def _send_file(self, commit: str, filename: str, data: bytes, *, send_body: bool) -> None:
                fault = hub.faults.get(filename)
                if fault == "corrupt":
                    data = bytes(b ^ 0xFF for b in data)
                etag = hashlib.sha256(data).hexdigest() if is_lfs(filename) else git_blob_sha1(data)
                # What the server actually has: all of it, or the first half for "cut"/"short".
                available = data[: len(data) // 2] if fault in ("cut", "short") else data
                start = self._range_start()
                if start is not None and start >= len(available):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206 if start is not None else 200
                start = start or 0
                announced = len(data) - start
                if fault == "short" and send_body:
                    announced = len(available) - start  # a complete, but too short, response
                self.send_response(status)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(announced))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if send_body:
                    self.wfile.write(available[start:])
                    self.wfile.flush()

            def _range_start(self) -> int | None:
                header = self.headers.get("Range")
                if not header:
                    return None
                found = re.fullmatch(r"bytes=(\d+)-", header.strip())
                return int(found.group(1)) if found else None

            def _error(self, status: int, code: str, *, commit: str | None) -> None:
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                if commit is not None:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler
