"""Pure ASGI middleware guarding the explorer: a Host allow-list, a body size and read-time bound, and
security headers on every answer. Pure middleware (not ``@app.middleware``) keeps
``request.is_disconnected()`` working downstream.

>>> host_name(b"localhost:8000"), host_name(b"[::1]:8000"), host_name(b"EVIL.example")
('localhost', '::1', 'evil.example')
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Host names every explorer answers to; others must be named with ``serve --allow-host``.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

#: The page loads its script and style from /static only and draws its heatmap as inline SVG.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: FastAPI's /docs and /redoc pages use inline scripts and load Swagger UI / ReDoc from a CDN.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src 'self' https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


def host_name(value: bytes) -> str:
    """The name in a Host header without its port, lower-cased (``[::1]:80`` → ``::1``)."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


async def send_json(send: Send, status: int, kind: str, message: str, close: bool = False) -> None:
    """Answer ``{"error": kind, "message": message}`` directly (``close`` adds ``Connection: close``)."""
    body = json.dumps({"error": kind, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HostCheck:
    """Answer 400 unless the Host header names a loopback address or an allowed name (DNS rebinding).

    Starlette's in-process ``TestClient`` (Host ``testserver``, marked by its ``http.response.debug``
    extension, which no network peer can set) is let through so that API tests run unchanged.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = {host_name(h.encode()) for h in (*LOOPBACK_HOSTS, *allowed_hosts)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        raw = dict(scope.get("headers") or []).get(b"host", b"")
        name = host_name(raw)
        in_process = name == "testserver" and "http.response.debug" in scope.get("extensions", {})
        if name in self.allowed or in_process:
            await self.app(scope, receive, send)
            return
        shown = raw.decode("latin-1")[:100] or "(none)"
        message = (
            f"Host header {shown!r} is not allowed; this server answers to {', '.join(sorted(self.allowed))}. "
            f"To reach it under another name, restart it with: patchscopes serve --allow-host {name or 'NAME'}"
        )
        await send_json(send, 400, "bad_host", message, close=True)


class BodyLimit:
    """Read the whole request body first, refusing one over ``max_bytes`` (declared or streamed) with 413
    and one that does not arrive within ``timeout`` seconds with 408 (and closes the connection)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = 10.0) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            declared = length.decode(errors="replace")[:40]
            refusal = f"request body of {declared} bytes is over this server's max_body_bytes={self.max_bytes}"
            await send_json(send, 413, "too_large", refusal, close=True)
            return
        body, more = bytearray(), True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await send_json(
                    send,
                    408,
                    "body_timeout",
                    f"the request body did not arrive within this server's body_timeout={self.timeout:g} s; "
                    "send the whole body at once (restart with `patchscopes serve --body-timeout SECONDS` to allow more)",
                    close=True,
                )
                return
            if message["type"] != "http.request":  # the client went away before sending its body
                return
            body.extend(message.get("body", b""))
            more = bool(message.get("more_body", False))
            if len(body) > self.max_bytes:
                await send_json(
                    send, 413, "too_large", f"request body is over this server's max_body_bytes={self.max_bytes}", close=True
                )
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: only http.disconnect arrives

        await self.app(scope, replay, send)


class SecurityHeaders:
    """Add Content-Security-Policy, nosniff, no framing and no referrer to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        csp = DOCS_CSP if path in ("/docs", "/redoc") or path.startswith("/docs/") else PAGE_CSP

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                if b"content-security-policy" not in names:
                    extra.append((b"content-security-policy", csp.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
