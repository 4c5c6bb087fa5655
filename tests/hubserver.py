"""A Hugging Face Hub-API server on 127.0.0.1, for driving the real huggingface_hub (2.4.0) client in tests.

It serves the routes in ROUTES (repo create, validate-yaml, revision info, tree, preupload, LFS
batch / basic upload / verify, NDJSON commit, HEAD/GET resolve with Range) and nothing else: another route gets
501 "hubserver: unsupported route METHOD PATH" and lands in ``hub.unhandled``; a server bug gets 500 and its
traceback lands in ``hub.errors``. Tests assert both empty. No Xet: HF_HUB_DISABLE_XET must be on. Use::

    @pytest.fixture
    def hub(monkeypatch, tmp_path):
        yield from hub_server_fixture(monkeypatch, tmp_path, token=TEST_TOKEN)   # token=None: no auth

    def test_x(hub):
        HfApi().create_repo("me/delta", exist_ok=True)   # endpoint, HF_HOME and HF_TOKEN come from the fixture
        hub.fail_next("resolve", method="GET")           # the next GET .../resolve/... answers 500
        hub.corrupt("me/delta", "w.safetensors")         # GETs serve it with one byte flipped, status 200
        hub.inject_file("me/delta", "../escape")         # a hostile name, in tree, siblings and resolve

Auth, when the server has a token: ``Authorization: Bearer <token>`` is authorised, any other Bearer value gets
401 "Invalid credentials in Authorization header" (client: plain HfHubHTTPError). Anonymous reads of a private
or missing repo get 401 + ``X-Error-Code: RepoNotFound`` (the real Hub hides existence the same way; client:
RepositoryNotFoundError); authorised reads of a missing repo get 404 + RepoNotFound; anonymous writes get 401
"Invalid username or password." (plain HfHubHTTPError). Without a token the server authorises everyone.

Mirrored Hub behaviour: a new repo has one commit holding ``.gitattributes``; preupload says "lfs" for
LFS_SUFFIXES or size > 10 MiB and a commit refuses such files inline; LFS objects are kept per repo and the batch
answer has no ``actions`` for stored ones (the client then skips them); the upload href carries a nonce (the
client sends no token there) and the PUT body must hash to the oid; ETag is the git blob sha1 of regular files,
the sha256 of LFS files (plus X-Linked-Etag / X-Linked-Size). Revisions: branch names or full 40-hex commit
shas. Only model repos named ``namespace/name``; no PRs, tags or repo deletion.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import secrets
import threading
import time
import traceback
from collections import namedtuple
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

HOST = "127.0.0.1"
TEST_TOKEN = "hf_hubserver_test_token"
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".npy", ".npz", ".onnx", ".gguf", ".zst",
                ".msgpack", ".pkl", ".zip", ".tar", ".gz")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
_R = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [  # (name, methods, regex fully matching the raw request path); handled by HubServer._r_<name>
    ("create_repo", "POST", r"/api/repos/create"),
    ("validate_yaml", "POST", r"/api/validate-yaml"),  # create_commit sends README.md here first
    ("repo_info", "GET", rf"/api/models/{_R}(?:/revision/(?P<rev>[^/]+))?"),
    ("tree", "GET", rf"/api/models/{_R}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"),
    ("preupload", "POST", rf"/api/models/{_R}/preupload/(?P<rev>[^/]+)"),
    ("commit", "POST", rf"/api/models/{_R}/commit/(?P<rev>[^/]+)"),
    ("lfs_batch", "POST", rf"/{_R}\.git/info/lfs/objects/batch"),
    ("lfs_verify", "POST", rf"/{_R}\.git/info/lfs/objects/verify"),
    ("lfs_upload", "PUT", rf"/_lfs_upload/{_R}/(?P<oid>[0-9a-f]{{64}})"),
    ("resolve", "GET HEAD", rf"/{_R}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def wants_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size > LFS_SIZE_THRESHOLD


class Entry:
    """One immutable file version and the ids the Hub reports for it."""

    def __init__(self, data: bytes, lfs: bool):
        self.data, self.lfs, self.size = data, lfs, len(data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
        blob = self.pointer.encode() if lfs else data
        self.git_oid = _sha1(b"blob %d\0" % len(blob) + blob)  # what git (and the Hub's tree "oid") calls it
        self.etag = self.sha256 if lfs else self.git_oid

    def tree_json(self, path: str) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.lfs:
            d["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(self.pointer)}
        return d


Commit = namedtuple("Commit", "sha parent title date files")  # files: path -> Entry
Repo = namedtuple("Repo", "repo_id private created branches commits lfs")  # branch -> sha; lfs: sha256 -> bytes
Request = namedtuple("Request", "method route path token_sent status")  # route: a ROUTES name, or "?" if unhandled


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class HubServer:
    """In-memory Hub served by a ThreadingHTTPServer; every request is handled under one lock."""

    def __init__(self, token: str | None = None, host: str = HOST, port: int = 0):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []  # request log, in arrival order
        self.unhandled: list[str] = []  # routes / features the client used that this server does not implement
        self.errors: list[str] = []  # tracebacks of server bugs (answered 500)
        self.page_size = 1000  # tree entries per page; further pages are linked with a Link header
        self.ignore_range = False  # True: answer Range requests with 200 + full body (huggingface_hub#3778)
        self._faults: list[list[Any]] = []  # [route, method or None, remaining, status]
        self._corrupt: dict[tuple[str, str], int] = {}
        self._slow: dict[tuple[str, str], list[Any]] = {}
        self.stopping = threading.Event()
        self._nonces: dict[tuple[str, str], str] = {}
        self._lock = threading.RLock()
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://{host}:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hubserver", daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    # ---- direct helpers for tests (no HTTP, no auth, no name checks) ----------------------------------------
    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        with self._lock:
            repo = self.repos[repo_id] = Repo(repo_id, private, _now(), {}, {}, {})
            self._commit(repo, "main", {".gitattributes": Entry(GITATTRIBUTES, False)}, "initial commit", None)
            return repo

    def commit_files(self, repo_id: str, files: dict[str, bytes], revision: str = "main",
                     message: str = "test commit", lfs: bool | None = None) -> str:
        """Commit ``files`` on branch ``revision`` (LFS per ``wants_lfs`` unless ``lfs`` says); returns the sha."""
        with self._lock:
            repo = self.repos[repo_id]
            head = repo.branches[revision]
            tree = dict(repo.commits[head].files)
            for path, data in files.items():
                tree[path] = Entry(data, wants_lfs(path, len(data)) if lfs is None else lfs)
                if tree[path].lfs:
                    repo.lfs[tree[path].sha256] = data
            return self._commit(repo, revision, tree, message, head)

    def inject_file(self, repo_id: str, name: str, data: bytes = b"hostile\n", revision: str = "main") -> str:
        """Commit a file under an attacker-chosen name (``../x``, ``/abs``, ``C:\\x``, ``\\\\host\\share``, NUL)."""
        return self.commit_files(repo_id, {name: data}, revision, message=f"inject {name!r}")

    def create_branch(self, repo_id: str, branch: str, revision: str = "main") -> None:
        with self._lock:
            self.repos[repo_id].branches[branch] = self.head(repo_id, revision)

    def corrupt(self, repo_id: str, path: str, offset: int = 0) -> None:
        """GETs of ``path`` (any revision) serve the byte at ``offset`` flipped; status 200, size unchanged."""
        self._corrupt[(repo_id, path)] = offset

    def slow_body(self, repo_id: str, path: str, kind: str, *, times: int | None = 1, after_bytes: int = 64,
                  delay: float = 0.01) -> None:
        """GETs of ``path`` send their body badly: ``stall`` sends ``after_bytes`` then goes silent for ``delay``
        seconds with the connection open (a read timeout mid-body); ``drip`` sends it all, ``after_bytes`` at a
        time, ``delay`` apart. ``times``: how many GETs (None: all)."""
        assert kind in ("stall", "drip"), kind
        self._slow[(repo_id, path)] = [kind, times, after_bytes, delay]

    def uncorrupt(self, repo_id: str, path: str) -> None:
        self._corrupt.pop((repo_id, path), None)

    def fail_next(self, route: str, n: int = 1, status: int = 500, method: str | None = None) -> None:
        """Answer the next ``n`` requests of ``route`` (a ROUTES name; only ``method`` if given) with ``status``."""
        assert route in {r[0] for r in ROUTES}, route
        with self._lock:
            self._faults.append([route, method, n, status])

    def head(self, repo_id: str, revision: str = "main") -> str:
        return self._resolve(self.repos[repo_id], revision).sha

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return self._resolve(self.repos[repo_id], revision).files[path].data

    def count(self, route: str, method: str | None = None) -> int:
        return sum(r.route == route and method in (None, r.method) for r in self.requests)

    # ---- internals -------------------------------------------------------------------------------------------
    def _commit(self, repo: Repo, branch: str, files: dict[str, Entry], title: str, parent: str | None) -> str:
        sha = _sha1(json.dumps([parent, branch, title, sorted((p, e.git_oid) for p, e in files.items())]).encode())
        repo.commits[sha] = Commit(sha, parent, title, _now(), files)
        repo.branches[branch] = sha
        return sha

    def _resolve(self, repo: Repo, rev: str) -> Commit:
        commit = repo.commits.get(repo.branches.get(rev, rev))
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    def _authorised(self, headers: Any) -> bool:
        auth = headers.get("Authorization")
        if self.token is None or auth is None:
            return self.token is None
        if auth != f"Bearer {self.token}":
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return True

    def _repo(self, repo_id: str, headers: Any, write: bool = False) -> Repo:
        authorised = self._authorised(headers)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorised):
            raise HubError(404 if authorised else 401, "RepoNotFound", "Repository not found")
        if write and not authorised:
            raise HubError(401, None, "Invalid username or password.")
        return repo

    def _unsupported(self, what: str) -> HubError:
        self.unhandled.append(what)
        return HubError(501, None, f"hubserver: unsupported {what}")

    def dispatch(self, method: str, target: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        split = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        route, args = "?", {"raw_path": split.path}
        for name, methods, pattern in ROUTES:
            if (m := re.fullmatch(pattern, split.path)) and method in methods.split():
                route = name
                args.update((k, unquote(v)) for k, v in m.groupdict().items() if v is not None)
                break
        with self._lock:
            try:
                if route == "?":
                    raise self._unsupported(f"route {method} {target}")
                for fault in self._faults:
                    if fault[0] == route and fault[1] in (None, method) and fault[2] > 0:
                        fault[2] -= 1
                        raise HubError(fault[3], None, f"hubserver: injected fault on {method} {target}")
                status, out, payload = getattr(self, "_r_" + route)(method, args, query, headers, body)
            except HubError as e:
                status, payload = e.status, json.dumps({"error": e.message}).encode()
                out = {"Content-Type": "application/json", "X-Error-Message": e.message, **e.headers}
                out.update({"X-Error-Code": e.code} if e.code else {})
            except Exception:
                self.errors.append(f"{method} {target}\n{traceback.format_exc()}")
                status, out, payload = 500, {}, f"hubserver: internal error on {method} {target}".encode()
            self.requests.append(Request(method, route, unquote(split.path), "Authorization" in headers, status))
            return status, out, payload

    # ---- routes: (method, args, query, headers, body) -> (status, headers, body) ----------------------------
    @staticmethod
    def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None):
        return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()

    def _r_validate_yaml(self, method, args, query, headers, body):
        return self._json({"errors": [], "warnings": []})

    def _r_create_repo(self, method, args, query, headers, body):
        payload = json.loads(body)
        if payload.get("type") not in (None, "model"):
            raise self._unsupported(f"repo type {payload['type']!r}")
        if not self._authorised(headers):
            raise HubError(401, None, "Invalid username or password.")
        if not payload.get("organization"):
            raise HubError(400, None, "hubserver needs repo ids of the form namespace/name")
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:  # the client reads "url" from this answer too when exist_ok=True
            return self._json({"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, 409)
        self.create_repo(repo_id, private=payload.get("visibility") == "private")
        return self._json({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": _sha1(repo_id.encode())[:24]})

    def _r_repo_info(self, method, args, query, headers, body):
        repo = self._repo(args["repo"], headers)
        commit = self._resolve(repo, args.get("rev", "main"))
        siblings = []
        for path, e in sorted(commit.files.items()):
            siblings.append({"rfilename": path})
            if query.get("blobs", "").lower() in ("1", "true"):  # files_metadata=True
                siblings[-1].update(size=e.size, blobId=e.git_oid)
                if e.lfs:
                    siblings[-1]["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": len(e.pointer)}
        return self._json({
            "_id": _sha1(repo.repo_id.encode())[:24], "id": repo.repo_id, "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": commit.sha, "lastModified": commit.date,
            "createdAt": repo.created, "private": repo.private, "gated": False, "disabled": False, "downloads": 0,
            "likes": 0, "tags": [], "siblings": siblings, "usedStorage": sum(e.size for e in commit.files.values()),
        })

    def _r_tree(self, method, args, query, headers, body):
        commit = self._resolve(self._repo(args["repo"], headers), args["rev"])
        recursive = query.get("recursive", "").lower() in ("1", "true")
        prefix = args["path"].strip("/") + "/" if args.get("path", "").strip("/") else ""
        files, dirs = [], set()
        for path, e in commit.files.items():
            if path.startswith(prefix):
                parts = path[len(prefix):].split("/")
                ancestors = len(parts) - 1 if recursive else min(1, len(parts) - 1)
                dirs.update(prefix + "/".join(parts[:i]) for i in range(1, ancestors + 1))
                files += [e.tree_json(path)] if recursive or len(parts) == 1 else []
        if prefix and not files and not dirs:
            raise HubError(404, "EntryNotFound", f"{prefix} does not exist at {commit.sha}")
        folders = [{"type": "directory", "oid": _sha1(d.encode()), "size": 0, "path": d} for d in dirs if d]
        entries = sorted(folders + files, key=lambda d: d["path"])
        start, link = int(query.get("cursor", 0)), {}
        if start + self.page_size < len(entries):
            next_query = urlencode({**query, "cursor": start + self.page_size})
            link["Link"] = f'<{self.url}{args["raw_path"]}?{next_query}>; rel="next"'
        return self._json(entries[start:start + self.page_size], headers=link)

    def _r_preupload(self, method, args, query, headers, body):
        if "create_pr" in query:
            raise self._unsupported("create_pr")
        commit = self._resolve(self._repo(args["repo"], headers, write=True), args["rev"])
        files = []
        for f in json.loads(body)["files"]:
            old = commit.files.get(f["path"])  # the client skips files whose oid it already has
            files.append({"path": f["path"], "uploadMode": "lfs" if wants_lfs(f["path"], f["size"]) else "regular",
                          "shouldIgnore": False, "oid": old and (old.sha256 if old.lfs else old.git_oid)})
        return self._json({"files": files, "commitOid": commit.sha})

    def _r_lfs_batch(self, method, args, query, headers, body):
        repo = self._repo(args["repo"], headers, write=True)
        payload = json.loads(body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise self._unsupported(f"LFS batch {payload.get('operation')} via {payload.get('transfers')}")
        objects = []
        for o in payload["objects"]:
            objects.append({"oid": o["oid"], "size": o["size"], "authenticated": True})
            if not re.fullmatch(r"[0-9a-f]{64}", o["oid"]):
                objects[-1]["error"] = {"code": 422, "message": "oid must be a sha256 hex digest"}
            elif o["oid"] not in repo.lfs:  # no "actions" => the client treats the object as already uploaded
                nonce = self._nonces.setdefault((repo.repo_id, o["oid"]), secrets.token_hex(8))
                objects[-1]["actions"] = {
                    "upload": {"href": f"{self.url}/_lfs_upload/{repo.repo_id}/{o['oid']}?nonce={nonce}"},
                    "verify": {"href": f"{self.url}/{repo.repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
        answer = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, json.dumps(answer).encode()

    def _r_lfs_upload(self, method, args, query, headers, body):
        key = (args["repo"], args["oid"])
        if key not in self._nonces or query.get("nonce") != self._nonces[key]:
            raise HubError(403, None, "upload URL not issued by the LFS batch endpoint")
        if hashlib.sha256(body).hexdigest() != args["oid"]:
            raise HubError(400, None, f"sha256 of the uploaded body does not match oid {args['oid']}")
        self.repos[args["repo"]].lfs[args["oid"]] = body
        del self._nonces[key]
        return 200, {}, b""

    def _r_lfs_verify(self, method, args, query, headers, body):
        repo = self._repo(args["repo"], headers, write=True)
        o = json.loads(body)
        if o["oid"] not in repo.lfs or len(repo.lfs[o["oid"]]) != o["size"]:
            raise HubError(404, None, f"LFS object {o['oid']} of size {o['size']} not found")
        return self._json({"success": True})

    def _r_commit(self, method, args, query, headers, body):
        repo = self._repo(args["repo"], headers, write=True)
        if unsupported := [flag for flag in ("create_pr", "hot_reload") if flag in query]:
            raise self._unsupported(f"commit with {unsupported}")
        if args["rev"] not in repo.branches:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {args['rev']} (commits go to a branch)")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, None, "the first NDJSON line must be the header")
        head, parent = repo.branches[args["rev"]], lines[0]["value"].get("parentCommit")
        if parent is not None and parent != head:
            raise HubError(412, None, f"parentCommit {parent} is not the head of {args['rev']} ({head})")
        files = dict(repo.commits[head].files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"].rstrip("/") if key == "deletedFolder" else value["path"]
            if path.startswith("/") or "\0" in path or any(part in ("", ".", "..") for part in path.split("/")):
                raise HubError(400, None, f"invalid path {path!r}")
            if key == "file":
                data = base64.b64decode(value["content"])
                if value.get("encoding") != "base64" or (data and wants_lfs(path, len(data))):
                    raise HubError(400, None, f"{path}: regular files are base64 and not LFS-sized/typed")
                files[path] = Entry(data, False)
            elif key == "lfsFile":
                data = repo.lfs.get(value["oid"])
                if data is None or value.get("size", len(data)) != len(data):
                    raise HubError(422, None, f"LFS object {value['oid']} for {path} was never uploaded")
                files[path] = Entry(data, True)
            elif key in ("deletedFile", "deletedFolder"):
                doomed = [p for p in files if p == path or (key == "deletedFolder" and p.startswith(path + "/"))]
                if not doomed:
                    raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                for p in doomed:
                    del files[p]
            else:
                raise self._unsupported(f"commit operation {key!r}")
        sha = self._commit(repo, args["rev"], files, lines[0]["value"].get("summary", ""), head)
        return self._json({"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo.repo_id}/commit/{sha}",
                           "hookOutput": "", "pullRequestUrl": None})

    def _r_resolve(self, method, args, query, headers, body):
        repo = self._repo(args["repo"], headers)
        commit = self._resolve(repo, args["rev"])
        e = commit.files.get(args["path"])
        if e is None:  # the client caches the miss under .no_exist/<X-Repo-Commit>/
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha})
        out = {"X-Repo-Commit": commit.sha, "ETag": f'"{e.etag}"', "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
        if e.lfs:
            out.update({"X-Linked-Etag": f'"{e.sha256}"', "X-Linked-Size": str(e.size)})
        data = e.data
        if method == "GET" and data and (offset := self._corrupt.get((repo.repo_id, args["path"]))) is not None:
            i = offset % len(data)
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        slow = self._slow.get((repo.repo_id, args["path"])) if method == "GET" and data else None
        if slow is not None and slow[1] != 0:
            slow[1] = None if slow[1] is None else slow[1] - 1
            out["X-Test-Body"] = f"{slow[0]} {slow[2]} {slow[3]}"  # the handler acts on it and strips it
        if headers.get("Range") and method == "GET" and not self.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", headers["Range"].strip())
            if not m or int(m.group(1)) >= len(data):
                raise HubError(416, None, f"bad range {headers['Range']}", {"Content-Range": f"bytes */{len(data)}"})
            start, end = int(m.group(1)), min(int(m.group(2) or len(data) - 1), len(data) - 1)
            out["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, out, data[start:end + 1]
        return 200, out, data  # HEAD: same headers, Content-Length of the body, no body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else every response stalls ~40 ms on delayed ACKs
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        if self.headers.get("Transfer-Encoding"):  # the client always sends Content-Length; fail loudly if not
            error = hub._unsupported(f"Transfer-Encoding on {self.command} {self.path}")
            status, headers, payload = 501, {}, error.message.encode()
            self.close_connection = True
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, headers, payload = hub.dispatch(self.command, self.path, self.headers, body)
        slow = headers.pop("X-Test-Body", None)
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if slow is None:
            self.wfile.write(payload)
            return
        kind, step, delay = slow.split()
        step, delay = int(step), float(delay)
        try:
            if kind == "stall":
                self.wfile.write(payload[:step])
                self.wfile.flush()
                hub.stopping.wait(delay)  # silent, connection open
                self.close_connection = True
                return
            for i in range(0, len(payload), step):
                self.wfile.write(payload[i:i + step])
                self.wfile.flush()
                time.sleep(delay)
        except OSError:
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _serve


@contextlib.contextmanager
def run_hub_server(token: str | None = None) -> Iterator[HubServer]:
    """A started HubServer on 127.0.0.1 (free port); ``.url`` is what HF_ENDPOINT must be."""
    hub = HubServer(token=token).start()
    try:
        yield hub
    finally:
        hub.stop()


def patch_hf_env(monkeypatch: Any, url: str, home: str | Path, token: str | None = None) -> None:
    """Point an already-imported huggingface_hub at ``url``, with all its files under ``home``.

    huggingface_hub reads the environment into ``huggingface_hub.constants`` at import, and some modules copy
    further: ``hf_api.api`` (the HfApi behind ``huggingface_hub.create_repo``, ``list_repo_files``...) fixed its
    endpoint when built; ``utils._http._HUB_ORIGINS`` and ``utils._cache_manager.HF_HUB_CACHE`` too. So this sets
    the environment (for subprocesses) and patches those copies. Telemetry goes off: with it on, the first request
    of a process also fetches ``{ENDPOINT}/api/agent-harnesses`` (a route this server does not serve).
    """
    import huggingface_hub.constants as C
    import huggingface_hub.hf_api as hf_api
    from huggingface_hub.utils import _http

    home = Path(home)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN",
                "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "TRANSFORMERS_OFFLINE",
                "HUGGINGFACE_CO_STAGING", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    env = {"HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_HOME": str(home),
           "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.update({"HF_TOKEN": token} if token else {})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    old_home = C.HF_HOME
    for name, value in list(vars(C).items()):  # every path under the old HF_HOME (caches, token files, ...)
        if isinstance(value, str) and name.isupper() and value.startswith(old_home):
            monkeypatch.setattr(C, name, str(home) + value[len(old_home):])
    patches = {"ENDPOINT": url, "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
               "HF_URL_HOSTS": C.HF_URL_HOSTS | {HOST}, "_staging_mode": False, "HF_HUB_OFFLINE": False,
               "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
               "HF_HUB_CACHE": str(home / "hub"), "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
               "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens")}
    for name, value in patches.items():
        monkeypatch.setattr(C, name, value, raising=name in ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE"))
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(url)}, raising=False)
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import _cache_manager
        monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(home / "hub"), raising=False)
    _http.close_session()  # drop keep-alive connections pooled for an earlier server


def checked(servers):
    """Yield the server from ``hub_server_fixture``; afterwards assert it saw no server error and no route
    the client used that it does not implement."""
    server: HubServer = next(servers)
    try:
        yield server
        assert server.errors == []
        assert server.unhandled == [], "the client used a route the test server does not implement"
    finally:
        servers.close()


def hub_server_fixture(monkeypatch: Any, tmp_path: Path, token: str | None = None) -> Iterator[HubServer]:
    """For a fixture: ``yield from hub_server_fixture(monkeypatch, tmp_path, token=...)``.

    Starts a server (auth on iff ``token``), patches huggingface_hub to it (HF_HOME = tmp_path/"hf_home",
    HF_TOKEN = ``token``), and on teardown closes the client's connection pool and stops the server.
    """
    from huggingface_hub.utils import _http

    with run_hub_server(token=token) as hub:
        patch_hf_env(monkeypatch, hub.url, tmp_path / "hf_home", token=token)
        try:
            yield hub
        finally:
            _http.close_session()

