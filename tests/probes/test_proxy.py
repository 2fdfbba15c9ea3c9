"""Proxy checks against asyncio fakes, with our real canaries on loopback."""

from __future__ import annotations

import pytest
from fakes import proxy as fakes
from support import Slots, canaries, proxy_port

from app.probes import proxy
from app.verdicts import Verdict


@pytest.fixture
async def targets():
    async with canaries() as targets:
        yield targets


def outcome(results, check: str) -> tuple[str, str]:
    result = results[f"proxy.{check}"]
    return result.verdict.value, result.reason


async def test_open_http_proxy_is_proven_by_the_canary_tokens(targets):
    async with fakes.ForwardingProxy() as server:
        results = await proxy_port(server.port, targets, step_timeout=0.5)
    for check in ("http_get", "connect_smtp", "connect_tls", "http_post"):
        assert outcome(results, check) == ("open", "token_returned"), (check, results[f"proxy.{check}"].detail)
        assert results[f"proxy.{check}"].confirmed
    # each open row names its protocol and what it lets through (web pages, mail, encrypted tunnels)
    assert results["proxy.http_get"].detail.startswith("HTTP GET (web): our canary's token came back")
    assert results["proxy.connect_smtp"].detail.startswith("HTTP CONNECT (smtp): our canary's token came back")
    assert results["proxy.connect_tls"].detail.startswith("HTTP CONNECT (tunnel): our canary's token came back")
    assert "our canary saw it arrive from 127.0.0.1 (your server's address)" in results["proxy.connect_smtp"].detail
    # an HTTP proxy sits silent on a SOCKS greeting or a TLS hello, while it answers HTTP: not a SOCKS/HTTPS proxy
    for check in ("socks4", "socks4a", "socks5", "https_connect"):
        assert outcome(results, check) == ("closed", "not_a_proxy"), (check, results[f"proxy.{check}"].detail)
    assert results["proxy.http_get"].fingerprint["raw"].startswith("proxy-agent: fakeproxy/1.0") or \
        "fakeproxy" in results["proxy.connect_smtp"].fingerprint["raw"]


async def test_replies_in_one_byte_packets_are_read_right(targets):
    async with fakes.ForwardingProxy(one_byte_writes=True) as server:
        results = await proxy_port(server.port, targets, step_timeout=2)
    assert outcome(results, "connect_smtp") == ("open", "token_returned")
    assert outcome(results, "http_get") == ("open", "token_returned")


async def test_a_proxy_that_needs_the_extra_crlf(targets):
    async with fakes.ForwardingProxy(needs_extra_crlf=True) as server:
        results = await proxy_port(server.port, targets, step_timeout=0.5)
    assert outcome(results, "connect_smtp") == ("open", "token_returned")


async def test_web_server_answering_200_to_connect_is_not_a_proxy(targets):
    async with fakes.WebServer() as server:
        results = await proxy_port(server.port, targets, step_timeout=0.5)
    for check in ("http_get", "connect_smtp", "connect_tls", "http_post"):
        assert outcome(results, check) == ("closed", "answers_without_tunnel"), check
    assert results["proxy.http_get"].fingerprint["product"] == "Apache httpd"


async def test_an_echo_cannot_forge_the_token(targets):
    async with fakes.EchoServer() as server:
        results = await proxy_port(server.port, targets, step_timeout=0.5)
    assert all(r.verdict is not Verdict.OPEN for r in results.values())
    assert outcome(results, "http_get") == ("closed", "answers_without_tunnel")


IMPOSTORS = {
    # the fake, the ports it is tested as a gateway on, the checks it fakes (each must be closed, not open)
    "http": (lambda: fakes.HttpImpostor(), False, ("connect_smtp", "http_post", "connect_tls")),
    "https": (lambda: fakes.HttpImpostor(tls=True), False, ("https_connect",)),
    "socks": (lambda: fakes.SocksImpostor(), False, ("socks4", "socks4a", "socks5")),
    "wingate": (lambda: fakes.WinGateImpostor(), True, ("wingate",)),
}


@pytest.mark.parametrize("kind", sorted(IMPOSTORS))
async def test_an_impostor_that_greets_with_its_own_smtp_banner_is_never_open(targets, kind):
    """The rule: a tunnel check is open only when our canary's token comes back. These fakes grant the tunnel (200,
    SOCKS granted, "Connected") and then greet as a mail server themselves, even repeating our check id: a `220`
    and a friendly EHLO reply are no proof. None of them ever reaches our canary."""
    make, gateway, faked = IMPOSTORS[kind]
    async with make() as server:
        results = await proxy_port(server.port, targets, step_timeout=0.5,
                                   wingate_ports=frozenset({server.port}) if gateway else frozenset())
    assert [name for name, r in results.items() if r.verdict is Verdict.OPEN or r.confirmed] == []
    for check in faked:
        assert outcome(results, check) == ("closed", "answers_without_tunnel"), (check, results[f"proxy.{check}"].detail)
    assert fakes.IMPOSTOR_BANNER.strip().decode() in "\n".join(
        line.text for check in faked for line in results[f"proxy.{check}"].transcript)  # it did greet us
    assert not targets.canary.sources  # and our canary never saw a check id


