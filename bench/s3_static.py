"""A read-only S3-compatible endpoint on loopback that serves a folder, for throughput benches.

`python -m bench.s3_static ROOT PORT`: `GET/HEAD /<bucket>/<key>` (path-style addressing, or
`/<key>` virtual-host style) answer with `ROOT/<key>`, `Range: bytes=a-b` honoured (206), bodies sent with `os.sendfile`. Signatures
are not checked. Why not moto's server, which the tests use: moto answers a ranged GET by copying
the whole object first (a 2 GiB shard read in 64 MiB ranges copies 64 GiB), so its figure would
measure moto; this one is a floor on what the server costs, so the figure measures our client
(boto3 reads, sha256 of every chunk, host-to-device copies). It is no stand-in for S3's own
per-connection rate (about 100 MB/s), which the worker's 16 parallel ranges are there to multiply.
"""

from __future__ import annotations

import os
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: boto3 reuses its connections
    root: Path

    def log_message(self, *args):  # one line per request would swamp the bench's output
        pass

    def _target(self) -> Path | None:
        """ROOT/<key> for path-style `/<bucket>/<key>`, else for virtual-host style `/<key>`."""
        path = self.path.split("?", 1)[0].lstrip("/")
        for key in (path.split("/", 1)[-1], path):
            target = (self.root / key).resolve()
            if target.is_file() and self.root in target.parents:
                return target
        return None

    def _missing(self) -> None:
        body = b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code><Message>not found</Message></Error>"
        self.send_response(404)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        self.do_GET()

    def do_GET(self):  # noqa: N802
        path = self._target()
        if path is None:
            return self._missing()
        size = path.stat().st_size
        begin, end, status = 0, size - 1, 200
        m = _RANGE.match(self.headers.get("Range", ""))
        if m:
            begin, end, status = int(m[1]), min(int(m[2] or size - 1), size - 1), 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - begin + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{size:x}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {begin}-{end}/{size}")
        self.end_headers()
        if self.command == "GET":
            self.wfile.flush()
            with open(path, "rb") as f:
                sent = 0
                while sent < end - begin + 1:
                    sent += os.sendfile(self.connection.fileno(), f.fileno(), begin + sent, end - begin + 1 - sent)


def make_server(root: str | Path, port: int = 0) -> ThreadingHTTPServer:
    """The endpoint for `root` on 127.0.0.1:`port` (0: any free port), not yet serving."""
    handler = type("Handler", (_Handler,), {"root": Path(root).resolve()})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    return server


def serve(root: str, port: int) -> None:
    server = make_server(root, port)
    print(f"serving {root} on 127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
