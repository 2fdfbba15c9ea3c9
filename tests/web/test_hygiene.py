"""Server hygiene inside the app (issue 10, part 7): body cap, cross-site API writes, CSRF tokens, links and notices
that stay the site's own. The attack-style tests against a real `serve` are in tests/test_serve_hygiene.py."""

from __future__ import annotations

import re

import httpx
import pytest
from fakes.dns import FakeDns
from support import running_app, wait_done

from app.web import verifications
from app.web.security import CSRF_COOKIE, csrf_token, csrf_valid


# --- bodies over SECURE_MAX_BODY_BYTES -------------------------------------------------------------------------
async def test_a_declared_large_body_is_413_before_it_is_read(client):
    read = 0

    async def body():  # counts what the app pulled from the client
        nonlocal read
        for _ in range(100):  # 100 x 64 KiB if anyone read it all
            read += 65536
            yield b" " * 65536

    response = await client.post("/api/v1/audits", content=body(),
                                 headers={"Content-Type": "application/json", "Content-Length": str(100 * 65536)})
    assert response.status_code == 413 and "16384 bytes" in response.json()["detail"]
    assert read <= 65536  # httpx may have produced the first chunk; nobody asked for more


async def test_a_chunked_body_is_refused_once_past_the_cap(client):
    pulled = 0

    async def body():
        nonlocal pulled
        for _ in range(1000):  # 4 MB if read whole
            pulled += 4096
            yield b"[" * 4096

    response = await client.post("/api/v1/audits/self", content=body(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["detail"].startswith("The request body is larger")
    assert pulled <= 16384 + 2 * 4096  # the middleware stopped reading right after the cap


async def test_bodies_under_the_cap_still_reach_the_app(client):
    async def body():
        yield b'{"checks": '
        yield b'["relay"]}'

    response = await client.post("/api/v1/audits/self", content=body(), headers={"Content-Type": "application/json"})
    assert response.status_code == 202, response.text
    response = await client.post("/api/v1/audits", json={"target": "self", "checks": ["relay"], "x": "y" * 15000})
    assert response.status_code == 422  # under the cap: validated as before (extra field)


async def test_forms_are_capped_too(client):
    response = await client.post("/start", data={"csrf": "x" * 20000})
    assert response.status_code == 413


# --- cross-site writes to the API --------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Origin": "https://evil.example"},
    {"Origin": "null"},  # a sandboxed frame or a privacy-sensitive redirect
    {"Sec-Fetch-Site": "same-site", "Origin": "https://sibling.testserver"},
])
async def test_a_cross_site_post_to_the_api_is_403(client, headers):
    response = await client.post("/api/v1/audits/self", headers=headers)
    assert response.status_code == 403 and "other web sites" in response.json()["detail"]
    assert (await client.get("/api/v1/audits/" + "A" * 22)).status_code == 404  # nothing was created either way
    response = await client.post("/api/v1/verifications", json={"domain": "corp.test"}, headers=headers)
    assert response.status_code == 403


@pytest.mark.parametrize("headers", [
    {},  # curl -fsS -X POST https://SITE/api/v1/audits/self
    {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},  # SECURE_PUBLIC_URL
    {"Sec-Fetch-Site": "none"},  # typed by the user
    {"Sec-Fetch-Site": "same-origin"},
])
async def test_same_origin_and_curl_still_work(client, headers):
    response = await client.post("/api/v1/audits/self", headers=headers)
    assert response.status_code == 202, response.text


async def test_the_requests_own_origin_is_same_origin(settings):
    settings.public_url = "https://secure.example.gov"
    async with running_app(settings) as client:
        response = await client.post("/api/v1/audits/self", headers={"Origin": "http://testserver"})
        assert response.status_code == 202, response.text
        response = await client.post("/api/v1/audits/self", headers={"Origin": "https://secure.example.gov.evil"})
        assert response.status_code == 403


