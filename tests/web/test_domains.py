"""Verified domains: proving control (DNS TXT or HTTP file), and audits of every MX and address of the domain."""

from __future__ import annotations

import asyncio
import time

import pytest
from fakes.dns import FakeDns
from support import running_app, skip_or_fail, wait_done

from app.access.domains import (MAX_BODY, MAX_HEAD, USER_AGENT, DomainError, FetchBudgetSpent, _fetch, check_http,
                                hash_id, normalise_domain)
from app.access.resolver import Resolver

DOMAIN = "corp.test"


@pytest.fixture
async def dns():
    async with FakeDns() as server:
        yield server


@pytest.fixture
async def site(settings, dns):
    settings.dns_servers = [dns.server]
    async with running_app(settings) as client:
        yield client


async def verify(client, dns, domain=DOMAIN) -> str:
    created = (await client.post("/api/v1/verifications", json={"domain": domain})).json()
    dns.set(created["dns"]["name"], "TXT", [f'"{created["dns"]["value"]}"'])
    check = (await client.post(f"/api/v1/verifications/{created['id']}/check")).json()
    assert check["status"] == "verified", check
    return created["id"]


# --- normalisation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("Example.COM.", "example.com"), (" mail.example.org ", "mail.example.org"),
    ("Bücher.example", "xn--bcher-kva.example"), ("xn--bcher-kva.example", "xn--bcher-kva.example"),
])
def test_domains_are_normalised(text, expected):
    assert normalise_domain(text) == expected


@pytest.mark.parametrize("text", ["", "localhost", "example", "192.0.2.1", "[2001:db8::1]", "::1", "exa mple.com",
                                  "-bad.example.com", "a..b.com", "x" * 64 + ".com", "a." * 130 + "com",
                                  "example.123", "exa_mple.com", "http://example.com", "example.com/path",
                                  "ex\u0000ample.com"])
def test_junk_domains_are_refused(text):
    with pytest.raises(DomainError):
        normalise_domain(text)


# --- the verification API ----------------------------------------------------------------------------------
async def test_create_a_verification(site):
    response = await site.post("/api/v1/verifications", json={"domain": "Corp.Test."})
    assert response.status_code == 201
    body = response.json()
    assert body["domain"] == DOMAIN and len(body["id"]) == 22 and len(body["token"]) >= 22
    assert body["dns"]["name"] == f"_secure-your-server.{DOMAIN}" and body["token"] in body["dns"]["value"]
    assert body["http"] == {"url": f"http://{DOMAIN}/.well-known/secure-your-server.txt", "body": body["token"]}
    # the id is a credential: stored hashed, never in clear
    rows = await site.app.state.sys.store._run(lambda c: [dict(r) for r in c.execute("SELECT * FROM verifications")])
    assert rows[0]["id_hash"] == hash_id(body["id"]) and body["id"] not in str(rows)


@pytest.mark.parametrize("body", [{"domain": "192.0.2.1"}, {"domain": "localhost"}, {"domain": ""},
                                  {"domain": "a b.com"}, {}, {"domain": "x.com", "extra": 1}, {"domain": 5}])
async def test_bad_verification_requests_are_422(site, body):
    response = await site.post("/api/v1/verifications", json=body)
    assert response.status_code == 422 and response.json()["detail"]


async def test_dns_verification_pending_then_verified(site, dns):
    created = (await site.post("/api/v1/verifications", json={"domain": DOMAIN})).json()
    pending = (await site.post(f"/api/v1/verifications/{created['id']}/check")).json()
    assert pending["status"] == "pending" and "no TXT record" in pending["detail"]
    dns.set(created["dns"]["name"], "TXT", ['"something else"'])
    assert (await site.post(f"/api/v1/verifications/{created['id']}/check")).json()["status"] == "pending"
    dns.set(created["dns"]["name"], "TXT", [f'"{created["dns"]["value"]}"'])
    verified = (await site.post(f"/api/v1/verifications/{created['id']}/check")).json()
    assert (verified["status"], verified["method"]) == ("verified", "dns")