async def test_socks5_reply_02_is_destination_denied(targets):
    async with fakes.Socks5Denied() as server:
        results = await proxy_port(server.port, targets, step_timeout=0.5)
    assert outcome(results, "socks5") == ("closed", "destination_denied")


async def test_a_reset_during_a_socks_handshake_is_not_a_proxy_not_an_error(targets):
    async with fakes.ResetsSocks() as server:
        results = await proxy_port(server.port, targets, step_timeout=0.5)
    for check in ("socks4", "socks4a", "socks5"):
        assert outcome(results, check) == ("closed", "not_a_proxy"), (check, results[f"proxy.{check}"].detail)
        assert results[f"proxy.{check}"].detail.startswith(f"the connection failed during the {check.upper()} hand")
    assert outcome(results, "http_get") == ("closed", "not_a_proxy")  # a 404: not a proxy either


async def test_407_is_auth_required(targets):
    async with fakes.AuthRequired() as server:
        results = await proxy_port(server.port, targets, step_timeout=0.5)
    for check in ("http_get", "connect_smtp", "http_post"):
        assert outcome(results, check) == ("auth_required", "auth_required"), check
    assert results["proxy.http_get"].fingerprint["product"] == "Squid"


async def test_tarpit_is_a_timeout_not_closed(targets):
    async with fakes.Tarpit() as server:
        results = await proxy_port(server.port, targets, step_timeout=0.3)
    for check in ("http_get", "connect_smtp", "connect_tls", "http_post"):
        assert outcome(results, check) == ("inconclusive", "timeout"), check
    assert outcome(results, "socks5")[1] == "timeout"


async def test_garbage_is_not_a_proxy(targets):
    async with fakes.Garbage() as server:
        results = await proxy_port(server.port, targets, step_timeout=0.5)
    for check in ("http_get", "connect_smtp", "socks4", "socks5"):
        assert outcome(results, check) == ("closed", "not_a_proxy"), (check, results[f"proxy.{check}"].detail)


async def test_refused_and_filtered_cost_one_connection(targets, refused_port, silent_port):
    slots = Slots()
    results = await proxy_port(refused_port, targets, slots=slots)
    assert {outcome(results, c.removeprefix("proxy.")) for c in results} == {("unreachable", "refused")}
    assert slots.total == 1
    results = await proxy_port(silent_port, targets, connect_timeout=0.3)
    assert {outcome(results, c.removeprefix("proxy.")) for c in results} == {("unreachable", "filtered")}


async def test_connections_stay_within_the_limit(targets):
    slots = Slots(limit=2)
    async with fakes.ForwardingProxy() as server:
        await proxy_port(server.port, targets, slots=slots, step_timeout=0.5)
    assert slots.most == 2  # the checks do run side by side, and never more than the limit


def test_planning_by_family_port_and_canaries(tmp_path):
    from app.probes.canary import Canary

    full = proxy.CanaryTargets(canary=Canary("s"), address="192.0.2.1", name="canary.example",
                               http_base="http://192.0.2.1:80", smtp_port=25, tls_port=443)
    ids = lambda host, port, targets=full: [c.id for c in proxy.planned_checks(host, port, targets)]  # noqa: E731
    assert ids("192.0.2.7", 3128) == ["http_get", "connect_smtp", "connect_tls", "http_post", "socks4", "socks4a",
                                      "socks5", "https_connect"]
    assert "wingate" in ids("192.0.2.7", 23)
    v6 = ids("2001:db8::7", 1080)
    assert "socks4" not in v6 and "socks4a" not in v6 and "socks5" in v6 and "connect_smtp" in v6
    bare = proxy.CanaryTargets(canary=Canary("s"), address="192.0.2.1", smtp_port=25)
    assert ids("192.0.2.7", 8080, bare) == ["connect_smtp", "http_post", "socks4", "socks5", "https_connect"]


def test_tokens_are_per_check_and_secret():
    from app.probes.canary import Canary

    a, b = Canary("one"), Canary("two")
    check_id = a.new_check_id()
    assert a.token(check_id) != b.token(check_id)
    assert a.token(check_id) != a.token(a.new_check_id())
    assert check_id not in a.token(check_id)


async def test_wingate_style_gateway(targets):
    async with fakes.WinGate() as server:
        results = await proxy_port(server.port, targets, step_timeout=0.5,
                                   wingate_ports=frozenset({server.port}))
    assert outcome(results, "wingate") == ("open", "token_returned")
    assert results["proxy.wingate"].fingerprint["product"] == "WinGate"
    assert outcome(results, "http_get") == ("closed", "not_a_proxy")  # a gateway prompt is not an HTTP reply