async def test_reading_the_api_cross_site_is_unchanged(client):
    response = await client.get("/api/v1/whoami", headers={"Origin": "https://evil.example",
                                                           "Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


# --- CSRF tokens ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", ["é" * 64, "ä", "A" * 64, "0" * 63, "0" * 65, " " + "0" * 63, "", None, 12])
def test_a_malformed_csrf_token_is_invalid_not_an_error(token):
    assert csrf_valid("secret", "cookie", token) is False


def test_a_well_formed_csrf_token_still_passes():
    assert csrf_valid("secret", "cookie", csrf_token("secret", "cookie")) is True
    assert csrf_valid("secret", "other", csrf_token("secret", "cookie")) is False


@pytest.mark.parametrize("path,data", [("/start", {"checks": "relay"}), ("/verify", {"domain": "corp.test"})])
async def test_a_non_ascii_csrf_token_on_a_form_is_403(client, path, data):
    page = await client.get("/start")
    assert page.status_code == 200 and client.cookies.get(CSRF_COOKIE)
    response = await client.post(path, data={**data, "csrf": "ü" * 64})
    assert response.status_code == 403, response.text
    assert "form expired" in response.text


def _form_token(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]{64})"', html).group(1)


async def _visitor(client: httpx.AsyncClient) -> str:
    """A new visitor: no cookie yet; the page sets one and carries the form token bound to it."""
    client.cookies.clear()
    page = await client.get("/start")
    assert client.cookies.get(CSRF_COOKIE)
    return _form_token(page.text)


async def test_a_form_token_works_only_with_the_cookie_it_was_made_for(client):
    """The CSRF token is bound to the visitor's cookie: visitor A's token, sent with visitor B's cookie, is 403 on
    the start form and on the re-test form; B's own token passes."""
    token_a = await _visitor(client)
    cookie_a = client.cookies.get(CSRF_COOKIE)
    token_b = await _visitor(client)
    assert client.cookies.get(CSRF_COOKIE) != cookie_a and token_b != token_a
    refused = await client.post("/start", data={"csrf": token_a, "checks": "relay"})
    assert refused.status_code == 403 and "form expired" in refused.text
    started = await client.post("/start", data={"csrf": token_b, "checks": "relay"})
    assert started.status_code == 303
    audit_id = started.headers["location"].rsplit("/", 1)[1]
    await wait_done(client, audit_id)
    refused = await client.post(f"/audits/{audit_id}/retest", data={"csrf": token_a})
    assert refused.status_code == 403 and "form expired" in refused.text
    retest = await client.post(f"/audits/{audit_id}/retest", data={"csrf": token_b})
    assert retest.status_code == 303 and retest.headers["location"] != f"/audits/{audit_id}"


@pytest.mark.parametrize("form", [{}, {"csrf": ""}, {"csrf": "0" * 64}, {"csrf": "g" * 64}, {"csrf": "0" * 63},
                                  {"csrf": "ü" * 64}], ids=["missing", "empty", "wrong", "not-hex", "short", "non-ascii"])
async def test_the_retest_form_refuses_a_missing_or_malformed_token(client, form):
    """The re-test form is CSRF-protected: without a valid token nothing starts (403, no new audit)."""
    token = await _visitor(client)
    audit_id = (await client.post("/api/v1/audits/self", json={"checks": ["relay"]})).json()["id"]
    await wait_done(client, audit_id)
    response = await client.post(f"/audits/{audit_id}/retest", data=form)
    assert response.status_code == 403, response.text
    store = client.app.state.sys.store
    count = await store._run(lambda c: c.execute("SELECT COUNT(*) FROM audits").fetchone()[0])
    assert count == 1
    assert (await client.post(f"/audits/{audit_id}/retest", data={"csrf": token})).status_code == 303


@pytest.mark.parametrize("public_url,secure", [("http://testserver", False), ("https://audit.example.org", True)])
async def test_the_csrf_cookie_is_httponly_samesite_strict_and_secure_over_https(settings, public_url, secure):
    settings.public_url = public_url
    async with running_app(settings) as client:
        response = await client.get("/start")
    cookies = [v for k, v in response.headers.multi_items() if k == "set-cookie" and v.startswith(CSRF_COOKIE + "=")]
    assert len(cookies) == 1, response.headers
    flags = {part.strip().split("=", 1)[0].lower(): part.strip().partition("=")[2]
             for part in cookies[0].split(";")[1:]}
    assert "httponly" in flags
    assert flags.get("samesite", "").lower() == "strict"
    assert ("secure" in flags) is secure
    assert flags.get("path") == "/"


# --- links that stay on the site ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["//evil.example/x", "///evil.example/x", "/\\evil.example/x", "/%5Cevil.example/x",
                                  "/%09/evil.example/x", "/%2F%2Fevil.example/x"])
async def test_language_links_never_leave_the_site(client, path):
    response = await client.send(httpx.Request("GET", "http://testserver" + path))
    assert response.status_code == 404
    links = re.findall(r'href="([^"]*)\?lang=', response.text)
    assert links, response.text
    for link in links:
        assert link.startswith("/") and not link.startswith("//") and "\\" not in link and "\t" not in link, link
        assert httpx.URL("https://secure.example.gov/start").join(link).host == "secure.example.gov"


async def test_language_links_keep_an_ordinary_path(client):
    response = await client.get("/guides/postfix")
    assert 'href="/guides/postfix?lang=es"' in response.text


# --- the verify page prints only the site's own words ----------------------------------------------------------
FORGED = "URGENT: your server is hacked, call +1-555-0100 now"


async def test_the_verify_page_ignores_text_from_the_address(settings):
    async with FakeDns() as dns:
        settings.dns_servers = [dns.server]
        async with running_app(settings) as client:
            created = (await client.post("/api/v1/verifications", json={"domain": "corp.test"})).json()
            page = await client.get(f"/verify/{created['id']}", params={"detail": FORGED, "result": FORGED})
            assert page.status_code == 200 and "URGENT" not in page.text and 'role="status"' not in page.text
            # after "Check now" the redirect names a code, and the page says the site's sentence for it
            csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text).group(1)
            checked = await client.post(f"/verify/{created['id']}/check", data={"csrf": csrf})
            assert checked.status_code == 303
            assert checked.headers["location"] == f"/verify/{created['id']}?result=no_txt"
            page = await client.get(checked.headers["location"])
            assert "We found no TXT record at _secure-your-server.corp.test yet" in page.text


@pytest.mark.parametrize("detail,code", [
    ("no TXT record at _x.corp.test yet (DNS changes can take a while to appear); could not fetch", "no_txt"),
    ("the TXT record at _x.corp.test does not hold the token; http://corp.test/x answered HTTP 404", "txt_wrong"),
    ("SERVFAIL; http://corp.test/x redirects to another host or port (http://evil/URGENT)", "not_found"),
])
def test_every_check_result_maps_to_a_fixed_notice(detail, code):
    assert verifications.notice_code({"status": "pending", "detail": detail}) == code
    text = verifications.notice_text(code, "corp.test")
    assert text and "URGENT" not in text and "evil" not in text
    assert verifications.notice_text(detail, "corp.test") == ""
