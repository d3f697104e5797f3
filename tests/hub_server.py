"""A Hugging Face Hub stand-in for tests: git repositories served over HTTP on 127.0.0.1.

The real Hub cannot be reached from the project's machines, so the online path (a model
downloaded at a pinned revision by ``huggingface_hub`` / ``transformers``, a data set loaded by
config and split through ``datasets``) is tested against this server. It implements the
endpoints those clients call in that path, with the headers and error codes they check:

- ``GET /api/{models|datasets}/{repo}[/revision/{rev}]``: repo info (``sha``, ``siblings``, with
  sizes under ``?blobs=true``).
- ``GET /api/{type}/{repo}/tree/{rev}[/{path}]?recursive=``: the file listing ``datasets``
  resolves data-file patterns with (entries carry ``lfs`` for LFS files).
- ``POST /api/{type}/{repo}/paths-info/{rev}``: what ``HfFileSystem.info`` asks.
- ``HEAD|GET /{repo}/resolve/{rev}/{path}`` (``/datasets/{repo}/...`` for data sets): the
  file. ``X-Repo-Commit`` (the resolved commit) and ``ETag`` (the git blob id) on every file;
  files that ``.gitattributes`` stores in LFS answer like the Hub does: a 302 to a content
  URL on another host name (``localhost``, standing for the Hub's CDN) with ``X-Linked-Etag``
  (the sha256) and ``X-Linked-Size``. ``Range`` requests (resumed
  downloads) get 206.
- ``GET /api/agent-harnesses``: the registry ``huggingface_hub`` fetches once a day (empty here).

Errors as the Hub sends them: 404 with ``X-Error-Code: RepoNotFound``, ``RevisionNotFound`` or
``EntryNotFound`` (``huggingface_hub`` turns these into its typed errors). Not implemented:
Xet transfers (the Hub serves large files through Xet, which ``hf_xet`` downloads; without an
``X-Xet-Hash`` header the client downloads over plain HTTP, as it does from any mirror),
uploads, gated repos, pagination of long listings.

Repositories are git repositories at ``ROOT/{models|datasets}/{org}/{name}`` (the layout of
olah's ``mirrors-path``, so the same folders can be served by that mirror too); every commit is
a revision, branches and tags resolve like on the Hub.

Fault injection, for "the server goes away mid-download": ``drop_after={"pytorch_model.bin":
N}`` sends the headers of that file's content, N bytes of it, then closes the connection and
stops the server (later connections are refused).

Command line (what the tests run inside a loopback-only network namespace)::

    python tests/hub_server.py --root DIR --log FILE [--drop-after NAME=BYTES] -- CMD ARGS...

starts the server on a free port of 127.0.0.1, runs CMD with ``HF_ENDPOINT`` pointing at it,
stops the server and exits with CMD's status.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

FULL_SHA = re.compile(r"[0-9a-f]{40}")
TYPES = {"models": "models", "datasets": "datasets"}


# -- reading a git repository ----------------------------------------------------------------
def git(repo: Path, *args: str, binary: bool = False):
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=False)
    if out.returncode != 0:
        return None
    return out.stdout if binary else out.stdout.decode()


@lru_cache(maxsize=256)
def resolve(repo: Path, rev: str) -> str | None:
    """The commit a branch, tag or full commit id names, or None (abbreviated ids are refused,
    as on the Hub)."""
    if re.fullmatch(r"[0-9a-f]{7,39}", rev):
        return None
    out = git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    return out.strip() if out else None


@lru_cache(maxsize=256)
def listing(repo: Path, commit: str) -> dict[str, tuple[str, int]]:
    """path -> (blob id, size) of every file of the commit."""
    out = git(repo, "ls-tree", "-r", "-l", "-z", commit) or ""
    files = {}
    for entry in out.split("\0"):
        if entry:
            meta, path = entry.split("\t", 1)
            _mode, _kind, oid, size = meta.split()
            files[path] = (oid, int(size))
    return files


@lru_cache(maxsize=64)
def content(repo: Path, oid: str) -> bytes:
    return git(repo, "cat-file", "blob", oid, binary=True)


def lfs_patterns(repo: Path, commit: str) -> list[str]:
    oid = listing(repo, commit).get(".gitattributes", (None, 0))[0]
    if oid is None:
        return []
    return [line.split()[0] for line in content(repo, oid).decode().splitlines()
            if "filter=lfs" in line and line.split()]


def is_lfs(repo: Path, commit: str, path: str) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(Path(path).name, p) for p in lfs_patterns(repo, commit))


def commit_date(repo: Path, commit: str) -> str:
    """The commit's date as the Hub writes it (UTC, milliseconds, a Z)."""
    seconds = int((git(repo, "show", "-s", "--format=%ct", commit) or "0").strip())
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# -- the HTTP side ---------------------------------------------------------------------------
class HubError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format, *args):
        pass  # requests go to the server's own log

    def setup(self):
        super().setup()
        self.server.track(self.connection, True)

    def finish(self):
        self.server.track(self.connection, False)
        super().finish()

    # -- dispatch
    def do_HEAD(self):
        self.handle_any("HEAD")

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")

    def handle_any(self, method: str) -> None:
        if self.server.gone.is_set():  # a request that raced the server going away: no answer
            self.close_connection = True
            return
        rng = self.headers.get("Range")
        self.server.record(f"{method} {self.path}" + (f" [{rng}]" if rng else ""))
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        try:
            if path == "/api/agent-harnesses":
                return self.send_json({"standardEnvVars": [], "harnesses": {}})  # no agent harnesses
            if path.startswith("/api/"):
                return self.api(method, path[len("/api/"):], query)
            if path.startswith("/cdn/"):
                return self.cdn(method, path[len("/cdn/"):])
            return self.resolve_file(method, path.lstrip("/"))
        except HubError as err:
            self.send_error_json(err)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def repo_dir(self, kind: str, repo_id: str) -> Path:
        folder = self.server.root / kind / repo_id
        if "/" not in repo_id or ".." in repo_id or not (folder / ".git").exists():
            raise HubError(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
        return folder

    def commit_of(self, repo: Path, rev: str) -> str:
        commit = resolve(repo, unquote(rev))
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    # -- /api/...
    def api(self, method: str, rest: str, query: dict) -> None:
        kind, _, rest = rest.partition("/")
        if kind not in TYPES:
            raise HubError(404, "", "Not Found")
        parts = rest.split("/")
        repo_id, tail = "/".join(parts[:2]), parts[2:]
        repo = self.repo_dir(kind, repo_id)
        if not tail or tail[0] == "revision":
            commit = self.commit_of(repo, "/".join(tail[1:]) if len(tail) > 1 else "main")
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            return self.send_json(self.info(kind, repo_id, repo, commit, blobs))
        if tail[0] == "tree" and len(tail) >= 2:
            commit = self.commit_of(repo, tail[1])
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self.send_json(self.tree(repo, commit, "/".join(tail[2:]).strip("/"), recursive))
        if tail[0] == "paths-info" and len(tail) >= 2 and method == "POST":
            commit = self.commit_of(repo, tail[1])
            form = self.read_form()
            return self.send_json(self.paths_info(repo, commit, form.get("paths", [])))
        raise HubError(404, "", f"Not Found: {self.path}")

    def info(self, kind: str, repo_id: str, repo: Path, commit: str, blobs: bool = False) -> dict:
        files = listing(repo, commit)
        siblings = []
        for path, (oid, size) in sorted(files.items()):
            entry = {"rfilename": path}
            if blobs:  # ?blobs=true: sizes and ids, as files_metadata=True asks
                item = self.entry(repo, commit, path, oid, size)
                entry.update(blobId=oid, size=size)
                if "lfs" in item:  # siblings name the LFS hash sha256 (a tree entry names it oid)
                    entry["lfs"] = {"sha256": item["lfs"]["oid"], "size": size, "pointerSize": 134}
            siblings.append(entry)
        info = {"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "sha": commit,
                "lastModified": commit_date(repo, commit), "private": False, "gated": False, "disabled": False,
                "tags": [], "siblings": siblings}
        if kind == "models":
            info["modelId"] = repo_id
        return info

    def entry(self, repo: Path, commit: str, path: str, oid: str, size: int) -> dict:
        item = {"type": "file", "oid": oid, "size": size, "path": path}
        if is_lfs(repo, commit, path):
            data = content(repo, oid)
            item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": size, "pointerSize": 134}
        return item

    def tree(self, repo: Path, commit: str, folder: str, recursive: bool) -> list[dict]:
        files = listing(repo, commit)
        prefix = f"{folder}/" if folder else ""
        if folder and not any(p.startswith(prefix) for p in files):
            raise HubError(404, "EntryNotFound", f"{folder} does not exist at revision {commit}")
        out, dirs = [], set()
        for path, (oid, size) in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/")[0])
                continue
            if recursive:  # the Hub lists every folder on the way too
                parts = rest.split("/")[:-1]
                dirs.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            out.append(self.entry(repo, commit, path, oid, size))
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(dirs)]
        return folders + out

    def paths_info(self, repo: Path, commit: str, paths: list[str]) -> list[dict]:
        files, out = listing(repo, commit), []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(self.entry(repo, commit, p, *files[p]))
            elif any(f.startswith(p + "/") for f in files):
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p})
        return out

    # -- /{repo}/resolve/{rev}/{path}
    def resolve_file(self, method: str, path: str) -> None:
        kind = "models"
        if path.startswith(("datasets/", "models/")):
            kind, _, path = path.partition("/")
        parts = path.split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            raise HubError(404, "", f"Not Found: {self.path}")
        repo_id, rev, file_path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repo = self.repo_dir(kind, repo_id)
        commit = self.commit_of(repo, rev)
        files = listing(repo, commit)
        if file_path not in files:
            raise HubError(404, "EntryNotFound", f"Entry not found: {file_path}")
        oid, size = files[file_path]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{oid}"', "Accept-Ranges": "bytes"}
        if is_lfs(repo, commit, file_path):
            data = content(repo, oid)
            sha = hashlib.sha256(data).hexdigest()
            headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(size),
                            "Location": f"{self.server.cdn_url}/cdn/{kind}/{repo_id}/{oid}/{file_path}"})
            return self.send_bytes(302, b"", headers, method)
        self.send_content(method, file_path, content(repo, oid), headers)

    def cdn(self, method: str, rest: str) -> None:
        """The content of an LFS file, where a resolve of it redirects (like the Hub's CDN)."""
        parts = rest.split("/")
        kind, repo_id, oid, file_path = parts[0], "/".join(parts[1:3]), parts[3], "/".join(parts[4:])
        repo = self.repo_dir(kind, repo_id)
        data = content(repo, oid)
        if data is None:
            raise HubError(404, "EntryNotFound", "no such object")
        self.send_content(method, file_path, data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                                    "Accept-Ranges": "bytes"})

    def send_content(self, method: str, file_path: str, data: bytes, headers: dict) -> None:
        start, status = 0, 200
        rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if rng and method == "GET":
            start, status = min(int(rng.group(1)), len(data)), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        drop = self.server.drop_at(file_path) if method == "GET" else None
        if drop is not None:
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.server.go_away(self.connection)
            return
        self.send_bytes(status, body, headers, method)

    # -- helpers
    def read_form(self) -> dict[str, list[str]]:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n).decode() if n else ""
        if self.headers.get("Content-Type", "").startswith("application/json"):
            data = json.loads(raw or "{}")
            return {k: v if isinstance(v, list) else [v] for k, v in data.items()}
        return parse_qs(raw)

    def send_bytes(self, status: int, body: bytes, headers: dict, method: str = "GET") -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def send_json(self, obj) -> None:
        self.send_bytes(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def send_error_json(self, err: HubError) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        self.send_bytes(err.status, json.dumps({"error": err.message}).encode(), headers,
                        "HEAD" if self.command == "HEAD" else "GET")


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, *, port: int = 0, drop_after: dict[str, int] | None = None,
                 log: Path | None = None):
        super().__init__(("127.0.0.1", port), Handler)
        self.root = Path(root)
        self.drop_after = dict(drop_after or {})
        self.log_path = log
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.gone = threading.Event()
        self.connections: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        """Where LFS files redirect: this server under another host name, as the Hub's CDN is
        another host (huggingface_hub follows redirects within a host, not off it)."""
        return f"http://localhost:{self.server_address[1]}"

    def record(self, line: str) -> None:
        with self.lock:
            self.requests.append(line)
            if self.log_path is not None:
                with open(self.log_path, "a") as f:
                    f.write(line + "\n")

    def drop_at(self, file_path: str) -> int | None:
        name = Path(file_path).name
        return self.drop_after.get(file_path, self.drop_after.get(name))

    def track(self, conn: socket.socket, open_: bool) -> None:
        with self.lock:
            (self.connections.add if open_ else self.connections.discard)(conn)

    def go_away(self, conn: socket.socket) -> None:
        """Cut the connection mid-body and stop serving: the server is gone. Every other open
        connection is closed too (kept-alive ones included), as when a process dies: a client
        must not go on talking to a server that is no longer there."""
        self.record("-- server went away")
        self.gone.set()
        with self.lock:
            conns = self.connections | {conn}
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        threading.Thread(target=self._stop, daemon=True).start()

    def _stop(self) -> None:
        self.shutdown()
        self.socket.close()

    def start(self) -> HubServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve git repositories as a Hub-compatible API on 127.0.0.1, "
                                "run a command against it (HF_ENDPOINT set), stop.")
    p.add_argument("--root", required=True, help="folder holding models/ORG/NAME and datasets/ORG/NAME git repos")
    p.add_argument("--log", help="append every request (METHOD PATH) to this file")
    p.add_argument("--drop-after", action="append", default=[], metavar="NAME=BYTES",
                   help="cut the download of file NAME after BYTES bytes, then stop the server")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    drops = {k: int(v) for k, v in (d.split("=", 1) for d in args.drop_after)}
    server = HubServer(Path(args.root), drop_after=drops, log=Path(args.log) if args.log else None).start()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    env = {**os.environ, "HF_ENDPOINT": server.url}
    try:
        return subprocess.run(cmd, env=env, check=False).returncode
    finally:
        if not server.gone.is_set():
            server.shutdown()
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
