"""uvicorn on rank 0, with two bounds on connections that its knobs lack.

uvicorn times out idle keep-alive connections (timeout_keep_alive) and answers 503 beyond
limit_concurrency connections, but a connection whose request headers never finish is held
forever, and counts towards that limit: a few hundred half-open sockets from one client would lock
every other client out. So its h11 protocol is given (1) a deadline for a request's headers, from
the connection (or from the first byte of the next request on a kept-alive one), answered with 408
and a close, and (2) a bound on one client address's connections at once, beyond which a new one
is answered 503 and closed. The body's own deadline and size are paradit.serve.guard's.
"""
from __future__ import annotations

import socket
import threading
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

PER_CLIENT = 64          # connections one client address may hold at once (a browser opens about 6)
LIMIT_CONCURRENCY = 512  # uvicorn's bound on all connections, beyond which it answers 503


class BoundedH11(H11Protocol):
    request_timeout_s = 10.0   # set per server by start_http (--request-timeout)
    per_client = PER_CLIENT
    header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        if host is not None and sum(c.client is not None and c.client[0] == host
                                    for c in self.connections) > self.per_client:
            self.answer_and_close(503, f"too many connections from {host}: at most {self.per_client} at once; "
                                       f"close some and retry")
            return
        self.arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.waiting_for_headers():
            self.arm()      # a kept-alive connection began its next request: its headers have a deadline
        else:
            self.disarm()

    def connection_lost(self, exc) -> None:
        self.disarm()
        super().connection_lost(exc)

    def waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def arm(self) -> None:
        if self.header_timer is None and not self.transport.is_closing():
            self.header_timer = self.loop.call_later(self.request_timeout_s, self.headers_timed_out)

    def disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_timed_out(self) -> None:
        self.header_timer = None
        if self.waiting_for_headers() and not self.transport.is_closing():
            self.answer_and_close(408, f"the request's headers did not arrive within {self.request_timeout_s:g} s")

    def answer_and_close(self, status: int, message: str) -> None:
        """A plain-text answer written past h11 (no request may have been read), then a close."""
        body = (message + "\n").encode()
        reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
        self.transport.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                             f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        self.transport.close()


def start_http(app, host: str, port: int, request_timeout_s: float):
    """uvicorn in a thread of rank 0, on a socket bound here (so a taken port is a clear error)."""
    import uvicorn
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({err.strerror}); give another "
                         f"--port (0: any free one)") from None
    protocol = type("Protocol", (BoundedH11,), {"request_timeout_s": request_timeout_s})
    config = uvicorn.Config(app, http=protocol, log_level="warning", access_log=False, timeout_keep_alive=5,
                            limit_concurrency=LIMIT_CONCURRENCY)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="paradit-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start (see its log above)")
        time.sleep(0.01)
    return server, sock.getsockname()[1]


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