async def test_a_mail_server_on_the_gateway_port_is_not_a_gateway(targets):
    from fakes import smtp as smtp_fakes

    async with smtp_fakes.FakeSmtpServer(smtp_fakes.Policy()) as server:
        results = await proxy_port(server.port, targets, step_timeout=0.5, wingate_ports=frozenset({server.port}))
    assert outcome(results, "wingate") == ("closed", "not_a_proxy")


@pytest.mark.parametrize("status,reason_text,expected", [
    (407, "Proxy Authentication Required", ("auth_required", "auth_required")),
    (403, "Forbidden", ("closed", "destination_denied")),
    (502, "Bad Gateway", ("inconclusive", "destination_unreachable")),
    (503, "Service Unavailable", ("inconclusive", "destination_unreachable")),
    (504, "Gateway Timeout", ("inconclusive", "destination_unreachable")),
    (500, "Unable to connect", ("inconclusive", "destination_unreachable")),
    (500, "Internal Server Error", ("closed", "not_a_proxy")),
    (200, "OK", ("closed", "answers_without_tunnel")),
    (302, "Found", ("closed", "answers_without_tunnel")),
    (400, "Bad Request", ("closed", "not_a_proxy")),
    (405, "Method Not Allowed", ("closed", "not_a_proxy")),
])
def test_http_status_mapping(status, reason_text, expected):
    finding = proxy.http_status_finding(status, {":reason": reason_text}, "CONNECT")
    assert (finding.verdict.value, finding.reason) == expected


@pytest.mark.parametrize("code,message,expected", [
    (2, "Connection not allowed by ruleset", ("closed", "destination_denied")),
    (1, "General SOCKS server failure", ("inconclusive", "destination_unreachable")),
    (5, "Connection refused", ("inconclusive", "destination_unreachable")),
    (None, "No acceptable authentication methods were offered", ("auth_required", "auth_required")),
    (None, "Unexpected SOCKS authentication method: 2", ("auth_required", "auth_required")),
    (None, "Unexpected SOCKS version number: 72", ("closed", "not_a_proxy")),
])
def test_socks5_error_mapping(code, message, expected):
    from python_socks import ProxyError

    finding = proxy.socks_finding("socks5", ProxyError(message, error_code=code))
    assert (finding.verdict.value, finding.reason) == expected


@pytest.mark.parametrize("code,expected", [
    (0x5B, ("inconclusive", "destination_unreachable")), (0x5C, ("auth_required", "auth_required")),
    (0x5D, ("auth_required", "auth_required")),
])
def test_socks4_error_mapping(code, expected):
    from python_socks import ProxyError

    finding = proxy.socks_finding("socks4", ProxyError("rejected", error_code=code))
    assert (finding.verdict.value, finding.reason) == expected


async def test_the_canary_records_every_connection_and_each_check_source(targets):
    async with fakes.ForwardingProxy() as server:
        results = await proxy_port(server.port, targets, step_timeout=0.5)
    canary = targets.canary
    assert {via for _source, via, _t in canary.connections} >= {"smtp", "http", "tls"}
    assert all(source == "127.0.0.1" for source, _via, _t in canary.connections)
    assert results["proxy.connect_smtp"].verdict is Verdict.OPEN
    assert len(canary.sources) >= 3  # one per check id that reached us


async def test_an_ipv6_target_gets_connect_and_socks5_but_no_socks4(targets):
    server = fakes.ForwardingProxy()
    server.listen_host = "::1"
    async with server:
        results = await proxy_port(server.port, targets, host="::1", step_timeout=0.5)
    assert "proxy.socks4" not in results and "proxy.socks4a" not in results and "proxy.socks5" in results
    assert outcome(results, "connect_smtp") == ("open", "token_returned")
    assert results["proxy.connect_smtp"].host == "::1"


def test_a_check_our_canary_saw_is_never_could_not_reach():
    """Issue 13: Privoxy's 502 for a POST that reached our SMTP canary was explained as "could not reach"."""
    said = proxy.http_status_finding(502, {":reason": "Server or forwarder response invalid"}, "POST")
    assert said.reason == "destination_unreachable"
    finding = proxy._reached_but_not_returned(said, ["192.0.2.7"])
    assert (finding.verdict.value, finding.reason) == ("inconclusive", "answer_not_returned")
    assert finding.note == ("our canary saw this check arrive from 192.0.2.7: the port passed our request on, but our "
                            "canary's answer did not come back through it (POST answered HTTP 502)")
    assert proxy._reached_but_not_returned(said, []) is said  # not seen: what the port said stands
    timeout = proxy.Finding(proxy.Verdict.INCONCLUSIVE, "timeout", "no our canary's token within 2 s")
    assert proxy._reached_but_not_returned(timeout, ["192.0.2.7"]).note.endswith("(no our canary's token within 2 s)")
