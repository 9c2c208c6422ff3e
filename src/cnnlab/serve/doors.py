"""The server's doors, in front of every route: only the ``Host`` names of ``AllowedHosts``
are answered (``HostCheck``: a web page the user visits cannot reach the server by DNS
rebinding, as Jupyter checks); an upload's size and type are checked before its body is read,
and its body must arrive in time (``PredictLimits``); every error leaves as JSON ``{"detail":
"one line"}`` (``add_error_handlers``), never a traceback."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnnlab.serve.pool import Gate

FORM_OVERHEAD = 64 * 1024  # the multipart boundaries, headers and small fields around it
WILDCARDS = ("", "0.0.0.0", "::")  # addresses that listen on every interface


class PredictLimits:
    """ASGI middleware for the uploads (a POST to one of ``paths``: ``POST /api/predict``
    and ``POST /api/explore/images``), all before the body is read: 415 unless
    multipart, 413 past ``max_upload`` and the form around it (the Content-Length, then
    the bytes as they arrive), 503 when the ``queue`` is full or ``arriving`` holds as many
    uploads as it takes. While the body arrives: 408 once ``upload_timeout`` seconds have
    passed since its headers (a stalled or trickling client gives its place back), 503
    once ``stopping`` is set. The place in ``arriving`` is given back as soon as the body
    has arrived; the route then takes one in ``queue``."""

    def __init__(
        self,
        app: ASGIApp,
        paths: Sequence[str],
        queue: Gate,
        arriving: Gate,
        max_upload: int,
        upload_timeout: float,
        stopping: asyncio.Event,
    ) -> None:
        self.app, self.queue, self.arriving, self.stopping = app, queue, arriving, stopping
        self.paths = frozenset(paths)
        self.max_body = max_upload + FORM_OVERHEAD
        self.upload_timeout = upload_timeout
        self.too_large = f"the upload is larger than the limit of {max_upload:,} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        length = headers.get("content-length", "0")
        refusal = None
        if kind != "multipart/form-data":
            refusal = _error(415, f"expected a multipart/form-data upload, not {kind or 'none'}")
        elif not length.isdigit():
            refusal = _error(400, f"malformed Content-Length {length!r}")
        elif int(length) > self.max_body:
            refusal = _error(413, self.too_large)
        elif self.queue.full():
            refusal = _error(503, "busy: too many predictions queued", {"Retry-After": "1"})
        elif not self.arriving.enter():
            refusal = _error(503, "busy: too many uploads arriving", {"Retry-After": "1"})
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.upload_timeout
        received, arrived = 0, False

        def give_back() -> None:
            nonlocal arrived
            if not arrived:
                arrived = True
                self.arriving.leave()

        async def counted() -> Message:
            nonlocal received
            if arrived:  # the body is in: no deadline on what the app waits for next
                return await receive()
            message = await self._next(receive, deadline)
            received += len(message.get("body", b""))
            if received > self.max_body:  # a body longer than its Content-Length, or chunked
                raise HTTPException(413, self.too_large)
            if not message.get("more_body", False):
                give_back()
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            give_back()

    async def _next(self, receive: Receive, deadline: float) -> Message:
        """The next message, or a 408 once ``deadline`` passes, a 503 once stopping."""
        arrived = asyncio.ensure_future(receive())
        stop = asyncio.ensure_future(self.stopping.wait())
        left = deadline - asyncio.get_running_loop().time()
        await asyncio.wait((arrived, stop), timeout=max(left, 0), return_when="FIRST_COMPLETED")
        stop.cancel()
        if arrived.done():
            return arrived.result()
        arrived.cancel()
        if self.stopping.is_set():
            raise HTTPException(503, "the server is stopping", {"Retry-After": "1"})
        raise HTTPException(
            408, f"the upload did not arrive within {self.upload_timeout:g} s (--upload-timeout)"
        )


class AllowedHosts:
    """The ``Host`` names a server answers to: the address it listens on, ``localhost``
    and loopback addresses, and ``extra`` (``--allow-host``; ``*`` admits any). Listening
    on every interface (0.0.0.0 or ::), any IP address is admitted too: a name is what a
    DNS-rebinding page sends, an address never is. Ports are not compared."""

    def __init__(self, bound: str, extra: Sequence[str] = ()) -> None:
        self.any_host = "*" in extra
        self.any_address = bound in WILDCARDS
        self.names = {"localhost", *(host_name(name) for name in extra)}
        if not self.any_address:
            self.names.add(host_name(bound))

    def admits(self, header: str | None) -> bool:
        if header is None or self.any_host:  # no Host: not a browser (it always sends one)
            return True
        name = host_name(header)
        if name in self.names:
            return True
        address = _address(name)
        if address is None:
            return False
        bound = {_address(known) for known in self.names} - {None}
        return address.is_loopback or self.any_address or address in bound


def host_name(header: str) -> str:
    """The host of a ``Host`` header, lower case, without its port or final dot."""
    text = header.strip().lower()
    if text.startswith("["):  # [IPv6]:port
        return text[1:].split("]")[0]
    if text.count(":") == 1:
        text = text.rsplit(":", 1)[0]
    return text.rstrip(".")


def _address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class HostCheck:
    """ASGI middleware answering 403 to a request whose ``Host`` is not ``allowed``."""

    def __init__(self, app: ASGIApp, allowed: AllowedHosts) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            header = Headers(scope=scope).get("host")
            if not self.allowed.admits(header):
                name = _one_line(host_name(header or ""))[:100]
                detail = (
                    f"Host {name!r} is not an address of this server (a page elsewhere"
                    f" reaching it?); if you opened it by that name, start it with"
                    f" --allow-host {name}"
                )
                if scope["type"] == "http":
                    await _error(403, detail)(scope, receive, send)
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON ``{"detail": "one line"}``: a 4xx as raised, a malformed field a
    422 naming it, any other exception a 500."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, _one_line(str(error.detail)), error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return _error(422, _one_line(f"{where}: {first['msg']}"))

    @app.exception_handler(Exception)
    async def failure(request: Request, error: Exception) -> JSONResponse:
        # Starlette raises the error again once this is sent: uvicorn logs its traceback.
        return _error(500, _one_line(f"internal error: {type(error).__name__}: {error}"))


def _one_line(text: str) -> str:
    return " ".join(text.split())
