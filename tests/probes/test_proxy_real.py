"""The proxy checks against Debian's real proxies on loopback, with our canaries as the destinations."""

from __future__ import annotations

import pytest
from support import canaries, proxy_port

from app.verdicts import Verdict, summarize


@pytest.fixture
async def targets():
    async with canaries() as targets:
        yield targets


def table(results) -> dict[str, tuple[str, str]]:
    return {name.removeprefix("proxy."): (r.verdict.value, r.reason) for name, r in results.items()}


def summary(results) -> str:
    return summarize((r.verdict, r.reason) for r in results.values()).value


NOT_SOCKS_OR_TLS = {"socks4": ("closed", "not_a_proxy"), "socks4a": ("closed", "not_a_proxy"),
                    "socks5": ("closed", "not_a_proxy"), "https_connect": ("closed", "not_a_proxy")}


def exactly(results, expected: dict[str, tuple[str, str]]) -> None:
    """The whole table: every planned check, with the verdict and reason we expect (details in the message)."""
    got = table(results)
    assert got == expected, "\n".join(f"{name}: {got[name]} - {results['proxy.' + name].detail}" for name in got)


async def test_squid_open(proxies, targets):
    squid = proxies.squid("open")
    results = await proxy_port(squid.port, targets)
    exactly(results, {**dict.fromkeys(("http_get", "connect_smtp", "connect_tls", "http_post"), ("open", "token_returned")), **NOT_SOCKS_OR_TLS})
    assert results["proxy.http_get"].fingerprint["product"] == "Squid"
    assert summary(results) == "open"


async def test_squid_closed(proxies, targets):
    squid = proxies.squid("closed")
    results = await proxy_port(squid.port, targets)
    exactly(results, {**dict.fromkeys(("http_get", "connect_smtp", "connect_tls", "http_post"), ("closed", "destination_denied")), **NOT_SOCKS_OR_TLS})
    assert results["proxy.connect_smtp"].fingerprint == {
        "product": "Squid", "version": "5.7", "raw": results["proxy.connect_smtp"].fingerprint["raw"]}
    assert summary(results) == "closed"


async def test_squid_that_allows_connect_only_to_its_ssl_ports(proxies, targets):
    squid = proxies.squid("ssl_only", ssl_ports=[targets.tls_port])
    results = await proxy_port(squid.port, targets)
    got = table(results)
    assert got["connect_tls"] == ("open", "token_returned")  # the port-443 case: a tunnel, reported apart
    assert got["connect_smtp"] == ("closed", "destination_denied")  # no spam through CONNECT to port 25
    assert "(tunnel)" in results["proxy.connect_tls"].detail


async def test_dante_open(proxies, targets):
    dante = proxies.dante()
    results = await proxy_port(dante.port, targets)
    # Dante speaks SOCKS4 and SOCKS5 but not 4a: it answers a 4a request with 0x5b ("rejected or failed"); it closes
    # (or resets) an HTTP request or a TLS hello
    exactly(results, {"socks4": ("open", "token_returned"), "socks5": ("open", "token_returned"),
                      "socks4a": ("inconclusive", "destination_unreachable"),
                      **dict.fromkeys((*("http_get", "connect_smtp", "connect_tls", "http_post"), "https_connect"), ("closed", "not_a_proxy"))})
    assert summary(results) == "open"


async def test_microsocks_with_a_password_is_auth_required(proxies, targets):
    microsocks = proxies.microsocks("user", "secret-password")
    results = await proxy_port(microsocks.port, targets)
    got = table(results)
    assert got["socks5"] == ("auth_required", "auth_required")
    assert got["socks4"][0] == "closed"
    assert summary(results) == "closed"


async def test_microsocks_without_a_password_is_open(proxies, targets):
    microsocks = proxies.microsocks()
    results = await proxy_port(microsocks.port, targets)
    assert table(results)["socks5"] == ("open", "token_returned")


