"""A small in-memory stand-in for the Hugging Face Hub HTTP API, for tests that run without internet.

The real ``huggingface_hub`` client talks to it through ``HF_ENDPOINT`` (or ``huggingface_hub.constants.ENDPOINT``).
It implements just what ``create_repo``, ``upload_folder`` / ``create_commit``, ``create_branch``, ``ModelCard``,
``hf_hub_download``, ``snapshot_download`` and PEFT's loading code use:

=======  ===============================================  ===============================================
method   path                                             what it does
=======  ===============================================  ===============================================
GET      ``/api/whoami-v2``                               the user owning :attr:`HubServer.token`
POST     ``/api/repos/create``                            create a model repo (records ``visibility``)
POST     ``/api/models/{repo}/preupload/{rev}``           answers ``"regular"``: content goes in the commit
POST     ``/api/models/{repo}/commit/{rev}``              NDJSON commit: ``file``, ``deletedFile``, ``deletedFolder``
POST     ``/api/models/{repo}/branch/{branch}``           create a branch from main (or ``startingPoint``)
GET      ``/api/models/{repo}[/revision/{rev}]``          repo info with ``sha`` and ``siblings``
GET      ``/api/models/{repo}/tree/{rev}[/{path}]``       file listing with git blob ids and sizes
HEAD/GET ``/{repo}/resolve/{rev}/{path}``                 file content, with ``ETag`` and ``X-Repo-Commit``
POST     ``/api/validate-yaml``                           checks that model card metadata is a YAML mapping
=======  ===============================================  ===============================================

Repositories are ``namespace/name``; files are stored in memory, one snapshot per commit. Private repos answer 401
to requests without the server's token, like the Hub. Errors carry ``X-Error-Code`` headers (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``) so that the client raises its usual exceptions. Every request's body is
read before the answer is sent, errors included: otherwise the client sees a reset connection instead of the error.

A commit with ``?create_pr=1`` goes to a new branch ``refs/pr/N`` (started from the target) and answers with a
``pullRequestUrl``, as the Hub does for pull requests. Set :attr:`HubServer.fail_commits` to make every commit answer 500 (after reading the body). Every request is
recorded in :attr:`HubServer.requests` (method, path, parsed JSON body or NDJSON lines); the ``Authorization``
header is recorded only as a flag.

Example:

```py
>>> from huggingface_hub import HfApi
>>> with HubServer() as hub:
...     api = HfApi(endpoint=hub.url, token=hub.token)
...     api.create_repo("user/demo", private=True)
...     api.upload_file(path_or_fileobj=b"hello", path_in_repo="a.txt", repo_id="user/demo")
```
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

USER = "user"
TOKEN = "hf_TestTokenDoNotLeak0123456789abcdef"


def git_blob_sha(content: bytes) -> str:
    """The git object id of a blob, which the Hub uses as ETag and ``oid`` of regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    """A snapshot of every file in a repository after a commit."""

    sha: str
    files: dict[str, bytes]
    message: str
    parent: Optional[str] = None
    description: str = ""


@dataclass
class Repo:
    """A model repository: its visibility, its commits, and branches pointing at commits."""

    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Optional[Commit]:
        """The commit a branch name or full commit id names, or ``None``."""
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)

    def add_commit(self, branch: str, files: dict[str, bytes], message: str, description: str = "") -> Commit:
        parent = self.branches.get(branch)
        digest = hashlib.sha1(f"{self.repo_id}:{branch}:{len(self.commits)}:{message}".encode())
        for path in sorted(files):
            digest.update(path.encode() + git_blob_sha(files[path]).encode())
        commit = Commit(digest.hexdigest(), dict(files), message, parent, description)
        self.commits[commit.sha] = commit
        self.branches[branch] = commit.sha
        return commit


