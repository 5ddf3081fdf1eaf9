"""A blocking HTTP/1.1 client (h11 over a socket, optional TLS with ALPN) and a raw-bytes exchange helper.

with H1Connection("127.0.0.1", port) as c:
    r = c.request("GET", "/")
data, closed = raw_exchange("127.0.0.1", port, b"GARBAGE\\r\\n\\r\\n")
"""

from __future__ import annotations

import socket
import ssl
import time

import h11

from .common import HeaderInput, Response, header_list

__all__ = ["H1Connection", "h1_request", "raw_exchange"]


class H1Connection:
    """One keep-alive HTTP/1.1 connection (blocking)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str = "localhost",
        timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock: socket.socket = raw
        self.alpn: str | None = None
        if ssl_context is not None:
            tls = ssl_context.wrap_socket(raw, server_hostname=server_hostname)
            self.alpn = tls.selected_alpn_protocol()
            self.sock = tls
        self.h11 = h11.Connection(h11.CLIENT)

    def __enter__(self) -> H1Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"<H1Connection {self.host}:{self.port} alpn={self.alpn} state={self.h11.our_state.__name__}>"

    def request(
        self,
        method: str,
        path: str,
        headers: HeaderInput = (),
        body: bytes = b"",
        *,
        host: str | None = None,
    ) -> Response:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        hdrs = header_list(headers)
        names = {k.lower() for k, _ in hdrs}
        if "host" not in names:
            hdrs.insert(0, ("host", host or f"{self.host}:{self.port}"))
        if body and "content-length" not in names and "transfer-encoding" not in names:
            hdrs.append(("content-length", str(len(body))))
        out = self.h11.send(h11.Request(method=method, target=path, headers=hdrs))
        if body:
            out += self.h11.send(h11.Data(data=body))
        out += self.h11.send(h11.EndOfMessage())
        self.sock.sendall(out)
        status = 0
        resp_headers: list[tuple[str, str]] = []
        resp_body = bytearray()
        trailers: list[tuple[str, str]] = []
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = self.sock.recv(65536)
                self.h11.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = header_list(event.headers)
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Data):
                resp_body += event.data
            elif isinstance(event, h11.EndOfMessage):
                trailers = header_list(event.headers)
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("connection closed before the response completed")
        return Response(status, resp_headers, bytes(resp_body), trailers)


def h1_request(
    host: str,
    port: int,
    method: str,
    path: str,
    headers: HeaderInput = (),
    body: bytes = b"",
    *,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request on a fresh connection."""
    with H1Connection(host, port, ssl_context=ssl_context, timeout=timeout) as c:
        return c.request(method, path, headers, body)


def raw_exchange(host: str, port: int, data: bytes, *, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send ``data`` as is; read until the peer closes or ``timeout`` passes. Returns ``(received, closed)``.

    ``closed`` is True when the peer closed (or reset) the connection within the timeout.
    """
    deadline = time.monotonic() + timeout
    received = bytearray()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            return bytes(received), True
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(received), False
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return bytes(received), False
            except OSError:  # reset counts as closed
                return bytes(received), True
            if not chunk:
                return bytes(received), True
            received += chunk