async def test_tinyproxy_open(proxies, targets):
    tinyproxy = proxies.tinyproxy("open")
    results = await proxy_port(tinyproxy.port, targets)
    # tinyproxy carries the POST to our SMTP canary, then answers 503 (the canary's reply is not HTTP): the canary
    # saw it, so it is answer_not_returned (it used to say "could not reach our canary")
    exactly(results, {**dict.fromkeys(("http_get", "connect_smtp", "connect_tls"), ("open", "token_returned")),
                      "http_post": ("inconclusive", "answer_not_returned"), **NOT_SOCKS_OR_TLS})
    assert results["proxy.http_post"].detail.endswith("(POST answered HTTP 503)")
    assert results["proxy.connect_smtp"].fingerprint["product"] == "tinyproxy"


async def test_tinyproxy_restricted_to_another_network(proxies, targets):
    tinyproxy = proxies.tinyproxy("restricted")
    results = await proxy_port(tinyproxy.port, targets)
    exactly(results, {**dict.fromkeys(("http_get", "connect_smtp", "connect_tls", "http_post"), ("closed", "destination_denied")), **NOT_SOCKS_OR_TLS})
    assert summary(results) == "closed"
    assert all(r.verdict is not Verdict.OPEN for r in results.values())


# --- Apache, nginx, Privoxy, HAProxy and a closed Dante: every check asserted exactly -------------------------
async def test_apache_forward_proxy_open(proxies, targets):
    """`ProxyRequests On`, `<Proxy "*"> Require all granted`, AllowCONNECT widened: open every HTTP way.
    The POST is open too: the SMTP canary's reply is not HTTP, and mod_proxy_http passes it on as HTTP/0.9."""
    apache = proxies.apache("open")
    results = await proxy_port(apache.port, targets)
    exactly(results, {**dict.fromkeys(("http_get", "connect_smtp", "connect_tls", "http_post"),
                                      ("open", "token_returned")), **NOT_SOCKS_OR_TLS})
    assert results["proxy.http_get"].fingerprint["product"] == "Apache httpd"
    assert f'"POST http://127.0.0.1:{targets.smtp_port}/ HTTP/1.0" 200' in apache.log()
    assert summary(results) == "open"


async def test_apache_forward_proxy_with_the_default_allowconnect(proxies, targets):
    """Without AllowCONNECT, mod_proxy_connect tunnels to 443 and 563 only: CONNECT to our canaries is refused
    (403), GET and POST stay open."""
    apache = proxies.apache("stock_connect")
    results = await proxy_port(apache.port, targets)
    exactly(results, {"http_get": ("open", "token_returned"), "http_post": ("open", "token_returned"),
                      "connect_smtp": ("closed", "destination_denied"),
                      "connect_tls": ("closed", "destination_denied"), **NOT_SOCKS_OR_TLS})
    assert f'"CONNECT 127.0.0.1:{targets.smtp_port} HTTP/1.1" 403' in apache.log()
    assert summary(results) == "open"


async def test_apache_forward_proxy_for_a_foreign_network_only(proxies, targets):
    apache = proxies.apache("restricted")
    results = await proxy_port(apache.port, targets)
    exactly(results, {**dict.fromkeys(("http_get", "connect_smtp", "connect_tls", "http_post"),
                                      ("closed", "destination_denied")), **NOT_SOCKS_OR_TLS})
    assert "AH01630: client denied by server configuration" in apache.log()
    assert summary(results) == "closed"


async def test_apache_reverse_proxy_is_not_open(proxies, targets):
    """`ProxyRequests Off` + ProxyPass: an absolute-URI GET is served from its own site (404), CONNECT is 405."""
    apache = proxies.apache("reverse")
    results = await proxy_port(apache.port, targets)
    exactly(results, {**dict.fromkeys(("http_get", "connect_smtp", "connect_tls", "http_post"),
                                      ("closed", "not_a_proxy")), **NOT_SOCKS_OR_TLS})
    assert results["proxy.connect_smtp"].detail == "CONNECT answered HTTP 405: it does not act as a proxy"
    assert summary(results) == "closed"
    assert targets.canary.sources == {}  # nothing reached any canary


