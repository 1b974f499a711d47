"""What every request passes before the app sees it: a plain ASGI middleware on rank 0's HTTP front.

In order: the Host header (without an API key, only `localhost` or an IP address: a page of another
site cannot reach a keyless service through DNS rebinding, which needs a name of its own), the
API key on /v1 (before the body is read, so a wrong key never learns whether its body was valid),
then the body: at most MAX_BODY bytes whatever the transfer encoding (a Content-Length over it, or
a chunked body counted as it arrives, refused as soon as it passes MAX_BODY), and all of it within
the request timeout. The app then reads the body from memory. After a refusal the connection stays
open only if the unread rest of the body is known and small (uvicorn reads and drops it, so the
client hears the answer rather than a reset); otherwise it is closed, and the rest never read.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from paradit.serve.schema import ApiError

MAX_BODY = 64 * 1024    # bytes: a request is a prompt and a few numbers
DRAIN_MAX = 2**20       # bytes of a refused body read and dropped, rather than the connection closed


class Guard:
    """app wrapped; refused(status) counts each refusal (the service's metrics)."""

    def __init__(self, app, api_key: str | None, timeout_s: float, refused=lambda status: None, image_body: int = 0):
        self.app, self.api_key, self.timeout_s, self.refused = app, api_key, timeout_s, refused
        self.image_body = image_body   # a service of an image model: POST /v1/videos may carry a first frame

    def limit(self, scope) -> int:
        """The most bytes this request's body may have: MAX_BODY, or the image bound for a video request
        to a service that takes images (the app refuses a body over MAX_BODY that carries none)."""
        if self.image_body and scope.get("method") == "POST" and scope["path"] == "/v1/videos":
            return max(MAX_BODY, self.image_body)
        return MAX_BODY

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        err = self.check_headers(scope, headers)
        if err is not None:  # nothing of the body read yet
            return await self.refuse(err, not small_rest(headers), scope, receive, send)
        body, err = await self.read_body(headers, receive, self.limit(scope))
        if err is not None:  # part of it read, the rest unknown
            return await self.refuse(err, True, scope, receive, send)
        if body is not None:  # None: the client left while sending it
            await self.app(scope, replay(body, receive), send)

    async def refuse(self, err: ApiError, close: bool, scope, receive, send) -> None:
        self.refused(err.status)
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
        if close:
            headers["Connection"] = "close"
        await JSONResponse(err.body(), err.status, headers)(scope, receive, send)

    def check_headers(self, scope, headers: Headers) -> ApiError | None:
        if self.api_key is None and not rebinding_safe(headers.get("host")):
            return ApiError(403, f"Host {headers.get('host')!r}: this service has no API key, so it answers only "
                                 f"requests addressed to localhost or an IP address (a defence against DNS "
                                 f"rebinding): use http://127.0.0.1:PORT, or start it with --api-key", "Host",
                            kind="permission_error")
        if self.api_key is not None and scope["path"].startswith("/v1"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                                kind="authentication_error")
        length = headers.get("content-length")
        if length is not None and (len(length) > 9 or int(length) > self.limit(scope)):  # h11 checked: digits
            return too_large(f"{length} bytes", self.limit(scope))
        return None

    async def read_body(self, headers: Headers, receive, limit: int = MAX_BODY) -> tuple[bytes | None, ApiError | None]:
        """The whole body, counted as it arrives: (body, None), (None, refusal), or (None, None) if the
        client disconnected."""
        loop = asyncio.get_running_loop()
        deadline, chunks, size = loop.time() + self.timeout_s, [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None, ApiError(408, f"the body did not arrive within {self.timeout_s:g} s "
                                           f"(--request-timeout)", "body", kind="timeout_error")
            if message["type"] == "http.disconnect":
                return None, None
            size += len(message.get("body", b""))
            if size > limit:
                return None, too_large(f"over {limit} bytes ({headers.get('transfer-encoding', 'streamed')})", limit)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks), None


def small_rest(headers: Headers) -> bool:
    """The body left unread is known and at most DRAIN_MAX bytes (none, or a Content-Length)."""
    length = headers.get("content-length")
    if length is not None:
        return len(length) <= 9 and int(length) <= DRAIN_MAX
    return "chunked" not in headers.get("transfer-encoding", "").lower()


def too_large(what: str, limit: int = MAX_BODY) -> ApiError:
    return ApiError(413, f"the body is {what}; at most {limit} are taken", "body")


def replay(body: bytes, receive):
    """A receive() that gives the app the body read already, then the client's own messages
    (a disconnect)."""
    first = True

    async def again():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return again


def rebinding_safe(host: str | None) -> bool:
    """Host (with or without a port) is `localhost`, a name under it, or an IP address: names that no
    other site can point at this machine. No Host (HTTP/1.0) is no browser's request."""
    if host is None:
        return True
    try:
        name = urlsplit(f"//{host}").hostname or ""
    except ValueError:
        return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False
