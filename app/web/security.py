"""Security headers on every response, and CSRF tokens for the HTML forms."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

BASE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
    "Cross-Origin-Opener-Policy": "same-origin",
}
HSTS = "max-age=31536000; includeSubDomains"


def security_headers(https: bool, connect: tuple[str, ...] = ()) -> dict[str, str]:
    """`connect`: other origins the pages may fetch from (the site's IPv4-only and IPv6-only names)."""
    headers = dict(BASE_HEADERS)
    if connect:
        extra = " ".join(connect)
        headers["Content-Security-Policy"] = CSP.replace("connect-src 'self'", f"connect-src 'self' {extra}")
    if https:
        headers["Strict-Transport-Security"] = HSTS
    return headers


class SecurityHeadersMiddleware:
    """Adds the headers to every HTTP response that does not already set them."""

    def __init__(self, app: ASGIApp, public_https: bool, connect: tuple[str, ...] = ()) -> None:
        self.app = app
        self.public_https = public_https
        self.connect = connect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        https = self.public_https or scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in security_headers(https, self.connect).items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


CSRF_COOKIE = "sys_csrf"


def new_csrf_cookie() -> str:
    return secrets.token_urlsafe(24)


def csrf_token(secret: str, cookie: str) -> str:
    """The form token is bound to the visitor's cookie by an HMAC under the server secret."""
    return hmac.new(secret.encode(), b"csrf:" + cookie.encode(), hashlib.sha256).hexdigest()


CSRF_TOKEN = re.compile(r"[0-9a-f]{64}")


def csrf_valid(secret: str, cookie: str | None, token: str | None) -> bool:
    """False for anything but a well-formed token that matches: hmac.compare_digest raises on non-ASCII text,
    which would answer 500 to a forged form."""
    if not isinstance(cookie, str) or not isinstance(token, str) or not cookie or not CSRF_TOKEN.fullmatch(token):
        return False
    return hmac.compare_digest(csrf_token(secret, cookie).encode(), token.encode())