async def test_nginx_classic_forward_proxy_is_open(proxies, targets):
    """`resolver` + `proxy_pass $scheme://$http_host$request_uri`: GET and POST to any host; no CONNECT (400).
    The POST is open: nginx passes the SMTP canary's non-HTTP reply on as HTTP/0.9 (status 009 in its log)."""
    nginx = proxies.nginx("forward")
    results = await proxy_port(nginx.port, targets)
    exactly(results, {"http_get": ("open", "token_returned"), "http_post": ("open", "token_returned"),
                      "connect_smtp": ("closed", "not_a_proxy"), "connect_tls": ("closed", "not_a_proxy"),
                      **NOT_SOCKS_OR_TLS})
    assert f'"POST http://127.0.0.1:{targets.smtp_port}/ HTTP/1.0" 009' in nginx.log()
    assert results["proxy.http_get"].fingerprint["product"] == "nginx"
    assert summary(results) == "open"


async def test_nginx_site_with_a_reverse_proxy_is_not_open(proxies, targets):
    nginx = proxies.nginx("site")
    results = await proxy_port(nginx.port, targets)
    exactly(results, {**dict.fromkeys(("http_get", "connect_smtp", "connect_tls", "http_post"),
                                      ("closed", "not_a_proxy")), **NOT_SOCKS_OR_TLS})
    assert summary(results) == "closed"
    assert targets.canary.sources == {}


async def test_privoxy_open(proxies, targets):
    """Debian's stock Privoxy listening for everyone. CONNECT works to every port (no limit-connect applies in the
    stock action files). Its POST reaches our SMTP canary, but Privoxy answers `502 Server or forwarder response
    invalid` because the reply is not HTTP: inconclusive/answer_not_returned, never "could not reach our canary"."""
    privoxy = proxies.privoxy("open")
    results = await proxy_port(privoxy.port, targets)
    exactly(results, {**dict.fromkeys(("http_get", "connect_smtp", "connect_tls"), ("open", "token_returned")),
                      "http_post": ("inconclusive", "answer_not_returned"), **NOT_SOCKS_OR_TLS})
    post = results["proxy.http_post"]
    assert "could not reach" not in post.detail
    assert post.detail == ("our canary saw this check arrive from 127.0.0.1: the port passed our request on, but our "
                           "canary's answer did not come back through it (POST answered HTTP 502)")
    assert "Invalid server or forwarder response. Starts with: 220 canary ready" in privoxy.log()
    assert summary(results) == "open"


async def test_privoxy_for_a_foreign_network_only(proxies, targets):
    """`permit-access 198.51.100.0/24`: Privoxy drops our connection at once ("dropped due to ACL"), whatever we
    send; the port answers no protocol to us."""
    privoxy = proxies.privoxy("restricted")
    results = await proxy_port(privoxy.port, targets)
    exactly(results, {name: ("closed", "not_a_proxy") for name in table(results)})
    assert "dropped due to ACL" in privoxy.log()
    assert summary(results) == "closed"
    assert targets.canary.sources == {}


async def test_haproxy_reverse_proxy_is_not_open(proxies, targets):
    """HAProxy (`mode http`, one backend) in front of an nginx site: it hands everything, absolute-URI GETs and
    CONNECT included, to its backend, never to the host the request names."""
    site = proxies.nginx("site")
    haproxy = proxies.haproxy(site.port)
    results = await proxy_port(haproxy.port, targets)
    exactly(results, {**dict.fromkeys(("http_get", "connect_smtp", "connect_tls", "http_post"),
                                      ("closed", "not_a_proxy")), **NOT_SOCKS_OR_TLS})
    assert '"CONNECT 127.0.0.1:' in haproxy.log() and "web/web1" in haproxy.log()
    assert "CONNECT 127.0.0.1" in site.log()  # HAProxy passed CONNECT to nginx, which answered 400
    assert summary(results) == "closed"
    assert targets.canary.sources == {}


async def test_dante_closed_resets_are_closed_not_errors(proxies, targets):
    """Dante limited to a foreign network drops a loopback client right after the connection (a reset, or a close,
    depending on timing). Issue 13 saw the SOCKS4 check end error/internal_error on that reset; it is
    closed/not_a_proxy, in every round."""
    dante = proxies.dante("closed")
    for _ in range(3):
        results = await proxy_port(dante.port, targets)
        exactly(results, {name: ("closed", "not_a_proxy") for name in table(results)})
        assert summary(results) == "closed"
    assert "block(" in dante.log() or "blocked" in dante.log()
    assert targets.canary.sources == {}
