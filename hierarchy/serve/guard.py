"""What every endpoint of ``hierarchy serve`` and ``hierarchy review`` is protected by: a
request body read no further than its limit, a bind address that stays on the machine unless
asked, and for the review page's writes a per-server token, same-origin and JSON only.

Why a token and not only the Origin check: a browser sends no Origin on some same-site
requests and other clients send what they like; a page on another site cannot read the
token (it travels in the printed link's fragment, which no server or log sees, then in a
custom header, which a cross-origin request cannot set without a CORS preflight this server
never grants).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import secrets
from typing import Dict, Optional
from urllib.parse import urlsplit

from hierarchy.contracts.errors import Refused

TOKEN_HEADER = "x-review-token"
# a team that wants a stable token (several reviewers behind one link) sets it here rather
# than in a conf file that lands in version control
TOKEN_ENV = "HIERARCHY_REVIEW_TOKEN"


class RemoteRefused(Refused, ValueError):
    pass


class BodyTooLarge(Exception):
    pass


class BodyTimedOut(BodyTooLarge):
    """A body still arriving after ``serve.body_timeout_s``: unwound like one too large (the
    408 is already answered)."""


def server_limits(scfg) -> dict:
    """uvicorn's options that bound what clients can hold: ``serve.max_connections``
    connections at once (more are answered 503 at once: what bounds the server's memory
    under many clients) and ``serve.header_timeout_s`` for a request's headers."""
    return {"limit_concurrency": scfg.max_connections + 1,  # uvicorn refuses at >= its limit
            "http": header_timeout_protocol(scfg.header_timeout_s),
            "timeout_keep_alive": min(5, int(scfg.header_timeout_s) or 1)}


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request headers are not whole
    ``seconds`` after it opened or after its last answer. uvicorn's own keep-alive timer
    restarts on every byte received, so a client sending a header byte every few seconds
    (slowloris) held its connection forever: 300 of them were held 25 s and more."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        _awaiting = None
        _timer = None

        def _arm(self) -> None:
            self._disarm()
            self._awaiting = self.cycle  # headers are whole once a new cycle starts
            self._timer = self.loop.call_later(seconds, self._late)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _late(self) -> None:
            self._timer = None
            if self.cycle is self._awaiting and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self._timer is not None and self.cycle is not self._awaiting:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

    return HeaderTimeout


def new_token() -> str:
    return os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool, what: str) -> None:
    """Refuse, before a socket opens, to bind ``what`` beyond this machine unless asked."""
    if not is_loopback(host) and not allow_remote:
        raise RemoteRefused(
            f"--host {host} is reachable from the network: {what} would answer anyone who "
            f"reaches it; pass --allow-remote to mean it (review decisions still need the "
            f"token the server prints), or keep 127.0.0.1 behind a proxy with TLS")


def local_hosts_only(app, host: str, allow_remote: bool):
    """``app`` answering only requests addressed to this machine by name or loopback address
    when it listens on loopback. Why: a web page can re-point its own host name at 127.0.0.1
    (DNS rebinding) and then read the review queue as a same-origin page; the Host header it
    must send still names its own site. Listening beyond loopback (--allow-remote) the names
    are the operator's proxy's business, and writes still need the token."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    if allow_remote and not is_loopback(host):
        return app
    return TrustedHostMiddleware(app, allowed_hosts=sorted({"localhost", "127.0.0.1", "::1",
                                                            host.strip("[]").lower()}))


def write_refusal(headers, token: str, url: str = "http://") -> Optional[tuple]:
    """(status, detail) that refuses a write, or None: same origin (scheme, host and port:
    an http page is another origin than the https one a proxy serves; ``url``: the
    request's own), JSON, the token."""
    origin = headers.get("origin")
    if origin is not None:
        sent, own = urlsplit(origin), urlsplit(url)
        if (sent.scheme.lower(), sent.netloc.lower()) != (own.scheme.lower(),
                                                          headers.get("host", "").lower()):
            return 403, ("cross-origin request refused: decisions come from the review page "
                         "itself")
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        return 415, f"content type {ctype or 'missing'}: decisions are application/json"
    given = headers.get(TOKEN_HEADER, "")
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        return 403, (f"missing or wrong {TOKEN_HEADER}: open the review page through the link "
                     f"the server printed at start (it carries the token)")
    return None


class BodyLimit:
    """ASGI middleware: a request body over its limit ends in 413 as soon as it is read past
    it (a missing or lying Content-Length changes nothing), and one still not whole
    ``timeout`` seconds after its headers in 408 (a client trickling bytes would otherwise
    hold a connection, and its buffers, for as long as it likes). ``limits`` gives a path
    prefix its own, smaller limit (the review page's decisions are a few hundred bytes)."""

    def __init__(self, app, limit: int, limits: Optional[Dict[str, tuple]] = None,
                 key: str = "serve.max_body_bytes", timeout: Optional[float] = None):
        self.app, self.limit, self.key, self.timeout = app, limit, key, timeout
        self.limits = limits or {}

    def _limit_of(self, path: str) -> tuple:
        for prefix, (limit, key) in self.limits.items():
            if path.startswith(prefix):
                return limit, key
        return self.limit, self.key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, key = self._limit_of(scope.get("path", ""))
        seen = 0
        started = refused = whole = False
        deadline = None if self.timeout is None else \
            asyncio.get_running_loop().time() + self.timeout

        async def refuse(status: int = 413, detail: str = ""):
            # answered here, not by the app: a route that reads the body would otherwise let
            # Starlette's error middleware turn the exception into a 500 first
            nonlocal refused
            refused = True
            body = json.dumps({"detail": detail or f"request body over {limit} bytes "
                                                   f"({key})"}).encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})

        async def limited_receive():
            nonlocal seen, whole
            try:
                message = await (receive() if deadline is None or whole else asyncio.wait_for(
                    receive(), max(0.0, deadline - asyncio.get_running_loop().time())))
            except TimeoutError:
                if not started and not refused:
                    await refuse(408, f"request body not received within {self.timeout:g} s "
                                      f"(serve.body_timeout_s)")
                raise BodyTimedOut(self.timeout) from None
            if message["type"] == "http.request":
                whole = not message.get("more_body", False)  # later receives: a disconnect
                seen += len(message.get("body", b""))
                if seen > limit:
                    if not started and not refused:
                        await refuse()
                    raise BodyTooLarge(limit, key)
            return message

        async def tracking_send(message):
            nonlocal started
            if refused:
                return  # the 413 is sent; what the app answers after it is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await refuse()
        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not refused:
                raise
