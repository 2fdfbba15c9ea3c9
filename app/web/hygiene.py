"""Request hygiene before the app sees a request: bodies capped, cross-site writes to the API refused (the open
event streams are counted in app.shared_slots)."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def _refuse(scope: Scope, send: Send, status: int, detail: str) -> None:
    """A JSON `{"detail"}` under /api/, plain text elsewhere; the connection closes (a body may still be coming)."""
    if scope["path"].startswith("/api/"):
        body, kind = json.dumps({"detail": detail}).encode(), b"application/json"
    else:
        body, kind = detail.encode(), b"text/plain; charset=utf-8"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """No request body over `limit` bytes: a larger Content-Length is refused before reading anything, a chunked
    body is read (at most `limit` bytes held) and refused as soon as it passes the limit. The site takes no uploads:
    its JSON and forms are a few hundred bytes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        too_large = f"The request body is larger than {self.limit} bytes."
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                await _refuse(scope, send, 413, too_large)
                return
            await self.app(scope, receive, send)  # the server delivers no more than Content-Length
            return
        if b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:  # bounded: we stop once the body passes the limit
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                await _refuse(scope, send, 413, too_large)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class CrossSiteApiMiddleware:
    """A web page anywhere can make a visitor's browser POST to the API (a "simple" request needs no preflight), and
    `self` means the visitor's address. When the browser says the request comes from another site, refuse it.
    curl and scripts send neither header and are not affected."""

    def __init__(self, app: ASGIApp, own_origins: tuple[str, ...]) -> None:
        self.app = app
        self.own_origins = frozenset(o.rstrip("/") for o in own_origins if o)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] not in SAFE_METHODS and scope["path"].startswith("/api/")
                and self._cross_site(scope)):
            await _refuse(scope, send, 403, "Requests from other web sites are refused. "
                                            "Use this site's pages, or call the API directly (curl, scripts).")
            return
        await self.app(scope, receive, send)

    def _cross_site(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        fetch_site = headers.get(b"sec-fetch-site", b"").decode("latin-1").strip().lower()
        if fetch_site in ("cross-site", "same-site"):  # same-site: another name under the same registrable domain
            return True
        origin = headers.get(b"origin")
        if origin is None:
            return False
        origin_text = origin.decode("latin-1").strip().rstrip("/")
        host = headers.get(b"host", b"").decode("latin-1")
        own = f"{scope.get('scheme', 'http')}://{host}"
        return origin_text not in self.own_origins and origin_text != own  # "null" (sandboxed pages) included
