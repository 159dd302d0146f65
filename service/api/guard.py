"""What every HTTP request meets before any route: ``Guard``, a pure ASGI middleware, and
``HeaderTimeoutProtocol``, the uvicorn protocol that bounds how long request headers may take.

The guard runs these steps in order; each refuses with problem+json before the next runs:

1. Host: the ``Host`` header must name this server (loopback names, plus ``MPQ_ALLOWED_HOSTS``), else 400.
   DNS rebinding points a hostile name at 127.0.0.1; the browser then sends that name as Host.
2. Origin: a state-changing request (anything but GET/HEAD/OPTIONS) whose ``Origin`` (or, without one,
   ``Referer``) is another origin, ``Origin: null`` or ``Sec-Fetch-Site: cross-site`` is refused (403) on
   every route, auth on or off: a page of another site must not upload or start jobs through the user's
   browser. Clients that send neither header (CI, curl, httpx) pass.
3. The bearer token on /v1 when auth is on (401), before any body byte is read.
4. The request body is counted as it streams and refused (413) as soon as it, or its declared
   Content-Length, passes its bound; nothing is buffered here. The upload routes are exempt: they stream
   into the blob store under MPQ_MAX_UPLOAD_BYTES (service/api/transfer.receive_upload).
5. An unexpected exception before the response started is answered 500 problem+json (logged with its
   traceback) and not re-raised: re-raised, uvicorn would close the keep-alive connection after the 500.

A refused request's unread body is discarded by uvicorn as it arrives (never stored), and the client
reads its error after sending the body, as httpx does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, ClassVar
from urllib.parse import urlsplit

from starlette.datastructures import Headers, State
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.api.auth import require_bearer
from service.api.errors import Problem, problem_response
from service.settings import Settings

logger = logging.getLogger("mpq.service")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_BODY_BYTES = 4096  # the login form holds one token
# These stream their body into the blob store under MPQ_MAX_UPLOAD_BYTES (service/api/transfer.receive_upload);
# the API's routes are service/api/registry.py's, the dashboard's service/dashboard/pages.upload.
UPLOAD_ROUTES = frozenset(
    {("POST", "/v1/models"), ("POST", "/v1/datasets"), ("POST", "/upload/models"), ("POST", "/upload/datasets")}
)
DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]  # scheme, host (IPv6 in brackets), port


class RequestBodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes its bound. An HTTPException because FastAPI re-raises
    those when they interrupt reading a body (others become a 400), so the app's handler answers it."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes ({setting})")


class Guard:
    """The first middleware of service.app, inside only Starlette's own error middleware (see the module docstring).

    ``state`` is the app's state, read on every request: settings changed at runtime apply at once.
    """

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._guarded(scope, receive, tracking_send)
        except Exception as error:
            if started:
                raise  # a response cut short: uvicorn closes the connection, as it must
            await _failure_response(scope, error)(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings: Settings = self.state.settings
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        try:
            check_host(headers, settings)
            if method not in SAFE_METHODS:
                check_origin(headers, scope["scheme"])
            if path == "/v1" or path.startswith("/v1/"):
                await require_bearer(self.state, headers)
            bound = body_bound(method, path, settings)
            if bound is not None:
                _check_declared_length(headers, *bound)
                receive = _bounded(receive, *bound)
        except Problem as problem:
            await problem_response(
                problem.status,
                problem.detail,
                title=problem.title,
                instance=path,
                headers=problem.headers,
                **problem.extra,
            )(scope, receive, send)
            return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------- Host and Origin


def check_host(headers: Headers, settings: Settings) -> None:
    """The Host header must be one of the server's names (any port)."""
    host = headers.get("host", "")
    name = split_host(host)[0]
    if name is None or name not in settings.allowed_host_names:
        raise Problem(
            400,
            f"the Host header {host[:100]!r} is not a name of this server: add the name to "
            "MPQ_ALLOWED_HOSTS (comma-separated; 127.0.0.1, localhost and [::1] are always allowed)",
            title="Unknown host",
        )


