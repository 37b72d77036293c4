"""A real S3-compatible server for the tests (moto's server mode, its own process, on
127.0.0.1) and a fault-injecting HTTP proxy to put in front of it.

    with S3Server() as s3, FaultProxy(s3.port) as proxy:
        env = s3.env(proxy.url)           # AWS_ENDPOINT_URL_S3 etc.: the standard variables
        proxy.fault = lambda method, path, n: "503" if n == 1 else None

Faults (what ``fault(method, path, n)`` returns for the n-th request of ``method path``):
``"500"``, ``"503"`` (an S3 SlowDown error), ``"429"`` (too many requests), ``"reset"`` (half the body, then a TCP
reset), ``"short"`` (half the body, then a clean close: fewer bytes than
Content-Length), ``"stall"`` (the headers, then nothing for ``stall_s`` seconds), or
None (forward as is). ``proxy.counts`` counts requests by (method, path).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"moto_server exited: {log.read().decode(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"moto_server did not listen on {port} within {timeout}s")


class S3Server:
    """``moto_server`` in a child process; ``bucket(name)`` creates a bucket."""

    def __init__(self, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = env or {}

    def __enter__(self) -> "S3Server":
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        # its request log in a file: a pipe nobody reads fills up and blocks the server
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            env={**os.environ, **self.extra_env},
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        try:
            _wait_port(self.port, self.proc, self.log)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def env(self, endpoint: str | None = None) -> dict:
        """The standard AWS variables that point a client at ``endpoint`` (default: the server)."""
        return {**KEYS, "AWS_ENDPOINT_URL_S3": endpoint or self.url, "AWS_ENDPOINT_URL": endpoint or self.url}

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


class _Quiet(http.server.ThreadingHTTPServer):
    """A client that hangs up (a process killed mid-read) is not an error of the proxy."""

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class FaultProxy:
    """A threaded HTTP proxy to ``127.0.0.1:upstream`` that injects ``fault``s."""

    def __init__(self, upstream: int, stall_s: float = 3.0):
        self.upstream, self.stall_s = upstream, stall_s
        self.fault = lambda method, path, n: None
        self.counts: Counter = Counter()
        self.served = 0  # bytes of GET responses forwarded (bench/peer_bench.py: bytes read per epoch)
        self.injected: Counter = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                path = self.path.split("?")[0]
                with proxy.lock:
                    proxy.counts[(self.command, path)] += 1
                    n = proxy.counts[(self.command, path)]
                kind = proxy.fault(self.command, path, n)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if kind in ("500", "503", "429"):
                    with proxy.lock:
                        proxy.injected[kind] += 1
                    code, text = {
                        "503": ("SlowDown", b"Please reduce your request rate."),
                        "429": ("TooManyRequests", b"Too many requests."),
                        "500": ("InternalError", b"We encountered an internal error."),
                    }[kind]
                    payload = (
                        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>"
                        + code.encode()
                        + b"</Code><Message>"
                        + text
                        + b"</Message></Error>"
                    )
                    self.send_response(int(kind))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if self.command == "GET":
                    with proxy.lock:
                        proxy.served += len(data)
                if kind in ("reset", "short", "stall") and len(data) > 1:
                    with proxy.lock:
                        proxy.injected[kind] += 1
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header(
                    "Content-Length",
                    resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)),
                )
                self.end_headers()
                if self.command == "HEAD" or len(data) <= 1 or kind is None:
                    self.wfile.write(data)
                    return
                if kind == "stall":
                    self.wfile.flush()
                    time.sleep(proxy.stall_s)
                    self.close_connection = True
                    return
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                if kind == "reset":  # RST instead of FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = _Quiet(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def gets(self, suffix: str = ".tar") -> int:
        return sum(n for (m, p), n in self.counts.items() if m == "GET" and p.endswith(suffix))

    def gets_of(self, path: str) -> int:
        """GETs of exactly ``path`` so far (the counts are the module's: compare differences)."""
        return self.counts[("GET", path)]

    def __enter__(self) -> "FaultProxy":
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
