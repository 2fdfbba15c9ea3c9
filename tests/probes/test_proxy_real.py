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


async def test_squid_open(proxies, targets):
    squid = proxies.squid("open")
    results = await proxy_port(squid.port, targets)
    got = table(results)
    for check in ("http_get", "connect_smtp", "connect_tls"):
        assert got[check] == ("open", "token_returned"), (check, results[f"proxy.{check}"].detail)
    assert got["socks4"] == got["socks5"] == ("closed", "not_a_proxy")
    assert got["https_connect"] == ("closed", "not_a_proxy")
    assert results["proxy.http_get"].fingerprint["product"] == "Squid"
    assert summary(results) == "open"


async def test_squid_closed(proxies, targets):
    squid = proxies.squid("closed")
    results = await proxy_port(squid.port, targets)
    got = table(results)
    for check in ("http_get", "connect_smtp", "connect_tls", "http_post"):
        assert got[check] == ("closed", "destination_denied"), check
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
    got = table(results)
    assert got["socks4"] == ("open", "token_returned")
    assert got["socks5"] == ("open", "token_returned")
    # Dante speaks SOCKS4 and SOCKS5 but not 4a: it answers a 4a request with 0x5b ("rejected or failed")
    assert got["socks4a"] == ("inconclusive", "destination_unreachable")
    assert got["http_get"] == ("closed", "not_a_proxy")
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
    got = table(results)
    for check in ("http_get", "connect_smtp", "connect_tls"):
        assert got[check] == ("open", "token_returned"), (check, results[f"proxy.{check}"].detail)
    assert results["proxy.connect_smtp"].fingerprint["product"] == "tinyproxy"


async def test_tinyproxy_restricted_to_another_network(proxies, targets):
    tinyproxy = proxies.tinyproxy("restricted")
    results = await proxy_port(tinyproxy.port, targets)
    got = table(results)
    for check in ("http_get", "connect_smtp", "connect_tls", "http_post"):
        assert got[check] == ("closed", "destination_denied"), check
    assert summary(results) == "closed"
    assert all(r.verdict is not Verdict.OPEN for r in results.values())
