"""A small in-memory, Hub-compatible HTTP server for tests (standard library only).

The real ``huggingface_hub`` client (2.x) talks to it when ``HF_ENDPOINT`` is ``server.url`` and
``HF_HUB_DISABLE_XET=1``; the ``hub_server`` fixture (``tests/conftest_hub.py``) sets that up.

Routes (``{type}``: models|datasets|spaces; ``{repo}``: namespace/name; revisions and paths are
URL-decoded, so ``refs%2Fpr%2F1`` is ``refs/pr/1``)::

    GET      /api/whoami-v2
    POST     /api/repos/create                            {name, organization, visibility, type}
    POST     /api/validate-yaml                           {content, repoType}
    GET      /api/{type}/{repo}[/revision/{rev}]          info + siblings (?blobs=1: size, lfs)
    GET      /api/{type}/{repo}/tree/{rev}[/{path}]       ?recursive=1
    POST     /api/{type}/{repo}/paths-info/{rev}          form: paths=... (copies, HfFileSystem)
    GET      /api/{type}/{repo}/refs                      ?include_prs=1
    POST     /api/{type}/{repo}/branch/{branch}           {startingPoint}
    POST     /api/{type}/{repo}/preupload/{rev}           uploadMode lfs|regular, remote oid
    POST     /api/{type}/{repo}/commit/{rev}              NDJSON header/file/lfsFile/deletedFile/
                                                          deletedFolder; ?create_pr=1 -> refs/pr/N
    POST     /[{type}/]{repo}.git/info/lfs/objects/batch  LFS batch API, "basic" transfer
    PUT      /lfs-upload/{oid}?size=..&sig=..             signed upload URL (no auth header)
    POST     /lfs-verify/{oid}
    GET|HEAD /[{type}/]{repo}/resolve/{rev}/{path}        bytes (no Range), X-Repo-Commit, ETag,
                                                          X-Linked-Etag/X-Linked-Size for LFS

State: ``server.repos[repo_id]`` is a ``Repo`` (``.private``, ``.branches[name]`` -> commits, PR
refs included as ``"refs/pr/N"``); a ``Commit`` is a full snapshot (``.files`` path -> bytes, ``.lfs``,
``.message``, ``.oid``, ``.pr_num``) published only once complete.  New repos start with a
``.gitattributes`` commit, as on the Hub; a file is LFS if it matches a ``filter=lfs`` pattern there,
has >= ``server.lfs_threshold`` bytes (10 MiB) or a NUL in its sample.  ``server.log`` holds
``LoggedRequest(method, path, status)``, never header values.  Auth: ``server.tokens`` maps token ->
user; a wrong token is a 401, so is a missing one if ``server.require_token``; writes with a token
of ``server.read_only_tokens`` or on a repo of ``server.write_forbidden`` are a 403.  Faults:
``HubServer.fail_next``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
import secrets
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

TEST_TOKEN = "hf_fakehub_write_token_0123456789"
TEST_USER = "tester"
LFS_THRESHOLD = 10 * 1024 * 1024
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.gguf")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
_PLURAL = {"model": "models", "dataset": "datasets", "space": "spaces"}
_ACTIONS = "revision|tree|paths-info|refs|branch|preupload|commit"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API = re.compile(
    rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}(?:/(?P<action>{_ACTIONS})(?:/|$)|$)"
)
_PREFIX = rf"^/(?:(?P<type>datasets|spaces)/)?{_REPO}"
_RESOLVE = re.compile(_PREFIX + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_LFS_BATCH = re.compile(_PREFIX + r"\.git/info/lfs/objects/batch$")
_LFS_UPLOAD = re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$")
_LFS_VERIFY = re.compile(r"^/lfs-verify/(?P<oid>[0-9a-f]{64})$")


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data`` (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
    )


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _json(body: bytes) -> Any:
    return json.loads(body or b"{}")


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true")


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]
    lfs: frozenset[str] = frozenset()
    description: str = ""
    parent: str | None = None
    pr_num: int | None = None
    author: str = TEST_USER
    date: str = field(default_factory=_now)

    def entry(self, path: str) -> dict[str, Any]:
        """The tree / paths-info entry of one file, as the Hub lists it."""
        data = self.files[path]
        out: dict[str, Any] = {"type": "file", "path": path, "size": len(data)}
        if path not in self.lfs:
            return {**out, "oid": git_blob_sha1(data)}
        pointer, sha = lfs_pointer(data), hashlib.sha256(data).hexdigest()
        lfs = {"oid": sha, "size": len(data), "pointerSize": len(pointer)}
        return {**out, "oid": git_blob_sha1(pointer), "lfs": lfs}


def _folder(path: str) -> dict[str, Any]:
    return {"type": "directory", "path": path, "size": 0, "oid": git_blob_sha1(path.encode())}


@dataclass
class Repo:
    repo_id: str
    repo_type: str = "model"
    private: bool = False
    branches: dict[str, list[Commit]] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)

    def resolve(self, rev: str) -> Commit | None:
        """A branch or ``refs/pr/N`` name (its head), or a commit id (7 to 40 hex digits)."""
        rev = rev.removeprefix("refs/heads/")
        if rev in self.branches:
            return self.branches[rev][-1]
        commits = (c for cs in self.branches.values() for c in cs)
        return next((c for c in commits if len(rev) >= 7 and c.oid.startswith(rev)), None)

    def history(self, commit: Commit) -> list[Commit]:
        """The commits from the first one up to ``commit``."""
        by_oid = {c.oid: c for commits in self.branches.values() for c in commits}
        chain = [commit]
        while chain[-1].parent is not None:
            chain.append(by_oid[chain[-1].parent])
        return chain[::-1]


class LoggedRequest(NamedTuple):
    method: str
    path: str  # raw path, with the query string
    status: int


@dataclass
class _Fault:
    route: str
    status: int
    count: int
    method: str | None
    headers: dict[str, str]
    message: str


class HubError(Exception):
    """An error answer: JSON ``{"error": message, **body}`` plus X-Error-Code / X-Error-Message."""

    def __init__(self, status: int, message: str, code: str = "", headers=None, body=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = dict(headers or {}), dict(body or {})


def _not_found(message: str, code: str, status: int = 404, commit: str = "") -> HubError:
    return HubError(status, message, code, {"X-Repo-Commit": commit} if commit else None)


def _lfs_patterns(gitattributes: bytes) -> list[str]:
    lines = [line.split() for line in gitattributes.decode("utf-8", "replace").splitlines()]
    return [words[0] for words in lines if "filter=lfs" in words[1:]]


class HubServer:
    """In-memory Hub on 127.0.0.1 (free port): ``start()`` / ``stop()``, or ``with HubServer():``."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(tokens) if tokens is not None else {TEST_TOKEN: TEST_USER}
        self.read_only_tokens: set[str] = set()
        self.write_forbidden: set[str] = set()  # repo ids on which every write gets a 403
        self.require_token = False
        self.lfs_threshold = LFS_THRESHOLD
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # uploaded LFS blobs by sha256, committed or not
        self.log: list[LoggedRequest] = []
        self.errors: list[str] = []  # tracebacks of bugs in this server (answered with a 500)
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(16)
        self._ids = itertools.count(1)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(
        self,
        route: str,
        status: int = 500,
        count: int = 1,
        *,
        method=None,
        headers=None,
        message=None,
    ) -> None:
        """Answer the next ``count`` requests whose raw path (with query) contains ``route``.

        E.g. ``fail_next("/commit/main", 500)``, ``fail_next("/lfs-upload/", 403, method="PUT")``,
        ``fail_next("/preupload/", 429, headers={"Retry-After": "1"})`` (a 429 gets
        ``Retry-After: 0`` by default).  The client retries 408/429/5xx up to 5 times, sleeping
        1-8 s, on preupload, LFS batch/upload/verify and tree listings, but not on the commit POST.
        """
        headers = ({"Retry-After": "0"} if status == 429 else {}) | dict(headers or {})
        message = message or f"Injected failure: HTTP {status}"
        with self._lock:
            self._faults.append(_Fault(route, status, count, method, headers, message))

    def requests(self, route: str = "", method: str | None = None) -> list[LoggedRequest]:
        """The logged requests whose raw path contains ``route`` (and with ``method``, if given)."""
        return [r for r in self.log if route in r.path and method in (None, r.method)]

    def add_repo(
        self, repo_id: str, *, private=False, repo_type="model", files=None, author=TEST_USER
    ) -> Repo:
        """Create a repo as ``create_repo`` does: one commit with .gitattributes (and ``files``)."""
        files = {".gitattributes": GITATTRIBUTES, **(files or {})}
        patterns = _lfs_patterns(files[".gitattributes"])
        lfs = {p for p, data in files.items() if self._wants_lfs(p, len(data), data, patterns)}
        repo = Repo(repo_id, repo_type, private)
        commit = self._new_commit("initial commit", files, lfs, None, author=author)
        repo.branches["main"] = [commit]
        with self._lock:
            self.repos[repo_id] = repo
            self.lfs_objects.update({hashlib.sha256(files[p]).hexdigest(): files[p] for p in lfs})
        return repo

    # -- helpers ---------------------------------------------------------------------------------

    def _url_of(self, repo: Repo) -> str:
        prefix = "" if repo.repo_type == "model" else f"{_PLURAL[repo.repo_type]}/"
        return f"{self.url}/{prefix}{repo.repo_id}"

    def _new_commit(self, message: str, files: dict, lfs: set, parent: str | None, **kw) -> Commit:
        blobs = "".join(f"{p}\0{git_blob_sha1(d)}\0" for p, d in sorted(files.items()))
        oid = hashlib.sha1(f"{next(self._ids)}\0{parent}\0{message}\0{blobs}".encode()).hexdigest()
        return Commit(oid, message, files, frozenset(lfs & files.keys()), parent=parent, **kw)

    def _wants_lfs(self, path: str, size: int, sample: bytes, patterns: list[str]) -> bool:
        name = path.rsplit("/", 1)[-1]
        by_pattern = any(fnmatch(path if "/" in p else name, p.lstrip("/")) for p in patterns)
        return by_pattern or size >= self.lfs_threshold or b"\0" in sample[:512]

    def _sign(self, oid: str) -> str:
        return hmac.new(self._secret, oid.encode(), "sha256").hexdigest()

    def _take_fault(self, method: str, raw_path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.route in raw_path and fault.method in (None, method):
                    fault.count -= 1
                    if fault.count <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _auth(self, headers) -> tuple[str | None, str | None]:
        """(token, user) of the request; a wrong token, or a missing one if required, is a 401."""
        value = headers.get("Authorization")
        if not value:
            if self.require_token:
                raise HubError(401, "Invalid username or password.")
            return None, None
        token = value.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token, self.tokens[token]

    def _check_write(self, repo_id: str, token: str | None) -> None:
        if token is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        if token in self.read_only_tokens:
            raise HubError(403, "Forbidden: you must use a write token to upload to a repository.")
        if repo_id in self.write_forbidden:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")

    def _repo(self, plural: str, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or _PLURAL[repo.repo_type] != plural or (repo.private and user is None):
            # Anonymous callers get a 401, so as not to learn whether the repo exists.
            raise _not_found("Repository not found", "RepoNotFound", 401 if user is None else 404)
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise _not_found(f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # -- routing ---------------------------------------------------------------------------------

    def _dispatch(self, method: str, raw_path: str, body: bytes, headers) -> tuple[int, Any, dict]:
        split = urlsplit(raw_path)
        path, query = split.path, {k: v[-1] for k, v in parse_qs(split.query).items()}
        if method == "PUT" and (m := _LFS_UPLOAD.match(path)):  # a signed URL: no Authorization
            return self._lfs_upload(m["oid"], query, body)
        token, user = self._auth(headers)
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami(token, user)
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(_json(body), token, user)
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(_json(body).get("content", ""))
        if (m := _LFS_VERIFY.match(path)) and method == "POST":
            if len(self.lfs_objects.get(m["oid"], b"")) != _json(body).get("size", -1):
                raise HubError(404, f"Object {m['oid']} not found")
            return 200, {}, {}
        if m := _API.match(path):
            repo = self._repo(m["type"], m["repo"], user)
            raw_rev, _, raw_tail = path[m.end() :].partition("/")
            rev, tail, action = unquote(raw_rev) or "main", unquote(raw_tail), m["action"]
            if method == "GET" and action in (None, "revision"):
                return self._info(repo, self._commit_at(repo, rev), query)
            if method == "GET" and action == "tree":
                return self._tree(self._commit_at(repo, rev), tail, query)
            if method == "POST" and action == "paths-info":
                return self._paths_info(self._commit_at(repo, rev), body)
            if method == "GET" and action == "refs":
                return self._refs(repo, query)
            if method == "POST" and action in ("branch", "preupload", "commit"):
                self._check_write(repo.repo_id, token)
                if action == "commit":
                    return self._commit(repo, rev, body, query, user or TEST_USER)
                handler = self._branch if action == "branch" else self._preupload
                return handler(repo, rev, _json(body))
        if (m := _LFS_BATCH.match(path)) and method == "POST":
            self._check_write(self._repo(m["type"] or "models", m["repo"], user).repo_id, token)
            return self._lfs_batch(_json(body))
        if (m := _RESOLVE.match(path)) and method in ("GET", "HEAD"):
            repo = self._repo(m["type"] or "models", m["repo"], user)
            commit = self._commit_at(repo, unquote(m["rev"]))
            return self._resolve(commit, unquote(m["path"]))
        raise HubError(404, f"Not found: {method} {path}")

    # -- route handlers --------------------------------------------------------------------------

    def _whoami(self, token: str | None, user: str | None):
        if user is None:
            raise HubError(401, "Invalid username or password.")
        role = "read" if token in self.read_only_tokens else "write"
        auth = {"type": "access_token", "accessToken": {"displayName": "fake-hub", "role": role}}
        return 200, {"type": "user", "name": user, "fullname": user, "orgs": [], "auth": auth}, {}

    def _create_repo(self, payload: dict, token: str | None, user: str | None):
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        self._check_write(repo_id, token)
        if repo_id in self.repos:  # with exist_ok=True, the client reads "url" from this 409
            url = self._url_of(self.repos[repo_id])
            raise HubError(409, f"You already created this {repo_type} repo", body={"url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = self.add_repo(repo_id, private=private, repo_type=repo_type, author=user)
        return 200, {"url": self._url_of(repo), "name": repo_id, "id": repo_id}, {}

    def _validate_yaml(self, content: str):
        lines = [line.strip() for line in content.splitlines()]
        if lines and lines[0] == "---" and "---" not in lines[1:]:
            errors = [{"message": "Invalid YAML metadata: no closing '---'"}]
            raise HubError(400, errors[0]["message"], body={"errors": errors, "warnings": []})
        return 200, {"errors": [], "warnings": []}, {}

    def _info(self, repo: Repo, commit: Commit, query: dict):
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if _truthy(query.get("blobs")):
                entry = commit.entry(path)
                sibling |= {"size": entry["size"], "blobId": entry["oid"]}
                if lfs := entry.get("lfs"):
                    sibling["lfs"] = {"size": lfs["size"], "sha256": lfs["oid"]}
                    sibling["lfs"]["pointerSize"] = lfs["pointerSize"]
            siblings.append(sibling)
        info = {"id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.oid}
        info |= {"private": repo.private, "gated": False, "disabled": False, "tags": []}
        info |= {"lastModified": commit.date, "createdAt": repo.created_at, "siblings": siblings}
        return 200, info, {}

    def _tree(self, commit: Commit, base: str, query: dict):
        recursive, base = _truthy(query.get("recursive")), base.strip("/")
        prefix = f"{base}/" if base else ""
        files = [p for p in sorted(commit.files) if p.startswith(prefix)]
        if base and not files:
            raise _not_found(f"Entry not found: {base}", "EntryNotFound", commit=commit.oid)
        folders, entries = set(), []
        for path in files:
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else min(2, len(parts))
            folders.update(prefix + "/".join(parts[:i]) for i in range(1, depth))
            if recursive or len(parts) == 1:
                entries.append(commit.entry(path))
        return 200, [_folder(f) for f in sorted(folders)] + entries, {}

    def _paths_info(self, commit: Commit, body: bytes):
        out = []
        for path in (p.strip("/") for p in parse_qs(body.decode()).get("paths", [])):
            if path in commit.files:
                out.append(commit.entry(path))
            elif any(p.startswith(f"{path}/") for p in commit.files):
                out.append(_folder(path))
        return 200, out, {}

    def _refs(self, repo: Repo, query: dict):
        def ref(name: str, ref: str) -> dict:
            return {"name": name, "ref": ref, "targetCommit": repo.branches[name][-1].oid}

        prs = [ref(b, b) for b in repo.branches if b.startswith("refs/pr/")]
        heads = [b for b in repo.branches if not b.startswith("refs/pr/")]
        branches = [ref(b, f"refs/heads/{b}") for b in heads]
        out = {"branches": branches, "converts": [], "tags": []}
        return 200, out | ({"pullRequests": prs} if query.get("include_prs") else {}), {}

    def _branch(self, repo: Repo, name: str, payload: dict):
        if name in repo.branches:
            raise HubError(409, "Reference already exists")
        start = self._commit_at(repo, payload.get("startingPoint") or "main")
        repo.branches[name] = repo.history(start)
        return 200, {}, {}

    def _preupload(self, repo: Repo, rev: str, payload: dict):
        commit = self._commit_at(repo, rev)
        patterns = _lfs_patterns(commit.files.get(".gitattributes", b""))
        out = []
        for f in payload.get("files", []):
            path, sample = f["path"], base64.b64decode(f.get("sample") or "")
            lfs = self._wants_lfs(path, int(f.get("size", 0)), sample, patterns)
            info = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if (data := commit.files.get(path)) is not None:  # lets the client skip unchanged files
                lfs_oid = hashlib.sha256(data).hexdigest()
                info["oid"] = lfs_oid if path in commit.lfs else git_blob_sha1(data)
            out.append(info)
        return 200, {"files": out, "commitOid": commit.oid}, {}

    def _commit(self, repo: Repo, rev: str, body: bytes, query: dict, user: str):
        ops = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((op["value"] for op in ops if op["key"] == "header"), {})
        rev = rev.removeprefix("refs/heads/")
        if rev not in repo.branches:
            raise _not_found(f"Invalid rev id: {rev}", "RevisionNotFound")
        base = repo.branches[rev][-1]
        if header.get("parentCommit") not in (None, base.oid):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files, lfs = dict(base.files), set(base.lfs)
        for key, value in ((op["key"], op["value"]) for op in ops if op["key"] != "header"):
            path = value.get("path", "")
            if key == "file":
                files[path] = base64.b64decode(value["content"])
                lfs.discard(path)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(422, f"LFS pointer to an object that was never uploaded: {path}")
                files[path] = self.lfs_objects[value["oid"]]
                lfs.add(path)
            elif key in ("deletedFile", "deletedFolder"):
                folder = path.rstrip("/") + "/" if key == "deletedFolder" else None
                doomed = [p for p in files if p == path or (folder and p.startswith(folder))]
                if not doomed:
                    raise _not_found("A file with this name doesn't exist", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"Unknown commit operation: {key}")
        create_pr = _truthy(query.get("create_pr"))
        prs = sum(name.startswith("refs/pr/") for name in repo.branches)
        ref = f"refs/pr/{prs + 1}" if create_pr else rev
        pr_num = int(ref.rsplit("/", 1)[1]) if ref.startswith("refs/pr/") else None
        summary, description = header.get("summary") or "", header.get("description") or ""
        kwargs = {"description": description, "pr_num": pr_num, "author": user}
        commit = self._new_commit(summary, files, lfs, base.oid, **kwargs)
        url = f"{self._url_of(repo)}/commit/{commit.oid}"
        out = {"success": True, "commitOid": commit.oid, "commitUrl": url}
        if create_pr:  # the PR ref starts from the target branch
            repo.branches[ref] = [*repo.history(base), commit]
            out["pullRequestUrl"] = f"{self._url_of(repo)}/discussions/{pr_num}"
        else:
            repo.branches[ref].append(commit)
        return 200, out, {}

    def _lfs_batch(self, payload: dict):
        if payload.get("operation") != "upload":
            raise HubError(422, "Only the 'upload' operation is supported")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs_objects:  # no "actions": the client skips the upload
                upload = f"{self.url}/lfs-upload/{oid}?size={size}&sig={self._sign(oid)}"
                verify = f"{self.url}/lfs-verify/{oid}"
                item["actions"] = {"upload": {"href": upload}, "verify": {"href": verify}}
            objects.append(item)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {}

    def _lfs_upload(self, oid: str, query: dict, body: bytes):
        if not hmac.compare_digest(query.get("sig", ""), self._sign(oid)):
            raise HubError(403, "Invalid signature")
        if hashlib.sha256(body).hexdigest() != oid or str(len(body)) != query.get("size"):
            raise HubError(400, "Uploaded content does not match its oid and size")
        self.lfs_objects[oid] = body
        return 200, b"", {}

    def _resolve(self, commit: Commit, path: str):
        if path not in commit.files:
            raise _not_found("Entry not found", "EntryNotFound", commit=commit.oid)
        data, entry = commit.files[path], commit.entry(path)
        out = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry["oid"]}"'}
        if "lfs" in entry:
            out |= {"ETag": f'"{entry["lfs"]["oid"]}"', "X-Linked-Etag": f'"{entry["lfs"]["oid"]}"'}
            out["X-Linked-Size"] = str(len(data))
        return 200, data, out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length
    disable_nagle_algorithm = True  # headers and body are two writes: avoid 40 ms ACK stalls

    def log_message(self, format: str, *args: Any) -> None:  # quiet: see HubServer.log
        pass

    def _read_body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def _handle(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        body = self._read_body()
        try:
            if fault := hub._take_fault(self.command, self.path):
                raise HubError(fault.status, fault.message, headers=fault.headers)
            with hub._lock:
                status, payload, headers = hub._dispatch(
                    self.command, self.path, body, self.headers
                )
        except HubError as e:
            headers = {**e.headers, "X-Error-Message": e.message}
            headers |= {"X-Error-Code": e.code} if e.code else {}
            status, payload = e.status, {"error": e.message, **e.body}
        except Exception:
            hub.errors.append(traceback.format_exc())
            status, payload, headers = 500, {"error": "fake hub bug: see server.errors"}, {}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        kind = "application/octet-stream" if isinstance(payload, bytes) else "application/json"
        hub.log.append(LoggedRequest(self.command, self.path, status))  # before the client sees it
        self.send_response(status)
        headers = {"Content-Type": kind, "Content-Length": str(len(data)), **headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle
