"""The stand-in Orb's HTTP plumbing: a threading loopback server whose handler reads
every body (chunked or not), hands the request to :class:`fake_orb.FakeOrb` and writes
its answer, a hang or a connection reset."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import struct
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fake_orb.common import _Outcome, _Request, error_body

if TYPE_CHECKING:
    from fake_orb.core import FakeOrb

_DRAIN_CHUNK = 64 * 1024


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], family: int, fake: FakeOrb) -> None:
        self.address_family = family
        self.fake = fake
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which can block on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        # Without this, keep-alive request/response pairs stall ~40 ms on
        # Nagle + delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._conns_lock:
            self._conns.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away, or stop() shut the socket: not news
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-orb/1"
    sys_version = ""
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests and the CLI summary say what happened

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    # ------------------------------------------------------------------

    def _read_body(self, limit: int | None) -> tuple[bytes | None, int]:
        """Read the whole request body (always, to keep the connection in sync).

        Returns (body or None when it exceeded ``limit``, length on the wire).
        """
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            total = 0
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunk = self.rfile.read(size)
                self.rfile.readline(65537)
                total += len(chunk)
                if limit is None or total <= limit:
                    chunks.append(chunk)
            if limit is not None and total > limit:
                return None, total
            return b"".join(chunks), total
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        if limit is not None and length > limit:
            remaining = length
            while remaining > 0:
                got = self.rfile.read(min(_DRAIN_CHUNK, remaining))
                if not got:
                    break
                remaining -= len(got)
            return None, length
        return self.rfile.read(length) if length else b"", length

    def _dispatch(self) -> None:
        fake = self.server.fake
        try:
            body, body_len = self._read_body(fake.max_body_bytes)
        except ValueError:
            self.close_connection = True
            self._write(_Outcome(400, error_body(400, detail="malformed request body framing")))
            return
        split = urlsplit(self.path)
        req = _Request(self.command, split.path, split.query, self.headers, body, body_len)
        try:
            outcome = fake._process(req)
        except Exception as exc:
            traceback.print_exc()
            outcome = _Outcome(
                500,
                error_body(500, detail=f"fake-orb internal error: {exc!r}"),
                {"Transient-Error": "true"},
            )
        if outcome.delay and fake.latency_ms > 0:
            fake._stopping.wait(fake.latency_ms / 1000.0)
        if outcome.action == "hang":
            fake._stopping.wait(outcome.seconds)
            self.close_connection = True  # the server closes without answering
            return
        if outcome.action == "reset":
            self._reset_connection()
            return
        self._write(outcome)

    def _reset_connection(self) -> None:
        self.close_connection = True
        sock = self.connection
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The fd is really closed (with RST, thanks to SO_LINGER 0) once the
        # buffered reader made by makefile() is closed too.
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            sock.close()

    def _write(self, outcome: _Outcome) -> None:
        body = outcome.body
        if body is None:
            payload, ctype = b"", "application/json"
        elif isinstance(body, str):
            payload, ctype = body.encode("utf-8"), "text/plain; charset=utf-8"
        else:
            payload, ctype = json.dumps(body).encode("utf-8"), "application/json"
        assert outcome.status is not None
        self.send_response(outcome.status)
        lower = {k.lower() for k in outcome.headers}
        if "content-type" not in lower:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in outcome.headers.items():
            if k.lower() != "content-length":
                self.send_header(k, v)
        # Headers and body in one write.
        self._headers_buffer.append(b"\r\n")  # type: ignore[attr-defined]
        if self.command != "HEAD":
            self._headers_buffer.append(payload)  # type: ignore[attr-defined]
        self.flush_headers()
