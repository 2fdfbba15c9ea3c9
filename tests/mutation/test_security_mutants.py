"""CSRF tokens and security headers (app/web/security.py), pinned where mutants survived `make mutation`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import pytest

from app.web.security import (BASE_HEADERS, CSP, HSTS, SecurityHeadersMiddleware, csrf_token, csrf_valid,
                              new_csrf_cookie, security_headers)

SECRET = "server-secret"


def test_the_token_is_an_hmac_of_the_cookie_under_the_secret_with_its_own_label():
    cookie = new_csrf_cookie()
    expected = hmac.new(SECRET.encode(), b"csrf:" + cookie.encode(), hashlib.sha256).hexdigest()
    assert csrf_token(SECRET, cookie) == expected
    assert csrf_token(SECRET, cookie) != csrf_token("other-secret", cookie)
    assert csrf_token(SECRET, cookie) != csrf_token(SECRET, cookie + "x")


def test_cookies_are_long_and_fresh():
    cookies = {new_csrf_cookie() for _ in range(50)}
    assert len(cookies) == 50
    assert {len(c) for c in cookies} == {32}  # 24 random bytes, URL-safe base64


def test_only_the_matching_token_of_a_real_cookie_is_valid():
    cookie = new_csrf_cookie()
    token = csrf_token(SECRET, cookie)
    assert csrf_valid(SECRET, cookie, token)
    assert not csrf_valid(SECRET, cookie, token.upper())
    assert not csrf_valid(SECRET, cookie, csrf_token("other-secret", cookie))
    assert not csrf_valid(SECRET, None, token) and not csrf_valid(SECRET, cookie, None)
    assert not csrf_valid(SECRET, cookie, "é" * 64)  # non-ASCII: refused, not an exception
    # an empty cookie is no cookie, even with the token that an empty cookie would have
    assert not csrf_valid(SECRET, "", csrf_token(SECRET, ""))


def test_headers_without_https_or_other_origins():
    assert security_headers(False) == BASE_HEADERS
    assert "Strict-Transport-Security" not in security_headers(False)


def test_headers_with_https_and_other_origins():
    headers = security_headers(True, ("https://v4.example", "https://v6.example"))
    assert headers["Strict-Transport-Security"] == HSTS
    assert headers["Content-Security-Policy"] == CSP.replace(
        "connect-src 'self'", "connect-src 'self' https://v4.example https://v6.example")
    assert "connect-src 'self' https://v4.example https://v6.example; font-src" in headers["Content-Security-Policy"]
    assert {k: v for k, v in headers.items() if k not in ("Strict-Transport-Security", "Content-Security-Policy")} \
        == {k: v for k, v in BASE_HEADERS.items() if k != "Content-Security-Policy"}


def run_middleware(scope: dict, public_https: bool = False, connect: tuple[str, ...] = (),
                   app_headers: list[tuple[bytes, bytes]] | None = None) -> tuple[list[dict], list]:
    seen: list = []

    async def app(scope_, receive_, send_):
        seen.append((scope_, receive_, send_))
        if scope_["type"] == "http":
            await send_({"type": "http.response.start", "status": 200, "headers": list(app_headers or [])})
            await send_({"type": "http.response.body", "body": b"ok"})

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request"}

    async def send(message):
        sent.append(message)

    asyncio.run(SecurityHeadersMiddleware(app, public_https, connect)(scope, receive, send))
    return sent, seen


def headers_of(sent: list[dict]) -> dict[str, str]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    return {k.decode().lower(): v.decode() for k, v in start["headers"]}


@pytest.mark.parametrize("scheme,public_https,hsts", [("http", False, False), ("https", False, True),
                                                       ("http", True, True)])
def test_hsts_when_the_request_or_the_site_is_https(scheme, public_https, hsts):
    sent, _ = run_middleware({"type": "http", "scheme": scheme, "headers": []}, public_https)
    headers = headers_of(sent)
    assert ("strict-transport-security" in headers) is hsts
    assert headers["x-frame-options"] == "DENY" and headers["content-security-policy"] == CSP
    assert sent[-1] == {"type": "http.response.body", "body": b"ok"}


def test_the_middleware_passes_other_origins_and_keeps_what_the_app_set():
    sent, _ = run_middleware({"type": "http", "scheme": "http", "headers": []}, connect=("https://v6.example",),
                             app_headers=[(b"x-frame-options", b"SAMEORIGIN")])
    headers = headers_of(sent)
    assert headers["x-frame-options"] == "SAMEORIGIN"
    assert "connect-src 'self' https://v6.example;" in headers["content-security-policy"]


def test_other_scopes_pass_through_untouched():
    scope = {"type": "lifespan"}
    sent, seen = run_middleware(scope)
    assert sent == [] and len(seen) == 1
    passed_scope, passed_receive, passed_send = seen[0]
    assert passed_scope is scope and passed_receive.__name__ == "receive" and passed_send.__name__ == "send"