class HubError(Exception):
    """An error answer: HTTP status, message, and the ``X-Error-Code`` the client maps to an exception."""

    def __init__(self, status: int, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    """The in-memory Hub, served over HTTP on ``127.0.0.1`` (a free port) from a background thread.

    Args:
        token (`str`): The one valid write token; its user is ``"user"``.

    Attributes:
        url (`str`): The endpoint, e.g. ``http://127.0.0.1:54321``, for ``HF_ENDPOINT``.
        repos (`dict[str, Repo]`): The repositories, by ``namespace/name``.
        requests (`list[dict]`): Every request received: ``method``, ``path``, ``query``, ``body``, ``authorized``.
        fail_commits (`bool`): If `True`, commits answer 500 and change nothing.
    """

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict[str, Any]] = []
        self.fail_commits = False
        self._lock = threading.Lock()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("The server is not running.")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        """Bind to a free port on 127.0.0.1 and serve from a daemon thread."""
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests
    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """The content of ``path`` at ``revision`` (raises `KeyError` if absent)."""
        commit = self.repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(revision)
        return commit.files[path]

    def requests_to(self, method: str, pattern: str) -> list[dict[str, Any]]:
        """The recorded requests with this method whose path matches the regular expression ``pattern``."""
        return [r for r in self.requests if r["method"] == method and re.search(pattern, r["path"])]

    # ------------------------------------------------------------------ API, called by the handler
    def handle(self, method: str, path: str, query: dict[str, str], body: Any, authorized: bool) -> tuple:
        """Route one request; return ``(status, json_or_bytes, headers)`` or raise `HubError`."""
        with self._lock:
            if path == "/api/whoami-v2" and method == "GET":
                return self._whoami(authorized)
            if path == "/api/repos/create" and method == "POST":
                return self._create_repo(body, authorized)
            if path == "/api/validate-yaml" and method == "POST":
                return self._validate_yaml(body)
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(\w+)(?:/([^/]+))?(/.*)?)?", path)
            if match:
                repo_id, action, revision, rest = match.groups()
                revision = unquote(revision) if revision else None
                repo = self._repo(repo_id, authorized)
                if action is None and method == "GET":
                    return self._info(repo, "main")
                if action == "revision" and method == "GET":
                    return self._info(repo, revision)
                if action == "tree" and method == "GET":
                    return self._tree(repo, revision, unquote(rest or "").strip("/"), query)
                if action == "preupload" and method == "POST":
                    return self._preupload(repo, revision, body)
                if action == "commit" and method == "POST":
                    return self._commit(repo, revision, body, authorized, query.get("create_pr") == "1")
                if action == "branch" and method == "POST":
                    return self._create_branch(repo, revision, body, authorized)
            match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if match and method in ("GET", "HEAD"):
                repo_id, revision, file_path = match.groups()
                return self._resolve(self._repo(repo_id, authorized), unquote(revision), unquote(file_path))
        raise HubError(404, f"{method} {path} is not implemented by the test Hub server.")

    def _repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404 if repo is None else 401, f"Repository {repo_id} not found.", "RepoNotFound")
        return repo

    def _commit_or_error(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _whoami(self, authorized: bool) -> tuple:
        if not authorized:
            raise HubError(401, "Invalid credentials in Authorization header")
        return 200, {"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}}, {}

    def _create_repo(self, body: dict, authorized: bool) -> tuple:
        if not authorized:
            raise HubError(401, "You must be authenticated to create a repository.")
        if body.get("type", "model") != "model":
            raise HubError(400, "The test Hub server only hosts model repositories.")
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
        private = body.get("visibility") == "private" or body.get("private") is True
        repo = self.repos[repo_id] = Repo(repo_id=repo_id, private=private)
        repo.add_commit("main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def _validate_yaml(self, body: dict) -> tuple:
        """Check the metadata block (between ``---`` lines) of a README: a mapping, with ``tags`` a list of str."""
        import yaml

        match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", body.get("content") or "", re.DOTALL)
        errors = []
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            metadata, errors = {}, [f"Invalid YAML: {error}"]
        if not isinstance(metadata, (dict, type(None))):
            errors.append("Model card metadata must be a YAML mapping.")
        elif metadata:
            tags = metadata.get("tags", [])
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                errors.append('"tags" must be a list of strings.')
        if errors:
            return 400, {"error": errors[0], "errors": [{"message": e} for e in errors], "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _info(self, repo: Repo, revision: str) -> tuple:
        commit = self._commit_or_error(repo, revision)
        info = {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": commit.sha,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "tags": [],
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }
        return 200, info, {}

    def _tree(self, repo: Repo, revision: str, folder: str, query: dict[str, str]) -> tuple:
        commit = self._commit_or_error(repo, revision)
        recursive = query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict] = {}
        for path, content in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # folders on the way
                if depth > 1 and not recursive:
                    break
                sub = prefix + "/".join(parts[:depth])
                entries.setdefault(sub, {"type": "directory", "oid": "0" * 40, "size": 0, "path": sub})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": git_blob_sha(content), "size": len(content), "path": path}
        if folder and not entries:
            raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        return 200, list(entries.values()), {}

    def _preupload(self, repo: Repo, revision: str, body: dict) -> tuple:
        commit = repo.resolve(revision)
        files = []
        for entry in body.get("files", []):
            existing = commit.files.get(entry["path"]) if commit else None
            files.append(
                {
                    "path": entry["path"],
                    "uploadMode": "regular",  # content is inlined in the commit: no LFS, no Xet
                    "shouldIgnore": False,
                    "oid": git_blob_sha(existing) if existing is not None else None,
                }
            )
        return 200, {"files": files, "commitOid": commit.sha if commit else None}, {}

    def _commit(self, repo: Repo, revision: str, lines: list[dict], authorized: bool, create_pr: bool) -> tuple:
        if not authorized:
            raise HubError(401, "You must be authenticated to commit.")
        if self.fail_commits:
            raise HubError(500, "Internal Error - the test Hub server was told to fail commits.")
        base = self._commit_or_error(repo, revision)
        files = dict(base.files)
        message, description = "commit", ""
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            if key == "header":
                message, description = value.get("summary") or message, value.get("description") or ""
                parent = value.get("parentCommit")
                if parent and parent != base.sha:
                    raise HubError(412, f"Parent commit {parent} is not the head of {revision}.")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "Only base64-encoded files are supported.")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(folder)}
            else:
                raise HubError(400, f"Unsupported commit operation {key!r} (the test server accepts regular files).")
        branch = revision if revision in repo.branches else None
        if branch is None:
            raise HubError(400, f"Can only commit to a branch, got {revision}.")
        answer = {}
        if create_pr:  # a pull request is a ref `refs/pr/N` starting from the target branch
            number = 1 + sum(name.startswith("refs/pr/") for name in repo.branches)
            branch = f"refs/pr/{number}"
            repo.branches[branch] = base.sha
            answer["pullRequestUrl"] = f"{self.url}/{repo.repo_id}/discussions/{number}"
        commit = repo.add_commit(branch, files, message, description)
        answer.update(commitUrl=f"{self.url}/{repo.repo_id}/commit/{commit.sha}", commitOid=commit.sha)
        return 200, answer, {}

    def _create_branch(self, repo: Repo, branch: str, body: Optional[dict], authorized: bool) -> tuple:
        if not authorized:
            raise HubError(401, "You must be authenticated to create a branch.")
        if branch in repo.branches:
            return 409, {"error": f"Reference refs/heads/{branch} already exists"}, {}
        start = self._commit_or_error(repo, (body or {}).get("startingPoint") or "main")
        repo.branches[branch] = start.sha
        return 200, {}, {}

    def _resolve(self, repo: Repo, revision: str, path: str) -> tuple:
        commit = self._commit_or_error(repo, revision)
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        content = commit.files[path]
        headers = {"ETag": f'"{git_blob_sha(content)}"', "X-Repo-Commit": commit.sha}
        return 200, content, headers


class _Handler(BaseHTTPRequestHandler):
    """Reads the whole request, lets :meth:`HubServer.handle` answer, and writes JSON or bytes back."""

    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        raw = self._read_body()  # always read the body first, even when the answer is an error
        split = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        authorized = self.headers.get("Authorization") == f"Bearer {self.server_hub.token}"
        body: Any = None
        if raw:
            text = raw.decode("utf-8", errors="replace")
            if "/commit/" in split.path:
                body = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                try:
                    body = json.loads(text)
                except json.JSONDecodeError:
                    body = text
        hub = self.server_hub
        hub.requests.append(
            {"method": self.command, "path": split.path, "query": query, "body": body, "authorized": authorized}
        )
        try:
            status, payload, headers = hub.handle(self.command, split.path, query, body, authorized)
        except HubError as error:
            status, payload = error.status, {"error": error.message}
            headers = {"X-Error-Code": error.code, "X-Error-Message": error.message} if error.code else {}
        except Exception as error:  # a bug in the server: report it to the client instead of hanging up
            status, payload, headers = 500, {"error": f"test Hub server error: {error!r}"}, {}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch
