"""A Hub-compatible HTTP server on 127.0.0.1 for tests: the subset huggingface_hub's client uses.

Repo create, YAML validation, preupload, LFS batch + PUT, NDJSON commits (with parentCommit
checks), branches, repo info, recursive tree, and file resolve (HEAD/GET with ETag and
X-Repo-Commit). Xet is never offered: clients must run with HF_HUB_DISABLE_XET=1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".pt", ".npy")


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, dict]] = field(default_factory=dict)  # sha -> path -> file entry
    messages: dict[str, str] = field(default_factory=dict)


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.headers_seen: list[dict[str, str]] = []

    def commit(self, repo: Repo, parent: str | None, files: dict[str, dict | None], message: str) -> str:
        tree = dict(repo.commits.get(parent, {})) if parent else {}
        for path, entry in files.items():
            if entry is None:
                tree = {p: e for p, e in tree.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
            else:
                tree[path] = entry
        sha = hashlib.sha1(json.dumps([parent, sorted(tree.items(), key=lambda x: x[0]), message],
                                      default=str).encode()).hexdigest()
        repo.commits[sha] = tree
        repo.messages[sha] = message
        return sha


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<verb>revision|preupload|commit|tree|branch)/(?P<rest>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_LFS = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")


class Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # --- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, code: int, payload=None, headers: dict | None = None, raw: bytes | None = None,
              head: bool = False) -> None:
        data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(code)
        self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, code: int, msg: str) -> None:
        self._send(code, {"error": msg}, {"X-Error-Message": msg})

    def _record(self) -> None:
        self.state.requests.append(f"{self.command} {self.path}")
        self.state.headers_seen.append(dict(self.headers))

    def _repo(self, repo_id: str) -> Repo | None:
        return self.state.repos.get(unquote(repo_id))

    # --- verbs ---------------------------------------------------------------------------------
    def do_POST(self) -> None:
        self._record()
        path = urlparse(self.path).path
        body = self._body()
        if path == "/api/repos/create":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if m := _LFS.match(path):
            return self._lfs_batch(m["repo"], json.loads(body))
        m = _API.match(path)
        if not m or not self._repo(m["repo"]):
            return self._error(404, f"Repository not found: {path}")
        repo = self._repo(m["repo"])
        self._repo_id = unquote(m["repo"])
        if m["verb"] == "preupload":
            files = json.loads(body)["files"]
            return self._send(200, {"files": [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                 "shouldIgnore": False} for f in files]})
        if m["verb"] == "commit":
            return self._commit(repo, unquote(m["rest"]), body)
        if m["verb"] == "branch":
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            repo.branches.setdefault(unquote(m["rest"]), repo.branches.get(start, repo.branches["main"]))
            return self._send(200, {})
        return self._error(404, f"unsupported POST {path}")

    def do_PUT(self) -> None:
        self._record()
        oid = urlparse(self.path).path.rsplit("/", 1)[-1]
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "sha256 mismatch")
        with self.state.lock:
            self.state.blobs[oid] = data
        self._send(200, {})

    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def _get(self, head: bool) -> None:
        self._record()
        url = urlparse(self.path)
        if m := _RESOLVE.match(url.path):
            return self._resolve(m["repo"], unquote(m["rev"]), unquote(m["path"]), head)
        m = _API.match(url.path)
        if not m or not self._repo(m["repo"]):
            return self._error(404, f"Repository not found: {url.path}")
        repo, repo_id = self._repo(m["repo"]), unquote(m["repo"])
        if m["verb"] in (None, "revision"):
            rev = unquote(m["rest"] or "main")
            sha = self._sha(repo, rev)
            if sha is None:
                return self._error(404, f"Revision not found: {rev}")
            siblings = [{"rfilename": p, "size": e["size"]} for p, e in sorted(repo.commits[sha].items())]
            return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                                    "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})
        if m["verb"] == "tree":
            rev, _, prefix = unquote(m["rest"]).partition("/")
            sha = self._sha(repo, rev)
            if sha is None:
                return self._error(404, f"Revision not found: {rev}")
            recursive = parse_qs(url.query).get("recursive", ["false"])[0] in ("true", "True", "1")
            return self._send(200, self._tree(repo.commits[sha], prefix, recursive))
        return self._error(404, f"unsupported GET {url.path}")

    # --- handlers ------------------------------------------------------------------------------
    def _create(self, req: dict) -> None:
        repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
        if "/" not in repo_id:
            repo_id = f"user/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:  # the Hub answers 409 with the url, which exist_ok reads
                msg = "You already created this model repo"
                return self._send(409, {"error": msg, "url": f"http://{self.headers['Host']}/{repo_id}"},
                                  {"X-Error-Message": msg})
            repo = Repo(private=req.get("visibility") == "private" or bool(req.get("private")))
            repo.branches["main"] = self.state.commit(repo, None, {".gitattributes": self._regular(b"*.safetensors filter=lfs\n")}, "initial commit")
            self.state.repos[repo_id] = repo
        self._send(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id, "id": repo_id})

    def _regular(self, data: bytes) -> dict:
        sha = hashlib.sha256(data).hexdigest()
        self.state.blobs[sha] = data
        return {"sha256": sha, "size": len(data), "lfs": False, "oid": git_blob_sha(data)}

    def _lfs_batch(self, repo_id: str, req: dict) -> None:
        host = self.headers["Host"]
        objects = []
        for obj in req["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.blobs:
                entry["actions"] = {"upload": {"href": f"http://{host}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _commit(self, repo: Repo, rev: str, body: bytes) -> None:
        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        files: dict[str, dict | None] = {}
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = self._regular(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                if value["oid"] not in self.state.blobs:
                    return self._error(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = {"sha256": value["oid"], "size": value["size"], "lfs": True,
                                        "oid": git_blob_sha(self.state.blobs[value["oid"]])}
            elif key in ("deletedFile", "deletedFolder"):
                files[value["path"]] = None
        with self.state.lock:
            if rev not in repo.branches:
                return self._error(404, f"Invalid rev id: {rev}")
            head = repo.branches[rev]
            if header.get("parentCommit") and header["parentCommit"] != head:
                return self._error(412, "A commit has happened since the parent commit. Please retry.")
            sha = self.state.commit(repo, head, files, header.get("summary", ""))
            repo.branches[rev] = sha
        self._send(200, {"commitUrl": f"http://{self.headers['Host']}/{self._repo_id}/commit/{sha}", "commitOid": sha,
                         "commitMessage": header.get("summary", ""), "pullRequestUrl": None})

    def _sha(self, repo: Repo, rev: str) -> str | None:
        return repo.branches.get(rev) or (rev if rev in repo.commits else None)

    def _tree(self, tree: dict[str, dict], prefix: str, recursive: bool) -> list[dict]:
        out, dirs = [], set()
        for path, e in sorted(tree.items()):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            rel = path[len(prefix.rstrip("/")) + 1:] if prefix else path
            parts = rel.split("/")
            for k in range(1, len(parts)):
                d = "/".join(([prefix.rstrip("/")] if prefix else []) + parts[:k])
                if d not in dirs and (recursive or k == 1):
                    dirs.add(d)
                    out.append({"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()})
            if len(parts) > 1 and not recursive:
                continue
            item = {"type": "file", "path": path, "size": e["size"], "oid": e["oid"]}
            if e["lfs"]:
                item["lfs"] = {"oid": e["sha256"], "size": e["size"], "pointerSize": 134}
            out.append(item)
        return out

    def _resolve(self, repo_id: str, rev: str, path: str, head: bool) -> None:
        repo = self._repo(repo_id)
        sha = self._sha(repo, rev) if repo else None
        entry = repo.commits[sha].get(path) if sha else None
        if entry is None:
            return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound",
                                                                  "X-Error-Message": "Entry not found"}, head=head)
        data = self.state.blobs[entry["sha256"]]
        etag = entry["sha256"] if entry["lfs"] else entry["oid"]
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": sha}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        self._send(200, headers=headers, raw=data, head=head)


class HubServer:
    """``with HubServer() as hub: hub.url``; ``hub.state`` holds repos, blobs and the request log."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