async def test_expired_and_unknown_verifications(site, dns):
    verification = await verify(site, dns)
    await site.app.state.sys.store._run(lambda c: c.execute("UPDATE verifications SET expires_at=?", (time.time() - 1,)))
    assert (await site.post(f"/api/v1/verifications/{verification}/check")).json()["status"] == "expired"
    response = await site.post("/api/v1/audits", json={"target": DOMAIN, "verification": verification})
    assert response.status_code == 403 and "expired" in response.json()["detail"]
    for bad in ("A" * 22, "nope", "../x"):
        assert (await site.post(f"/api/v1/verifications/{bad}/check")).status_code == 404


# --- the HTTP file ------------------------------------------------------------------------------------------
class TinyWeb:
    """Answers GET on 127.0.0.3:80 from a dict of path -> (status, headers, body)."""

    def __init__(self, pages: dict[str, tuple[int, dict[str, str], bytes]]) -> None:
        self.pages = pages
        self.requests: list[str] = []

    async def __aenter__(self):
        try:
            self.server = await asyncio.start_server(self.handle, "127.0.0.3", 80)
        except OSError as exc:
            skip_or_fail(f"cannot listen on 127.0.0.3:80: {exc}")
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def handle(self, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ")[1].decode()
        self.requests.append(path)
        status, headers, body = self.pages.get(path, (404, {}, b"not found"))
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"HTTP/1.1 {status} X\r\n{extra}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()


WELL_KNOWN = "/.well-known/secure-your-server.txt"
LOOPBACK = [__import__("ipaddress").ip_network("127.0.0.0/8")]


async def http_proof(dns, pages, token="tok123", domain=DOMAIN, allow=LOOPBACK):
    dns.set(domain, "A", ["127.0.0.3"])
    async with TinyWeb(pages) as web:
        proof = await check_http(domain, token, Resolver([dns.server]), allow, timeout=2)
    return proof, web


async def test_http_file_verifies(dns):
    proof, web = await http_proof(dns, {WELL_KNOWN: (200, {}, b"tok123\n")})
    assert proof.verified and proof.method == "http"


async def test_http_redirects_on_the_same_host_only_and_at_most_three(dns):
    same = {WELL_KNOWN: (301, {"Location": "/moved"}, b""), "/moved": (200, {}, b"tok123")}
    proof, _ = await http_proof(dns, same)
    assert proof.verified
    other = {WELL_KNOWN: (302, {"Location": "http://evil.test/x"}, b"")}
    proof, _ = await http_proof(dns, other)
    assert not proof.verified and "another host" in proof.detail
    chain = {WELL_KNOWN: (302, {"Location": "/1"}, b""), "/1": (302, {"Location": "/2"}, b""),
             "/2": (302, {"Location": "/3"}, b""), "/3": (302, {"Location": "/4"}, b""), "/4": (200, {}, b"tok123")}
    proof, web = await http_proof(dns, chain)
    assert not proof.verified and "more than 3 redirects" in proof.detail and len(web.requests) == 4


async def test_http_reads_at_most_one_kib(dns):
    proof, _ = await http_proof(dns, {WELL_KNOWN: (200, {}, b"x" * 2000 + b" tok123")})
    assert not proof.verified


async def test_http_fetch_respects_the_guard(dns):
    dns.set("private.test", "A", ["10.0.0.1"])
    proof = await check_http("private.test", "tok", Resolver([dns.server]), [], timeout=1)
    assert not proof.verified and "private or reserved" in proof.detail



# --- the fetch itself: bounded reads, pinned addresses, the budget ------------------------------------------------
class RawWeb:
    """A server on `address`:`port` that reads each request head, records it, and lets `answer(reader, writer)`
    reply however a test needs (several loopback addresses, so one fetch can be offered several)."""

    def __init__(self, address, answer, port=80, context=None):
        self.address, self.port, self.answer, self.context = address, port, answer, context
        self.requests: list[str] = []

    async def __aenter__(self):
        try:
            self.server = await asyncio.start_server(self.handle, self.address, self.port, ssl=self.context)
        except OSError as exc:
            skip_or_fail(f"cannot listen on {self.address}:{self.port}: {exc}")
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def handle(self, reader, writer):
        try:
            self.requests.append((await reader.readuntil(b"\r\n\r\n")).decode("latin-1"))
            await self.answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def replying(data: bytes, then_hold: bool = False):
    async def answer(reader, writer):
        writer.write(data)
        await writer.drain()
        if then_hold:
            await reader.read()  # until the fetch gives up and hangs up
    return answer


async def holding(reader, writer):
    await reader.read()  # never answers


FETCH_URL = f"http://{DOMAIN}{WELL_KNOWN}"


async def test_the_request_names_the_domain_and_keeps_the_query():
    async with RawWeb("127.0.0.61", replying(b"HTTP/1.0 200 OK\r\nlocation: /next\r\n\r\nbody")) as web:
        status, location, body = await _fetch(f"http://{DOMAIN}/x?a=1&b=2", DOMAIN, ["127.0.0.61"], 2)
    assert (status, location, body) == (200, "/next", b"body")  # any case of Location
    assert web.requests == [f"GET /x?a=1&b=2 HTTP/1.1\r\nHost: {DOMAIN}\r\nUser-Agent: {USER_AGENT}\r\n"
                            "Accept: text/plain\r\nConnection: close\r\n\r\n"]


async def test_a_head_without_end_is_read_no_further_than_8_kib():
    endless = b"HTTP/1.1 200 OK\r\nX-Junk: " + b"a" * (MAX_HEAD + 100)
    async with RawWeb("127.0.0.61", replying(endless, then_hold=True)):
        with pytest.raises(ValueError, match="no complete HTTP reply head"):
            await _fetch(FETCH_URL, DOMAIN, ["127.0.0.61"], 5)


async def test_a_reply_that_is_not_http_ends_the_fetch():
    async with RawWeb("127.0.0.61", replying(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")), \
            RawWeb("127.0.0.62", replying(b"HTTP/1.1 200 OK\r\n\r\ntok123")) as second:
        with pytest.raises(ValueError, match="not an HTTP reply"):
            await _fetch(FETCH_URL, DOMAIN, ["127.0.0.61", "127.0.0.62"], 2)
    assert second.requests == []


async def test_the_next_pinned_address_is_tried_when_one_is_refused_or_silent():
    asked = []

    def may_fetch(address):
        asked.append(address)
        return True
    async with RawWeb("127.0.0.61", holding), RawWeb("127.0.0.63", replying(b"HTTP/1.1 200 OK\r\n\r\ntok123")):
        # nothing listens on 127.0.0.62:80
        status, _location, body = await _fetch(FETCH_URL, DOMAIN, ["127.0.0.61", "127.0.0.62", "127.0.0.63"], 0.5,
                                               may_fetch)
    assert (status, body) == (200, b"tok123")
    assert asked == ["127.0.0.61", "127.0.0.62", "127.0.0.63"]  # the budget is asked before every connection


async def test_when_no_address_answers_the_last_error_is_raised():
    with pytest.raises(ConnectionRefusedError):
        await _fetch(FETCH_URL, DOMAIN, ["127.0.0.62"], 1)
    with pytest.raises(OSError, match="no address"):
        await _fetch(FETCH_URL, DOMAIN, [], 1)


async def test_a_spent_budget_stops_before_connecting():
    async with RawWeb("127.0.0.61", replying(b"HTTP/1.1 200 OK\r\n\r\ntok123")) as web:
        with pytest.raises(FetchBudgetSpent):
            await _fetch(FETCH_URL, DOMAIN, ["127.0.0.61"], 2, lambda address: False)
    assert web.requests == []


async def test_https_on_the_same_host_accepts_any_certificate_and_names_the_domain():
    from app.probes.canary import self_signed_context

    context = self_signed_context()
    names = []
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)
    async with RawWeb("127.0.0.61", replying(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 3000), 443, context):
        status, _location, body = await _fetch(f"https://{DOMAIN}/x", DOMAIN, ["127.0.0.61"], 2)
    assert (status, body) == (200, b"x" * MAX_BODY)
    assert names == [DOMAIN]

# --- audits of a verified domain -----------------------------------------------------------------------------
async def test_domain_audit_needs_a_verification_of_that_domain(site, dns):
    response = await site.post("/api/v1/audits", json={"target": DOMAIN})
    assert response.status_code == 403 and "prove that you control it" in response.json()["detail"]
    other = await verify(site, dns, "other.test")
    response = await site.post("/api/v1/audits", json={"target": DOMAIN, "verification": other})
    assert response.status_code == 403 and "does not belong" in response.json()["detail"]
    created = (await site.post("/api/v1/verifications", json={"domain": DOMAIN})).json()
    response = await site.post("/api/v1/audits", json={"target": DOMAIN, "verification": created["id"]})
    assert response.status_code == 403 and "not verified yet" in response.json()["detail"]


@pytest.fixture
async def site_v6(settings, dns):
    settings.dns_servers = [dns.server]
    settings.allow_networks = ["127.0.0.0/8", "::1/128"]
    async with running_app(settings) as client:
        yield client


async def test_domain_audit_tests_every_mx_address_and_rows_the_forbidden_ones(site_v6, dns):
    site = site_v6
    verification = await verify(site, dns)
    dns.set(DOMAIN, "MX", ["10 mx1.corp.test.", "20 mx2.corp.test."])
    dns.set("mx1.corp.test", "A", ["127.0.0.11"])
    dns.set("mx1.corp.test", "AAAA", ["::1"])
    dns.set("mx2.corp.test", "A", ["10.0.0.5", "127.0.0.12"])  # 10/8 is not allowed in these tests
    dns.set(DOMAIN, "A", ["127.0.0.13"])
    response = await site.post("/api/v1/audits", json={"target": DOMAIN, "verification": verification})
    assert response.status_code == 202
    data = await wait_done(site, response.json()["id"])
    assert data["target"] == DOMAIN
    relay_hosts = {c["host"] for c in data["checks"] if c["service"] == "relay" and c["name"] != "relay.guard"}
    assert relay_hosts == {"127.0.0.11", "::1", "127.0.0.12"}
    proxy_hosts = {c["host"] for c in data["checks"] if c["service"] == "proxy"}
    assert proxy_hosts == {"127.0.0.13"}
    guard = [c for c in data["checks"] if c["name"] == "relay.guard"]
    assert [(c["host"], c["verdict"], c["reason"]) for c in guard] == [("10.0.0.5", "unreachable", "forbidden_address")]
    assert "mx2.corp.test resolves to 10.0.0.5" in guard[0]["detail"]
    # pinned: changing DNS afterwards changes nothing in the stored audit
    dns.set("mx1.corp.test", "A", ["127.0.0.99"])
    again = (await site.get(f"/api/v1/audits/{data['id']}")).json()
    assert set(again["hosts"]) == {"127.0.0.11", "::1", "127.0.0.12", "10.0.0.5", "127.0.0.13"}


async def test_no_mx_means_the_domain_itself_and_null_mx_means_no_mail(site, dns):
    verification = await verify(site, dns)
    dns.set(DOMAIN, "A", ["127.0.0.21"])
    data = await wait_done(site, (await site.post("/api/v1/audits", json={
        "target": DOMAIN, "verification": verification, "checks": ["relay"]})).json()["id"])
    assert {c["host"] for c in data["checks"]} == {"127.0.0.21"}
    dns.set(DOMAIN, "MX", ["0 ."])
    response = await site.post("/api/v1/audits", json={"target": DOMAIN, "verification": verification,
                                                        "checks": ["relay"]})
    assert response.status_code == 403 and "no address" in response.json()["detail"]


async def test_a_domain_with_only_forbidden_addresses_is_refused(site, dns):
    verification = await verify(site, dns)
    dns.set(DOMAIN, "A", ["10.1.1.1", "192.168.0.1"])
    response = await site.post("/api/v1/audits", json={"target": DOMAIN, "verification": verification,
                                                        "checks": ["proxy"]})
    assert response.status_code == 403
    assert "10.1.1.1" in response.json()["detail"] and "private" in response.json()["detail"]


async def test_a_failing_dns_is_a_503_with_retry_after(site, dns):
    verification = await verify(site, dns)
    dns.servfail.add(DOMAIN)
    response = await site.post("/api/v1/audits", json={"target": DOMAIN, "verification": verification})
    assert response.status_code == 503 and response.headers["retry-after"]


async def test_only_the_verification_holder_can_retest_a_domain(site, dns):
    verification = await verify(site, dns)
    dns.set(DOMAIN, "A", ["127.0.0.31"])
    first = (await site.post("/api/v1/audits", json={"target": DOMAIN, "verification": verification,
                                                      "checks": ["proxy"]})).json()["id"]
    await wait_done(site, first)
    assert (await site.post(f"/api/v1/audits/{first}/retest")).status_code == 403
    assert (await site.post(f"/api/v1/audits/{first}/retest", json={"verification": "B" * 22})).status_code == 403
    response = await site.post(f"/api/v1/audits/{first}/retest", json={"verification": verification})
    assert response.status_code == 202
    second = await wait_done(site, response.json()["id"])
    assert second["previous_id"] == first


# --- the same steps in HTML ----------------------------------------------------------------------------------
async def test_domain_verification_in_html_from_the_form_to_the_audit(site, dns):
    import re

    token = re.search(r'name="csrf" value="([0-9a-f]+)"', (await site.get("/verify")).text).group(1)
    bad = await site.post("/verify", data={"csrf": token, "domain": "192.0.2.1"})
    assert bad.status_code == 422 and "not an IP address" in bad.text
    created = await site.post("/verify", data={"csrf": token, "domain": "Corp.Test"})
    assert created.status_code == 303
    page_url = created.headers["location"]
    page = (await site.get(page_url)).text
    assert "_secure-your-server.corp.test" in page and "Check now" in page
    value = re.search(r"(secure-your-server-verification=[A-Za-z0-9_-]+)", page).group(1)
    checked = await site.post(page_url + "/check", data={"csrf": token})
    assert checked.status_code == 303
    assert "no TXT record" in (await site.get(checked.headers["location"])).text
    dns.set("_secure-your-server.corp.test", "TXT", [f'"{value}"'])
    checked = await site.post(page_url + "/check", data={"csrf": token})
    page = (await site.get(checked.headers["location"])).text
    assert "corp.test is verified" in page and "Test corp.test" in page
    dns.set(DOMAIN, "A", ["127.0.0.41"])
    started = await site.post(page_url + "/audit", data={"csrf": token, "checks": ["proxy"]})
    assert started.status_code == 303 and started.headers["location"].startswith("/audits/")
    data = await wait_done(site, started.headers["location"].rsplit("/", 1)[1])
    assert data["target"] == DOMAIN and data["hosts"] == ["127.0.0.41"]
    # without the CSRF token nothing happens
    assert (await site.post(page_url + "/audit", data={"checks": ["proxy"]})).status_code == 403


async def test_a_domain_pointing_at_the_sites_own_sink_in_another_form_skips_it(settings, dns, refused_port):
    """Issue 10, row 12: the sink on 127.0.0.1 was tested through ::ffff:127.0.0.1 and reported open, confirmed."""
    from support import free_port

    sink_port = free_port()
    settings.dns_servers = [dns.server]
    settings.allow_networks = ["127.0.0.0/8", "::ffff:127.0.0.0/104", "2002:7f00:1::/48"]
    settings.sink_listen = f"127.0.0.1:{sink_port}"
    settings.probe_domain = "sink.test.example"
    settings.relay_ports = [sink_port, refused_port]
    async with running_app(settings) as site:
        verification = await verify(site, dns)
        dns.set(DOMAIN, "MX", ["10 mx1.corp.test."])
        dns.set("mx1.corp.test", "A", ["127.0.0.1"])
        # the mapped form is 127.0.0.1 itself (tested once); the 6to4 form embeds it and is another route to it
        dns.set("mx1.corp.test", "AAAA", ["::ffff:127.0.0.1", "2002:7f00:1::1"])
        response = await site.post("/api/v1/audits", json={"target": DOMAIN, "verification": verification,
                                                            "checks": ["relay"]})
        assert response.status_code == 202
        data = await wait_done(site, response.json()["id"])
    assert {(c["host"], c["port"]) for c in data["checks"]} == {("127.0.0.1", refused_port),
                                                                ("2002:7f00:1::1", refused_port)}