def check_origin(headers: Headers, scheme: str) -> None:
    """A state-changing request must not come from another site's page."""
    own = _origin_of(scheme, headers.get("host", ""))
    origin = headers.get("origin")
    referer = headers.get("referer")
    if headers.get("sec-fetch-site") == "cross-site":
        raise _cross_site("the browser marks it Sec-Fetch-Site: cross-site")
    if origin is not None:
        if origin.strip() == "null" or _origin_of_url(origin) != own:
            raise _cross_site(f"its Origin {origin[:100]!r} is not this server's")
    elif referer is not None and _origin_of_url(referer) != own:
        raise _cross_site(f"its Referer {referer[:100]!r} is not on this server")


def _cross_site(reason: str) -> Problem:
    return Problem(
        403,
        f"cross-site request refused: {reason}. State-changing requests must come from this "
        "server's own pages, or from clients that send no Origin (CI, curl)",
        title="Cross-site request",
    )


def split_host(host: str) -> tuple[str | None, int | None]:
    """``name[:port]`` or ``[ipv6][:port]`` -> (lower-case name, port); (None, None) if malformed."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        name, rest = (host[: end + 1], host[end + 1 :]) if end > 0 else ("", "")
    else:
        name, colon, port = host.partition(":")
        rest = colon + port
    if not name or "@" in name or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
        return None, None
    return name, int(rest[1:]) if rest else None


def _origin_of(scheme: str, host: str) -> Origin | None:
    name, port = split_host(host)
    if name is None or scheme not in DEFAULT_PORTS:
        return None
    return scheme, name, port if port is not None else DEFAULT_PORTS[scheme]


def _origin_of_url(url: str) -> Origin | None:
    parts = urlsplit(url.strip())
    return _origin_of(parts.scheme.lower(), parts.netloc)


# ---------------------------------------------------------------- request bodies


def body_bound(method: str, path: str, settings: Settings) -> tuple[int, str] | None:
    """(limit, what sets it) for a route's request body; None for the streaming uploads."""
    if (method, path) in UPLOAD_ROUTES:
        return None
    if path == "/login":
        return LOGIN_BODY_BYTES, "the login form's limit"
    return settings.max_request_body_bytes, "MPQ_MAX_REQUEST_BODY_BYTES"


def _check_declared_length(headers: Headers, limit: int, setting: str) -> None:
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Problem(413, RequestBodyTooLarge(limit, setting).detail)


def _bounded(receive: Receive, limit: int, setting: str) -> Receive:
    received = 0

    async def bounded_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise RequestBodyTooLarge(limit, setting)
        return message

    return bounded_receive


# ---------------------------------------------------------------- unexpected errors


def _failure_response(scope: Scope, error: Exception) -> Response:
    if isinstance(error, RequestBodyTooLarge):  # met outside a route (e.g. in a middleware)
        return problem_response(413, error.detail, instance=scope["path"])
    logger.error("unhandled error on %s %s", scope["method"], scope["path"], exc_info=error)
    return problem_response(500, "internal error; the server log has the details", instance=scope["path"])


# ---------------------------------------------------------------- slow clients


@functools.cache
def _configured_header_timeout() -> float:
    return Settings().header_timeout_s


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request headers take too long.

    uvicorn has no such timeout: a connection that sends half a header is kept forever (1,100 of them
    made /healthz time out). The timer runs whenever the connection waits for a request's headers: from
    its opening, and again after each response, until the next request's headers are complete.

    The timeout is ``header_timeout_s``, or MPQ_HEADER_TIMEOUT_S where that is None (read once per process:
    with ``--api-workers`` each worker process imports this class anew).
    """

    header_timeout_s: ClassVar[float | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = self.header_timeout_s or _configured_header_timeout()
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        waiting = not self.pipeline  # a pipelined request already sent its headers
        super().on_response_complete()
        if waiting and not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self._header_timeout, self._headers_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()
