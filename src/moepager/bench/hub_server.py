"""A local HTTP server in the hub's URL layout, serving checkpoint folders, for tests and benchmarks.

`/{repo}/resolve/{revision}/{file}` answers HEAD and GET, whole or by Range (206), with the ETag,
X-Repo-Commit and Content-Length headers huggingface_hub reads; `/api/models/{repo}/revision/{revision}`
gives the commit and the file list (HfApi.model_info), `/api/models/{repo}/tree/{revision}` the listing that
snapshot_download asks for. Faults on demand (`fail`): HTTP 500s, answers that
stall past the client's timeout, or bodies cut after some bytes, so retries and clean failures can be tested
against a real server. It counts the bytes it sends. It serves files from the folders it is given, nothing else.

    python -m moepager.bench.hub_server FOLDER --repo org/name [--port 8808]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RESOLVE = re.compile(r"^/([\w.-]+/[\w.-]+)/resolve/([^/]+)/(.+)$")
_API = re.compile(r"^/api/models/([\w.-]+/[\w.-]+)(?:/(revision|tree)/([^/]+))?$")


class HubServer:
    """Serves {repo id: folder} on 127.0.0.1 in a background thread; stop() ends it."""

    def __init__(self, repos: dict[str, Path], port: int = 0, rate: float | None = None):
        self.repos = {r: Path(p) for r, p in repos.items()}
        self.commits = {r: hashlib.sha1(r.encode()).hexdigest() for r in self.repos}
        self.bytes_sent = 0
        self.ranges: list[tuple[str, int, int]] = []  # (file, start, end) of every range answered
        self.fault: str | None = None  # "error", "stall" or "cut"
        self.fault_count = 0  # range GETs left to spoil (-1: all)
        self.stall_s = 2.0
        self.token: str | None = None  # when set, requests without "Authorization: Bearer TOKEN" get a 401
        self.rate = (
            rate  # bytes/s over all connections together (a link's bandwidth); None: as fast as it goes
        )
        self._link = threading.Lock()  # bodies take turns on the link, a piece at a time
        self._lock = threading.Lock()
        self.connections: set[socket.socket] = set()  # open keep-alive connections, closed by stop()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def fail(self, kind: str | None, count: int = -1) -> None:
        with self._lock:
            self.fault, self.fault_count = kind, count

    def _take_fault(self) -> str | None:
        with self._lock:
            if self.fault is None or self.fault_count == 0:
                return None
            self.fault_count -= self.fault_count > 0
            return self.fault

    def stop(self) -> None:
        """Stop listening and drop every open connection: a client sees the server gone."""
        self.httpd.shutdown()
        self.httpd.server_close()
        with self._lock:
            for c in self.connections:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join()


def _handler(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def setup(self) -> None:
            super().setup()
            with server._lock:
                server.connections.add(self.connection)

        def finish(self) -> None:
            with server._lock:
                server.connections.discard(self.connection)
            super().finish()

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _send(
            self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False
        ) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            path = self.path.split("?")[0]
            if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                return self._send(401, b"Invalid credentials", {"X-Error-Code": "RepoNotFound"}, head)
            if m := _API.match(path):
                repo = m[1]
                if repo not in server.repos:
                    return self._send(
                        404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"}
                    )
                root = server.repos[repo]
                files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
                if m[2] == "tree":  # what snapshot_download lists
                    tree = [{"type": "file", "path": f, "size": (root / f).stat().st_size,
                             "oid": hashlib.sha1(f.encode()).hexdigest()} for f in files]  # fmt: skip
                    return self._send(
                        200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head
                    )
                info = {"id": repo, "modelId": repo, "sha": server.commits[repo], "private": False,
                        "siblings": [{"rfilename": f} for f in files]}  # fmt: skip
                return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
            m = _RESOLVE.match(path)
            if not m or m[1] not in server.repos or ".." in m[3]:
                return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"}, head)
            repo, name = m[1], m[3]
            file = server.repos[repo] / name
            if not file.is_file():
                return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"}, head)
            size = file.stat().st_size
            headers = {"ETag": f'"{hashlib.sha1(f"{name}:{size}".encode()).hexdigest()}"',
                       "X-Repo-Commit": server.commits[repo], "Accept-Ranges": "bytes"}  # fmt: skip
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if head:
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                return
            start, end = (int(rng[1]), int(rng[2]) + 1 if rng[2] else size) if rng else (0, size)
            end = min(end, size)
            fault = server._take_fault() if rng else None
            if fault == "error":
                return self._send(500, b"Internal Error")
            if fault == "stall":
                time.sleep(server.stall_s)
            self.send_response(206 if rng else 200)
            for k, v in headers.items():
                self.send_header(k, v)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            # a cut body: half of it, then the connection ends (the half arrives, then EOF)
            stop = start + (end - start) // 2 if fault == "cut" else end
            sent = 0
            with open(file, "rb") as f:
                f.seek(start)
                while start + sent < stop:
                    piece = f.read(min(1 << 20, stop - start - sent))
                    if not piece:
                        break
                    if server.rate:
                        with server._link:
                            time.sleep(len(piece) / server.rate)
                    self.wfile.write(piece)
                    sent += len(piece)
            if fault == "cut":
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
                self.close_connection = True
            with server._lock:
                server.bytes_sent += sent
                server.ranges.append((name, start, start + sent))

    return Handler


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", help="a checkpoint folder to serve")
    p.add_argument("--repo", required=True, help="the id it is served as (ORG/NAME)")
    p.add_argument("--port", type=int, default=8808)
    p.add_argument(
        "--rate", type=float, help="bandwidth in MiB/s, shared by all connections (default: unlimited)"
    )
    args = p.parse_args(argv)
    server = HubServer({args.repo: Path(args.folder)}, args.port, args.rate and args.rate * 2**20)
    print(f"serving {args.folder} as {args.repo} at {server.url} (HF_ENDPOINT={server.url})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
